"""The transforms from a CT volume to what the network sees: HU window, canonical orientation, in-plane
resampling, 3-slice stacks, organ masks.

Pure functions of arrays and :class:`~unet3plus.config.DataConfig`, shared by dataset building
(:mod:`unet3plus.data.preprocess`, chunk by chunk) and prediction on a new scan
(:mod:`unet3plus.predict`, whole volumes), so both compute the same input. The way back to the
scan's own voxel grid is :func:`unet3plus.data.geometry.restore_volume`.
"""

from __future__ import annotations

import numpy as np

from unet3plus.config import DataConfig
from unet3plus.data.geometry import (
    VolumeGeometry,
    canonical_slab,
    chunks,
    resample_planes,
    resample_to_slices,
    volume_geometry,
)
from unet3plus.data.sources import organ_mask


def prepare_volume(
    image_hu: np.ndarray, affine: np.ndarray, data_config: DataConfig
) -> tuple[np.ndarray, VolumeGeometry]:
    """CT volume in Hounsfield units -> the network's 3-channel inputs, one per axial slice.

    Maps ``data_config.hu_window`` linearly onto [0, 1] (clipping outside), reorients to the
    canonical orientation (see :mod:`unet3plus.data.geometry`), resizes every axial plane to
    ``size x size`` bilinearly (or centre crops/pads with 0 in ``"crop"`` mode, or resamples to
    ``spacing_mm`` then crops/pads in ``"spacing"`` mode) and stacks each
    slice with its neighbours (previous, current, next; the first and last slice repeat themselves).

    Args:
        image_hu: (X, Y, Z) volume as stored in the file, any real dtype.
        affine: (4, 4) voxel-to-world matrix of the file.
        data_config: uses ``size``, ``hu_window`` and ``resize_mode``.

    Returns:
        ``(stacks, geometry)``: float32 (Z, 3, S, S) in [0, 1], channel 1 is slice z itself;
        and the :class:`VolumeGeometry` that :func:`restore_volume` needs to map predictions back.

    Raises:
        ValueError: not a 3-D volume, NaN voxels, bad affine, or invalid ``data_config``.
    """
    geometry = volume_geometry(np.shape(image_hu), affine, data_config.size, data_config.resize_mode, data_config.spacing_mm)
    _, planes = canonical_slab(np.asarray(image_hu), 0, geometry)
    stacks = np.concatenate([image_chunk(chunk, geometry, data_config.hu_window) for _, chunk in chunks(planes)])
    return stacks[neighbour_index(len(stacks))], geometry


def image_chunk(planes_hu: np.ndarray, geometry: VolumeGeometry, hu_window: tuple[float, float]) -> np.ndarray:
    """Canonical (n, H, W) planes in HU -> float32 (n, S, S) network input in [0, 1].

    The window comes first: crop mode pads with 0, which must mean "below the window", not 0 HU.

    Raises:
        ValueError: NaN voxels.
    """
    windowed = window_hu(planes_hu, hu_window)
    if planes_hu.dtype.kind == "f" and np.isnan(windowed).any():
        raise ValueError(f"image_hu holds {np.isnan(planes_hu).sum()} NaN voxel(s)")
    return resample_planes(windowed, geometry, "linear")


def mask_chunk(labels: np.ndarray, geometry: VolumeGeometry, layout: str) -> np.ndarray:
    """Canonical (n, H, W) label values -> uint8 (n, S, S) organ masks.

    The organ mask is resampled exactly like the image (bilinear, half-pixel centres) and a sample
    pixel is organ where that gives at least 0.5 (at 2x: at least 2 of its 2 x 2 block). Picking
    the nearest voxel instead shifts the mask against the image by up to half a voxel (at 2x every
    pick is the lower-right voxel of its block), which cost a 50-pixel spleen 2.5 points of
    reachable Dice (benchmarks/RESULTS.md, "Training recipe").
    """
    return organ_fraction_mask(resample_planes(organ_mask(labels, layout), geometry, "linear"))


def organ_fraction_mask(fraction: np.ndarray) -> np.ndarray:
    """Bilinearly resampled 0/1 organ masks -> uint8 0/1: organ where at least half of the pixel is."""
    return (fraction >= 0.5).view(np.uint8)


def neighbour_index(depth: int) -> np.ndarray:
    """(depth, 3) slice indices of each slice's (previous, current, next) stack; edges repeat themselves."""
    return np.clip(np.arange(depth)[:, None] + np.array([-1, 0, 1]), 0, depth - 1)


def prepare_label(labels: np.ndarray, affine: np.ndarray, data_config: DataConfig, layout: str) -> np.ndarray:
    """Label volume (X, Y, Z) -> (Z, S, S) uint8 organ masks aligned with :func:`prepare_volume`.

    The layout's organ labels become 1 (:func:`organ_mask`), then the same reorientation and
    in-plane step as the image, thresholded at 0.5 (see :func:`mask_chunk`).

    Args:
        labels: (X, Y, Z) label values as stored in the file (validated for ``layout``).
        affine: the (4, 4) affine of the image it belongs to.
        data_config: uses ``size`` and ``resize_mode``.
        layout: decides which label values are organ.

    Returns:
        uint8 (Z, S, S) with values 0/1.

    Raises:
        ValueError: not 3-D, bad affine or unknown layout.
    """
    geometry = volume_geometry(np.shape(labels), affine, data_config.size, data_config.resize_mode, data_config.spacing_mm)
    return organ_fraction_mask(resample_to_slices(organ_mask(np.asarray(labels), layout), geometry, "linear"))


def window_hu(image_hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Map ``[low, high]`` HU linearly onto [0, 1], clipping outside; returns float32, same shape."""
    low, high = hu_window
    image = np.array(image_hu, dtype=np.float32)
    np.clip(image, low, high, out=image)
    image -= low
    image *= np.float32(1.0 / (high - low))
    return image
