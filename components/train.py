"""Component: train a model on the preprocessed dataset, tracked in MLflow."""

from typing import List, Optional

from kfp import dsl

from components.common import component, input_dir, load_config, log_numbers


@component
def train_model(
    processed: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    overrides: Optional[List[str]] = None,
    ablation: str = "",
) -> float:
    """Train the network of the ``model``, ``loss`` and ``train`` sections (``unet3plus train``).

    The MLflow tracking URI comes from ``MLFLOW_TRACKING_URI`` when set (on the cluster, from a
    Kubernetes secret), else from ``mlflow.tracking_uri``.

    Args:
        processed: the preprocessed dataset (from ``preprocess_data``).
        model: output directory with ``best.pt`` (best validation Dice), ``last.pt``,
            ``history.csv`` and ``train_summary.json``; metadata gets the dataset, architecture,
            MLflow run id and best validation Dice.
        metrics: ``best_val_dice``, ``best_epoch`` and ``epochs``.
        params: text of ``params.yaml``.
        overrides: ``section.key=value`` overrides (an ablation's changes).
        ablation: the ablation's name, set as the ``ablation`` tag of the MLflow run (``""``:
            the main model, tagged ``main``).

    Returns:
        The best validation Dice.

    Raises:
        ConfigError: invalid parameters or overrides.
        DataError: the preprocessed input is missing or incomplete.
    """
    from unet3plus.train import train
    from unet3plus.utils import setup_logging

    setup_logging()
    config = load_config(params, overrides)
    data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
    # The run is tagged with the variant and grouped under the study of the base parameters.
    summary = train(config, data_dir=data_dir, out_dir=model.path, ablation=ablation or "main", base=load_config(params))
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
