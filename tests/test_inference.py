"""The inference form of a network (unet3plus.models.inference): batch norm folded, side heads dropped, channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unet3plus.models import create_model, predict_proba
from unet3plus.models.inference import fold_batch_norms, inference_network, randomize_batch_norms


def trained_looking(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial running statistics and affine parameters (fresh ones fold to the identity)."""
    return randomize_batch_norms(model).eval()


@pytest.mark.parametrize(("arch", "encoder", "skip_impl"), [
    ("unet3plus", "unet", "naive"), ("unet3plus", "unet", "factored"), ("unet3plus", "vgg16", "auto"),
    ("unet3plus", "resnet101", "auto"), ("unet2plus", "unet", "auto"), ("unet", "resnet101", "auto"),
])  # fmt: skip
def test_folded_network_equals_the_original_in_float64(arch, encoder, skip_impl):
    torch.manual_seed(0)
    model = trained_looking(create_model(arch, encoder=encoder, width=4, skip_impl=skip_impl)).double()
    with torch.no_grad():  # every slice "organ present": every logit is decoded (gating: tests below)
        model.cgm.conv.bias.copy_(torch.tensor([0.0, 100.0]))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    network = inference_network(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert len(network.heads) == 1 and all(not p.requires_grad for p in network.parameters())
    images = torch.rand(2, 3, 48, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(images), network(images.contiguous(memory_format=torch.channels_last))
    assert want.logits.abs().max() > 1e-3
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.class_logits, want.class_logits, rtol=1e-10, atol=1e-10)
    assert len(got.side_logits) == 1
    torch.testing.assert_close(predict_proba(network, images), predict_proba(model, images), rtol=1e-10, atol=1e-10)
    for key, value in model.state_dict().items():  # the original is not touched
        assert torch.equal(value, before[key]), key


def test_float32_folding_is_exact_up_to_rounding():
    torch.manual_seed(0)
    model = trained_looking(create_model("unet3plus", width=8))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    want = predict_proba(model, images)
    got = predict_proba(inference_network(model), images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(create_model("unet", width=4).train())


def half_gated_off(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Shift the CGM's "organ present" bias so that it gates off exactly the lower half of ``images``."""
    with torch.no_grad():
        class_logits = model(images).class_logits
        margins = (class_logits[:, 1] - class_logits[:, 0]).sort().values
        middle = len(margins) // 2
        model.cgm.conv.bias[1] -= (margins[middle - 1] + margins[middle]) / 2
    return model


class DecoderBatches:
    """Records the batch size of every decoder call of ``network``."""

    def __init__(self, network: nn.Module) -> None:
        self.sizes: list[int] = []
        network.decoder.register_forward_pre_hook(lambda module, args: self.sizes.append(len(args[0][0])))


@pytest.mark.parametrize("part_size", [None, 2])
def test_slices_the_cgm_gates_off_are_not_decoded_and_probabilities_are_unchanged(part_size):
    torch.manual_seed(0)
    model = trained_looking(create_model("unet3plus", encoder="resnet101", width=4, cgm=True)).double()
    images = torch.rand(6, 3, 48, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    half_gated_off(model, images)
    network = inference_network(model)
    if part_size:  # the eval-mode split of large batches (INT_MAX up-sampling outputs) keeps the gating
        network.max_upsample_elements = part_size * network.upsample_elements_per_image(48, 40)
    decoded = DecoderBatches(network)
    want, got = predict_proba(model, images), predict_proba(network, images)
    present = model(images).class_logits.argmax(dim=1) == 1
    assert present.sum() == 3
    assert sum(decoded.sizes) == 3 and len(decoded.sizes) == (3 if part_size else 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[~present], torch.zeros_like(got[~present])) and got[present].std() > 1e-3


@pytest.mark.parametrize("organ", [False, True])
def test_batches_with_no_slice_or_every_slice_gated_on(organ):
    torch.manual_seed(0)
    model = trained_looking(create_model("unet3plus", width=4, cgm=True))
    with torch.no_grad():
        model.cgm.conv.bias.copy_(torch.tensor([0.0, 100.0] if organ else [100.0, 0.0]))
    network = inference_network(model)
    decoded = DecoderBatches(network)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = predict_proba(network, images.contiguous(memory_format=torch.channels_last))
    assert decoded.sizes == ([3] if organ else [])
    torch.testing.assert_close(got, predict_proba(model, images), rtol=0, atol=1e-5)
    assert (got.amax() > 0) == organ


def test_randomized_batch_norms_are_seeded_and_not_the_identity():
    first, second = (randomize_batch_norms(create_model("unet", width=4), seed=3) for _ in range(2))
    norms = [m for m in first.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.running_mean.abs().min() > 0 and (m.running_var != 1).all() and (m.weight != 1).all()
                         and (m.bias != 0).all() for m in norms)  # fmt: skip
    others = [m for m in second.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm, other in zip(norms, others):
        for key, value in norm.state_dict().items():
            assert torch.equal(value, other.state_dict()[key]), key
