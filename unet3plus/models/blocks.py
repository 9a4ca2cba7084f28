"""Building blocks shared by the encoders and decoders.

Levels are numbered as in the UNet 3+ paper: level 1 is full resolution, level ``k`` is at
scale ``1 / 2 ** (k - 1)``, level 5 (scale 1/16) is the deepest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Sequential):
    """Convolution, batch norm, ReLU; spatial size is kept.

    The convolution has no bias: the batch norm's shift makes it redundant.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: odd kernel size (padding ``kernel_size // 2``).

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3 :class:`ConvBNReLU`: one UNet encoder stage or decoder node.

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class UpConcatBlock(nn.Module):
    """A UNet / UNet++ decoder node: up-convolve a deeper map, concatenate same-scale maps, fuse.

    The 2x up-sampling is a learnt transposed convolution with a 4x4 kernel (stride 2, padding
    1), as in the official UNet / UNet++ code the paper's parameter counts come from.

    Args:
        deep_channels: channels of the map one level deeper.
        skip_channels: total channels of the same-scale maps concatenated to it.
        out_channels: channels of the node's output (also of the up-convolved map).

    Shapes:
        ``deep (B, deep_channels, H/2, W/2)``, ``skips`` each ``(B, *, H, W)``
        -> ``(B, out_channels, H, W)``.
    """

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(deep_channels, out_channels, kernel_size=4, stride=2, padding=1)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels)

    def forward(self, deep: Tensor, skips: list[Tensor]) -> Tensor:
        return self.conv(torch.cat([*skips, self.up(deep)], dim=1))


SKIP_IMPLS = ("auto", "naive", "factored")
AUTO_FACTORED_2X_MIN_CHANNELS = 16


def _thirds(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three channel thirds of ``x`` as separate views (``narrow``: unlike ``chunk``'s, they may
    be modified in place)."""
    third = x.shape[1] // 3
    return tuple(x.narrow(1, k * third, third) for k in range(3))


def _shift_sum(taps: tuple[Tensor, Tensor, Tensor], dim: int) -> Tensor:
    """``out[i] = taps[0][i - 1] + taps[1][i] + taps[2][i + 1]`` along ``dim``, zero beyond the ends.

    This is a 3-tap convolution with zero padding 1 whose channel mixing was already applied to
    each tap. The two outer taps are added in place into slices of the centre one (an
    intermediate of :func:`upsample_conv3x3` that nothing else reads; addition's backward needs
    neither operand), so no padded or cloned copy is made.
    """
    length = taps[1].shape[dim]
    out = taps[1]
    out.narrow(dim, 1, length - 1).add_(taps[0].narrow(dim, 0, length - 1))
    out.narrow(dim, 0, length - 1).add_(taps[2].narrow(dim, 1, length - 1))
    return out


def upsample_conv3x3(x: Tensor, weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``conv2d(interpolate(x, size, bilinear, align_corners=False), weight, padding=1)``, computed factored.

    Bilinear up-sampling is a fixed linear map applied to each channel alone, so it commutes with
    channel mixing, and it is separable: ``up = up_W o up_H``. A 3x3 convolution is the sum over
    its nine taps ``(ky, kx)`` of a 1x1 channel mixing ``W[:, :, ky, kx]`` followed by a shift of
    ``(ky - 1, kx - 1)`` with zero fill (the zero padding). Hence::

        conv3x3(up(x)) = sum_kx shift_x(up_W(sum_ky shift_y(up_H(W[:, :, ky, kx] x))))

    computed as: one 1x1 convolution to ``9 * out_channels`` at the low resolution (the channel
    mixing, 1 / s**2 of the naive convolution's multiply-adds for scale ``s``); up-sampling of
    the height only; the three ``ky`` taps shifted and summed (``3 * out_channels`` left);
    up-sampling of the width; the three ``kx`` taps shifted and summed. A shift along one axis
    commutes with interpolation along the other, and interpolating to the same size along an
    axis is the identity (weights exactly 1 and 0), so the result equals the naive form up to
    float rounding (about 1e-16 relative in float64). Gradients flow to ``weight`` through a
    view, so the parameter and its ``state_dict`` key are those of the naive convolution.

    Args:
        x: ``(B, C_in, h, w)`` low-resolution map.
        weight: ``(C_out, C_in, 3, 3)`` convolution weight (no bias).
        size: ``(H, W)`` output size of the up-sampling.

    Returns:
        ``(B, C_out, H, W)``.
    """
    out_channels, in_channels = weight.shape[:2]
    mixing = weight.permute(2, 3, 0, 1).reshape(9 * out_channels, in_channels, 1, 1)  # rows (ky, kx, out)
    taps = F.conv2d(x, mixing)
    rows = F.interpolate(taps, size=(size[0], x.shape[-1]), mode="bilinear", align_corners=False)
    rows = _shift_sum(_thirds(rows), dim=2)  # channels (kx, out)
    columns = F.interpolate(rows, size=size, mode="bilinear", align_corners=False)
    return _shift_sum(_thirds(columns), dim=3)


def resolve_skip_impl(skip_impl: str, scale: int, in_channels: int, out_channels: int) -> str:
    """``"naive"`` or ``"factored"`` for one full-scale skip that up-samples by ``scale``.

    ``"auto"`` picks the factored form where it measured faster: for every up-sampling by 4 or
    more, and for 2x when the skip has at least ``AUTO_FACTORED_2X_MIN_CHANNELS`` output
    channels (UNet 3+ width >= 16).

    Measured per skip (forward + backward, batch 2, CPU, 1 thread, torch 2.14.1, medians of 9
    interleaved runs on the project's shared 2-core machine under load, 2026-11-29; ms naive ->
    factored; the alternatives "up-sample all 9 taps in 2-D, then 9 slicing adds" and "F.pad,
    then 9 slice adds" were slower than the separable form at all but one skip and were dropped):

    - width 64, 64 x 64 input: x2 from hd5 6.0 -> 4.0, hd4 -> hd3 5.9 -> 4.0, hd3 -> hd2
      79 -> 65, hd2 -> hd1 113 -> 94; x4 18 -> 8.7, 110 -> 46, 126 -> 46; x8 141 -> 15,
      483 -> 124; x16 3145 -> 228.
    - width 8, 96 x 96 input: x2 1.5 -> 1.2, 1.9 -> 14, 27 -> 32, 98 -> 62 (no clear winner: naive
      kept); x4 24 -> 11, 29 -> 24, 106 -> 56; x8 58 -> 16, 100 -> 46.

    Not measured on a GPU yet (``benchmarks/gpu_check.py`` times both paths there).
    """
    if skip_impl not in SKIP_IMPLS:
        raise ValueError(f"skip_impl = {skip_impl!r} is invalid; valid values: {', '.join(map(repr, SKIP_IMPLS))}")
    if skip_impl != "auto":
        return skip_impl
    return "factored" if scale >= 4 or out_channels >= AUTO_FACTORED_2X_MIN_CHANNELS else "naive"


class FullScaleSkip(nn.Module):
    """One full-scale skip connection of UNet 3+: resample a map to the target level, then conv.

    A finer source is max-pooled by ``2 ** (target_level - source_level)`` (ceil mode); a
    coarser one is bilinearly up-sampled to the target size; a same-level one is used as is.
    Then a 3x3 :class:`ConvBNReLU` maps it to ``out_channels``.

    For a coarser source, ``impl`` chooses how "up-sample, then 3x3 convolution" is computed:
    ``"naive"`` as written, ``"factored"`` by :func:`upsample_conv3x3` (the same function, the
    convolution's channel mixing done at the low resolution). Both use the same parameters, so
    the choice is a property of forward only: any ``state_dict`` loads into either.

    Args:
        in_channels: channels of the source map.
        out_channels: channels after the convolution (the paper's 64).
        source_level: level of the source map (1 = full resolution).
        target_level: level of the decoder stage being built.
        skip_impl: ``"auto"``, ``"naive"`` or ``"factored"`` (see :func:`resolve_skip_impl`).

    Shapes:
        ``(B, in_channels, h, w) -> (B, out_channels, *size)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, source_level: int, target_level: int, skip_impl: str = "auto"
    ) -> None:
        super().__init__()
        self.pool_factor = 2 ** max(target_level - source_level, 0)
        scale = 2 ** max(source_level - target_level, 0)
        self.impl = resolve_skip_impl(skip_impl, scale, in_channels, out_channels) if scale > 1 else "naive"
        self.conv = ConvBNReLU(in_channels, out_channels)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.pool_factor > 1:
            x = F.max_pool2d(x, self.pool_factor, ceil_mode=True)
        elif tuple(x.shape[-2:]) != tuple(size):
            if self.impl == "factored":
                conv, norm, activation = self.conv
                mixed = upsample_conv3x3(x, conv.weight, tuple(size))
                if conv.bias is not None:  # batch norm folded into the conv for inference
                    mixed = mixed + conv.bias.view(1, -1, 1, 1)
                return activation(norm(mixed))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.conv(x)


def init_conv_bn(module: nn.Module) -> None:
    """Initialise every convolution and batch norm in ``module`` in place.

    Convolutions: Kaiming normal (fan-out, ReLU gain), zero bias; batch norms: weight 1, bias 0.
    This is also torchvision's initialisation of VGG and ResNet.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
