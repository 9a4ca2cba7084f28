"""What every component shares: the image it runs in, and how it reads its configuration and inputs.

Components are KFP lightweight Python components: KFP ships the source of each function, plus the
helpers below (``additional_funcs``), to the pod and runs it in :data:`IMAGE`, the project's image
(``Dockerfile``), where :mod:`unet3plus` is installed. So the helpers and the component bodies import
what they use inside the function and annotate with ``typing`` names only: the shipped source has
nothing else at module level. That also keeps compiling the pipeline fast (no torch import).
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


def load_config(params: str, overrides: Optional[List[str]] = None) -> Any:
    """Build the validated :class:`unet3plus.config.Config` from ``params.yaml`` text and overrides.

    Args:
        params: the text of a ``params.yaml`` file.
        overrides: ``section.key=value`` strings (values are YAML), applied in order.

    Returns:
        The configuration.

    Raises:
        ConfigError: ``params`` is empty, not YAML or not a mapping of sections; an override is
            not a ``section.key=value`` string; or any knob is unknown, mistyped or invalid.
    """
    import yaml

    from unet3plus.config import apply_overrides, config_from_dict, parse_yaml
    from unet3plus.errors import ConfigError

    mlflow_environment()
    hint = "pass the text of params.yaml (python -m pipeline submit --params params.yaml does)"
    try:
        raw = parse_yaml(params)
    except yaml.YAMLError as err:
        raise ConfigError(f"params: not valid YAML ({err}); {hint}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections (data, model, train, ...), got {raw!r:.80}; {hint}")
    overrides = list(overrides or [])
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"overrides: {item!r} is not a string; expected 'section.key=value' strings, "
                              "e.g. 'train.epochs=5'")
    try:
        config = config_from_dict(raw)
        return apply_overrides(config, overrides) if overrides else config
    except ConfigError as err:
        raise ConfigError(f"params: {err}") from err


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


def input_dir(artifact: Any, what: str, producer: str, required: str = "") -> "pathlib.Path":
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

    Tags the MLflow run with ``ablation`` (when set), fills the model artifact's metadata (dataset,
    architecture, encoder, ablation, MLflow run id, best validation Dice) and logs
    ``best_val_dice``, ``best_epoch`` and ``epochs`` on ``metrics``.

    Returns:
        The best validation Dice.
    """
    from unet3plus.tracking import open_run

    if ablation and summary.get("mlflow_run_id"):
        with open_run(config.mlflow, run_id=summary["mlflow_run_id"], tags={"ablation": ablation}):
            pass
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


def variant_params(params: str, overrides: Optional[List[str]], ablation: str) -> tuple:
    """``params.yaml`` text and ``unet3plus train`` arguments that train ``overrides`` as the variant ``ablation``.

    ``unet3plus train --ablation NAME`` applies the variant NAME of ``ablations.variants``, tags
    the run NAME and files it under the study of the parameters *without* the variant, as the
    in-process ``train(..., ablation=, base=)`` does. So the overrides travel as that variant
    (``ablation`` or ``main``) in a copy of ``params``, not as ``--set``; with neither an
    ablation nor overrides, ``params`` is returned as given.

    Returns:
        ``(params text, ["--ablation", NAME] or [])``.

    Raises:
        ConfigError: ``ablation`` is not a valid variant name (lower-case letters, digits, ``_``).
    """
    import yaml

    from unet3plus.config import config_from_dict, parse_yaml
    from unet3plus.errors import ConfigError

    if not ablation and not overrides:
        return params, []
    name = ablation or "main"
    raw = parse_yaml(params)
    raw["ablations"] = dict(raw.get("ablations") or {})
    variants = raw["ablations"]["variants"] = dict(raw["ablations"].get("variants") or {})
    variants[name] = {key.strip(): parse_yaml(value)
                      for key, _, value in (item.partition("=") for item in overrides or [])}
    try:
        config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"ablation {name!r}: {err}") from err
    return yaml.safe_dump(raw, sort_keys=False), ["--ablation", name]


HELPERS = [mlflow_environment, load_config, layout_of, input_dir, log_numbers, record_training, variant_params]
