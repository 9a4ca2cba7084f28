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


class FullScaleSkip(nn.Module):
    """One full-scale skip connection of UNet 3+: resample a map to the target level, then conv.

    A finer source is max-pooled by ``2 ** (target_level - source_level)`` (ceil mode); a
    coarser one is bilinearly up-sampled to the target size; a same-level one is used as is.
    Then a 3x3 :class:`ConvBNReLU` maps it to ``out_channels``.

    Args:
        in_channels: channels of the source map.
        out_channels: channels after the convolution (the paper's 64).
        source_level: level of the source map (1 = full resolution).
        target_level: level of the decoder stage being built.

    Shapes:
        ``(B, in_channels, h, w) -> (B, out_channels, *size)``.
    """

    def __init__(self, in_channels: int, out_channels: int, source_level: int, target_level: int) -> None:
        super().__init__()
        self.pool_factor = 2 ** max(target_level - source_level, 0)
        self.conv = ConvBNReLU(in_channels, out_channels)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.pool_factor > 1:
            x = F.max_pool2d(x, self.pool_factor, ceil_mode=True)
        elif tuple(x.shape[-2:]) != tuple(size):
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
