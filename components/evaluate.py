"""Component: score a trained model per 3-D volume on the test split."""

from kfp import dsl

from components.common import component, input_dir, log_numbers, start


@component
def evaluate_model(
    model: dsl.Input[dsl.Model],
    processed: dsl.Input[dsl.Dataset],
    raw: dsl.Input[dsl.Dataset],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    ablation: str = "",
) -> float:
    """Evaluate ``model/best.pt`` on every test volume (``unet3plus evaluate``).

    Predictions are mapped back to each volume's original grid and scored there; the results also
    go to the training run in MLflow.

    Args:
        model: the trained model directory (from ``train_model``).
        processed: the preprocessed dataset it was trained on (from ``preprocess_data``).
        raw: the raw dataset (from ``raw_data``): original labels and geometry.
        evaluation: output directory with ``metrics.json``, ``per_case.csv``,
            ``predictions/*.nii.gz`` and ``overlays/*.png``.
        metrics: every finite number of ``metrics.json`` (``dice``, ``iou``, ``hd95``, ...).
        params: text of ``params.yaml`` (``evaluate`` and ``mlflow`` sections are used).
        ablation: the name of the variant of ``ablations.variants`` the model is (``""``: the main model).

    Returns:
        The mean test Dice over volumes.

    Raises:
        ConfigError: invalid parameters, or no such variant.
        DataError: an input directory is missing or incomplete, or has no test case.
        CheckpointError: the model's checkpoint is missing or corrupt.
    """
    from unet3plus.evaluate import evaluate

    config = start(params, ablation=ablation)
    model_dir = input_dir(model, "trained model", "train_model", required="best.pt")
    data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
    raw_dir = input_dir(raw, "raw dataset", "raw_data")
    summary = evaluate(config, checkpoint=model_dir / "best.pt", data_dir=data_dir, raw_dir=raw_dir,
                       out_dir=evaluation.path)
    evaluation.metadata.update({"dataset": summary["dataset"], "cases": summary["cases"]})
    log_numbers(metrics, summary)
    return float(summary["dice"])
