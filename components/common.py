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
from typing import Any

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


def start(params: str, ablation: str = "") -> Any:
    """What every component does first: logging, the MLflow settings of the mounted secret, the configuration.

    Args:
        params: the text of a ``params.yaml``.
        ablation: the name of a variant of its ``ablations.variants``, or ``""`` for the main model.

    Returns:
        ``unet3plus.config.parse_config(params, ablation=ablation)``.

    Raises:
        ConfigError: invalid parameters, no such variant, or an MLflow secret without the tracking URI.
    """
    from unet3plus.config import parse_config
    from unet3plus.utils import setup_logging

    setup_logging()
    mlflow_environment()
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
    import pathlib

    from unet3plus.errors import DataError

    path = pathlib.Path(artifact.path)
    if not path.is_dir():
        raise DataError(f"{path}: the {what} is not a directory; connect this input to the output of {producer}")
    if required and not (path / required).is_file():
        raise DataError(f"{path}: the {what} has no {required}; connect this input to the output of {producer}")
    return path


def log_numbers(metrics: Any, values: dict) -> None:
    """Log every finite number of ``values`` on a KFP Metrics artifact (booleans and text skipped)."""
    import math

    for key, value in sorted(values.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(key, float(value))


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


HELPERS = [mlflow_environment, start, layout_of, input_dir, log_numbers, record_training]
