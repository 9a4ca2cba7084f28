"""unet3plus.models.blocks: the factored full-scale skip (``skip_impl``) is the naive one, to float rounding.

References are independent: the naive path is ``F.interpolate`` then ``F.conv2d`` as written, run
in float64; the factored path reorders the linear algebra, so any mistake in taps, shifts or
borders shows up as an O(1) difference, far above the 1e-10 tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unet3plus.config import load_config
from unet3plus.errors import ConfigError
from unet3plus.models import create_model, predict_proba
from unet3plus.models.blocks import FullScaleSkip, upsample_conv3x3

TOLERANCE = 1e-10


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    ("low", "size"),
    [((7, 5), (14, 10)), ((7, 5), (28, 20)), ((3, 5), (24, 40)), ((2, 3), (32, 48)), ((1, 1), (16, 16)),
     ((5, 3), (13, 11))],
    ids=["x2", "x4", "x8", "x16", "1px_x16", "non_integer"],
)
def test_upsample_conv3x3_equals_interpolate_then_conv_in_float64(low, size):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *low, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, 6, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 4, *size, dtype=torch.float64, generator=generator)

    want = F.conv2d(F.interpolate(x, size=size, mode="bilinear", align_corners=False), weight, padding=1)
    want_grads = torch.autograd.grad((want * upstream).sum(), (x, weight))
    got = upsample_conv3x3(x, weight, size)
    got_grads = torch.autograd.grad((got * upstream).sum(), (x, weight))

    assert got.shape == want.shape
    assert _relative(got, want) < TOLERANCE
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert _relative(got_grad, want_grad) < TOLERANCE


def _model(skip_impl: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet3plus", width=4, skip_impl=skip_impl, **options)


def test_factored_unet3plus_equals_naive_outputs_and_every_gradient_at_odd_size_float64():
    """97 x 83 is padded to 112 x 96: the skips up-sample 7 x 6 -> 14 x 12 .. 112 x 96 (x2 .. x16)."""
    naive = _model("naive").double()
    factored = _model("factored").double()
    factored.load_state_dict(naive.state_dict())
    from_deeper = [skip.impl for name, skip in factored.decoder.skips.items() if "_hd" in name]
    assert from_deeper == ["factored"] * 10
    images = torch.rand(2, 3, 97, 83, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    outputs = {}
    for name, model in (("naive", naive), ("factored", factored)):
        torch.manual_seed(5)  # the same CGM dropout mask for both
        output = model(images)
        loss = sum((side * torch.linspace(-1, 1, 83, dtype=torch.float64)).sum() for side in output.side_logits)
        (loss + output.class_logits.square().sum()).backward()
        outputs[name] = output

    for got, want in zip(outputs["factored"].side_logits, outputs["naive"].side_logits):
        assert got.shape == (2, 1, 97, 83)
        assert _relative(got, want) < TOLERANCE
    assert _relative(outputs["factored"].class_logits, outputs["naive"].class_logits) < TOLERANCE
    naive_parameters = dict(naive.named_parameters())
    for name, parameter in factored.named_parameters():
        assert _relative(parameter.grad, naive_parameters[name].grad) < TOLERANCE, name


def _smooth_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth random images: organ-like blobs where channel 1 > 0.5, few pixels near the boundary."""
    coarse = torch.rand(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _train(model: torch.nn.Module, steps: int = 3) -> torch.nn.Module:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        images = _smooth_images(2, 48, 48, seed=step)
        target = (images[:, 1:2] > 0.5).float()
        output = model(images)
        loss = sum(F.binary_cross_entropy_with_logits(side, target) for side in output.side_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(("trained_with", "loaded_into"), [("naive", "factored"), ("factored", "naive")])
def test_model_trained_with_one_path_predicts_the_same_with_the_other(trained_with, loaded_into):
    trained = _train(_model(trained_with))
    other = _model(loaded_into)
    assert list(other.state_dict()) == list(trained.state_dict())
    other.load_state_dict(trained.state_dict())
    other.eval()
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(3))

    want, got = predict_proba(trained, images, gate=False), predict_proba(other, images, gate=False)

    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(got > 0.5, want > 0.5)


def test_bad_skip_impl_is_refused_by_create_model_and_by_the_config():
    with pytest.raises(ValueError, match="skip_impl.*'auto', 'naive', 'factored'"):
        create_model("unet3plus", width=4, skip_impl="fast")
    with pytest.raises(ValueError, match="skip_impl"):
        FullScaleSkip(8, 4, source_level=3, target_level=1, skip_impl="fast")
    with pytest.raises(ConfigError, match="model.skip_impl = 'fast' is invalid"):
        load_config(None, ["model.skip_impl=fast"])
    assert load_config(None, ["model.skip_impl=factored"]).model.skip_impl == "factored"


def test_channels_last_bf16_autocast_inference_gives_the_fp32_masks_within_half_a_percent_dice():
    """The GPU recipe's code path (channels_last, bf16 autocast, factored skips, split batches) run on the CPU."""
    model = _train(_model("factored"), steps=8)
    images = _smooth_images(4, 48, 48, seed=100)
    want = predict_proba(model, images, gate=False) > 0.5

    model.to(memory_format=torch.channels_last)
    model.max_upsample_elements = 2 * model.upsample_elements_per_image(48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = predict_proba(model, images.contiguous(memory_format=torch.channels_last), gate=False) > 0.5

    assert want.any()
    dice = 2 * (got & want).sum() / (got.sum() + want.sum())
    assert dice.item() >= 0.995
