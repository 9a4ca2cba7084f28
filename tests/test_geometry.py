"""unet3plus.data.geometry: slices resampled from any voxel order and restored exactly, in resize, crop and spacing mode."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import AFFINES
from unet3plus.config import DataConfig
from unet3plus.data.geometry import VolumeGeometry, resample_to_slices, restore_volume, volume_geometry


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("mode,size", [("resize", 20), ("crop", 26), ("crop", 20)])
def test_restore_inverts_resample_exactly_without_scaling(name, mode, size):
    volume = np.random.default_rng(0).integers(0, 1000, size=(20, 20, 7)).astype(np.int16)
    geometry = volume_geometry(volume.shape, AFFINES[name], size, mode)
    slices = resample_to_slices(volume, geometry, "nearest")
    assert slices.shape == (geometry.canonical_shape[2], size, size)
    np.testing.assert_array_equal(restore_volume(slices, geometry, "nearest"), volume)


def test_crop_mode_crops_and_pads_around_the_centre_and_restores_zeros_outside():
    volume = np.arange(30 * 16 * 3, dtype=np.float32).reshape(30, 16, 3) + 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS voxel axes: canonical plane [r, c] = volume[c, r]
    geometry = volume_geometry(volume.shape, affine, 20, "crop")
    slices = resample_to_slices(volume, geometry, "linear")
    plane = volume[:, :, 1].T  # (16 rows, 30 columns)
    np.testing.assert_array_equal(slices[1, 2:18, :], plane[:, 5:25])  # rows padded by 2, columns cropped by 5
    assert not slices[1, :2].any() and not slices[1, 18:].any()
    restored = restore_volume(slices, geometry, "linear")
    np.testing.assert_array_equal(restored[5:25], volume[5:25])
    assert not restored[:5].any() and not restored[25:].any()




# ---- spacing mode (``data.resize_mode: spacing``) ----

SPACING_AFFINES = {
    "lps": np.diag([-0.5, -0.5, 2.0, 1.0]),
    "ras_feet_first": np.diag([0.5, 0.5, -2.0, 1.0]),
    "permuted": np.array([[0, 0.5, 0, 0], [-0.5, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]]),
}


def disk(shape: tuple[int, int, int], pixel_mm: float, radius_mm: float) -> np.ndarray:
    """(X, Y, Z) uint8: a centred cylinder of ``radius_mm``, in voxels of ``pixel_mm``."""
    centres = (np.arange(shape[0]) - (shape[0] - 1) / 2) * pixel_mm
    plane = centres[:, None] ** 2 + centres[None, :] ** 2 <= radius_mm**2
    return np.repeat(plane[:, :, None], shape[2], axis=2).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(SPACING_AFFINES))
@pytest.mark.parametrize("size", [24, 40])  # the scaled 20 x 24 plane is cropped (24) or padded (40)
def test_spacing_mode_restores_exactly_what_it_kept(name, size):
    # 2 x 2 blocks of 0.5 mm voxels: resampling to 1 mm and back is exact for nearest neighbours
    blocks = np.random.default_rng(0).integers(1, 1000, size=(10, 12, 3)).astype(np.int16)
    volume = np.kron(blocks, np.ones((2, 2, 1), np.int16))
    geometry = volume_geometry(volume.shape, SPACING_AFFINES[name], size, "spacing", spacing_mm=1.0)
    geometry = VolumeGeometry.from_dict(geometry.to_dict())  # as read back from cases.json
    assert sorted(geometry.scaled_shape) == [10, 12]
    slices = resample_to_slices(volume, geometry, "nearest")
    assert slices.shape == (3, size, size)
    restored = restore_volume(slices, geometry, "nearest")
    kept = restored != 0  # what fell outside the crop comes back as 0, everything else exactly
    np.testing.assert_array_equal(restored[kept], volume[kept])
    assert kept.all() == (size >= 12) and kept.sum() >= 0.8 * volume.size


def test_at_the_target_spacing_spacing_mode_is_crop_mode():
    volume = np.random.default_rng(1).random((30, 22, 4)).astype(np.float32)
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])
    spacing = volume_geometry(volume.shape, affine, 26, "spacing", spacing_mm=0.8)
    crop = volume_geometry(volume.shape, affine, 26, "crop")
    assert spacing.offsets == crop.offsets
    np.testing.assert_array_equal(resample_to_slices(volume, spacing, "linear"), resample_to_slices(volume, crop, "linear"))


def test_the_same_anatomy_at_any_spacing_and_field_of_view_gives_the_same_planes():
    """A 40 mm disk: at 0.5 mm in a 120 mm field of view, and at 1.25 mm in a 200 mm one."""
    fine, coarse = disk((240, 240, 2), 0.5, 40.0), disk((160, 160, 2), 1.25, 40.0)
    planes = {}
    for mode in ("spacing", "resize"):
        for name, volume, pixel in (("fine", fine, 0.5), ("coarse", coarse, 1.25)):
            affine = np.diag([-pixel, -pixel, 2.0, 1.0])
            geometry = volume_geometry(volume.shape, affine, 64, mode, spacing_mm=2.0)
            planes[mode, name] = resample_to_slices(volume, geometry, "nearest")[0].astype(bool)
    for mode in ("spacing", "resize"):
        overlap = (planes[mode, "fine"] & planes[mode, "coarse"]).sum()
        dice = 2 * overlap / (planes[mode, "fine"].sum() + planes[mode, "coarse"].sum())
        if mode == "spacing":  # 40 mm at 2 mm per pixel: area pi * 20^2 pixels either way
            assert dice > 0.97 and abs(planes[mode, "fine"].sum() - np.pi * 400) < 0.05 * np.pi * 400
        else:  # squashed to 64 pixels: the disk covers a different share of each field of view
            assert dice < 0.8


def test_spacing_mode_needs_a_positive_spacing_and_is_a_config_choice():
    with pytest.raises(ValueError, match="spacing_mm"):
        volume_geometry((8, 8, 2), np.eye(4), 8, "spacing", spacing_mm=0.0)
    DataConfig(resize_mode="spacing", spacing_mm=0.7).validate()
