"""unet3plus.data.transforms: the per-volume transforms preprocessing and `predict` share (window, stacks, labels)."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import AFFINES, LITS_AFFINE, reference_dice
from unet3plus.config import DataConfig
from unet3plus.data.geometry import VolumeGeometry, restore_volume
from unet3plus.data.transforms import prepare_label, prepare_volume, window_hu


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0).astype(np.uint8)


def world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) world (RAS mm) position of every voxel, from the affine alone."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)


def config(**changes) -> DataConfig:
    return dataclasses.replace(DataConfig(size=32, workers=1), **changes)


def test_label_round_trip_512_to_320_and_back_keeps_dice_and_affine(tmp_path):
    organ = ellipsoid((512, 512, 40), centre=(300, 230, 21), radii=(140, 100, 15))
    nib.save(nib.Nifti1Image(organ, LITS_AFFINE), tmp_path / "label.nii.gz")
    original = nib.load(tmp_path / "label.nii.gz")
    label = np.asanyarray(original.dataobj)
    masks = prepare_label(label, original.affine, DataConfig(size=320), "msd-spleen")
    _, geometry = prepare_volume(np.zeros(label.shape, np.int16), original.affine, DataConfig(size=320))
    assert masks.shape == (40, 320, 320) and masks.dtype == np.uint8
    geometry = VolumeGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))  # as read from cases.json
    for interpolation in ("nearest", "linear"):
        restored = restore_volume(masks, geometry, interpolation) >= 0.5
        assert restored.shape == label.shape
        assert reference_dice(restored, label) >= 0.99, interpolation
    nib.save(nib.Nifti1Image(restored.astype(np.uint8), geometry.affine), tmp_path / "restored.nii.gz")
    written = nib.load(tmp_path / "restored.nii.gz")
    np.testing.assert_array_equal(written.affine, original.affine)
    assert reference_dice(np.asanyarray(written.dataobj), label) >= 0.99


def test_crop_mode_pads_images_with_the_bottom_of_the_window():
    stacks, _ = prepare_volume(np.zeros((10, 10, 2)), np.eye(4), config(size=14, resize_mode="crop"))
    assert stacks.shape == (2, 3, 14, 14)
    np.testing.assert_allclose(stacks[:, :, 2:12, 2:12], 200.0 / 450.0, rtol=1e-6)  # 0 HU inside
    assert not stacks[:, :, :2].any() and not stacks[:, :, :, 12:].any()  # padding reads as air


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_planes_are_axial_in_radiological_display_order(name):
    affine = AFFINES[name]
    shape = (12, 12, 12)
    world = world_coordinates(shape, affine)
    identity = config(size=12, hu_window=(-1000.0, 1000.0))  # no scaling, window covers every value
    right, anterior, superior = (prepare_volume(world[i], affine, identity)[0][:, 1] * 2000 - 1000 for i in range(3))
    # rows run anterior -> posterior, columns patient right -> left, slices inferior -> superior
    assert (np.diff(anterior, axis=1) < 0).all() and np.allclose(np.diff(anterior, axis=2), 0, atol=1e-3)
    assert (np.diff(right, axis=2) < 0).all() and np.allclose(np.diff(right, axis=1), 0, atol=1e-3)
    assert (np.diff(superior, axis=0) > 0).all() and np.allclose(np.diff(superior, axis=2), 0, atol=1e-3)


def test_window_maps_hu_window_linearly_onto_unit_interval():
    hu = np.array([-1000.0, -200.0, 25.0, 250.0, 3000.0])
    np.testing.assert_allclose(window_hu(hu, (-200.0, 250.0)), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_stacks_hold_previous_current_next_slice_with_repeated_edges():
    volume = np.broadcast_to(np.arange(5, dtype=np.float32), (8, 8, 5))  # value = slice index
    stacks, _ = prepare_volume(volume, np.eye(4), config(size=8, hu_window=(0.0, 4.0)))
    assert stacks.shape == (5, 3, 8, 8) and stacks.dtype == np.float32
    expected = np.array([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]) / 4.0
    np.testing.assert_allclose(stacks[:, :, 4, 4], expected, atol=1e-6)


def test_bilinear_resize_matches_an_independent_half_pixel_reference():
    plane = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    stacks, _ = prepare_volume(plane[:, :, None], np.eye(4), config(size=8, hu_window=(0.0, 1.0)))
    # 2x downsampling with half-pixel centres = mean of each 2x2 block (canonical plane is the volume
    # transposed and flipped for a RAS affine: rows <- -y, columns <- -x)
    canonical = plane[::-1, ::-1].T
    expected = canonical.reshape(8, 2, 8, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(stacks[0, 1], expected, atol=1e-6)


def test_prepare_label_maps_the_layouts_label_values_to_the_organ():
    liver = np.zeros((4, 6, 3), np.int16)
    liver[1, 2, :] = 1  # liver
    liver[2, 3, 1] = 2  # tumour: part of the liver
    spleen = (liver == 1).astype(np.float32)  # MSD labels are 0/1, sometimes stored as floats
    crop = config(size=4, resize_mode="crop")  # keeps every voxel above: the organ count is exact
    liver_masks = prepare_label(liver, np.eye(4), crop, "lits")
    spleen_masks = prepare_label(spleen, np.eye(4), crop, "msd-spleen")
    assert liver_masks.dtype == spleen_masks.dtype == np.uint8
    assert liver_masks.sum() == 4 and spleen_masks.sum() == 3 and (liver_masks >= spleen_masks).all()


def test_prepare_functions_reject_bad_arrays():
    with pytest.raises(ValueError, match="unknown layout"):
        prepare_label(np.zeros((4, 4, 2), np.uint8), np.eye(4), config(), "kits")
    with pytest.raises(ValueError, match="3-D"):
        prepare_volume(np.zeros((4, 4)), np.eye(4), config())
    volume = np.zeros((4, 4, 2))
    volume[1, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare_volume(volume, np.eye(4), config())
