"""Component: score a trained model per 3-D volume on the test split."""


from kfp import dsl

from components.common import ablation_failed, component, failure_of, input_dir, log_numbers, start


@component
def evaluate_model(
    model: dsl.Input[dsl.Model],
    processed: dsl.Input[dsl.Dataset],
    raw: dsl.Input[dsl.Dataset],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    page: dsl.Output[dsl.HTML],
    cgm: dsl.Output[dsl.ClassificationMetrics],
    params: str,
    ablation: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    pipeline_version: str = "",
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
        page: the model's page in the KFP UI (``unet3plus.model_page``): learning curves, best and
            worst cases, headline numbers and a link to its MLflow run.
        cgm: the classification-guided module's ROC curve over test slices and its confusion
            matrix, as KFP ``ClassificationMetrics`` (nothing for a model without a CGM).
        params: text of ``params.yaml`` (``evaluate`` and ``mlflow`` sections are used).
        ablation: the name of the variant of ``ablations.variants`` the model is (``""``: the main model).
            A variant whose training or evaluation failed ends this step with the failure recorded
            (``FAILED.json``, ``components.common.ablation_failed``), not failed.
        kfp_run_id, kfp_run_name, pipeline_version: the Kubeflow run's id and name (KFP's placeholders)
            and the pipeline version; every MLflow run this step writes is tagged with them
            (``components.common.start``).

    Returns:
        The mean test Dice over volumes.

    Raises:
        ConfigError: invalid parameters, or no such variant.
        DataError: an input directory is missing or incomplete, or has no test case.
        CheckpointError: the model's checkpoint is missing or corrupt.
    """
    import html
    import json
    import pathlib

    import pandas as pd

    from unet3plus.evaluate import evaluate
    from unet3plus.model_page import model_page_html, run_link

    config = start(params, ablation=ablation, kfp_run=[kfp_run_id, kfp_run_name, pipeline_version])
    name = f"{ablation or 'main'} model"
    try:
        if failure_of(model.path):
            raise RuntimeError(f"its training failed ({failure_of(model.path)})")
        model_dir = input_dir(model, "trained model", "train_model", required="best.pt")
        data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
        raw_dir = input_dir(raw, "raw dataset", "raw_data")
        summary = evaluate(config, checkpoint=model_dir / "best.pt", data_dir=data_dir, raw_dir=raw_dir,
                           out_dir=evaluation.path)
    except Exception as err:
        if not ablation:
            raise
        pathlib.Path(page.path).write_text(f"<p>The {html.escape(name)} failed: {html.escape(str(err))}</p>")
        return ablation_failed(evaluation, err)
    evaluation.metadata.update({"dataset": summary["dataset"], "cases": summary["cases"]})
    log_numbers(metrics, summary)
    # The KFP UI's view of the model: curves, best and worst cases, link to its MLflow run; the CGM's ROC.
    run_id = json.loads((model_dir / "train_summary.json").read_text()).get("mlflow_run_id") or ""
    run_name, url = run_link(config.mlflow, run_id) if run_id else ("", None)
    pathlib.Path(page.path).write_text(model_page_html(run_name or name, model_dir, evaluation.path, run_id, url))
    roc = pathlib.Path(evaluation.path) / "cgm_roc.csv"
    if roc.is_file():
        curve = pd.read_csv(roc)
        cgm.log_roc_curve(curve["fpr"].tolist(), curve["tpr"].tolist(), curve["threshold"].tolist())
        cgm.log_confusion_matrix(["organ-free", "organ"], [[summary["cgm_tn"], summary["cgm_fp"]],
                                                          [summary["cgm_fn"], summary["cgm_tp"]]])
    return float(summary["dice"])
