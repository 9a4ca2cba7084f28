"""Encoders: a registry of backbones that each yield five feature maps at scales 1 .. 1/16.

Every encoder has ``out_channels`` (five ints) and ``forward(x) -> list[Tensor]`` of five maps
``(B, out_channels[k], H / 2**k, W / 2**k)`` for ``k = 0 .. 4`` (``H`` and ``W`` multiples of
16). ``width`` scales every channel count; ``width=64`` is the paper's and, for ``"vgg16"`` and
``"resnet101"``, gives exactly torchvision's layout and ``state_dict`` keys, so a local
torchvision weights file can be loaded. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet3plus.errors import CheckpointError
from unet3plus.models.blocks import DoubleConv, init_conv_bn

logger = logging.getLogger(__name__)


class UNetEncoder(nn.Module):
    """The plain UNet encoder (the paper's "VGG-16" column): five :class:`DoubleConv` stages.

    Channels ``width * (1, 2, 4, 8, 16)`` (64 .. 1024 in the paper), 2x2 max-pool between stages.
    It has no torchvision counterpart, so it takes no weights file.

    Args:
        in_channels: channels of the input image.
        width: channels of the first stage.
    """

    torchvision_ignored_prefixes: tuple[str, ...] | None = None
    own_prefixes: tuple[str, ...] = ()

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        channels = [width * 2**level for level in range(5)]
        inputs = [in_channels, *channels[:-1]]
        self.stages = nn.ModuleList(DoubleConv(c_in, c_out) for c_in, c_out in zip(inputs, channels))
        self.out_channels = tuple(channels)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for level, stage in enumerate(self.stages):
            x = stage(x if level == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features


VGG16_CONVS_PER_STAGE = (2, 2, 3, 3, 3)
VGG16_CHANNEL_MULTIPLIERS = (1, 2, 4, 8, 8)


class VGG16Encoder(nn.Module):
    """The convolutional part of torchvision's ``vgg16_bn``, tapped before each max-pool.

    ``self.features`` is torchvision's ``features`` sequence (conv with bias, batch norm, ReLU;
    max-pools between stages) without its last max-pool, so ``features.N`` keys match
    ``torchvision.models.vgg16_bn().state_dict()`` at ``width=64, in_channels=3``. Channels
    ``width * (1, 2, 4, 8, 8)``: the deepest map has 512 channels at width 64, not 1024.

    Args:
        in_channels: channels of the input image.
        width: channels of the first stage (64 in torchvision).
    """

    torchvision_ignored_prefixes: tuple[str, ...] | None = ("classifier.",)
    own_prefixes: tuple[str, ...] = ()

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []
        c_in = in_channels
        for stage, (convs, multiplier) in enumerate(zip(VGG16_CONVS_PER_STAGE, VGG16_CHANNEL_MULTIPLIERS)):
            if stage > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            c_out = width * multiplier
            for _ in range(convs):
                conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
                layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            self.stage_ends.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.out_channels = tuple(width * m for m in VGG16_CHANNEL_MULTIPLIERS)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.stage_ends:
                features.append(x)
        return features


RESNET101_BLOCKS_PER_LAYER = (3, 4, 23, 3)
BOTTLENECK_EXPANSION = 4  # torchvision's Bottleneck.expansion: a block's output channels per plane


def _bottleneck_layer(in_channels: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """One ResNet layer of torchvision ``Bottleneck`` blocks, laid out as torchvision's ``layerN``.

    The first block carries the stride and a projection shortcut (``downsample``: 1x1 conv, batch
    norm); when ``dilation > 1`` the first block keeps dilation 1 and the others use ``dilation``
    (torchvision's ``replace_stride_with_dilation``).
    """
    from torchvision.models.resnet import Bottleneck  # here: importing torchvision costs every command ~2 s

    out_channels = planes * BOTTLENECK_EXPANSION
    shortcut = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )
    first = Bottleneck(in_channels, planes, stride=stride, downsample=shortcut)
    return nn.Sequential(first, *(Bottleneck(out_channels, planes, dilation=dilation) for _ in range(blocks - 1)))


class ResNet101Encoder(nn.Module):
    """torchvision's ResNet-101 (stem, ``layer1`` .. ``layer4``) plus a full-resolution stage.

    ResNet has no full-resolution features (its 7x7 stem already has stride 2), but UNet 3+
    needs a level-1 map for its finest skips and its full-resolution decoder stage. So a small
    :class:`DoubleConv` stage (``full_resolution``, ``width`` channels, the "unet" encoder's
    first stage) runs on the input beside the stem. The five levels are:

    ========  =====  ===============================================  ================
    level     scale  map                                              channels (w=64)
    ========  =====  ===============================================  ================
    1         1      ``full_resolution(x)``                           64
    2         1/2    ``relu(bn1(conv1(x)))`` (stem, before max-pool)  64
    3         1/4    ``layer1``                                       256
    4         1/8    ``layer2``                                       512
    5         1/16   ``layer4(layer3(.))``, ``layer4`` dilated        2048
    ========  =====  ===============================================  ================

    ``layer4``'s stride is replaced by dilation 2 (DeepLab, torchvision's
    ``replace_stride_with_dilation=[False, False, True]``) so every pretrained weight is used and
    the deepest map stays at 1/16. Strides and dilations do not change weight shapes, so at
    ``width=64, in_channels=3`` the keys other than ``full_resolution.*`` are exactly those of
    ``torchvision.models.resnet101().state_dict()`` without ``fc.*``. ``width`` scales the stem
    and the ``planes`` of every layer (channels ``width * (1, 1, 4, 8, 32)``).

    Args:
        in_channels: channels of the input image.
        width: stem channels (64 in torchvision).
    """

    torchvision_ignored_prefixes: tuple[str, ...] | None = ("fc.",)
    own_prefixes: tuple[str, ...] = ("full_resolution.",)

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.full_resolution = DoubleConv(in_channels, width)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = width
        strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        layers = zip(RESNET101_BLOCKS_PER_LAYER, strides, dilations)
        for index, (blocks, stride, dilation) in enumerate(layers, start=1):
            planes = width * 2 ** (index - 1)
            self.add_module(f"layer{index}", _bottleneck_layer(in_planes, planes, blocks, stride, dilation))
            in_planes = planes * BOTTLENECK_EXPANSION
        self.out_channels = (width, width, 4 * width, 8 * width, 32 * width)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        half = self.relu(self.bn1(self.conv1(x)))
        quarter = self.layer1(self.maxpool(half))
        eighth = self.layer2(quarter)
        sixteenth = self.layer4(self.layer3(eighth))
        return [self.full_resolution(x), half, quarter, eighth, sixteenth]


ENCODERS: dict[str, type[nn.Module]] = {
    "unet": UNetEncoder,
    "vgg16": VGG16Encoder,
    "resnet101": ResNet101Encoder,
}


def create_encoder(name: str, *, in_channels: int, width: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build encoder ``name`` (randomly initialised) and optionally load local torchvision weights.

    Args:
        name: one of :data:`ENCODERS` (``"unet"``, ``"vgg16"``, ``"resnet101"``).
        in_channels: channels of the input image.
        width: channels of the first stage; every channel count scales with it.
        weights: path of a torchvision ``state_dict`` file (``torch.save(model.state_dict())``
            of ``vgg16_bn`` / ``resnet101``), or None. Needs ``width=64`` and ``in_channels=3``.

    Returns:
        The encoder module (``out_channels``: five ints; forward: five maps at 1 .. 1/16).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones), or weights given for
            ``"unet"``, which has no torchvision counterpart.
        CheckpointError: the weights file is missing, unreadable or does not match the layout.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid encoders: {', '.join(map(repr, ENCODERS))}")
    encoder_class = ENCODERS[name]
    if weights is not None and encoder_class.torchvision_ignored_prefixes is None:
        loadable = [repr(n) for n, c in ENCODERS.items() if c.torchvision_ignored_prefixes is not None]
        raise ValueError(
            f"encoder {name!r} has no torchvision counterpart, so encoder_weights must be None "
            f"(got {str(weights)!r}); weights can be loaded for: {', '.join(loadable)}"
        )
    encoder = encoder_class(in_channels, width)
    if weights is not None:
        load_torchvision_weights(encoder, weights)
    return encoder


def load_torchvision_weights(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Copy a local torchvision ``state_dict`` into ``encoder`` (in place).

    Every key of the encoder's torchvision-shaped part must be in the file with the same shape;
    the file's classifier keys (``classifier.*`` / ``fc.*``) are ignored and the encoder's own
    extra layers (ResNet's ``full_resolution``) keep their initialisation.

    Raises:
        CheckpointError: the file is missing, unreadable, not a state dict, or its keys or shapes
            do not match (the message names the file and the first differences).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: encoder weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path}: cannot read encoder weights, the file is truncated or not a torch file ({err})"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (name -> tensor) saved with torch.save(model.state_dict())"
        )
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith(encoder.own_prefixes)}
    provided = {k: v for k, v in state.items() if not k.startswith(encoder.torchvision_ignored_prefixes)}
    problems = [f"missing {k}" for k in sorted(expected.keys() - provided.keys())]
    problems += [f"unexpected {k}" for k in sorted(provided.keys() - expected.keys())]
    problems += [
        f"{k} has shape {tuple(provided[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in provided and provided[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(
            f"{path}: does not match the {type(encoder).__name__} layout ({len(problems)} problems: {shown}). "
            "Torchvision weights need width=64 and in_channels=3 and the matching architecture."
        )
    encoder.load_state_dict(provided, strict=False)
    logger.info("loaded %d encoder tensors from %s", len(provided), path)
