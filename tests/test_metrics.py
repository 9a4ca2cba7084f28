"""Per-volume metrics against hand-computed cases and independent numpy/scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from unet3plus.metrics import dice, summarise, volume_metrics


def reference_overlap(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Float64 set arithmetic, written independently of the library (non-empty masks only)."""
    p, t = pred.astype(np.float64).ravel(), target.astype(np.float64).ravel()
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn), "precision": tp / (tp + fp), "recall": tp / (tp + fn)}


def reference_surface(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """Symmetric HD95 and ASSD from scipy distance transforms of the mask edges (float64)."""

    def edges(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    def directed(source: np.ndarray, destination: np.ndarray) -> np.ndarray:
        distance_to_destination = ndimage.distance_transform_edt(~edges(destination), sampling=spacing)
        return distance_to_destination[edges(source)]

    forward, backward = directed(pred, target), directed(target, pred)
    hd95 = max(np.percentile(forward, 95), np.percentile(backward, 95))
    assd = np.concatenate([forward, backward]).mean()
    return float(hd95), float(assd)


def blob(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def test_dice_hand_computed():
    pred = np.array([[1, 1, 0, 0]], dtype=bool)
    target = np.array([[1, 0, 1, 0]], dtype=bool)
    assert dice(pred, target) == pytest.approx(0.5)
    assert dice(pred, pred) == 1.0
    assert dice(pred, ~pred) == 0.0


def test_dice_both_empty_is_one_and_one_empty_is_zero():
    empty = np.zeros((3, 4, 5), dtype=bool)
    full = np.ones((3, 4, 5), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_accepts_uint8_and_refuses_non_binary_or_mismatched():
    assert dice(np.array([0, 1, 1], np.uint8), np.array([0, 1, 0], np.uint8)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="binary"):
        dice(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros(3, bool), np.zeros(4, bool))


def test_volume_metrics_hand_computed_tiny_volume():
    pred = np.zeros((2, 3, 4), dtype=bool)
    target = np.zeros((2, 3, 4), dtype=bool)
    pred[0, 0, :3] = True  # 3 voxels
    target[0, 0, 1:] = True  # 3 voxels, 2 shared
    target[1, 2, 3] = True  # one more missed voxel
    result = volume_metrics(pred, target, spacing=(1.0, 1.0, 1.0))
    assert result["dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert result["iou"] == pytest.approx(2 / 5)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_volume_metrics_match_numpy_reference_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    target = blob((20, 18, 12), centre=(10, 9, 6), radii=(6, 5, 4))
    pred = blob((20, 18, 12), centre=tuple(rng.uniform(8, 11, 3)), radii=tuple(rng.uniform(3, 6, 3)))
    pred ^= rng.random(pred.shape) < 0.02  # scattered false positives and holes
    spacing = (0.8, 0.7, 2.5)
    result = volume_metrics(pred, target, spacing)
    for name, value in reference_overlap(pred, target).items():
        assert result[name] == pytest.approx(value, rel=1e-12), name
    hd95, assd = reference_surface(pred, target, spacing)
    assert result["hd95"] == pytest.approx(hd95, rel=1e-5)
    assert result["assd"] == pytest.approx(assd, rel=1e-5)


def test_surface_distance_of_two_single_voxels_is_their_distance_in_mm():
    pred = np.zeros((6, 6, 3), dtype=bool)
    target = np.zeros((6, 6, 3), dtype=bool)
    pred[1, 1, 1] = True
    target[4, 5, 1] = True  # 3 voxels along x (2 mm each), 4 along y (1 mm each)
    result = volume_metrics(pred, target, spacing=(2.0, 1.0, 5.0))
    assert result["hd95"] == pytest.approx(math.hypot(6.0, 4.0), rel=1e-6)
    assert result["assd"] == pytest.approx(math.hypot(6.0, 4.0), rel=1e-6)


def test_surface_distance_of_parallel_slabs_is_the_gap_times_the_spacing():
    # One-voxel-thick slabs are all surface; every surface voxel is exactly 3 x 2.5 mm from the other slab.
    pred = np.zeros((6, 4, 5), dtype=bool)
    target = np.zeros((6, 4, 5), dtype=bool)
    pred[1] = True
    target[4] = True
    result = volume_metrics(pred, target, spacing=(2.5, 0.7, 1.3))
    assert result["hd95"] == pytest.approx(7.5, rel=1e-6)
    assert result["assd"] == pytest.approx(7.5, rel=1e-6)
    assert result["dice"] == 0.0


def test_surface_distance_of_offset_cubes_with_anisotropic_spacing():
    shape = (14, 12, 12)
    pred = np.zeros(shape, dtype=bool)
    target = np.zeros(shape, dtype=bool)
    pred[2:8, 3:9, 3:9] = True
    target[5:11, 3:9, 4:10] = True  # shifted 3 voxels along x and 1 along z
    spacing = (2.0, 0.8, 1.25)
    result = volume_metrics(pred, target, spacing)
    hd95, assd = reference_surface(pred, target, spacing)
    assert result["hd95"] == pytest.approx(hd95, rel=1e-5)
    assert result["assd"] == pytest.approx(assd, rel=1e-5)
    # The far faces of the cubes are 3 x 2 mm apart along x; nothing is further than the x shift plus the z shift.
    assert 0 < result["assd"] < result["hd95"] <= math.hypot(6.0, 1.25) + 1e-6
    assert result["dice"] == pytest.approx(2 * (3 * 6 * 5) / (2 * 216))


def test_volume_metrics_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), dtype=bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    both_empty = volume_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert both_empty == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0, "assd": 0.0}
    for pred, target in ((empty, some), (some, empty)):
        result = volume_metrics(pred, target, (1.0, 1.0, 1.0))
        assert result["dice"] == result["iou"] == result["precision"] == result["recall"] == 0.0
        assert math.isnan(result["hd95"]) and math.isnan(result["assd"])


def test_volume_metrics_refuses_bad_spacing():
    mask = np.ones((2, 2, 2), dtype=bool)
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(mask, mask, (1.0, 0.0, 1.0))


def test_summarise_is_nan_aware_and_counts_surface_cases():
    rows = [
        {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 2.0, "assd": 1.0},
        {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "hd95": float("nan"), "assd": float("nan")},
        {"dice": 0.5, "iou": 0.25, "precision": 0.5, "recall": 0.5, "hd95": 4.0, "assd": 3.0},
    ]
    summary = summarise(rows)
    assert summary["cases"] == 3
    assert summary["dice"] == pytest.approx(0.5)
    assert summary["hd95"] == pytest.approx(3.0) and summary["hd95_cases"] == 2
    assert summary["assd"] == pytest.approx(2.0) and summary["assd_cases"] == 2


def _kdtree_surface_distances(pred, target, spacing):
    """Independent reference: surface voxels (mask minus its 6-connected erosion) in world coordinates (mm),
    nearest-neighbour distances both ways with scipy's KD-tree; HD95 = max of the two directed 95th
    percentiles, ASSD = mean over both directions' distances."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial import cKDTree

    def surface_points(mask):
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing, dtype=np.float64)

    a, b = surface_points(pred), surface_points(target)
    a_to_b, b_to_a = cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return hd95, np.concatenate([a_to_b, b_to_a]).mean()


def test_hd95_and_assd_match_a_kdtree_over_surface_points_with_unequal_spacing():
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(36), np.arange(24), indexing="ij"), axis=-1).astype(float)
    spacing = (0.7, 1.3, 2.5)  # mm along x, y, z: all different

    def ellipsoid(centre, radii):
        return (((grid - centre) / radii) ** 2).sum(axis=-1) <= 1.0

    target = ellipsoid((20, 18, 12), (12, 9, 6))
    pred = ellipsoid((23, 16, 13), (10, 10, 5)) | ellipsoid((8, 8, 5), (2, 2, 1.5))  # shifted, plus a blob
    result = volume_metrics(pred, target, spacing)
    hd95, assd = _kdtree_surface_distances(pred, target, spacing)
    assert result["hd95"] == pytest.approx(hd95, rel=1e-6)
    assert result["assd"] == pytest.approx(assd, rel=1e-6)
    # The spacing is applied per axis: the reference with the axes' spacings swapped differs.
    assert _kdtree_surface_distances(pred, target, spacing[::-1])[1] != pytest.approx(assd, rel=1e-3)
