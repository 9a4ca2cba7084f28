"""Spacing-aware preprocessing (``data.resize_mode: spacing``) and the phantom's field-of-view option."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from unet3plus.config import DataConfig
from unet3plus.data.geometry import VolumeGeometry, resample_to_slices, restore_volume, volume_geometry
from unet3plus.data.phantom import Tissue, synthesize_volume

AFFINES = {
    "lps": np.diag([-0.5, -0.5, 2.0, 1.0]),
    "ras_feet_first": np.diag([0.5, 0.5, -2.0, 1.0]),
    "permuted": np.array([[0, 0.5, 0, 0], [-0.5, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]]),
}


def disk(shape: tuple[int, int, int], pixel_mm: float, radius_mm: float) -> np.ndarray:
    """(X, Y, Z) uint8: a centred cylinder of ``radius_mm``, in voxels of ``pixel_mm``."""
    centres = (np.arange(shape[0]) - (shape[0] - 1) / 2) * pixel_mm
    plane = centres[:, None] ** 2 + centres[None, :] ** 2 <= radius_mm**2
    return np.repeat(plane[:, :, None], shape[2], axis=2).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("size", [24, 40])  # the scaled 20 x 24 plane is cropped (24) or padded (40)
def test_spacing_mode_restores_exactly_what_it_kept(name, size):
    # 2 x 2 blocks of 0.5 mm voxels: resampling to 1 mm and back is exact for nearest neighbours
    blocks = np.random.default_rng(0).integers(1, 1000, size=(10, 12, 3)).astype(np.int16)
    volume = np.kron(blocks, np.ones((2, 2, 1), np.int16))
    geometry = volume_geometry(volume.shape, AFFINES[name], size, "spacing", spacing_mm=1.0)
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


def test_a_larger_field_of_view_pads_the_same_kind_of_body_with_air_and_enlarges_pixels():
    image, tissue, affine = synthesize_volume(np.random.default_rng(3), 64, 8, fov_scale=1.0)
    wide_image, wide_tissue, wide_affine = synthesize_volume(np.random.default_rng(3), 64, 8, fov_scale=2.0)
    assert wide_image.shape == image.shape == (64, 64, 8)
    inner = 32
    pixel, wide_pixel = (float(nib.affines.voxel_sizes(a)[0]) for a in (affine, wide_affine))
    assert wide_pixel == pytest.approx(pixel * 64 / inner)  # same drawn field of view on half the voxels
    border = np.ones((64, 64), bool)
    border[16:48, 16:48] = False
    assert (wide_image[border] == -1024).all() and (wide_tissue[border] == Tissue.AIR).all()
    assert (wide_tissue[16:48, 16:48] == Tissue.LIVER).any()
    # the default phantom is untouched by the option: the digest of these arrays before it existed
    digest = hashlib.sha256(image.tobytes() + tissue.tobytes() + affine.tobytes()).hexdigest()
    assert digest == "640ef8e33bb8e509a1c84bad1b409a9d733e0c33e3922a102dde8fe3dad9fd66"
