"""The paper's results tables, rebuilt from the MLflow runs: test Dice per model configuration and organ.

Every evaluated run (``unet3plus evaluate`` logs ``test_dice`` into the training run, tagged with
its ``dataset``) becomes one cell: rows are model configurations (architecture, encoder, deep
supervision, CGM, loss weights: the axes of the paper's Tables 1 and 2, ablations included),
columns are organs. Repeated runs of one configuration are averaged, and the number of runs is
shown, so a seed sweep reads as mean Dice over seeds.
"""

from __future__ import annotations

import logging

import mlflow
import pandas as pd

from unet3plus.config import MlflowConfig
from unet3plus.errors import UserError
from unet3plus.tracking import check_access, configure_for_reading

logger = logging.getLogger(__name__)

CONFIGURATION = {
    "params.model.arch": "model",
    "params.model.encoder": "encoder",
    "params.model.deep_supervision": "deep supervision",
    "params.model.cgm": "CGM",
    "params.loss.focal_weight": "focal",
    "params.loss.ms_ssim_weight": "MS-SSIM",
    "params.loss.iou_weight": "IoU",
}
"""MLflow parameter -> column name of the configuration that identifies a row."""


def results_table(mlflow_config: MlflowConfig) -> pd.DataFrame:
    """Mean test Dice of every model configuration on every organ, from the experiment's runs.

    Args:
        mlflow_config: tracking URI (``MLFLOW_TRACKING_URI`` wins) and experiment name.

    Returns:
        One row per configuration (the :data:`CONFIGURATION` columns), then per dataset the
        mean test Dice (``dice <dataset>``) and the number of runs (``runs <dataset>``), sorted
        by model and encoder. A configuration not run on a dataset has NaN there.

    Raises:
        UserError: the experiment does not exist or holds no evaluated run.
    """
    uri = configure_for_reading(mlflow_config)  # capped HTTP retries; never creates a store
    check_access(uri)
    where = f"experiment {mlflow_config.experiment!r} at {uri}"
    if mlflow.get_experiment_by_name(mlflow_config.experiment) is None:
        raise UserError(f"{where}: no such experiment; train and evaluate a model first (e.g. `dvc repro`)")
    runs = mlflow.search_runs(experiment_names=[mlflow_config.experiment])
    needed = ["metrics.test_dice", "tags.dataset", *CONFIGURATION]
    runs = runs.iloc[:0] if any(column not in runs for column in needed) else runs.dropna(subset=needed)
    if runs.empty:
        raise UserError(f"{where}: no evaluated run; run `unet3plus evaluate` (or `dvc repro`) first")
    logger.info("%s: %d evaluated run(s)", where, len(runs))
    grouped = runs.groupby([*CONFIGURATION, "tags.dataset"])["metrics.test_dice"].agg(["mean", "count"])
    table = grouped.unstack("tags.dataset")
    table.columns = [f"{'dice' if stat == 'mean' else 'runs'} {dataset}" for stat, dataset in table.columns]
    datasets = sorted(runs["tags.dataset"].unique())
    table = table[[f"{stat} {dataset}" for dataset in datasets for stat in ("dice", "runs")]]
    return table.reset_index().rename(columns=CONFIGURATION)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table: Dice with 4 decimals, run counts as integers, blanks for NaN."""

    def cell(column: str, value: object) -> str:
        if pd.isna(value):
            return ""
        if column.startswith("dice "):
            return f"{value:.4f}"
        if column.startswith("runs "):
            return str(int(value))
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(cell(column, value) for column, value in zip(table.columns, row)) + " |")
    return "\n".join(lines) + "\n"
