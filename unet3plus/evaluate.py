"""Score a checkpoint per 3-D volume on the test split, in each scan's original voxel grid.

For every test case the model runs over the preprocessed 3-slice stacks in slice order; the
probabilities (with and without the CGM gate) go back to the original voxel grid
(:func:`unet3plus.data.geometry.restore_volume`), are thresholded, and are scored against the
original label file with :func:`unet3plus.metrics.volume_metrics` (the paper's metric is Dice per
volume, averaged over volumes). Empty-mask conventions are those of :mod:`unet3plus.metrics`.

Outputs in ``out_dir`` (each written atomically; the two folders are replaced as a whole):

- ``metrics.json``: means over cases of dice, iou, precision, recall, hd95, assd (mm) and
  dice_no_gate; ``hd95_cases``/``assd_cases`` (cases with a finite distance), ``cases``,
  ``dataset``, ``threshold``; ``fp_organ_free``/``fp_organ_free_no_gate``: predicted voxels on
  organ-free axial slices with and without the CGM gate (summed over cases); with a CGM, its
  per-slice classifier scores (:func:`cgm_classifier_metrics`). A mean with no finite value is ``null``.
- ``per_case.csv``: one row per case (NaN distances are empty cells).
- ``predictions/<case_id>.nii.gz``: uint8 0/1 masks with the original affine.
- ``overlays/{best,worst}_<rank>_<case_id>.png``: CT slice with the largest organ area, true
  positives pink, false negatives yellow, false positives green (the paper's colours).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from nibabel.orientations import apply_orientation
from tqdm import tqdm

from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.config import Config
from unet3plus.data.dataset import load_preprocessed, load_sample
from unet3plus.data.geometry import VolumeGeometry, restore_volume
from unet3plus.data.sources import organ_mask, read_volume
from unet3plus.data.transforms import window_hu
from unet3plus.device import describe_device, prepare_model, select_device
from unet3plus.errors import DataError
from unet3plus.metrics import METRIC_NAMES, dice, summarise, volume_metrics
from unet3plus.models import predict_proba
from unet3plus.predict import predict_slices, write_mask
from unet3plus.tracking import data_hash, data_source, open_run
from unet3plus.utils import atomic_path, check_replaceable, file_digest, record_outputs, staged_dir, write_json_atomic

logger = logging.getLogger(__name__)

SUMMARY_METRICS = (*METRIC_NAMES, "dice_no_gate")
PER_CASE_COLUMNS = ("case_id", *SUMMARY_METRICS, "true_voxels", "predicted_voxels", "slices", "fp_organ_free",
                    "fp_organ_free_no_gate")
# RGB of the paper's qualitative figure: true positive, false negative, false positive.
OVERLAY_COLOURS = {
    "true positive": (1.0, 0.41, 0.71),  # pink
    "false negative": (1.0, 0.92, 0.0),  # yellow
    "false positive": (0.0, 0.8, 0.2),  # green
}
OVERLAY_ALPHA = 0.55
PREPROCESSING_KEYS = ("size", "hu_window", "resize_mode", "spacing_mm")


def _test_cases(data_dir: Path, raw_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Manifest rows of the test split and the cases metadata; every label file must exist."""
    manifest, metadata = load_preprocessed(data_dir)
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise DataError(f"{data_dir}: the preprocessed dataset has no test cases to evaluate")
    missing = [
        str(raw_dir / metadata["cases"][case_id]["label"])
        for case_id in test["case_id"].unique()
        if not (raw_dir / metadata["cases"][case_id]["label"]).is_file()
    ]
    if missing:
        raise DataError(f"{raw_dir}: label files of test cases not found (wrong --raw?): {', '.join(missing)}")
    return test, metadata


def digest_test_set(test: pd.DataFrame, metadata: dict[str, Any], raw_dir: Path) -> str:
    """sha256 identifying a test set: its case ids and the content of their raw label files.

    Scores are computed against those labels on their original grid, so two evaluations with the
    same digest scored the same volumes whatever the preprocessing (``register`` compares a new
    version with the champion only on the same test set).
    """
    digest = hashlib.sha256()
    for case_id in sorted(test["case_id"].unique()):
        digest.update(f"{case_id}:{file_digest(raw_dir / metadata['cases'][case_id]['label'])}\n".encode())
    return digest.hexdigest()


def _warn_on_preprocessing_mismatch(
    payload: dict[str, Any], metadata: dict[str, Any], checkpoint: Path, data_dir: Path
) -> None:
    """Prediction preprocesses new scans with the checkpoint's data config: it should match the data's."""
    trained, prepared = json.loads(json.dumps(payload["config"]["data"])), metadata.get("data_config", {})
    differing = [key for key in PREPROCESSING_KEYS if key in prepared and trained.get(key) != prepared[key]]
    if differing:
        logger.warning(
            "%s records data.%s = %s but %s was preprocessed with %s; `unet3plus predict` will use the checkpoint's",
            checkpoint, "/".join(differing), [trained.get(k) for k in differing],
            data_dir, [prepared[k] for k in differing],
        )  # fmt: skip


def _both_probabilities(network: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, S, S) -> (B, 3, S, S): channel 0 with the CGM gate, channel 1 without it, channel 2 the
    CGM's probability that the slice contains the organ (constant over the slice; NaN without CGM)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        output = network(x)
        # One forward pass serves both: predict_proba gates the output it is handed.
        gated = predict_proba(lambda _: output, x)
        ungated = torch.sigmoid(output.logits[:, :1].float())
        if output.class_logits is None:
            organ = torch.full_like(ungated, math.nan)
        else:
            organ = torch.softmax(output.class_logits.float(), dim=1)[:, 1, None, None, None].expand_as(ungated)
        return torch.cat([gated[:, :1], ungated, organ], dim=1)

    return forward


def organ_free_false_positives(prediction: np.ndarray, target: np.ndarray, axial_axis: int) -> int:
    """Predicted voxels on the axial slices whose reference has no organ (over-segmentation the CGM should cut)."""
    other = tuple(axis for axis in range(target.ndim) if axis != axial_axis)
    free = ~target.any(axis=other)
    return int(np.compress(free, prediction, axis=axial_axis).sum())


def cgm_classifier_metrics(organ_probability: np.ndarray, organ_present: np.ndarray) -> dict[str, float]:
    """The CGM as a per-slice classifier of "organ present", scored with scikit-learn.

    Args:
        organ_probability: (N,) the CGM's probability of the organ, per test slice.
        organ_present: (N,) 0/1 truth per slice.

    Returns:
        ``cgm_roc_auc`` and ``cgm_average_precision`` (NaN when only one class is present), and
        the confusion matrix of its verdict (probability > 0.5, as the gate decides):
        ``cgm_tn``, ``cgm_fp``, ``cgm_fn``, ``cgm_tp``.
    """
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    truth = np.asarray(organ_present).astype(int)
    both = len(np.unique(truth)) == 2
    matrix = confusion_matrix(truth, (organ_probability > 0.5).astype(int), labels=[0, 1]).ravel()
    return {
        "cgm_roc_auc": float(roc_auc_score(truth, organ_probability)) if both else math.nan,
        "cgm_average_precision": float(average_precision_score(truth, organ_probability)) if both else math.nan,
        **{f"cgm_{name}": int(count) for name, count in zip(("tn", "fp", "fn", "tp"), matrix)},
    }


def cgm_roc_curve(organ_probability: np.ndarray, organ_present: np.ndarray) -> pd.DataFrame:
    """The CGM's ROC curve over test slices: ``fpr``, ``tpr``, ``threshold`` (scikit-learn's ``roc_curve``).

    scikit-learn's first threshold (infinity: nothing called "organ") is written as 1.0, a
    probability JSON can hold (the KFP ``ClassificationMetrics`` artifact needs that).
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, threshold = roc_curve(np.asarray(organ_present).astype(int), organ_probability)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(threshold, 1.0)})


def _score_case(
    case_id: str,
    rows: pd.DataFrame,
    entry: dict[str, Any],
    forward: Callable[[torch.Tensor], torch.Tensor],
    config: Config,
    device: torch.device,
    data_dir: Path,
    raw_dir: Path,
    layout: str,
    predictions_dir: Path,
) -> dict[str, Any]:
    """Predict one test volume, write its mask and return its per-case row."""
    rows = rows.sort_values("slice_index")
    stacks = np.stack([load_sample(data_dir / path)[0] for path in rows["path"]])
    probabilities = predict_slices(forward, stacks, config.evaluate.batch_size, device, description=f"case {case_id}",
                                   mixed_precision=config.train.mixed_precision)
    geometry = VolumeGeometry.from_dict(entry["geometry"])
    gated, ungated = (restore_volume(probabilities[:, c], geometry) > config.evaluate.threshold for c in (0, 1))
    label = read_volume(raw_dir / entry["label"])
    target = organ_mask(np.asanyarray(label.dataobj), layout).astype(bool)
    spacing = nib.affines.voxel_sizes(label.affine)
    write_mask(predictions_dir / f"{case_id}.nii.gz", gated, label)
    axial_axis = int(np.flatnonzero(np.array(geometry.orientation)[:, 0] == 2)[0])
    return {
        "case_id": case_id,
        **volume_metrics(gated, target, spacing),
        "dice_no_gate": dice(ungated, target),
        "true_voxels": int(target.sum()),
        "predicted_voxels": int(gated.sum()),
        "slices": len(rows),
        "fp_organ_free": organ_free_false_positives(gated, target, axial_axis),
        "fp_organ_free_no_gate": organ_free_false_positives(ungated, target, axial_axis),
        "organ_probability": probabilities[:, 2, 0, 0],
        "organ_present": rows["organ_present"].to_numpy(),
    }


def largest_organ_slice(target: np.ndarray, prediction: np.ndarray) -> int:
    """Index of the axial slice (last axis) with the largest reference organ area.

    Falls back to the largest predicted area when the reference is empty, and to the middle
    slice when both are.

    Args:
        target: (H, W, Z) bool reference mask.
        prediction: (H, W, Z) bool predicted mask.
    """
    for mask in (target, prediction):
        areas = mask.sum(axis=(0, 1))
        if areas.any():
            return int(np.argmax(areas))
    return target.shape[2] // 2


def overlay_rgb(grey: np.ndarray, prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Blend the agreement colours (:data:`OVERLAY_COLOURS`) over a grey image.

    Args:
        grey: (H, W) image in [0, 1].
        prediction: (H, W) bool predicted mask.
        target: (H, W) bool reference mask.

    Returns:
        (H, W, 3) float RGB in [0, 1]: true positives pink, false negatives yellow, false
        positives green (blended with weight :data:`OVERLAY_ALPHA`), background grey.
    """
    rgb = np.repeat(np.asarray(grey, dtype=np.float64)[..., None], 3, axis=-1)
    regions = (prediction & target, ~prediction & target, prediction & ~target)
    for region, colour in zip(regions, OVERLAY_COLOURS.values()):
        rgb[region] = (1 - OVERLAY_ALPHA) * rgb[region] + OVERLAY_ALPHA * np.array(colour)
    return rgb


def render_overlay(image_hu: np.ndarray, prediction: np.ndarray, target: np.ndarray, geometry: VolumeGeometry,
                   hu_window: tuple[float, float], title: str, png_path: str | os.PathLike) -> Path:
    """Draw the axial slice with the largest organ area, coloured by agreement, as a PNG.

    Args:
        image_hu: (X, Y, Z) CT in Hounsfield units, original voxel grid.
        prediction: (X, Y, Z) bool predicted mask.
        target: (X, Y, Z) bool reference mask.
        geometry: the volume's geometry (its orientation puts the slice in display orientation).
        hu_window: grey-level window.
        title: figure title.
        png_path: output file (written atomically).

    Returns:
        ``png_path`` as a Path.
    """
    orientation = np.array(geometry.orientation)
    image, prediction, target = (apply_orientation(np.asarray(v), orientation) for v in (image_hu, prediction, target))
    z = largest_organ_slice(target, prediction)
    rgb = overlay_rgb(window_hu(image[:, :, z], hu_window), prediction[:, :, z], target[:, :, z])
    figure = Figure(figsize=(5, 5.4), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(rgb, interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(f"{title}, slice {z}", fontsize=10)
    axes.legend(handles=[Patch(color=c, label=n) for n, c in OVERLAY_COLOURS.items()], loc="lower center",
                bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, bbox_inches="tight")
    return Path(png_path)


def _overlays(per_case: pd.DataFrame, metadata: dict[str, Any], config: Config, raw_dir: Path,
              predictions_dir: Path, overlays_dir: Path) -> list[Path]:
    """Overlay PNGs of the ``config.evaluate.overlays`` best and worst cases by Dice."""
    count = config.evaluate.overlays
    ranked = per_case.sort_values(["dice", "case_id"], ascending=[False, True])["case_id"].tolist()
    picks = [("best", i + 1, c) for i, c in enumerate(ranked[:count])]
    picks += [("worst", i + 1, c) for i, c in enumerate(ranked[::-1][:count])]
    written = []
    for kind, rank, case_id in picks:
        entry = metadata["cases"][case_id]
        label = np.asanyarray(read_volume(raw_dir / entry["label"]).dataobj)
        target = organ_mask(label, metadata["layout"]).astype(bool)
        prediction = np.asanyarray(nib.load(predictions_dir / f"{case_id}.nii.gz").dataobj).astype(bool)
        image = read_volume(raw_dir / entry["image"]).get_fdata(dtype=np.float32)
        score = float(per_case.loc[per_case["case_id"] == case_id, "dice"].iloc[0])
        written.append(render_overlay(
            image, prediction, target, VolumeGeometry.from_dict(entry["geometry"]), config.data.hu_window,
            f"{kind} {rank}: case {case_id}, Dice {score:.3f}", overlays_dir / f"{kind}_{rank}_{case_id}.png",
        ))
    return written


def _json_safe(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}


def evaluate(config: Config, checkpoint: str | os.PathLike, data_dir: str | os.PathLike,
             raw_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every test case of a preprocessed dataset.

    Args:
        config: ``evaluate`` (threshold, batch_size, overlays, device), ``train.mixed_precision``
            (bf16 + channels_last inference on CUDA), ``data.hu_window`` (overlay
            grey levels) and ``mlflow`` are used.
        checkpoint: checkpoint file (``best.pt``); its ``mlflow_run_id`` receives the results.
        data_dir: preprocessed dataset (``manifest.csv``, ``cases.json``, ``samples/``).
        raw_dir: the raw dataset it was made from (original labels, images and geometry).
        out_dir: output folder (created). Its outputs are replaced only when evaluate wrote them
            (listed in its :data:`unet3plus.utils.OUTPUTS_RECORD`, unchanged since).
        force: replace them whatever they hold.

    Returns:
        The content of ``metrics.json`` (NaN means written as None), which also records what was
        scored: ``checkpoint_sha256`` (content hash of ``checkpoint``) and ``data_hash``
        (:func:`unet3plus.tracking.data_hash` of ``data_dir``), checked by ``register``;
        ``data_source`` (synthetic, lits, msd) and ``test_set`` (:func:`digest_test_set`), which
        decide what ``register`` compares the model with; and ``device``
        (:func:`unet3plus.device.describe_device`), also the run's ``evaluate_device`` tag.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt.
        DataError: the preprocessed dataset is missing or corrupt, has no test case, a raw label
            is missing or unreadable, or the dataset is not the checkpoint's organ.
        UserError: ``out_dir`` holds files evaluate did not write (without ``force``).
    """
    checkpoint, data_dir, raw_dir, out_dir = Path(checkpoint), Path(data_dir), Path(raw_dir), Path(out_dir)
    payload = load_checkpoint(checkpoint)
    test, metadata = _test_cases(data_dir, raw_dir)
    if metadata["dataset"] != payload["dataset"]:
        raise DataError(f"{data_dir}: a {metadata['dataset']} dataset, but {checkpoint} is a {payload['dataset']} model"
                        " (evaluate each organ with its own model)")
    _warn_on_preprocessing_mismatch(payload, metadata, checkpoint, data_dir)
    outputs = [out_dir / name for name in ("predictions", "overlays", "per_case.csv", "metrics.json", "cgm_roc.csv")]
    if not force:
        check_replaceable(out_dir, outputs, "use another --out, or --force")
    scored = {"checkpoint_sha256": file_digest(checkpoint), "data_hash": data_hash(data_dir),
              "data_source": data_source(data_dir), "test_set": digest_test_set(test, metadata, raw_dir)}
    device = select_device(config.evaluate.device, "evaluate.device")
    device_name = describe_device(device)
    logger.info("evaluating on %s", device_name)
    network = prepare_model(model_from_checkpoint(payload), device, config.train.mixed_precision)
    forward = _both_probabilities(network)

    # Each folder is swapped in whole when the with-block ends (overlays first, then predictions).
    with staged_dir(out_dir / "predictions") as predictions_tmp, staged_dir(out_dir / "overlays") as overlays_tmp:
        groups = dict(tuple(test.groupby("case_id", sort=False)))
        rows = [
            _score_case(case_id, groups[case_id], metadata["cases"][case_id], forward, config, device, data_dir,
                        raw_dir, metadata["layout"], predictions_tmp)
            for case_id in tqdm(groups, desc="evaluate", unit="volume")
        ]
        per_case = pd.DataFrame(rows, columns=list(PER_CASE_COLUMNS))
        _overlays(per_case, metadata, config, raw_dir, predictions_tmp, overlays_tmp)
        cgm, roc = {}, None
        if not np.isnan(rows[0]["organ_probability"]).any():
            slices = [np.concatenate([row[key] for row in rows]) for key in ("organ_probability", "organ_present")]
            cgm = cgm_classifier_metrics(*slices)
            roc = None if math.isnan(cgm["cgm_roc_auc"]) else cgm_roc_curve(*slices)
        summary = _json_safe({**summarise(rows, SUMMARY_METRICS), **cgm,
                              "fp_organ_free": int(per_case["fp_organ_free"].sum()),
                              "fp_organ_free_no_gate": int(per_case["fp_organ_free_no_gate"].sum()),
                              "dataset": metadata["dataset"], "threshold": config.evaluate.threshold, **scored,
                              "device": device_name})
    with atomic_path(out_dir / "per_case.csv") as tmp:
        per_case.to_csv(tmp, index=False)
    if roc is not None:  # the CGM's ROC (for the KFP ClassificationMetrics artifact); none without a CGM
        with atomic_path(out_dir / "cgm_roc.csv") as tmp:
            roc.to_csv(tmp, index=False)
    else:
        (out_dir / "cgm_roc.csv").unlink(missing_ok=True)  # a previous evaluation's, checked replaceable above
    write_json_atomic(out_dir / "metrics.json", summary)
    record_outputs(out_dir, outputs)
    logger.info("%s: %d test volumes, mean Dice %.4f (without CGM gate %.4f)", checkpoint, summary["cases"],
                summary["dice"], summary["dice_no_gate"])
    # Where `unet3plus report` finds the predictions, labels and images for its overlay grid.
    places = {"evaluation_dir": out_dir, "raw_dir": raw_dir, "processed_dir": data_dir}
    _log_to_mlflow(config, payload, summary, out_dir, {**{key: str(path.resolve()) for key, path in places.items()},
                                                       "evaluate_device": summary["device"]})
    return summary


def _log_to_mlflow(config: Config, payload: dict[str, Any], summary: dict[str, Any], out_dir: Path,
                   tags: dict[str, str]) -> None:
    """Add the test metrics, ``tags`` and evaluation files to the run they belong to.

    On the model's own test split (the data hash its checkpoint records) that is the training run
    (a new run if it is gone); on other data a separate evaluation run, tagged ``evaluates`` (the
    training run) and ``data_hash``, so that the training run's ``test_*`` metrics stay those of
    its own test split and the ablation report never mixes in other data.
    """
    numbers = {f"test_{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    training_run = payload.get("mlflow_run_id")
    own_data = payload.get("data_hash") == summary["data_hash"]
    if not own_data:
        logger.info("%s is not the data this model was trained on: its results go to a separate evaluation run",
                    tags["processed_dir"])
        tags = {**tags, "evaluates": str(training_run), "data_hash": summary["data_hash"], "dataset": summary["dataset"]}
    name = f"evaluate-{summary['dataset']}" + ("" if own_data else f" on data {summary['data_hash'][:8]}")
    with open_run(config.mlflow, run_id=training_run if own_data else None, run_name=name) as run:
        run.log_metrics(numbers, step=0)
        run.set_tags(tags)
        for name in ("metrics.json", "per_case.csv", "cgm_roc.csv"):
            if (out_dir / name).is_file():
                run.log_artifact(out_dir / name, "evaluation")
        for png in sorted((out_dir / "overlays").glob("*.png")):
            run.log_artifact(png, "evaluation/overlays")
