"""The ablation study's report, rebuilt from the MLflow runs: the paper's Tables 1 and 2, plots, README table.

Every training run carries an ``ablation`` tag (``main`` or a name of ``ablations.variants``) and is
the child of its study's parent run (:func:`unet3plus.tracking.study_parent`); evaluation adds the
test metrics to it. :func:`collect_runs` takes, per organ, the newest study of the parameters given
(never rows of two studies) and in it the latest run per (name, seed) whose settings are the name's
today; :func:`configuration_table` gives a row per organ for the main model and every name of
``ablations.run`` (architecture, encoder, deep supervision, CGM, loss) with mean and spread over seeds,
or why there is no result (FAILED with its error, not run); :func:`write_report` writes the markdown
tables, naming the studies shown, a CSV, a JSON of the numbers (DVC metrics) and the plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml

from unet3plus import tracking
from unet3plus.config import MAIN, Config, ablation_config
from unet3plus.errors import UserError
from unet3plus.tracking import check_access, configure_for_reading, store_errors
from unet3plus.utils import atomic_path, record_outputs, redact, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

MODEL_LABELS = {"unet": "UNet", "unet2plus": "UNet++", "unet3plus": "UNet 3+"}
ENCODER_LABELS = {"unet": '"VGG-16" (unet)', "vgg16": "VGG-16-BN", "resnet101": "ResNet-101"}
PAPER_PARAMS = {
    ("unet", "unet"): 39.39, ("unet2plus", "unet"): 47.18, ("unet3plus", "unet"): 26.97,
    ("unet", "resnet101"): 55.90, ("unet2plus", "resnet101"): 63.76, ("unet3plus", "resnet101"): 43.55,
}
"""The paper's parameter counts (millions, width 64), by (architecture, encoder)."""
PAPER_DICE = {("unet3plus", "resnet101", True, True, "hybrid"): {"liver": 0.9675, "spleen": 0.9620}}
"""The paper's Dice where its source is certain: UNet 3+ ResNet-101, DS, CGM, hybrid loss (Table 2)."""
KEY = ["model", "encoder", "DS", "CGM", "loss"]
CGM_COLUMNS = ("test_cgm_roc_auc", "test_cgm_average_precision", "test_fp_organ_free", "test_fp_organ_free_no_gate",
               "test_dice_no_gate")
README_BEGIN, README_END = "<!-- results:begin (unet3plus report --readme) -->", "<!-- results:end -->"


def _value(text: Any) -> Any:
    return yaml.safe_load(text) if isinstance(text, str) else text


def parameter_count(model: dict[str, Any]) -> float:
    """Parameters (millions) of the model a run's ``model.*`` params describe, built on the meta device."""
    import torch

    from unet3plus.models import create_model

    with torch.device("meta"):
        network = create_model(**{**model, "encoder_weights": None})
    return sum(p.numel() for p in network.parameters()) / 1e6


@dataclass
class StudyRuns:
    """The runs :func:`write_report` shows, per organ the study of the parameters given.

    Attributes:
        runs: one row per training run kept (see :func:`collect_runs`).
        expected: one row per organ and name of ``main`` + ``ablations.run``: ``dataset``, ``ablation``,
            :data:`KEY`, ``params_m`` (each name gets a row in the tables, "not run" without a run).
        studies: per organ, one line naming the study shown (or saying that none has these parameters).
    """

    runs: pd.DataFrame
    expected: pd.DataFrame
    studies: dict[str, str]


def _describe(config: Config) -> dict[str, Any]:
    """The :data:`KEY` columns and ``params_m`` of the model ``config`` trains."""
    model = dataclasses.asdict(config.model)
    return {"model": model["arch"], "encoder": model["encoder"], "DS": bool(model["deep_supervision"]),
            "CGM": bool(model["cgm"]), "loss": tracking.loss_name(config.loss), "params_m": parameter_count(model)}


def _pick_study(parents: pd.DataFrame, dataset: str, config: Config) -> tuple[str | None, str]:
    """The run id of ``dataset``'s newest study whose settings are ``config``'s (None: none is) and a line naming it."""
    wanted = tracking.study_params(config)
    mine = parents[parents["tags.dataset"] == dataset]

    def differences(study: pd.Series) -> list[str]:
        return [f"{key} ({study.get(f'params.{key}')} there, {value} here)"
                for key, value in wanted.items() if study.get(f"params.{key}") != value]

    matching = [study for _, study in mine.iterrows() if not differences(study)]  # newest first
    if matching:
        study, others = matching[0], len(mine) - 1
        return study["run_id"], (
            f"{dataset}: study `{study['tags.study']}` (data hash {str(study['tags.data_hash'])[:8]}, the settings "
            f"given), started {study['start_time']:%Y-%m-%d %H:%M} UTC"
            + (f"; {others} other stud{'y' if others == 1 else 'ies'} of this organ not shown" if others else ""))
    if mine.empty:
        return None, f"{dataset}: no study"
    latest = mine.iloc[0]
    return None, (f"{dataset}: no study of the settings given; the latest, `{latest['tags.study']}`, differs in "
                  f"{', '.join(differences(latest)[:5])}: run the study (`dvc repro`), or report with its settings")


def collect_runs(config: Config, datasets: list[str] | None = None, kfp_run_id: str | None = None) -> StudyRuns:
    """The runs of the study of ``config``'s parameters, per organ: the main model and each name of ``ablations.run``.

    A study (:func:`unet3plus.tracking.study_parent`) is an organ, a data hash and the base parameters
    (:func:`unet3plus.tracking.study_params`); per organ the newest study whose parameters are ``config``'s is
    shown, never rows of two studies. In it, a run counts for a name when its own parameters are what
    ``config`` says for that name today (an earlier definition of a variant is left out), latest run per seed.

    Args:
        config: the parameters (``params.yaml`` with any ``--set``): study, names and variants, ``mlflow``.
        datasets: only these organs (default: every organ with a study in the experiment).
        kfp_run_id: only the training runs of this Kubeflow run (tag ``kfp_run_id``), so that the
            pipeline's report step covers exactly its own run even when another run of the same
            parameters writes into the same study at the same time.

    Returns:
        :class:`StudyRuns`; ``runs`` has columns ``dataset, ablation, seed, status, error, run_id`` +
        :data:`KEY` + ``params_m`` and every ``test_*`` metric, plus the ``evaluation_dir``/``raw_dir``/
        ``processed_dir`` tags.

    Raises:
        UserError: no such experiment, or no training run in it.
    """
    mlflow_config = config.mlflow
    with store_errors(mlflow_config):  # only the store's errors are reported as such
        uri = configure_for_reading(mlflow_config)  # capped HTTP retries; never creates a store
        check_access(uri)
        where = f"experiment {mlflow_config.experiment!r} at {redact(uri)}"
        if mlflow.get_experiment_by_name(mlflow_config.experiment) is None:
            raise UserError(f"{where}: no such experiment; train and evaluate a model first (e.g. `dvc repro`)")
        runs = mlflow.search_runs(experiment_names=[mlflow_config.experiment], order_by=["attributes.start_time DESC"])
    if "tags.ablation" not in runs or runs["tags.ablation"].isna().all():
        raise UserError(f"{where}: no training run; run `dvc repro` (or `unet3plus train`) first")
    for column in ("tags.study_parent", "tags.study", "tags.mlflow.parentRunId", "tags.kfp_run_id"):
        if column not in runs:
            runs[column] = None
    if kfp_run_id:
        runs = runs[(runs["tags.study_parent"] == "true") | (runs["tags.kfp_run_id"] == kfp_run_id)]
    parents = runs[runs["tags.study_parent"] == "true"]
    variants = {MAIN: config, **{name: ablation_config(config, config.ablations.get(name))
                                 for name in config.ablations.run}}
    wanted = {name: tracking.study_params(variant) for name, variant in variants.items()}
    datasets = sorted(set(runs["tags.dataset"].dropna()) if datasets is None else datasets)
    rows, expected, studies, stale = [], [], {}, 0
    for dataset in datasets:
        study, studies[dataset] = _pick_study(parents, dataset, config)
        expected += [{"dataset": dataset, "ablation": name, **_describe(variant)} for name, variant in variants.items()]
        children = runs[(runs["tags.mlflow.parentRunId"] == study) & runs["tags.ablation"].isin(list(variants))]
        current = children.apply(lambda run: all(run.get(f"params.{key}") == value
                                                 for key, value in wanted[run["tags.ablation"]].items()), axis=1)
        stale += int((~current).sum()) if len(children) else 0
        for _, run in children[current].drop_duplicates(["tags.ablation", "params.train.seed"]).iterrows():
            name = run["tags.ablation"]
            rows.append({
                "dataset": dataset, "ablation": name, "seed": _value(run["params.train.seed"]),
                "status": run["status"], "error": run.get("tags.error") if isinstance(run.get("tags.error"), str) else "",
                "run_id": run["run_id"], **_describe(variants[name]),
                **{key.removeprefix("metrics."): run[key] for key in run.index if key.startswith("metrics.test_")},
                **{tag: run.get(f"tags.{tag}") for tag in ("evaluation_dir", "raw_dir", "processed_dir", "device")},
                "started": run.get("start_time"),
            })
    if stale:
        logger.info("%d run(s) of an earlier definition of a variant left out", stale)
    logger.info("%s: %d training run(s) in the studies shown", where, len(rows))
    columns = ["dataset", "ablation", "seed", "status", "error", "run_id", *KEY, "params_m"]
    return StudyRuns(pd.DataFrame(rows, columns=None if rows else columns), pd.DataFrame(expected), studies)


def configuration_table(collected: StudyRuns) -> pd.DataFrame:
    """Per organ and name (main and ``ablations.run``): mean and spread (sample std) of the test Dice over seeds.

    ``status`` is ``ok``, ``FAILED`` (every run failed; ``error`` says why), ``running``, ``not evaluated``
    or ``not run``; Dice is NaN unless ``ok``.
    """
    rows = []
    runs = collected.runs
    for _, wanted in collected.expected.iterrows():
        dataset, variant = wanted["dataset"], wanted["ablation"]
        group = runs[(runs["dataset"] == dataset) & (runs["ablation"] == variant)] if len(runs) else runs
        key = [wanted[column] for column in KEY]
        dice = group["test_dice"].dropna() if "test_dice" in group else pd.Series(dtype=float)
        failed = group[group["status"] == "FAILED"]
        if len(dice):
            status = "ok"
        elif group.empty:
            status = "not run"
        elif len(failed) == len(group):
            status = "FAILED"
        else:
            status = "running" if (group["status"] == "RUNNING").any() else "not evaluated"
        row = {"dataset": dataset, "variant": variant, **dict(zip(KEY, key)),
               "params_m": wanted["params_m"], "paper_params_m": PAPER_PARAMS.get((key[0], key[1])),
               "dice_mean": dice.mean() if len(dice) else math.nan,
               "dice_std": dice.std() if len(dice) > 1 else math.nan, "seeds": len(dice),
               "paper_dice": PAPER_DICE.get(tuple(key), {}).get(dataset), "status": status,
               "failed_runs": len(failed), "error": "; ".join(e for e in failed["error"] if e) if len(failed) else ""}
        for column in CGM_COLUMNS:
            row[column.removeprefix("test_")] = group[column].mean() if column in group else math.nan
        rows.append(row)
    order = {"unet": 0, "unet2plus": 1, "unet3plus": 2}
    table = pd.DataFrame(rows)
    table["_order"] = table["model"].map(order)
    return table.sort_values(["dataset", "encoder", "_order", "DS", "CGM", "loss", "variant"]).drop(columns="_order")


def _dice_cell(row: pd.Series) -> str:
    if row["status"] == "FAILED":
        return f"**FAILED**: {row['error'][:120]}" if row["error"] else "**FAILED**"
    if row["status"] != "ok":
        return row["status"]
    text = f"{row['dice_mean']:.4f}"
    if row["seeds"] > 1:
        text += f" ± {row['dice_std']:.4f} (n={row['seeds']})"
    if row["failed_runs"]:
        text += f" ({row['failed_runs']} failed)"
    return text


def _number(value: Any, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _label(row: Any) -> str:
    return MODEL_LABELS.get(row["model"], row["model"]) + ("" if row["DS"] else " w/o DS")


def table1_markdown(table: pd.DataFrame) -> str:
    """The paper's Table 1: a row per configuration, parameters (M) and Dice per organ, per encoder."""
    datasets = sorted(table["dataset"].unique())
    header = ["variant", "model", "encoder", "CGM", "loss", "params (M)", "paper params (M, width 64)",
              *[f"Dice {d}" for d in datasets], *[f"paper Dice {d}" for d in datasets]]
    rows = []
    for variant, group in table.groupby("variant", sort=False):
        by_dataset = {row["dataset"]: row for _, row in group.iterrows()}
        first = group.iloc[0]
        rows.append([variant, _label(first), ENCODER_LABELS.get(first["encoder"], first["encoder"]),
                     "yes" if first["CGM"] else "no", first["loss"], _number(first["params_m"], 3),
                     _number(first["paper_params_m"], 2),
                     *[_dice_cell(by_dataset[d]) if d in by_dataset else "not run" for d in datasets],
                     *[_number(by_dataset[d]["paper_dice"]) if d in by_dataset else "" for d in datasets]])
    return _markdown(header, rows)


def table2_markdown(table: pd.DataFrame) -> str:
    """The paper's Table 2: UNet 3+ with deep supervision by loss and CGM, with the CGM's measurements."""
    part = table[(table["model"] == "unet3plus") & table["DS"]]
    header = ["organ", "variant", "encoder", "loss", "CGM", "Dice", "Dice without gate", "CGM ROC AUC", "CGM AP",
              "FP voxels on organ-free slices", "... without gate", "paper Dice"]
    rows = [[row["dataset"], row["variant"], ENCODER_LABELS.get(row["encoder"], row["encoder"]), row["loss"],
             "yes" if row["CGM"] else "no", _dice_cell(row), _number(row["dice_no_gate"]),
             _number(row["cgm_roc_auc"]), _number(row["cgm_average_precision"]),
             _number(row["fp_organ_free"], 0), _number(row["fp_organ_free_no_gate"], 0), _number(row["paper_dice"])]
            for _, row in part.iterrows()]
    return _markdown(header, rows)


INTRODUCTION = (
    "Test Dice per 3D volume, mean ± sample standard deviation over seeds (n) where repeated; read back from "
    "MLflow. Paper figures are shown only where the source is certain (parameter counts at width 64; Dice of "
    "UNet 3+ ResNet-101 hybrid + CGM)."
)
FOOTNOTE = (
    "CGM ROC AUC / AP: the CGM as a per-slice classifier of 'organ present' on the test slices; FP voxels: "
    "predicted organ voxels on test slices without the organ, with and without the CGM gate."
)


def report_markdown(table: pd.DataFrame, studies: dict[str, str]) -> str:
    """The whole ``ablations.md``: introduction, the studies shown, failures and names not run (if any), Tables 1, 2."""
    failed = table[table["status"] == "FAILED"]
    missing = table[table["status"] == "not run"]
    text = ["# Ablation study", "", INTRODUCTION, "", "Studies shown (one per organ, never mixed):", "",
            *[f"- {line}" for line in studies.values()], ""]
    if len(failed):
        text += [f"**{len(failed)} configuration(s) failed**: " + "; ".join(
            f"{r['dataset']} {r['variant']} ({r['error'][:200] or 'no error recorded'})" for _, r in failed.iterrows()), ""]
    if len(missing):
        text += [f"**{len(missing)} configuration(s) not run**: "
                 + ", ".join(f"{r['dataset']} {r['variant']}" for _, r in missing.iterrows()), ""]
    text += ["## Table 1: architectures and encoders", "", table1_markdown(table),
             "## Table 2: UNet 3+ by loss and CGM", "", table2_markdown(table), FOOTNOTE, ""]
    return "\n".join(text)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return path


def plot_dice_vs_params(table: pd.DataFrame, path: Path) -> Path:
    """Mean test Dice against parameters (millions), one marker per configuration and organ."""
    figure = _figure(7, 5)
    axes = figure.add_subplot()
    for dataset, group in table.dropna(subset=["dice_mean"]).groupby("dataset"):
        axes.errorbar(group["params_m"], group["dice_mean"], yerr=group["dice_std"].fillna(0), fmt="o",
                      capsize=3, label=dataset)
        for _, row in group.iterrows():
            axes.annotate(row["variant"], (row["params_m"], row["dice_mean"]),
                          fontsize=7, xytext=(4, 2), textcoords="offset points")
    axes.set(xlabel="parameters (millions)", ylabel="test Dice (mean over volumes)", title="Dice vs parameters")
    axes.legend()
    return _save(figure, path)


def _per_case_dice(run_id: str) -> pd.DataFrame | None:
    """The run's ``evaluation/per_case.csv`` artifact, read back from MLflow (None when absent)."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation/per_case.csv",
                                                        dst_path=scratch)
        except Exception as err:  # no artifact (failed or unevaluated run), or an unreachable store
            logger.warning("run %s: no per-case results (%s)", run_id, err)
            return None
        return pd.read_csv(local)


def plot_per_case_dice(runs: pd.DataFrame, path: Path) -> Path:
    """Per-case test Dice of every configuration (strip plot with the mean), one panel per organ."""
    datasets = sorted(runs["dataset"].unique())
    figure = _figure(max(6, 2.2 * runs.groupby("dataset").size().max()), 4 * len(datasets))
    for axes, dataset in zip(np.atleast_1d(figure.subplots(len(datasets), 1, squeeze=False)[:, 0]), datasets):
        labels = []
        for position, (variant, group) in enumerate(runs[runs["dataset"] == dataset].groupby("ablation", sort=False)):
            labels.append(variant)
            values = [frame["dice"].to_numpy() for frame in map(_per_case_dice, group["run_id"]) if frame is not None]
            values = np.concatenate(values) if values else np.array([])
            jitter = np.random.default_rng(position).uniform(-0.12, 0.12, len(values))
            axes.scatter(position + jitter, values, s=18, alpha=0.7)
            if len(values):
                axes.hlines(values.mean(), position - 0.3, position + 0.3, color="black")
        axes.set_xticks(range(len(labels)), labels, fontsize=7)
        axes.set(ylabel="test Dice per volume", title=f"{dataset}: per-case Dice (bar: mean)", ylim=(0, 1.02))
    return _save(figure, path)


def plot_overlay_grid(runs: pd.DataFrame, dataset: str, path: Path, cases: int = 3) -> Path | None:
    """The same test slices (largest organ area of the first ``cases`` test volumes) for every configuration.

    True positives pink, false negatives yellow, false positives green (:data:`unet3plus.evaluate.OVERLAY_COLOURS`).
    Predictions come from each run's ``evaluation_dir``; None when none is on this machine.
    """
    import json

    import nibabel as nib
    from matplotlib.patches import Patch
    from nibabel.orientations import apply_orientation

    from unet3plus.data.geometry import VolumeGeometry
    from unet3plus.data.sources import organ_mask, read_volume
    from unet3plus.data.transforms import window_hu
    from unet3plus.evaluate import OVERLAY_COLOURS, overlay_rgb

    available = runs[(runs["dataset"] == dataset) & runs["evaluation_dir"].map(
        lambda d: isinstance(d, str) and (Path(d) / "predictions").is_dir())]
    available = available.drop_duplicates("ablation")
    if available.empty:
        return None
    first = available.iloc[0]
    metadata = json.loads((Path(first["processed_dir"]) / "cases.json").read_text())
    test_ids = sorted(c for c, e in metadata["cases"].items() if e["split"] == "test")[:cases]
    slices = []
    for case_id in test_ids:
        entry = metadata["cases"][case_id]
        orientation = np.array(VolumeGeometry.from_dict(entry["geometry"]).orientation)
        label = apply_orientation(np.asanyarray(read_volume(Path(first["raw_dir"]) / entry["label"]).dataobj),
                                  orientation)
        target = organ_mask(label, metadata["layout"]).astype(bool)
        z = int(np.argmax(target.sum(axis=(0, 1))))
        image = apply_orientation(read_volume(Path(first["raw_dir"]) / entry["image"]).get_fdata(dtype=np.float32),
                                  orientation)[:, :, z]
        slices.append((case_id, orientation, z, window_hu(image, metadata["data_config"]["hu_window"]), target[:, :, z]))
    figure = _figure(max(6.0, 2.6 * len(slices)), 2.6 * len(available) + 0.6)
    grid = figure.subplots(len(available), len(slices), squeeze=False)
    for r, (_, run) in enumerate(available.iterrows()):
        for c, (case_id, orientation, z, grey, target) in enumerate(slices):
            prediction = np.asanyarray(nib.load(Path(run["evaluation_dir"]) / "predictions" / f"{case_id}.nii.gz").dataobj)
            prediction = apply_orientation(prediction, orientation)[:, :, z].astype(bool)
            axes = grid[r, c]
            axes.imshow(overlay_rgb(grey, prediction, target), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if r == 0:
                axes.set_title(f"case {case_id}, slice {z}", fontsize=8)
            if c == 0:
                axes.set_ylabel(run["ablation"], fontsize=8)
    figure.legend(handles=[Patch(color=colour, label=name) for name, colour in OVERLAY_COLOURS.items()],
                  loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return _save(figure, path)


def report_outputs(out: str | os.PathLike) -> tuple[list[Path], Path]:
    """The files (``out``, its ``.csv`` and ``.json``) and the plots folder (``<out stem>_plots``) of a report."""
    out = Path(out)
    return [out, out.with_suffix(".csv"), out.with_suffix(".json")], out.parent / f"{out.stem}_plots"


def write_report(config: Config, out: str | os.PathLike, readme: str | os.PathLike | None = None,
                 spread: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write ``out`` (markdown), ``out`` with ``.csv`` and ``.json`` and the plots in ``<out stem>_plots/``.

    The main model and every name of ``config.ablations.run`` get a row per organ, from the study of
    ``config``'s parameters (:func:`collect_runs`). With
    ``readme``, the results block between :data:`README_BEGIN` and :data:`README_END` is replaced too;
    ``spread`` (a ``benchmarks/bench_recipe.py`` JSON) adds the measured spread per model to it.
    Everything is made in a hidden folder beside ``out`` first and moved into place only when all
    of it is made, so an unreadable store or prediction leaves the previous report as it was; the
    files written are added to the folder's :data:`unet3plus.utils.OUTPUTS_RECORD`.

    Returns:
        The configuration table.

    Raises:
        UserError: no runs (see :func:`collect_runs`), or ``readme`` lacks the markers.
    """
    out = Path(out)
    readme_text = _check_readme(Path(readme)) if readme else None
    spread_table = load_spread(spread) if spread else None
    collected = collect_runs(config)
    runs, table = collected.runs, configuration_table(collected)
    files, plots = report_outputs(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        staged = Path(scratch)
        (staged / plots.name).mkdir()
        plot_dice_vs_params(table, staged / plots.name / "dice_vs_params.png")
        if len(runs):
            plot_per_case_dice(runs, staged / plots.name / "per_case_dice.png")
        for dataset in sorted(runs["dataset"].unique()):
            plot_overlay_grid(runs, dataset, staged / plots.name / f"overlays_{dataset}.png")
        table.to_csv(staged / files[1].name, index=False)
        numbers = {f"{row['dataset']}/{row['variant']}": {"dice": None if math.isnan(row["dice_mean"])
                   else row["dice_mean"], "status": row["status"]} for _, row in table.iterrows()}
        write_json_atomic(staged / files[2].name, numbers)
        write_text_atomic(staged / out.name, report_markdown(table, collected.studies))
        moves = [(path, plots / path.name) for path in sorted((staged / plots.name).iterdir())]
        plots.mkdir(exist_ok=True)
        for source, target in [*moves, *((staged / file.name, file) for file in files)]:
            os.replace(source, target)
    record_outputs(out.parent, [*files, plots])
    if readme_text is not None:
        write_text_atomic(readme, replace_readme_block(readme_text, readme_block(runs, table, spread_table)))
    logger.info("%d configuration(s) of %d run(s) written to %s and %s", len(table), len(runs), out, plots)
    return table


PAPER_ORDER = (("unet", False), ("unet2plus", True), ("unet2plus", False), ("unet3plus", False), ("unet3plus", True))
"""Table 1's direction, worst to best: UNet, UNet++, UNet 3+ w/o deep supervision, UNet 3+ (model, DS)."""


def load_spread(path: str | os.PathLike) -> dict[tuple[str, str], dict[str, Any]]:
    """The per-(organ, model) test Dice spread that ``benchmarks/bench_recipe.py`` wrote, keyed ``(organ, variant)``;
    each value has ``min``, ``mean``, ``std``, ``max``, ``runs`` and the benchmark's ``date``, ``cpu``, ``seeds``,
    ``threads``.

    Raises:
        UserError: the file is missing, unreadable or not such a summary.
    """
    try:
        payload = json.loads(Path(path).read_text())
        return {(row["organ"], row["model"]): {**row, **{key: payload[key] for key in ("date", "cpu", "seeds", "threads")}}
                for row in payload["summary"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a bench_recipe.py summary ({err!r}); run benchmarks/bench_recipe.py") from err


def order_note(table: pd.DataFrame, spread: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Per organ, whether the Dice of the Table 1 models reads in the paper's direction, and whether that means anything.

    A ranking is claimed only when every step up the paper's order is larger than the measured spread
    (the larger sample std of the two models, from ``spread``); otherwise the note says that the
    differences are within the spread, or that the order is not the paper's.
    """
    lines = []
    for dataset, group in table[table["status"] == "ok"].groupby("dataset"):
        ranked = sorted((PAPER_ORDER.index((row["model"], bool(row["DS"]))), row["dice_mean"], _label(row), row["variant"])
                        for _, row in group.iterrows() if (row["model"], bool(row["DS"])) in PAPER_ORDER)
        if len(ranked) < 2:
            continue
        steps = [(upper[1] - lower[1], max(spread.get((dataset, v), {}).get("std", math.nan) for v in (lower[3], upper[3])))
                 for lower, upper in itertools.pairwise(ranked)]
        chain = f"{ranked[0][2]} {ranked[0][1]:.3f}" + "".join(
            f" {'<' if gap > 0 else '>' if gap < 0 else '='} {label} {dice:.3f}"
            for (gap, _), (_, dice, label, _) in zip(steps, ranked[1:], strict=True))
        if any(gap < 0 for gap, _ in steps):
            verdict = "not the paper's order"
        elif all(gap > std for gap, std in steps):
            verdict = "the paper's order, every step larger than the measured spread"
        elif all(math.isnan(std) for _, std in steps):
            verdict = "the paper's order, but no spread was measured for these models: not evidence of a ranking"
        else:
            verdict = "the paper's order, but some steps are within the measured spread: not evidence of a ranking"
        lines.append(f"- {dataset}: {chain}: {verdict}.")
    return "\n".join(lines) + "\n" if lines else ""


def _spread_cell(spread: dict[str, Any] | None) -> str:
    return f"{spread['min']:.3f} / {spread['mean']:.3f} ± {spread['std']:.3f} (n={spread['runs']})" if spread else "not measured"


def readme_block(runs: pd.DataFrame, table: pd.DataFrame, spread: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
    """The README's results: when and where the runs trained, the main model per organ (Dice, IoU, HD95, ASSD),
    Table 1, and with ``spread`` (:func:`load_spread`) the benchmark's spread per model and :func:`order_note`."""
    main = runs[(runs["ablation"] == "main") & runs["test_dice"].notna()] if "test_dice" in runs else runs.iloc[:0]
    rows = [[row["dataset"], _number(row.get("test_cases"), 0), _number(row["test_dice"], 3),
             _number(row.get("test_iou"), 3), _number(row.get("test_hd95"), 2), _number(row.get("test_assd"), 2)]
            for _, row in main.sort_values("dataset").iterrows()]
    started = pd.to_datetime(runs["started"], utc=True) if "started" in runs and runs["started"].notna().any() else None
    devices = sorted({d for d in runs.get("device", pd.Series(dtype=object)).dropna()}) or ["an unrecorded device"]
    when = f"{started.min():%Y-%m-%d}" if started is not None else "an unrecorded date"
    text = (f"Runs of {when}, trained on {' and '.join(devices)}.\n\n"
            + _markdown(["dataset", "test volumes", "Dice", "IoU", "HD95 (mm)", "ASSD (mm)"], rows)
            + "\nThe ablation grid (`reports/ablations.md`):\n\n" + table1_markdown(table))
    if spread:
        first = next(iter(spread.values()))
        datasets = sorted(table["dataset"].unique())
        spread_rows = [[variant, _label(group.iloc[0]), *[_spread_cell(spread.get((dataset, variant))) for dataset in datasets]]
                       for variant, group in table.groupby("variant", sort=False)]
        text += (f"\nSpread of the recipe (`benchmarks/bench_recipe.py`, {first['date']}, {first['cpu']}: seeds "
                 f"{', '.join(map(str, first['seeds']))} x torch threads {', '.join(map(str, first['threads']))}): "
                 "test Dice min / mean ± sample std.\n\n"
                 + _markdown(["variant", "model", *[f"Dice {d}" for d in datasets]], spread_rows)
                 + "\nAgainst the paper's direction (UNet < UNet++ < UNet 3+ w/o DS < UNet 3+):\n\n"
                 + order_note(table, spread))
    return text


def _check_readme(path: Path) -> str:
    text = path.read_text() if path.is_file() else ""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise UserError(f"{path}: needs exactly one '{README_BEGIN}' line followed by one '{README_END}' line")
    return text


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with everything between the README markers replaced by ``block``."""
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    return f"{head}{README_BEGIN}\n{block}{README_END}{tail}"
