"""Log a trained model to MLflow, register it as ``<name_prefix>-<dataset>`` and move the champion alias.

MLflow model format (what :func:`register` writes, what :mod:`unet3plus.predict` reads):

- flavour ``pytorch`` saved as ``pt2`` (``torch.export``, MLflow 3's default): a pickle-free graph
  that loads without this package's code. The network is wrapped in
  :class:`unet3plus.predict.ProbabilityModel`, so ``mlflow.pytorch.load_model(uri)(x)`` and
  ``mlflow.pyfunc.load_model(uri).predict(x)`` both map a float32 batch (N, 3, S, S) of
  HU-windowed 3-slice stacks to (N, C, S, S) probabilities with the CGM gate applied.
- signature inferred from a 2-slice-stack input example (2, 3, S, S) and its output: batch
  dimension dynamic, S fixed (a batch of 1 would make ``torch.export`` freeze the batch size).
- metadata ``{"unet3plus": {"data": DataConfig, "model": ModelConfig, "dataset", "threshold"}}``
  in the MLmodel file: everything :func:`unet3plus.predict.predict_file` needs to preprocess a
  new scan.
- version tags: ``test_<metric>`` for every number in ``metrics.json``, ``dataset``,
  ``git_commit`` and ``data_hash`` (copied from the training run when it has them).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.config import Config
from unet3plus.errors import DataError, UserError
from unet3plus.predict import METADATA_KEY, ProbabilityModel
from unet3plus.tracking import check_access, configure, experiment_id, explain_failure, git_commit
from unet3plus.utils import file_digest

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"hd95", "assd"})
RUN_TAGS_COPIED = ("git_commit", "data_hash", "dvc_md5", "kfp_run_id", "kfp_run_name", "kfp_pipeline_version")
EXAMPLE_BATCH = 2


def _read_metrics(path: Path, metric: str) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: metrics file not found (run `unet3plus evaluate` first)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a valid metrics JSON file ({err})") from err
    if not isinstance(metrics, dict) or not isinstance(metrics.get(metric), (int, float)):
        raise DataError(f"{path}: no numeric {metric!r} (register.metric) in the metrics; expected evaluate's output")
    return metrics


def _check_scored(metrics: dict[str, Any], path: Path, checkpoint: Path, payload: dict[str, Any]) -> None:
    """Refuse metrics that are not finite, or that evaluate computed for another checkpoint or other data."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise DataError(f"{path}: non-finite {', '.join(bad)}; a broken model or evaluation cannot be registered")
    digest = file_digest(checkpoint)
    if metrics.get("checkpoint_sha256") != digest:
        raise DataError(
            f"{path}: scores checkpoint {metrics.get('checkpoint_sha256')}, not {checkpoint} (sha256 {digest}); "
            f"run `unet3plus evaluate --checkpoint {checkpoint}` first"
        )
    trained_on = payload.get("data_hash")
    if trained_on is not None and metrics.get("data_hash") != trained_on:
        raise DataError(
            f"{path}: was computed on data {metrics.get('data_hash')}, but {checkpoint} was trained on data "
            f"{trained_on}; evaluate on the test split of the model's own preprocessed data"
        )


def is_better(new: float, current: float | None, metric: str) -> bool:
    """Whether ``new`` beats the champion's ``current`` value of ``metric`` (None: no champion).

    Dice-like metrics are better when higher, surface distances (``hd95``, ``assd``) when lower;
    a NaN never beats a champion, and a champion without a recorded value is always beaten.
    """
    if current is None or math.isnan(current):
        return True
    return new < current if metric in LOWER_IS_BETTER else new > current


def _champion_value(
    client: mlflow.MlflowClient, name: str, alias: str, metric: str
) -> tuple[str | None, float | None]:
    """(version, ``test_<metric>``) of the version holding ``alias``; (None, None) without one."""
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None, None
        raise
    value = champion.tags.get(f"test_{metric}")
    if value is None:
        logger.warning("%s version %s (%s) has no test_%s tag; the new version will replace it",
                       name, champion.version, alias, metric)
        return champion.version, None
    return champion.version, float(value)


def _training_run(client: mlflow.MlflowClient, run_id: str | None) -> Any:
    """The training run if the store knows it (active), else None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _example(network: torch.nn.Module, size: int, in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded input example (EXAMPLE_BATCH, in_channels, S, S) in [0, 1] and the model's output."""
    example = np.random.default_rng(0).random((EXAMPLE_BATCH, in_channels, size, size), dtype=np.float32)
    with torch.no_grad():
        output = network(torch.from_numpy(example)).numpy()
    return example, output


def register(config: Config, checkpoint: str | os.PathLike, metrics_path: str | os.PathLike) -> dict[str, Any]:
    """Log ``checkpoint`` as an MLflow model, register a new version, and move the alias if it is better.

    The model is logged into the training run (``checkpoint["mlflow_run_id"]``) when the tracking
    store has it, else into a new run of ``config.mlflow.experiment``. The version gets the test
    metrics, git commit and data hash as tags. ``config.register.alias`` moves to the new version
    only if its ``config.register.metric`` beats the current holder's (the first version always
    gets it).

    Args:
        config: ``register`` (name prefix, alias, metric), ``mlflow`` (tracking URI, experiment)
            and ``evaluate.threshold`` (stored with the model) are used.
        checkpoint: a checkpoint written by training (``best.pt``).
        metrics_path: ``metrics.json`` written by :func:`unet3plus.evaluate.evaluate`.

    Returns:
        ``{"name": registered model name, "version": int, "champion": whether the alias now
        points at this version}``.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt.
        DataError: the metrics file is missing, invalid, lacks the metric or is for another organ.
        UserError: any MLflow tracking or registry failure (the message names the store).
    """
    checkpoint, metrics_path = Path(checkpoint), Path(metrics_path)
    payload = load_checkpoint(checkpoint)
    metric = config.register.metric
    metrics = _read_metrics(metrics_path, metric)
    dataset = payload["dataset"]
    if metrics.get("dataset", dataset) != dataset:
        raise DataError(f"{metrics_path}: metrics are for {metrics['dataset']!r} but {checkpoint} is a {dataset!r} model")
    _check_scored(metrics, metrics_path, checkpoint, payload)
    name = f"{config.register.name_prefix}-{dataset}"
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    network = ProbabilityModel(model_from_checkpoint(payload)).eval()
    uri = configure(config.mlflow)
    check_access(uri, registry=True)  # a missing login fails here, before anything is logged
    try:
        client = mlflow.MlflowClient()
        version, run_tags = _log_model(client, config, payload, network, name)
        tags = {f"test_{key}": str(value) for key, value in numbers.items()}
        tags["dataset"] = dataset
        tags.update({key: run_tags[key] for key in RUN_TAGS_COPIED if key in run_tags})
        if "git_commit" not in tags and (commit := git_commit()):
            tags["git_commit"] = commit
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.update_model_version(name, version, description=version_description(payload, tags, numbers))
        champion = _promote(client, name, version, float(numbers[metric]), config.register.alias, metric)
    except (MlflowException, OSError) as err:
        raise UserError(
            f"MLflow model registry at {uri} failed while registering {name} from {checkpoint}: {explain_failure(err, uri)}"
        ) from err
    moved = f"; alias {config.register.alias!r} moved to it" if champion else ""
    logger.info("registered %s version %s (test %s = %.4f)%s", name, version, metric, metrics[metric], moved)
    return {"name": name, "version": int(version), "champion": champion}


def version_description(payload: dict[str, Any], tags: dict[str, str], numbers: dict[str, Any]) -> str:
    """What a model version is, for the registry page: data, configuration, test scores."""
    model, train = payload["config"]["model"], payload["config"]["train"]
    loss = "hybrid" if all(float(payload["config"]["loss"][k]) > 0 for k in ("focal_weight", "ms_ssim_weight",
                                                                            "iou_weight")) else "partial loss"
    scores = ", ".join(f"{k} {float(numbers[k]):.4f}" for k in ("dice", "iou", "hd95", "assd")
                       if k in numbers and numbers[k] is not None)
    return (f"{model['arch']} ({model['encoder']} encoder, width {model['width']}, "
            f"{'DS' if model['deep_supervision'] else 'no DS'}, {'CGM' if model['cgm'] else 'no CGM'}, {loss} loss), "
            f"{train['epochs']} epochs, trained on {payload['dataset']} data {tags.get('data_hash', 'unknown')[:12]} "
            f"(git {tags.get('git_commit', 'unknown')[:12]}). Test: {scores} over {numbers.get('cases', '?')} volumes.")


def _log_model(
    client: mlflow.MlflowClient, config: Config, payload: dict[str, Any], network: torch.nn.Module, name: str
) -> tuple[str, dict[str, str]]:
    """Log ``network`` (pt2, signature, metadata) in the training run or a new one and register it.

    Returns:
        (the new version, the tags of the run it was logged in).
    """
    training_run = _training_run(client, payload.get("mlflow_run_id"))
    if training_run is None:
        logger.warning("training run %s not found in %s; logging the model in a new run",
                       payload.get("mlflow_run_id"), mlflow.get_tracking_uri())
        experiment, run_id, run_tags = experiment_id(client, config.mlflow.experiment), None, {}
    else:
        experiment, run_id, run_tags = training_run.info.experiment_id, training_run.info.run_id, training_run.data.tags
    data_config, model_config = payload["config"]["data"], payload["config"]["model"]
    example, output = _example(network, int(data_config["size"]), int(model_config["in_channels"]))
    metadata = {
        METADATA_KEY: {"data": data_config, "model": model_config, "dataset": payload["dataset"],
                       "threshold": config.evaluate.threshold}
    }  # fmt: skip
    # Nested when the caller already has a run open (e.g. a pipeline's parent run).
    with mlflow.start_run(run_id=run_id, experiment_id=experiment, nested=mlflow.active_run() is not None):
        info = mlflow.pytorch.log_model(
            network,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=name,
            metadata=metadata,
            # Listing requirements skips MLflow's slow inference (it reloads the model in a subprocess).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
        )
    return str(info.registered_model_version), run_tags


def _promote(client: mlflow.MlflowClient, name: str, version: str, value: float, alias: str, metric: str) -> bool:
    """Point ``alias`` at ``version`` if its ``metric`` ``value`` beats the current holder's; True if moved."""
    current_version, current_value = _champion_value(client, name, alias, metric)
    if not is_better(value, current_value, metric):
        logger.info("%s version %s keeps %r (test %s %.4f is not beaten by %.4f)",
                    name, current_version, alias, metric, current_value, value)
        return False
    client.set_registered_model_alias(name, alias, version)
    return True
