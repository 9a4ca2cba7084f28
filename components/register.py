"""Component: register the evaluated model in the MLflow Model Registry."""

from typing import NamedTuple

from kfp import dsl

from components.common import component, input_dir, start


@component
def register_model(
    model: dsl.Input[dsl.Model],
    evaluation: dsl.Input[dsl.Artifact],
    params: str,
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    pipeline_version: str = "",
) -> NamedTuple("Registered", [("name", str), ("version", str), ("champion", bool)]):
    """Register the model as ``<register.name_prefix>-<dataset>[-synthetic]`` (``unet3plus register``).

    The alias (``register.alias``, default ``champion``) moves to the new version only when its test
    Dice clears ``register.min_test_dice`` and its ``register.metric`` beats the champion's on the
    same test set (see :func:`unet3plus.register.decide_alias`). A retried step creates no second version.

    Args:
        model: the trained model directory (from ``train_model``).
        evaluation: its evaluation directory (from ``evaluate_model``), for ``metrics.json``.
        params: text of ``params.yaml`` (``register`` and ``mlflow`` sections are used).
        kfp_run_id, kfp_run_name, pipeline_version: the Kubeflow run's id and name (KFP's placeholders)
            and the pipeline version; every MLflow run this step writes is tagged with them
            (``components.common.start``); the version's tags name the run.

    Returns:
        ``(name, version, champion)``: the registered model name, its new version and whether it
        now holds the alias.

    Raises:
        ConfigError: invalid parameters.
        DataError: an input directory is missing or incomplete.
        CheckpointError: the model's checkpoint is missing or corrupt.
    """
    from unet3plus.register import register

    config = start(params, kfp_run=[kfp_run_id, kfp_run_name, pipeline_version])
    model_dir = input_dir(model, "trained model", "train_model", required="best.pt")
    evaluation_dir = input_dir(evaluation, "evaluation", "evaluate_model", required="metrics.json")
    result = register(config, checkpoint=model_dir / "best.pt", metrics_path=evaluation_dir / "metrics.json")
    return result["name"], str(result["version"]), bool(result["champion"])
