"""unet3plus.models.model (create_model, predict_proba): one shared tester over arch x encoder x options, from the registries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unet3plus.losses import Criterion
from unet3plus.models import ENCODERS as ENCODER_REGISTRY
from unet3plus.models import SegmentationOutput, create_model, predict_proba
from unet3plus.models.model import ARCHITECTURES

# The registries, so a new architecture or encoder is tested without editing this file.
ARCHS = tuple(ARCHITECTURES)
ENCODERS = tuple(ENCODER_REGISTRY)
SIDE_OUTPUTS = {"unet": 5, "unet2plus": 4, "unet3plus": 5}  # supervised maps with deep supervision (the paper)
WIDTH = 8


def test_the_registries_hold_the_papers_models_and_each_has_its_expected_side_outputs():
    assert {"unet", "unet2plus", "unet3plus"} <= set(ARCHS) and {"unet", "vgg16", "resnet101"} <= set(ENCODERS)
    assert set(SIDE_OUTPUTS) == set(ARCHS)  # a new architecture needs its expected number of supervised maps


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cgm", [True, False], ids=["cgm", "no_cgm"])
@pytest.mark.parametrize("deep_supervision", [True, False], ids=["ds", "no_ds"])
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_shapes_and_every_parameter_gets_a_gradient(arch, encoder, deep_supervision, cgm):
    torch.manual_seed(0)
    model = create_model(arch, encoder=encoder, deep_supervision=deep_supervision, cgm=cgm, num_classes=2, width=WIDTH)
    output = model(_images(2, 64, 64))

    assert isinstance(output, SegmentationOutput)
    assert len(output.side_logits) == (SIDE_OUTPUTS[arch] if deep_supervision else 1)
    assert output.side_logits[0] is output.logits
    assert all(side.shape == (2, 2, 64, 64) for side in output.side_logits)
    if cgm:
        assert output.class_logits.shape == (2, 2)
    else:
        assert output.class_logits is None

    target = torch.zeros(2, 2, 64, 64)
    target[:, :, 16:40, 20:50] = 1
    loss = sum(F.binary_cross_entropy_with_logits(side, target) for side in output.side_logits)
    if cgm:
        loss = loss + F.cross_entropy(output.class_logits, torch.tensor([1, 0]))
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not unused, f"parameters without a finite gradient: {unused[:5]}"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_odd_size_is_zero_padded_to_multiple_of_16_and_cropped_back(arch, encoder):
    torch.manual_seed(0)
    model = create_model(arch, encoder=encoder, width=WIDTH).eval()
    x = _images(1, 97, 83)
    with torch.no_grad():
        output = model(x)
        padded = model(F.pad(x, (0, 96 - 83, 0, 112 - 97)))

    assert len(output.side_logits) == SIDE_OUTPUTS[arch]
    for side, side_padded in zip(output.side_logits, padded.side_logits, strict=True):
        assert side.shape == (1, 1, 97, 83)
        torch.testing.assert_close(side, side_padded[..., :97, :83])
    torch.testing.assert_close(output.class_logits, padded.class_logits)


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (17, 50)])
def test_any_size_from_one_pixel_works_in_train_mode(size):
    model = create_model("unet3plus", width=WIDTH)
    output = model(_images(2, *size))
    assert all(side.shape == (2, 1, *size) for side in output.side_logits)
    sum(side.mean() for side in output.side_logits).backward()


@pytest.mark.parametrize("arch", ARCHS)
def test_predict_proba_is_sigmoid_times_per_slice_cgm_argmax(arch):
    torch.manual_seed(0)
    model = create_model(arch, width=WIDTH).eval()
    x = torch.cat([_images(1, 64, 64, seed=1), 0.2 * _images(1, 64, 64, seed=2)])
    with torch.no_grad():
        # A CGM whose "present" logit is the max over positions of the channel sum of the
        # deepest map and whose "absent" logit is a threshold between the two slices' scores.
        score = model.encoder(x)[-1].sum(dim=1).amax(dim=(1, 2))
        assert score[0] != score[1]
        model.cgm.conv.weight.zero_()
        model.cgm.conv.weight[1].fill_(1.0)
        model.cgm.conv.bias.copy_(torch.stack([score.mean(), torch.tensor(0.0)]))
        present = score > score.mean()
        logits = model(x).logits

    probabilities = predict_proba(model, x)

    assert probabilities.shape == (2, 1, 64, 64) and probabilities.dtype == torch.float32
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0
    for index in range(2):
        if present[index]:
            torch.testing.assert_close(probabilities[index], torch.sigmoid(logits[index]))
        else:
            assert torch.equal(probabilities[index], torch.zeros_like(probabilities[index]))
    # The gate acts only in predict_proba: forward's logits and the ungated probabilities keep
    # the segmentation of the slice judged organ-free.
    torch.testing.assert_close(predict_proba(model, x, gate=False), torch.sigmoid(logits))
    assert (torch.sigmoid(logits) > 0).all()


def test_predict_proba_forced_absent_gate_gives_exact_zeros_and_no_cgm_gives_sigmoid():
    torch.manual_seed(0)
    x = _images(3, 48, 40)
    gated = create_model("unet3plus", encoder="resnet101", width=WIDTH).eval()
    with torch.no_grad():
        gated.cgm.conv.bias.copy_(torch.tensor([1e4, -1e4]))  # class 0, "absent", always wins
    assert torch.equal(predict_proba(gated, x), torch.zeros(3, 1, 48, 40))

    plain = create_model("unet3plus", cgm=False, width=WIDTH).eval()
    with torch.no_grad():
        expected = torch.sigmoid(plain(x).logits)
    torch.testing.assert_close(predict_proba(plain, x), expected)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_gives_identical_outputs(arch, encoder, tmp_path):
    torch.manual_seed(0)
    source = create_model(arch, encoder=encoder, width=WIDTH)
    source(_images(2, 32, 32, seed=3))  # one train step of batch statistics: non-trivial running stats
    source.eval()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    copy = create_model(arch, encoder=encoder, width=WIDTH).eval()
    x = _images(1, 32, 48)
    with torch.no_grad():
        expected = source(x)
        assert not torch.equal(copy(x).logits, expected.logits)
        copy.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        actual = copy(x)
    for got, want in zip(actual.side_logits, expected.side_logits, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(actual.class_logits, expected.class_logits)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"arch": "unet4plus"}, ["'unet4plus'", "'unet'", "'unet2plus'", "'unet3plus'"]),
        ({"arch": "unet3plus", "encoder": "resnet50"}, ["'resnet50'", "'unet'", "'vgg16'", "'resnet101'"]),
        ({"arch": "unet3plus", "width": 0}, ["width", "integer >= 1"]),
        ({"arch": "unet3plus", "width": True}, ["width", "integer >= 1"]),
        ({"arch": "unet3plus", "in_channels": -1}, ["in_channels", "integer >= 1"]),
        ({"arch": "unet3plus", "num_classes": 1.5}, ["num_classes", "integer >= 1"]),
        ({"arch": "unet3plus", "deep_supervision": "yes"}, ["deep_supervision", "True or False"]),
        ({"arch": "unet3plus", "cgm": 1}, ["cgm", "True or False"]),
        ({"arch": "unet3plus", "encoder": "unet", "encoder_weights": "vgg.pth"}, ["'unet'", "'vgg16'", "'resnet101'"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_allowed_values(kwargs, named):
    with pytest.raises(ValueError) as info:
        create_model(**{"width": WIDTH, **kwargs})
    for text in named:
        assert text in str(info.value)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 4, 32, 32), (3, 32, 32), (1, 3, 0, 32)])
def test_bad_input_shape_raises_value_error_naming_expected_channels(shape):
    model = create_model("unet3plus", width=WIDTH)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(shape))


def _paper_layout_parameters(arch: str) -> int:
    """Parameter count of the paper's layouts (width 64, 3 inputs, 1 class, no DS, no CGM), by hand.

    Convolutions followed by batch norm carry no bias; every decoder conv has batch norm.
    """
    f = [64, 128, 256, 512, 1024]

    def conv(c_in, c_out, k=3, bias=False):
        return c_in * c_out * k * k + (c_out if bias else 0)

    def conv_bn(c_in, c_out):
        return conv(c_in, c_out) + 2 * c_out

    def double(c_in, c_out):
        return conv_bn(c_in, c_out) + conv_bn(c_out, c_out)

    def up_node(deep, skips, out):
        return conv(deep, out, k=4, bias=True) + double(out + skips, out)

    encoder = double(3, f[0]) + sum(double(f[k - 1], f[k]) for k in range(1, 5))
    if arch == "unet":
        return encoder + sum(up_node(f[i + 1], f[i], f[i]) for i in range(4)) + conv(64, 1, bias=True)
    if arch == "unet2plus":
        nodes = sum(up_node(f[i + 1], j * f[i], f[i]) for j in range(1, 5) for i in range(5 - j))
        return encoder + nodes + conv(64, 1, k=1, bias=True)
    skips = sum(conv_bn(c, 64) for i in range(4) for c in [*f[: i + 1], *[320] * (3 - i), f[4]])
    return encoder + skips + 4 * conv_bn(320, 320) + conv(320, 1, bias=True)


@pytest.mark.parametrize(("arch", "paper_millions"), [("unet", 39.39), ("unet2plus", 47.18), ("unet3plus", 26.97)])
def test_parameter_counts_match_the_paper(arch, paper_millions):
    model = create_model(arch, encoder="unet", deep_supervision=False, cgm=False, width=64)
    count = sum(p.numel() for p in model.parameters())
    assert count == _paper_layout_parameters(arch)
    assert abs(count / 1e6 - paper_millions) < 0.01
    if arch == "unet3plus":
        full = create_model(arch, encoder="unet", deep_supervision=True, cgm=True, width=64)
        side_heads = 3 * (320 * 9 + 1) + (1024 * 9 + 1)
        cgm = 1024 * 2 + 2
        assert sum(p.numel() for p in full.parameters()) == count + side_heads + cgm


def test_bf16_autocast_channels_last_training_steps_give_finite_loss():
    torch.manual_seed(0)
    model = create_model("unet3plus", width=WIDTH).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = Criterion()
    x = _images(2, 64, 64).contiguous(memory_format=torch.channels_last)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    mask = ((rows - 30) ** 2 + (cols - 34) ** 2 < 15**2).float().expand(2, 1, 64, 64).clone()
    mask[1] = 0
    organ_present = torch.tensor([1.0, 0.0])
    before = model.heads[0].conv.weight.detach().clone()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
            loss = criterion(output, mask, organ_present)["total"]
        assert output.logits.dtype == torch.bfloat16
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.heads[0].conv.weight, before)


# ---- eval batches split below the up-sampling limit (max_upsample_elements) ----


def _unet3plus(skip_impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet3plus", width=4, skip_impl=skip_impl)


def _largest_upsample_batches(model: torch.nn.Module, images: torch.Tensor, limit: int) -> list[int]:
    """Batch sizes the decoder saw in one eval forward with ``max_upsample_elements = limit``."""
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[0][0].shape[0]))
    model.max_upsample_elements = limit
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("skip_impl", ["naive", "factored"])
def test_eval_batches_are_split_below_the_upsample_limit_with_identical_results(skip_impl):
    model = _unet3plus(skip_impl).eval()
    images = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    per_image = model.upsample_elements_per_image(40, 40)
    # naive: the 16x up-sampling of hd5 (64 channels at 48 x 48); factored: the 9 x 4 taps at 48 x 24
    assert per_image == {"naive": 64 * 48 * 48, "factored": 36 * 48 * 24}[skip_impl]

    with torch.no_grad():
        whole = model(images)
    assert _largest_upsample_batches(model, images, 2 * per_image + 1) == [2, 2, 1]
    with torch.no_grad():
        split = model(images)

    assert split.side_logits[0] is split.logits
    for got, want in zip(split.side_logits, whole.side_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.class_logits, whole.class_logits, rtol=1e-5, atol=1e-6)
    assert _largest_upsample_batches(model.train(), images, per_image) == [5]  # training batches stay whole


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_the_free_upsample_bound_is_never_below_the_measured_largest_upsample(arch, encoder):
    for skip_impl in ("naive", "factored"):
        model = create_model(arch=arch, encoder=encoder, width=4, skip_impl=skip_impl).eval()
        for height, width in ((40, 40), (33, 70), (16, 96)):
            measured = model.upsample_elements_per_image(height, width)
            assert measured <= model.upsample_elements_bound(height, width), (skip_impl, height, width)


def test_batches_under_the_free_bound_are_not_measured():
    model = _unet3plus("naive").eval()
    images = torch.rand(3, 3, 40, 40)
    bound = model.upsample_elements_bound(40, 40)
    assert _largest_upsample_batches(model, images, 3 * bound) == [3]
    assert model._upsample_elements == {}  # the meta-device run (about 2 s on first use) never happened
    _largest_upsample_batches(model, images, 3 * bound - 1)
    assert list(model._upsample_elements) == [(40, 40)]  # over the bound: measured


def test_training_forward_runs_the_cgm_after_the_decoder():
    """The order of the forward pass decides the order in which autograd sums the deepest features'
    gradients, and so the trained weights' last bits: a training run stays bit-identical across versions
    only if the CGM keeps running after the decoder (the eval-only decode_present_only mode may run it first)."""
    model = create_model("unet3plus", width=4, cgm=True).train()
    calls: list[str] = []
    model.decoder.register_forward_hook(lambda *args: calls.append("decoder"))
    model.cgm.register_forward_hook(lambda *args: calls.append("cgm"))
    model.decode_present_only = True  # ignored while training
    model(torch.randn(2, 3, 32, 32))
    assert calls == ["decoder", "cgm"]
