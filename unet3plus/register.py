"""Log a trained model to MLflow, register it as ``<name_prefix>-<dataset>`` and move the champion alias.

MLflow model format (what :func:`register` writes, what :mod:`unet3plus.predict` and every
MLflow client read): the volume model of :mod:`unet3plus.serving`, a ``pyfunc`` that takes rows
of base64 NIfTI CT scans and returns their masks, with its own preprocessing, geometry inversion
and threshold; metadata ``{"unet3plus": {"data", "model", "dataset", "threshold"}}``.

Version tags: ``test_<metric>`` for every number in ``metrics.json``, ``dataset``,
``data_source``, ``test_set``, ``registration`` and ``git_commit`` and ``data_hash`` (copied from
the training run when it has them).

Registry rules (:func:`decide_alias`): a model trained on real data is registered as
``<name_prefix>-<dataset>``; one trained on the synthetic phantom (or on data whose source is not
recorded) as ``<name_prefix>-<dataset>-<source>``, so it never competes with real-data models. The
alias (``register.alias``, ``champion``) moves only to a version whose test Dice clears
``register.min_test_dice`` and that beats the holder on the same test set; any other version that
clears the floor gets ``challenger``, one below it no alias. Registering is idempotent: a retry of
the same checkpoint and metrics finds the version the first attempt created (tag ``registration``)
instead of creating another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from unet3plus.checkpoint import load_checkpoint
from unet3plus.config import Config, RegisterConfig
from unet3plus.data.sources import REAL_SOURCE
from unet3plus.errors import DataError, UserError
from unet3plus.serving import log_volume_model
from unet3plus.tracking import UNKNOWN_SOURCE, check_access, configure, experiment_id, explain_failure, git_commit
from unet3plus.utils import file_digest, redact

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"hd95", "assd"})
RUN_TAGS_COPIED = ("git_commit", "data_hash", "dvc_md5", "kfp_run_id", "kfp_run_name", "kfp_pipeline_version")
CHALLENGER = "challenger"
"""Alias of the latest version that clears the quality floor but did not (or could not) beat the champion."""
REAL_SOURCES = frozenset(REAL_SOURCE.values())
REGISTRATION_TAG = "registration"
"""Version tag identifying one registration (checkpoint + metrics): a retry finds its version by it."""


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


def register(config: Config, checkpoint: str | os.PathLike, metrics_path: str | os.PathLike) -> dict[str, Any]:
    """Log ``checkpoint`` as an MLflow model, register a new version and give it the alias it earned.

    The model is logged into the training run (``checkpoint["mlflow_run_id"]``) when the tracking
    store has it, else into a new run of ``config.mlflow.experiment``. The version gets the test
    metrics, data source, test set, git commit and data hash as tags, and an alias by
    :func:`decide_alias` (one log line says which and why). Registering the same checkpoint and
    metrics again (a retried step) creates no second version: the first one is completed instead.

    Args:
        config: ``register`` (name prefix, alias, metric, min_test_dice), ``mlflow`` (tracking URI,
            experiment) and ``evaluate.threshold`` (stored with the model) are used.
        checkpoint: a checkpoint written by training (``best.pt``).
        metrics_path: ``metrics.json`` written by :func:`unet3plus.evaluate.evaluate`.

    Returns:
        ``{"name": registered model name, "version": int, "alias": "champion", "challenger" or
        None, "champion": whether the alias now points at this version, "reason": why}``.

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
    source = str(metrics.get("data_source") or UNKNOWN_SOURCE)
    name = registered_name(config.register.name_prefix, dataset, source)
    registration = hashlib.sha256(f"{metrics['checkpoint_sha256']}:{file_digest(metrics_path)}".encode()).hexdigest()
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    uri = configure(config.mlflow)
    check_access(uri, registry=True)  # a missing login fails here, before anything is logged
    try:
        client = mlflow.MlflowClient()
        version = registered_version(client, name, registration)
        if version is None:
            version = _log_model(client, config, payload, name, {REGISTRATION_TAG: registration})
        else:
            logger.info("%s version %s already holds this registration (a retry): completing it, not logging again",
                        name, version)
        run_tags = _version_run_tags(client, name, version)
        tags = {f"test_{key}": str(value) for key, value in numbers.items()}
        tags.update({"dataset": dataset, "data_source": source, "test_set": str(metrics.get("test_set") or "unknown")})
        tags.update({key: run_tags[key] for key in RUN_TAGS_COPIED if key in run_tags})
        if "git_commit" not in tags and (commit := git_commit()):
            tags["git_commit"] = commit
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.update_model_version(name, version, description=version_description(payload, tags, numbers))
        alias, reason = assign_alias(client, name, version, config.register)
    except (MlflowException, OSError) as err:
        raise UserError(
            f"MLflow model registry at {redact(uri)} failed while registering {name} from {checkpoint}: {explain_failure(err, uri)}"
        ) from err
    logger.info("registered %s version %s: %s", name, version, f"alias {alias!r} ({reason})" if alias else f"no alias ({reason})")
    return {"name": name, "version": int(version), "alias": alias, "champion": alias == config.register.alias,
            "reason": reason}


def registered_name(prefix: str, dataset: str, source: str) -> str:
    """``<prefix>-<dataset>`` for a model trained on real data (LiTS, MSD), else ``<prefix>-<dataset>-<source>``.

    Phantom-trained models (``synthetic``) and models whose data source is not recorded
    (``unknown``) get their own registered model, so they never hold an alias real-data models compete for.
    """
    return f"{prefix}-{dataset}" if source in REAL_SOURCES else f"{prefix}-{dataset}-{source}"


def registered_version(client: mlflow.MlflowClient, name: str, registration: str) -> str | None:
    """The version of ``name`` tagged with ``registration`` (an earlier attempt of this registration), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.{REGISTRATION_TAG} = '{registration}'")
    return min((version.version for version in found), key=int, default=None)


def _version_run_tags(client: mlflow.MlflowClient, name: str, version: str) -> dict[str, str]:
    """The tags of the run a version was logged in ({} when the run is gone)."""
    run = _training_run(client, client.get_model_version(name, version).run_id)
    return dict(run.data.tags) if run is not None else {}


def decide_alias(candidate: dict[str, str], holder: dict[str, str] | None, config: RegisterConfig) -> tuple[str | None, str]:
    """Which alias a version earns, and why (one line).

    Args:
        candidate: the new version's tags (``test_dice``, ``test_<metric>``, ``test_set``).
        holder: the tags of the version now holding ``config.alias`` (None: nobody holds it).
        config: ``alias``, ``metric`` and ``min_test_dice``.

    Returns:
        ``(config.alias, reason)`` when the version clears ``min_test_dice`` and beats the holder
        on the same test set (or there is no holder); ``("challenger", reason)`` when it clears the
        floor but the holder was tested on another (or an unrecorded) test set or scores at least
        as well; ``(None, reason)`` below the floor.
    """
    metric, floor = config.metric, config.min_test_dice
    dice = float(candidate.get("test_dice", "nan"))
    if not dice >= floor:
        return None, f"test dice {dice:.4f} is below register.min_test_dice {floor:.2f}"
    value = float(candidate.get(f"test_{metric}", "nan"))
    if holder is None:
        return config.alias, f"first version to clear register.min_test_dice {floor:.2f} (test {metric} {value:.4f})"
    held = f"{config.alias} version {holder['version']}"
    test_set = candidate.get("test_set", "unknown")
    if test_set == "unknown" or holder.get("test_set", "unknown") != test_set:
        return CHALLENGER, (f"{held} was tested on another test set ({holder.get('test_set', 'unknown')[:12]}, this "
                            f"version on {test_set[:12]}): the scores are not comparable")
    current = float(holder.get(f"test_{metric}", "nan"))
    if is_better(value, current, metric):
        return config.alias, f"test {metric} {value:.4f} beats {held}'s {current:.4f} on the same test set"
    return CHALLENGER, f"test {metric} {value:.4f} does not beat {held}'s {current:.4f} on the same test set"


def assign_alias(client: mlflow.MlflowClient, name: str, version: str, config: RegisterConfig) -> tuple[str | None, str]:
    """Give ``version`` of ``name`` the alias :func:`decide_alias` grants it; returns (alias, reason).

    A version that already holds ``config.alias`` keeps it (a retried registration). The new
    champion loses the ``challenger`` alias if it had it.
    """
    candidate = client.get_model_version(name, version)
    holder = _alias_holder(client, name, config.alias)
    if holder is not None and holder.version == candidate.version:
        return config.alias, f"already holds {config.alias!r}"
    holder_tags = None if holder is None else {**holder.tags, "version": str(holder.version)}
    alias, reason = decide_alias(dict(candidate.tags), holder_tags, config)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    if alias == config.alias and CHALLENGER in candidate.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    return alias, reason


def _alias_holder(client: mlflow.MlflowClient, name: str, alias: str) -> Any:
    """The version of ``name`` holding ``alias``, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


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
            f"({tags.get('data_source', UNKNOWN_SOURCE)} source, git {tags.get('git_commit', 'unknown')[:12]}). "
            f"Test: {scores} over {numbers.get('cases', '?')} volumes.")


def _log_model(
    client: mlflow.MlflowClient, config: Config, payload: dict[str, Any], name: str, version_tags: dict[str, str]
) -> str:
    """Log the checkpoint's volume model (:func:`unet3plus.serving.log_volume_model`) in the training
    run or a new one and register it.

    The version is created with ``version_tags`` (in the same call, so no version exists without them).

    Returns:
        The new version.
    """
    training_run = _training_run(client, payload.get("mlflow_run_id"))
    if training_run is None:
        logger.warning("training run %s not found in %s; logging the model in a new run",
                       payload.get("mlflow_run_id"), redact(mlflow.get_tracking_uri()))
        experiment, run_id = experiment_id(client, config.mlflow.experiment), None
    else:
        experiment, run_id = training_run.info.experiment_id, training_run.info.run_id
    # Nested when the caller already has a run open (e.g. a pipeline's parent run).
    with mlflow.start_run(run_id=run_id, experiment_id=experiment, nested=mlflow.active_run() is not None):
        info = log_volume_model(payload, config.evaluate.threshold, name, version_tags)
    return str(info.registered_model_version)
