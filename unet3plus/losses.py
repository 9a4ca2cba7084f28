"""Losses of UNet 3+ (Huang et al., ICASSP 2020, arXiv:2004.08790, section 2.3).

Every side output is supervised by the hybrid loss ``focal + MS-SSIM + IoU`` (pixel, patch and
map level); the side losses are summed (full-scale deep supervision) and the classification-guided
module (CGM) adds a binary cross-entropy on its organ-present verdict. :class:`Criterion` puts the
parts together; the functions below are the parts.

All losses take logits, never probabilities. They run with autocast disabled and promote their
inputs to at least float32 (float64 stays float64, so ``torch.autograd.gradcheck`` works): under
bf16 autocast the sums over whole images and the divisions of MS-SSIM and IoU keep full precision.
Every loss is a mean over its batch (and classes), so its value does not depend on the batch size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from unet3plus.models import SegmentationOutput

# Wang, Simoncelli and Bovik, "Multiscale structural similarity for image quality assessment"
# (2003): the per-scale exponents, the constants K1, K2 and the Gaussian window; UNet 3+ uses them.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_K1, MS_SSIM_K2 = 0.01, 0.03
MS_SSIM_WINDOW = 11
MS_SSIM_SIGMA = 1.5


def _full_precision(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``loss`` with autocast off and its tensor arguments promoted to at least float32."""

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        device_type = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)).device.type
        args = tuple(_at_least_float32(a) if isinstance(a, Tensor) else a for a in args)
        kwargs = {k: _at_least_float32(a) if isinstance(a, Tensor) else a for k, a in kwargs.items()}
        with torch.autocast(device_type=device_type, enabled=False):
            return loss(*args, **kwargs)

    return wrapper


def _at_least_float32(tensor: Tensor) -> Tensor:
    dtype = torch.promote_types(tensor.dtype, torch.float32) if tensor.is_floating_point() else torch.float32
    return tensor.to(dtype)


def _check_maps(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or logits.shape != target.shape:
        raise ValueError(
            "expected logits and target of the same shape (B, C, H, W), "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )


def _check_focal_options(alpha: float, gamma: float) -> None:
    if not (alpha < 0 or 0 <= alpha <= 1):
        raise ValueError(
            f"focal alpha = {alpha!r} is invalid: expected a number in [0, 1], or negative to disable weighting"
        )
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"focal gamma = {gamma!r} is invalid: expected a finite number >= 0")


@_full_precision
def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al., 2017), mean over all elements.

    ``alpha_t * (1 - p_t) ** gamma * BCE(logits, target)``, the same maths as
    ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")``, with differences that only
    matter at the edges: ``1 - p_t`` comes from ``sigmoid(-logits)`` rather than
    ``1 - sigmoid(logits)`` (no cancellation for confident pixels) and is kept above the smallest
    normal float (so ``0 < gamma < 1`` gets no NaN gradient), and any negative ``alpha``
    disables the weighting (torchvision accepts only -1).

    Args:
        logits: raw scores, any shape, e.g. (B, C, H, W).
        target: 0/1 (or soft) labels, the shape of ``logits``.
        alpha: weight of the positive class in [0, 1] (negatives get ``1 - alpha``); negative
            disables the weighting. Default 0.25.
        gamma: focusing exponent >= 0; 0 gives the (alpha-weighted) BCE. Default 2.

    Returns:
        Scalar tensor, float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad ``alpha`` or ``gamma``, or ``target`` not the shape of ``logits``.
    """
    _check_focal_options(alpha, gamma)
    if logits.shape != target.shape:
        raise ValueError(
            f"expected logits and target of the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    miss_probability = torch.sigmoid(-logits) * target + torch.sigmoid(logits) * (1 - target)
    # x ** gamma has an infinite derivative at 0 for gamma < 1; the clamp makes it a zero gradient.
    loss = cross_entropy * miss_probability.clamp_min(torch.finfo(logits.dtype).tiny) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


@_full_precision
def iou_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft IoU (Jaccard) loss per image and class, averaged over batch and classes.

    ``1 - (sum(p * t) + smooth) / (sum(p) + sum(t) - sum(p * t) + smooth)`` with
    ``p = sigmoid(logits)``, sums over H and W. The smoothing keeps the ratio defined: an empty
    prediction on an empty target gives loss 0 (the official code's 0/0 gives NaN).

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, C, H, W) 0/1 (or soft) masks.
        smooth: added to intersection and union, > 0. Default 1.

    Returns:
        Scalar tensor in [0, 1), float32 (float64 for float64 inputs).

    Raises:
        ValueError: ``smooth <= 0`` or mismatched / non-4-D shapes.
    """
    if not (math.isfinite(smooth) and smooth > 0):
        raise ValueError(f"IoU smooth = {smooth!r} is invalid: expected a finite number > 0")
    _check_maps(logits, target)
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum(dim=(2, 3))
    union = probability.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) - intersection
    return (1 - (intersection + smooth) / (union + smooth)).mean()


def _blur(images: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian filter, 'valid' borders: (N, 1, H, W) -> (N, 1, H - k + 1, W - k + 1)."""
    # The images as channels of one depthwise convolution: on CPU about 10x faster than a batch
    # of one-channel images (benchmarks/RESULTS.md, "Losses").
    channels = images.transpose(0, 1)
    count = channels.shape[1]
    for kernel in (window.view(1, 1, 1, -1), window.view(1, 1, -1, 1)):
        channels = F.conv2d(channels, kernel.expand(count, 1, *kernel.shape[2:]), groups=count)
    return channels.transpose(0, 1)


def _ssim_and_contrast_structure(x: Tensor, y: Tensor, window: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Mean SSIM map and mean contrast-structure map per image: (N, 1, H, W) -> (N,), (N,)."""
    c1 = (MS_SSIM_K1 * data_range) ** 2
    c2 = (MS_SSIM_K2 * data_range) ** 2
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = _blur(torch.cat([x, y, x * x, y * y, x * y]), window).chunk(5)
    variance_x = mean_xx - mean_x**2
    variance_y = mean_yy - mean_y**2
    covariance = mean_xy - mean_x * mean_y
    contrast_structure = (2 * covariance + c2) / (variance_x + variance_y + c2)
    luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3)), contrast_structure.mean(dim=(1, 2, 3))


def _ms_ssim_scales(height: int, width: int) -> int:
    """Scales that keep one full window at the coarsest scale (5 when the smaller side > 160)."""
    side = min(height, width)
    if side < MS_SSIM_WINDOW:
        raise ValueError(
            f"MS-SSIM needs images of at least {MS_SSIM_WINDOW}x{MS_SSIM_WINDOW} pixels, got {height}x{width}"
        )
    return sum(math.ceil(side / 2**scale) >= MS_SSIM_WINDOW for scale in range(len(MS_SSIM_WEIGHTS)))


@_full_precision
def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Multi-scale structural similarity (Wang et al., 2003), per image and channel, then averaged.

    ``MS-SSIM = (l_M * cs_M) ** w_M * prod_{j < M} cs_j ** w_j`` with luminance ``l`` and
    contrast-structure ``cs`` the means of their maps under an 11-pixel Gaussian window
    (sigma 1.5, no padding), ``C1 = (0.01 * data_range) ** 2``, ``C2 = (0.03 * data_range) ** 2``,
    weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333 and a 2x2 average pool between scales
    (``ceil_mode``: an odd last row or column is averaged on its own). Negative ``cs`` (and
    last-scale SSIM) values are set to 0 before the fractional powers, as ``pytorch_msssim``
    does, which would otherwise give NaN; such an image (prediction anti-correlated with the
    target at some scale) has similarity 0 and gets no MS-SSIM gradient.

    Small inputs: the standard 5 scales need the smaller side to exceed (11 - 1) * 2**4 = 160.
    Smaller images use the largest number of scales M <= 5 whose coarsest scale still holds a
    full window (``ceil(side / 2 ** (M - 1)) >= 11``), with the first M weights rescaled to the
    sum of all five (1.0001, so that 5 scales are exactly the standard): 64x64 uses 3 scales,
    16x16 one (SSIM ** 1.0001). The window and its sigma never change.

    Args:
        x: (B, C, H, W) images, e.g. probabilities.
        y: (B, C, H, W) images, e.g. 0/1 masks.
        data_range: value range of the images (1 for probabilities), > 0. Default 1.

    Returns:
        Scalar similarity in [0, 1], float32 (float64 for float64 inputs); 1 for identical images.

    Raises:
        ValueError: mismatched or non-4-D shapes, a side below 11 pixels, ``data_range <= 0``.
    """
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"MS-SSIM data_range = {data_range!r} is invalid: expected a finite number > 0")
    _check_maps(x, y)
    height, width = x.shape[2:]
    scales = _ms_ssim_scales(height, width)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    weights = weights * (sum(MS_SSIM_WEIGHTS) / weights.sum())
    coordinates = torch.arange(MS_SSIM_WINDOW, dtype=x.dtype, device=x.device) - MS_SSIM_WINDOW // 2
    window = torch.exp(-(coordinates**2) / (2 * MS_SSIM_SIGMA**2))
    window = window / window.sum()
    # Channels become images of their own: the similarity is per image and channel.
    x = x.reshape(-1, 1, height, width)
    y = y.reshape(-1, 1, height, width)
    similarity = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for scale in range(scales - 1):
        _, contrast_structure = _ssim_and_contrast_structure(x, y, window, data_range)
        similarity = similarity * torch.relu(contrast_structure) ** weights[scale]
        x = F.avg_pool2d(x, kernel_size=2, ceil_mode=True)
        y = F.avg_pool2d(y, kernel_size=2, ceil_mode=True)
    last_ssim, _ = _ssim_and_contrast_structure(x, y, window, data_range)
    similarity = similarity * torch.relu(last_ssim) ** weights[-1]
    return similarity.mean()


@_full_precision
def ms_ssim_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``1 - ms_ssim(sigmoid(logits), target)`` with ``data_range = 1``.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, C, H, W) 0/1 masks.

    Returns:
        Scalar tensor in [0, 1], float32 (float64 for float64 inputs).

    Raises:
        ValueError: as :func:`ms_ssim`.
    """
    return 1 - ms_ssim(torch.sigmoid(logits), target, data_range=1.0)


@_full_precision
def cgm_loss(class_logits: Tensor, organ_present: Tensor) -> Tensor:
    """BCE of the classification-guided module, as the paper's sigmoid + BCE on both outputs.

    Each of the two logits gets a sigmoid and a binary cross-entropy against the one-hot target
    (index 1 = organ present), mean over batch and the two outputs.

    Args:
        class_logits: (B, 2) raw scores (absent, present).
        organ_present: (B,) 0/1 flags.

    Returns:
        Scalar tensor, float32 (float64 for float64 inputs).

    Raises:
        ValueError: ``class_logits`` not (B, 2) or ``organ_present`` not (B,).
    """
    if class_logits.dim() != 2 or class_logits.shape[1] != 2 or organ_present.shape != class_logits.shape[:1]:
        raise ValueError(
            "expected class_logits (B, 2) and organ_present (B,), "
            f"got {tuple(class_logits.shape)} and {tuple(organ_present.shape)}"
        )
    one_hot = torch.stack([1 - organ_present, organ_present], dim=1)
    return F.binary_cross_entropy_with_logits(class_logits, one_hot)


class Criterion(nn.Module):
    """The full UNet 3+ training loss: hybrid loss summed over side outputs, plus the CGM term.

    ``total = sum over side outputs s of (focal_weight * focal(s) + ms_ssim_weight *
    ms_ssim_loss(s) + iou_weight * iou(s)) + cgm_weight * cgm_loss(class_logits)``.
    The keyword arguments are the fields of :class:`unet3plus.config.LossConfig`, so
    ``Criterion(**dataclasses.asdict(config.loss))`` works.

    A part whose weight is 0 is neither computed nor reported; the CGM part needs
    ``class_logits`` (a model without CGM has none).

    Args:
        focal_weight, ms_ssim_weight, iou_weight: weights of the hybrid loss parts, >= 0, at
            least one of them > 0. Default 1 each.
        focal_alpha: positive-class weight of the focal loss in [0, 1], negative to disable.
            Default 0.25.
        focal_gamma: focusing exponent of the focal loss, >= 0. Default 2.
        cgm_weight: weight of the CGM's BCE, >= 0. Default 1.

    Raises:
        ValueError: any option out of range, naming it and its value.
    """

    def __init__(
        self,
        focal_weight: float = 1.0,
        ms_ssim_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cgm_weight: float = 1.0,
    ) -> None:
        super().__init__()
        weights = {"focal": focal_weight, "ms_ssim": ms_ssim_weight, "iou": iou_weight, "cgm": cgm_weight}
        for name, weight in weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{name}_weight = {weight!r} is invalid: expected a finite number >= 0")
        if focal_weight + ms_ssim_weight + iou_weight == 0:
            raise ValueError("focal_weight, ms_ssim_weight and iou_weight are all 0: at least one must be > 0")
        _check_focal_options(focal_alpha, focal_gamma)
        losses = {
            "focal": functools.partial(focal_loss, alpha=focal_alpha, gamma=focal_gamma),
            "ms_ssim": ms_ssim_loss,
            "iou": iou_loss,
        }
        self.segmentation_terms = [(name, weights[name], loss) for name, loss in losses.items() if weights[name] > 0]
        self.cgm_weight = cgm_weight

    def forward(self, output: SegmentationOutput, mask: Tensor, organ_present: Tensor) -> dict[str, Tensor]:
        """Compute the loss and its parts.

        Args:
            output: a :class:`unet3plus.models.SegmentationOutput` (only ``side_logits``, each
                (B, C, H, W), and ``class_logits``, (B, 2) or None, are read).
            mask: (B, C, H, W) float 0/1 ground truth.
            organ_present: (B,) float 0/1, whether each slice contains the organ.

        Returns:
            ``{"total": scalar with grad, "focal", "ms_ssim", "iou", "cgm": detached scalars}``;
            each segmentation part is summed over side outputs like the total (unweighted),
            parts with weight 0 are absent and "cgm" needs ``class_logits``.

        Raises:
            ValueError: no side outputs, or a side output, ``class_logits`` or ``organ_present``
                whose shape does not match ``mask`` (the message gives the shapes).
        """
        if not output.side_logits:
            raise ValueError("output.side_logits is empty: expected at least one (B, C, H, W) map")
        for index, side in enumerate(output.side_logits):
            if mask.dim() != 4 or side.shape != mask.shape:
                raise ValueError(
                    f"side output {index} has shape {tuple(side.shape)} but mask has {tuple(mask.shape)}: "
                    "expected both (B, C, H, W) and equal"
                )
        parts = {
            name: torch.stack([loss(side, mask) for side in output.side_logits]).sum()
            for name, _, loss in self.segmentation_terms
        }
        total = sum(weight * parts[name] for name, weight, _ in self.segmentation_terms)
        if output.class_logits is not None and self.cgm_weight > 0:
            if output.class_logits.shape != (mask.shape[0], 2) or organ_present.shape != mask.shape[:1]:
                raise ValueError(
                    f"expected class_logits ({mask.shape[0]}, 2) and organ_present ({mask.shape[0]},) for a mask "
                    f"{tuple(mask.shape)}, got {tuple(output.class_logits.shape)} and {tuple(organ_present.shape)}"
                )
            parts["cgm"] = cgm_loss(output.class_logits, organ_present)
            total = total + self.cgm_weight * parts["cgm"]
        return {"total": total, **{name: value.detach() for name, value in parts.items()}}
