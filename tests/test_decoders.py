"""unet3plus.models.decoders: the maps each decoder returns, and UNet 3+'s twenty full-scale skips."""

from __future__ import annotations

import pytest
import torch

from unet3plus.models import create_model
from unet3plus.models.blocks import FullScaleSkip
from unet3plus.models.decoders import LEVELS, FullScaleDecoder, NestedDecoder, UNetDecoder
from unet3plus.models.model import ARCHITECTURES

WIDTH = 8
ENCODER_CHANNELS = (4, 6, 8, 10, 12)  # unlike any width's doubling: a wrong level's channels show


def _features(height: int = 32, width: int = 48) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(2, c, height >> level, width >> level, generator=generator)
            for level, c in enumerate(ENCODER_CHANNELS)]


# the level of each map a decoder returns, final first: the shapes its docstring promises
LEVELS_OF = {UNetDecoder: (0, 1, 2, 3, 4), NestedDecoder: (0, 0, 0, 0), FullScaleDecoder: (0, 1, 2, 3, 4)}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_decoder_returns_its_maps_final_first_with_the_channels_it_declares(arch):
    decoder_class = ARCHITECTURES[arch][0]
    levels = LEVELS_OF[decoder_class]  # a new architecture's decoder needs its levels here
    decoder = decoder_class(ENCODER_CHANNELS).eval()
    features = _features()
    with torch.no_grad():
        maps = decoder(features)
    assert len(maps) == len(levels) == len(decoder.out_channels)
    for index, (level, channels) in enumerate(zip(levels, decoder.out_channels, strict=True)):
        assert tuple(maps[index].shape) == (2, channels, 32 >> level, 48 >> level), (arch, index)
    if levels[-1] == LEVELS - 1:  # UNet and UNet 3+ supervise the deepest encoder map itself
        assert maps[-1] is features[-1]
    assert type(create_model(arch, width=WIDTH).decoder) is decoder_class


def test_unet3plus_decoder_is_twenty_full_scale_skips_of_one_class():
    decoder = create_model("unet3plus", width=WIDTH).decoder
    expected = {f"hd{t}_{'h' if s <= t else 'hd'}{s}" for t in range(1, 5) for s in range(1, 6)}
    assert set(decoder.skips) == expected
    assert all(type(skip) is FullScaleSkip for skip in decoder.skips.values())
    assert decoder.skips["hd4_h1"].pool_factor == 8 and decoder.skips["hd2_h1"].pool_factor == 2
    assert decoder.skips["hd1_hd5"].pool_factor == 1
    assert decoder.out_channels == (40, 40, 40, 40, 128)
    nested = create_model("unet2plus", width=WIDTH).decoder
    assert set(nested.blocks) == {f"x_{i}_{j}" for j in range(1, 5) for i in range(5 - j)}
