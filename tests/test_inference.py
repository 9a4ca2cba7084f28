"""The inference form of a network (unet3plus.models.inference): batch norm folded, side heads dropped, channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unet3plus.models import create_model, predict_proba
from unet3plus.models.inference import fold_batch_norms, inference_network


def trained_looking(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial running statistics and affine parameters (fresh ones fold to the identity)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.3, 3.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.3, 0.3, generator=generator)
    return model.eval()


@pytest.mark.parametrize(("arch", "encoder", "skip_impl"), [
    ("unet3plus", "unet", "naive"), ("unet3plus", "unet", "factored"), ("unet3plus", "vgg16", "auto"),
    ("unet3plus", "resnet101", "auto"), ("unet2plus", "unet", "auto"), ("unet", "resnet101", "auto"),
])  # fmt: skip
def test_folded_network_equals_the_original_in_float64(arch, encoder, skip_impl):
    torch.manual_seed(0)
    model = trained_looking(create_model(arch, encoder=encoder, width=4, skip_impl=skip_impl)).double()
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
