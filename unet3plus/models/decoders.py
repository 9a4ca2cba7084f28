"""Decoders of UNet, UNet++ and UNet 3+ over any five-level encoder.

Each decoder takes the encoder's ``out_channels`` (five ints, level 1 first) and, in forward,
its five feature maps; it returns the maps the segmentation heads read, final map first
(``out_channels`` lists their channels in that order). The first map is the one the final
prediction comes from; the others are the deep-supervision side outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unet3plus.models.blocks import ConvBNReLU, FullScaleSkip, UpConcatBlock, init_conv_bn

LEVELS = 5


class UNetDecoder(nn.Module):
    """The UNet decoder: for levels 4 .. 1, up-convolve the previous map and fuse with the skip.

    Decoder map ``d{level}`` has the encoder's channels at that level. Returned maps (final
    first): ``d1, d2, d3, d4`` and the deepest encoder map ``h5``, the same five levels UNet 3+
    supervises.

    Args:
        encoder_channels: channels of the encoder's five maps, level 1 first.
    """

    def __init__(self, encoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        c = encoder_channels
        self.blocks = nn.ModuleDict(
            {f"d{level}": UpConcatBlock(c[level], c[level - 1], c[level - 1]) for level in range(LEVELS - 1, 0, -1)}
        )
        self.out_channels = tuple(c)
        init_conv_bn(self)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        x = features[-1]
        decoded = [x]
        for level in range(LEVELS - 1, 0, -1):
            x = self.blocks[f"d{level}"](x, [features[level - 1]])
            decoded.append(x)
        return decoded[::-1]


class NestedDecoder(nn.Module):
    """The UNet++ decoder: nested nodes ``X(i, j)`` with dense same-level skips.

    Node ``X(i, j)`` (depth ``i = 0 .. 3``, column ``j = 1 .. 4 - i``) up-convolves
    ``X(i + 1, j - 1)`` and fuses it with ``X(i, 0) .. X(i, j - 1)``; ``X(i, 0)`` are the
    encoder maps. Returned maps (final first): ``X(0, 4), X(0, 3), X(0, 2), X(0, 1)``, all at
    full resolution; the final prediction is read from ``X(0, 4)`` (the paper's "accurate
    mode"), the others are the nested deep-supervision outputs.

    Args:
        encoder_channels: channels of the encoder's five maps, level 1 first.
    """

    def __init__(self, encoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        c = encoder_channels
        self.blocks = nn.ModuleDict(
            {
                f"x_{depth}_{column}": UpConcatBlock(c[depth + 1], column * c[depth], c[depth])
                for column in range(1, LEVELS)
                for depth in range(LEVELS - column)
            }
        )
        self.out_channels = (c[0],) * (LEVELS - 1)
        init_conv_bn(self)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        nodes = {(depth, 0): feature for depth, feature in enumerate(features)}
        for column in range(1, LEVELS):
            for depth in range(LEVELS - column):
                same_level = [nodes[depth, k] for k in range(column)]
                nodes[depth, column] = self.blocks[f"x_{depth}_{column}"](nodes[depth + 1, column - 1], same_level)
        return [nodes[0, column] for column in range(LEVELS - 1, 0, -1)]


def _map_name(source_level: int, target_level: int) -> str:
    """``h{k}`` for encoder maps (finer or same level), ``hd{k}`` for decoder maps (deeper)."""
    return f"h{source_level}" if source_level <= target_level else f"hd{source_level}"


class FullScaleDecoder(nn.Module):
    """The UNet 3+ decoder: every stage fuses all five levels through full-scale skips.

    Stage ``hd{i}`` (``i = 4 .. 1``; ``hd5`` is the deepest encoder map) gathers encoder maps
    ``h1 .. h{i}`` (max-pooled down) and decoder maps ``hd{i+1} .. hd5`` (bilinearly
    up-sampled), each through one :class:`FullScaleSkip` to ``cat_channels`` (the encoder's
    level-1 channels, the paper's 64), concatenates the five (``5 * cat_channels``, 320) and
    fuses them with a 3x3 :class:`ConvBNReLU`. The 20 skips live in ``self.skips`` keyed
    ``"hd{i}_{source}"`` (e.g. ``"hd4_h1"``, ``"hd1_hd5"``), the fusions in ``self.fuse``.
    Returned maps (final first): ``hd1, hd2, hd3, hd4, hd5``.

    The ten skips from deeper decoder maps compute "bilinear up-sampling, then 3x3 convolution"
    either as written or factored (see :class:`FullScaleSkip`); ``skip_impl`` chooses, per
    skip for ``"auto"``. Parameters and ``state_dict`` keys do not depend on it.

    Args:
        encoder_channels: channels of the encoder's five maps, level 1 first.
        skip_impl: ``"auto"``, ``"naive"`` or ``"factored"``.
    """

    def __init__(self, encoder_channels: tuple[int, ...], skip_impl: str = "auto") -> None:
        super().__init__()
        c = encoder_channels
        cat_channels = c[0]
        fused_channels = LEVELS * cat_channels
        skips = {}
        for target in range(LEVELS - 1, 0, -1):
            for source in range(1, LEVELS + 1):
                from_decoder = target < source < LEVELS
                in_channels = fused_channels if from_decoder else c[source - 1]
                name = f"hd{target}_{_map_name(source, target)}"
                skips[name] = FullScaleSkip(in_channels, cat_channels, source, target, skip_impl)
        self.skips = nn.ModuleDict(skips)
        self.fuse = nn.ModuleDict(
            {f"hd{target}": ConvBNReLU(fused_channels, fused_channels) for target in range(LEVELS - 1, 0, -1)}
        )
        self.out_channels = (fused_channels,) * (LEVELS - 1) + (c[-1],)
        init_conv_bn(self)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        maps = {f"h{level}": feature for level, feature in enumerate(features, start=1)}
        maps[f"hd{LEVELS}"] = features[-1]
        for target in range(LEVELS - 1, 0, -1):
            size = tuple(features[target - 1].shape[-2:])
            parts = []
            for source in range(1, LEVELS + 1):
                name = _map_name(source, target)
                parts.append(self.skips[f"hd{target}_{name}"](maps[name], size))
            maps[f"hd{target}"] = self.fuse[f"hd{target}"](torch.cat(parts, dim=1))
        return [maps[f"hd{level}"] for level in range(1, LEVELS + 1)]
