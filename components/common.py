"""What every component shares: the image it runs in, and how it checks its inputs and describes its outputs.

Components are KFP lightweight Python components: KFP ships the source of each function, plus the
helpers below (``additional_funcs``), to the pod and runs it in :data:`IMAGE`, the project's image
(``Dockerfile``), where :mod:`unet3plus` is installed. So the helpers and the component bodies import
what they use inside the function and annotate with ``typing`` names only: the shipped source has
nothing else at module level. That also keeps compiling the pipeline fast (no torch import).

Every component takes the text of ``params.yaml`` and, where a variant can differ (train,
evaluate), an ablation's name; :func:`unet3plus.config.parse_config` turns both into the
configuration, as the CLI does for DVC.
"""

import os
from collections.abc import Callable
from typing import Any, List, Optional

from kfp import dsl

DEFAULT_IMAGE = "ghcr.io/unet3plus/unet3plus:0.1.0"
IMAGE = os.environ.get("UNET3PLUS_IMAGE") or DEFAULT_IMAGE
"""The image every component runs in; ``UNET3PLUS_IMAGE`` at compile time replaces the default."""


def component(func: Callable) -> Any:
    """Make ``func`` a KFP component that runs in :data:`IMAGE` and can call this module's helpers.

    KFP is not pip-installed when the pod starts (its default): the image already has the pinned
    version, and cluster nodes often have no internet access.
    """
    return dsl.component(func, base_image=IMAGE, install_kfp_package=False, additional_funcs=HELPERS)


def start(params: str, ablation: str = "", kfp_run: Optional[List[str]] = None) -> Any:
    """What every component does first: logging, the MLflow settings of the mounted secret, the configuration.

    Args:
        params: the text of a ``params.yaml``.
        ablation: the name of a variant of its ``ablations.variants``, or ``""`` for the main model.
        kfp_run: ``[run id, run name, pipeline version]`` of the Kubeflow run (the pipeline passes
            KFP's placeholders); they become ``KFP_RUN_ID``, ``KFP_RUN_NAME`` and
            ``KFP_PIPELINE_VERSION``, which every MLflow run this pod writes carries as tags
            (``unet3plus.tracking.kfp_tags``).

    Returns:
        ``unet3plus.config.parse_config(params, ablation=ablation)``.

    Raises:
        ConfigError: invalid parameters, no such variant, or an MLflow secret without the tracking URI.
    """
    import os

    from unet3plus.config import parse_config
    from unet3plus.utils import setup_logging

    setup_logging()
    mlflow_environment()
    for variable, value in zip(("KFP_RUN_ID", "KFP_RUN_NAME", "KFP_PIPELINE_VERSION"), kfp_run or []):
        if value:
            os.environ[variable] = str(value)
    return parse_config(params, ablation=ablation)


def mlflow_environment(mount: str = "/var/run/secrets/unet3plus/mlflow") -> None:
    """Export the MLflow settings of the Kubernetes secret mounted at ``mount`` (one file per key), if any.

    The pipeline mounts the secret as a volume rather than as environment variables: every
    ``secretAsEnv`` that kfp-kubernetes >= 2.15 writes carries an ``optional`` field that the
    minimum backend's driver refuses (``pipeline.backend.MINIMUM_KFP``). ``MLFLOW_TRACKING_URI`` is
    required; ``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD`` and ``MLFLOW_TRACKING_TOKEN``
    are exported when present. A variable already set in the pod is kept.

    Raises:
        ConfigError: the secret is mounted but has no ``MLFLOW_TRACKING_URI``.
    """
    import os
    import pathlib

    from unet3plus.errors import ConfigError

    folder = pathlib.Path(mount)
    if not folder.is_dir():
        return
    if not (folder / "MLFLOW_TRACKING_URI").is_file():
        raise ConfigError(f"{folder}: the MLflow secret has no key MLFLOW_TRACKING_URI; add it "
                          "(kubectl create secret generic ... --from-literal=MLFLOW_TRACKING_URI=https://...)")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if (folder / key).is_file():
            os.environ.setdefault(key, (folder / key).read_text().rstrip("\n"))


MLFLOW_SECRET_MOUNT = mlflow_environment.__defaults__[0]
"""Where the pipeline mounts the MLflow secret in the pods that track."""


def layout_of(dataset: str) -> str:
    """The raw data layout of a pipeline ``dataset``: ``"liver"`` -> ``"lits"``, ``"spleen"`` -> ``"msd-spleen"``.

    Raises:
        ConfigError: unknown dataset (the message lists the known ones).
    """
    from unet3plus.config import DATASET_OF_LAYOUT
    from unet3plus.errors import ConfigError

    layouts = {name: layout for layout, name in DATASET_OF_LAYOUT.items()}
    if dataset not in layouts:
        raise ConfigError(f"dataset {dataset!r} is unknown; expected one of {', '.join(map(repr, layouts))}")
    return layouts[dataset]


def input_dir(artifact: Any, what: str, producer: str, required: str = "") -> "pathlib.Path":  # noqa: F821
    """The directory behind an input artifact, checked before any work starts.

    Args:
        artifact: a KFP input artifact whose ``path`` should be a directory.
        what: what it should hold, for the message (``"preprocessed dataset"``).
        producer: the component that writes it, for the message (``"preprocess_data"``).
        required: a file that must exist inside it (``"manifest.csv"``), or ``""``.

    Returns:
        The directory.

    Raises:
        DataError: the path is not a directory or lacks ``required``.
    """
    import json
    import pathlib

    from unet3plus.errors import DataError

    path = pathlib.Path(artifact.path)
    if (path / "location.json").is_file():  # a dataset on the workspace claim: see dataset_output
        path = pathlib.Path(json.loads((path / "location.json").read_text())["path"])
    if not path.is_dir():
        raise DataError(f"{path}: the {what} is not a directory; connect this input to the output of {producer}")
    if required and not (path / required).is_file():
        raise DataError(f"{path}: the {what} has no {required}; connect this input to the output of {producer}")
    return path


def dataset_output(artifact: Any, workspace: str, kind: str, key: str, existing: str = "") -> Any:
    """Where a step writes a dataset: the artifact's own folder, or a folder on the workspace claim.

    Without a ``workspace`` the dataset is the artifact, uploaded to the artifact store and
    downloaded by every step that reads it. With one (the claim's mount path), the dataset is
    written to ``<workspace>/unet3plus/<kind>/<key>`` and the artifact holds only
    ``location.json`` (``{"path": ...}``), which :func:`input_dir` follows: the data stays on the
    claim. ``key`` names the content (e.g. a hash of the settings that make it), so a later run
    with the same settings finds it there, as KFP's cache finds the artifact. ``existing``: a
    folder already on the claim that is the dataset (referenced in place, nothing written).

    Returns:
        The folder to write (a ``pathlib.Path``; its parent exists).
    """
    import json
    import pathlib

    if not workspace:
        return pathlib.Path(artifact.path)
    folder = pathlib.Path(existing) if existing else pathlib.Path(workspace) / "unet3plus" / kind / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(artifact.path).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(artifact.path) / "location.json").write_text(json.dumps({"path": str(folder)}))
    artifact.metadata["location"] = str(folder)
    return folder


def content_key(*parts: Any) -> str:
    """16 hex of the SHA-256 of ``parts`` as JSON: the name of a dataset made from exactly these settings."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_numbers(metrics: Any, values: dict) -> None:
    """Log every finite number of ``values`` on a KFP Metrics artifact (booleans and text skipped)."""
    import math

    for key, value in sorted(values.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(key, float(value))


def ablation_failed(artifact: Any, error: BaseException) -> float:
    """Turn an ablation's failure into a marker, so that its branch ends successfully and nothing else is harmed.

    Argo's DAG fail-fast can cut sibling branches of a failed ParallelFor iteration short
    (kubeflow/pipelines#7330), and retries inside a ParallelFor may be ignored (#13897): a failing
    variant must not fail its task. Its error is logged, written to ``FAILED.json`` in
    ``artifact`` (``{"error": ...}``) and to the artifact's metadata (``failed``, ``error``); training
    also leaves its FAILED MLflow run with the error, which the report shows as a FAILED row.

    Returns:
        0.0, the step's number for a failed variant (no score: see the marker).
    """
    import json
    import logging
    import pathlib

    message = f"{type(error).__name__}: {error}"
    logging.getLogger("unet3plus").error("this ablation failed; recorded, and the pipeline goes on: %s", message)
    folder = pathlib.Path(artifact.path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "FAILED.json").write_text(json.dumps({"error": message}))
    artifact.metadata.update({"failed": True, "error": message[:2000]})
    return 0.0


def failure_of(folder: Any) -> Optional[str]:
    """The error an upstream step recorded with :func:`ablation_failed` in ``folder``, or None."""
    import json
    import pathlib

    marker = pathlib.Path(folder) / "FAILED.json"
    return json.loads(marker.read_text())["error"] if marker.is_file() else None


def record_training(model: Any, metrics: Any, config: Any, summary: dict, ablation: str) -> float:
    """Describe a finished training in its KFP outputs, the same whichever way it ran (in-pod or TrainJob).

    Fills the model artifact's metadata (dataset, architecture, encoder, ablation, MLflow run id,
    best validation Dice) and logs ``best_val_dice``, ``best_epoch`` and ``epochs`` on ``metrics``
    (training itself tagged the MLflow run with the ablation's name).

    Returns:
        The best validation Dice.
    """
    model.metadata.update({
        "framework": "pytorch",
        "dataset": summary["dataset"],
        "arch": config.model.arch,
        "encoder": config.model.encoder,
        "ablation": ablation,
        "mlflow_run_id": summary.get("mlflow_run_id") or "",
        "best_val_dice": summary["best_val_dice"],
    })
    log_numbers(metrics, {key: summary[key] for key in ("best_val_dice", "best_epoch", "epochs")})
    return float(summary["best_val_dice"])


HELPERS = [mlflow_environment, start, layout_of, input_dir, dataset_output, content_key, log_numbers,
           ablation_failed, failure_of, record_training]
