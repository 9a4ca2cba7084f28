"""Per-volume segmentation metrics: Dice (the paper's metric), IoU, precision, recall, HD95, ASSD.

Conventions, the same in :func:`volume_metrics`, ``per_case.csv`` and ``metrics.json``:

- Overlap ratios (Dice, IoU, precision, recall) whose denominator is 0 are 1.0 when both masks
  are empty (nothing to find, nothing found) and 0.0 otherwise (a missed or hallucinated organ).
- Surface distances (HD95, ASSD) are in millimetres, computed by MONAI on the mask edges with the
  voxel spacing. They are 0.0 when both masks are empty and NaN when exactly one is empty (no
  surface to measure to); means over cases ignore NaN (``nanmean``) and report how many cases
  had a finite distance (:func:`summarise`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch

METRIC_NAMES = ("dice", "iou", "precision", "recall", "hd95", "assd")
SURFACE_METRICS = ("hd95", "assd")


def _binary(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != bool:
        # One vectorised pass (np.unique would sort a whole CT volume).
        stray = (array != 0) & (array != 1)
        if stray.any():
            raise ValueError(f"{name} must be a binary mask (0/1 or bool), found value {array[stray].flat[0]!r}")
        array = array.astype(bool)
    return array


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _binary("pred", pred), _binary("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    return pred, target


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return float(numerator) / float(denominator)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient ``2|P & T| / (|P| + |T|)`` of two binary masks.

    Args:
        pred: predicted mask, bool or 0/1, any shape.
        target: reference mask, same shape.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty.

    Raises:
        ValueError: the shapes differ or a mask is not binary.
    """
    pred, target = _pair(pred, target)
    intersection = int(np.count_nonzero(pred & target))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(target))
    return _ratio(2 * intersection, total, both_empty=total == 0)


def _surface_distances(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Symmetric HD95 and ASSD in the units of ``spacing`` (see the module docstring for empties)."""
    pred_any, target_any = bool(pred.any()), bool(target.any())
    if not pred_any and not target_any:
        return 0.0, 0.0
    if pred_any != target_any:
        return float("nan"), float("nan")
    # here, not at the top: importing MONAI loads all of it (~3 s), which training never needs
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    # MONAI wants one-hot (B, C, *spatial); one foreground channel, background excluded.
    pred_t = torch.from_numpy(pred[None, None])
    target_t = torch.from_numpy(target[None, None])
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(pred_t, target_t, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(
            pred_t, target_t, include_background=True, symmetric=True, spacing=spacing
        )
    return float(hd95.item()), float(assd.item())


def volume_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Overlap and surface metrics of one 3-D (or 2-D) prediction against its reference.

    Args:
        pred: predicted mask, bool or 0/1, shape (X, Y, Z).
        target: reference mask, same shape and voxel grid.
        spacing: voxel size in millimetres along each axis of the arrays (len == pred.ndim).

    Returns:
        ``{"dice", "iou", "precision", "recall", "hd95", "assd"}`` as floats; HD95 is the symmetric
        95th-percentile Hausdorff distance and ASSD the average symmetric surface distance, both in
        mm. Empty masks follow the module's conventions (ratios 1.0/0.0, distances 0.0/NaN).

    Raises:
        ValueError: shapes differ, a mask is not binary, or ``spacing`` has the wrong length or a
            non-positive value.
    """
    pred, target = _pair(pred, target)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing must be {pred.ndim} positive numbers (mm per voxel), got {spacing}")
    true_positive = int(np.count_nonzero(pred & target))
    predicted = int(np.count_nonzero(pred))
    actual = int(np.count_nonzero(target))
    both_empty = predicted == 0 and actual == 0
    hd95, assd = _surface_distances(pred, target, spacing)
    return {
        "dice": _ratio(2 * true_positive, predicted + actual, both_empty),
        "iou": _ratio(true_positive, predicted + actual - true_positive, both_empty),
        "precision": _ratio(true_positive, predicted, both_empty),
        "recall": _ratio(true_positive, actual, both_empty),
        "hd95": hd95,
        "assd": assd,
    }


def summarise(rows: Iterable[dict[str, float]], names: Sequence[str] = METRIC_NAMES) -> dict[str, float | int]:
    """Mean of each metric over cases, NaN-aware.

    Args:
        rows: one dict per case (e.g. from :func:`volume_metrics`).
        names: metrics to average.

    Returns:
        ``{name: mean}`` (NaN values skipped; NaN when no case has a finite value) plus
        ``"<name>_cases"``: the number of cases that entered each surface-distance mean, and
        ``"cases"``: the number of rows.
    """
    rows = list(rows)
    summary: dict[str, float | int] = {"cases": len(rows)}
    for name in names:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary[name] = float(finite.mean()) if finite.size else float("nan")
        if name in SURFACE_METRICS:
            summary[f"{name}_cases"] = int(finite.size)
    return summary
