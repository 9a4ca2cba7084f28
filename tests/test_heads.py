"""unet3plus.models.heads: the segmentation head and the CGM against float64 numpy references worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet3plus.models.heads import ClassificationGuidedModule, SegmentationHead


def _numpy_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' cross-correlation, as loops: (C, H, W) with (O, C, k, k) -> (O, H, W)."""
    k = weight.shape[-1]
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    out = np.empty((weight.shape[0], *x.shape[1:]))
    for o in range(weight.shape[0]):
        for r in range(x.shape[1]):
            for c in range(x.shape[2]):
                out[o, r, c] = (padded[:, r:r + k, c:c + k] * weight[o]).sum() + bias[o]
    return out


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_the_segmentation_head_is_a_same_size_convolution(kernel_size):
    torch.manual_seed(0)
    head = SegmentationHead(5, 2, kernel_size).double()
    with torch.no_grad():
        head.conv.bias.copy_(torch.tensor([0.25, -0.5], dtype=torch.float64))
    x = torch.rand(2, 5, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        logits = head(x, (6, 7))
    weight, bias = head.conv.weight.detach().numpy(), head.conv.bias.detach().numpy()
    for item in range(2):
        np.testing.assert_allclose(logits[item].numpy(), _numpy_conv(x[item].numpy(), weight, bias), rtol=0, atol=1e-12)


def test_the_segmentation_head_upsamples_bilinearly_with_half_pixel_centres():
    head = SegmentationHead(1, 1, 1).double()
    with torch.no_grad():
        head.conv.weight.fill_(1.0)  # the identity: what comes out is the up-sampling alone
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]], dtype=torch.float64)  # value = 2 * row + column
    with torch.no_grad():
        logits = head(x, (4, 4))
    # 2 -> 4 pixels, half-pixel centres: output i samples input (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped at the borders to 0, 0.25, 0.75, 1; the map is linear, so it is 2 * row + column there.
    at = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(logits[0, 0].numpy(), 2 * at[:, None] + at[None, :], rtol=0, atol=1e-12)


def test_the_cgm_is_the_spatial_maximum_of_a_1x1_convolution_in_eval_mode():
    torch.manual_seed(0)
    cgm = ClassificationGuidedModule(6).double().eval()
    with torch.no_grad():
        cgm.conv.bias.copy_(torch.tensor([0.1, -0.2], dtype=torch.float64))
    deepest = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        logits = cgm(deepest)
    weight, bias = cgm.conv.weight.detach().numpy()[:, :, 0, 0], cgm.conv.bias.detach().numpy()
    per_pixel = np.einsum("oc,bchw->bohw", weight, deepest.numpy()) + bias[None, :, None, None]
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(logits.numpy(), per_pixel.max(axis=(2, 3)), rtol=0, atol=1e-12)


def test_the_cgm_drops_half_the_features_in_training_only():
    torch.manual_seed(0)
    cgm = ClassificationGuidedModule(64).double()
    deepest = torch.rand(2, 64, 3, 3, dtype=torch.float64) + 0.5
    with torch.no_grad():
        evaluated = cgm.eval()(deepest)
        torch.testing.assert_close(cgm(deepest), evaluated, rtol=0, atol=0)  # eval: deterministic
        cgm.train()
        torch.manual_seed(1)
        first = cgm(deepest)
        torch.manual_seed(2)
        second = cgm(deepest)
    assert cgm.dropout.p == 0.5  # the paper's
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)
