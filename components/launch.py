"""Component: train across nodes with a Kubeflow Trainer TrainJob, handing the model on like ``train_model``."""

from typing import List, Optional

from kfp import dsl

from components.common import component, input_dir, load_config, record_training, variant_params


@component
def train_on_trainjob(
    processed: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    job: dict,
    overrides: Optional[List[str]] = None,
    ablation: str = "",
) -> float:
    """Train on several nodes: stage the data on the workspace claim, run a TrainJob, collect the model.

    The dataset is copied to ``<workspace>/unet3plus/<job name>/data`` on the claim this pod and the
    TrainJob's pods mount (ReadWriteMany); the TrainJob (``pipeline.trainjob.render_trainjob``)
    trains into ``.../model``; its logs (node 0) are streamed here; then the model directory is
    copied into the ``model`` artifact with the same metadata and metrics as ``train_model``, so
    evaluation and registration work unchanged. Training writes one MLflow run (rank 0 of the
    job), which the artifact's ``mlflow_run_id`` names.

    Args:
        processed: the preprocessed dataset (from ``preprocess_data``).
        model, metrics: as ``train_model``.
        params: text of ``params.yaml``.
        job: the TrainJob settings, compiled in by the pipeline: the fields of
            ``pipeline.trainjob.TrainJobSettings`` plus ``namespace`` (``""``: this pod's),
            ``timeout_seconds``, ``cleanup`` and ``poll_seconds``.
        overrides: ``section.key=value`` overrides (an ablation's changes).
        ablation: the ablation's name (MLflow tag).

    Returns:
        The best validation Dice.

    Raises:
        ConfigError: invalid parameters or job settings.
        DataError: the preprocessed input is missing or incomplete.
        UserError: the TrainJob was refused, failed or timed out.
    """
    import json
    import pathlib
    import shutil
    import uuid

    from pipeline.trainjob import TrainJobSettings, render_trainjob, run_trainjob, train_arguments
    from unet3plus.utils import setup_logging

    setup_logging()
    config = load_config(params, overrides)
    data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
    options = dict(job)
    namespace = options.pop("namespace", "") or pathlib.Path(
        "/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    run = {key: options.pop(key) for key in ("timeout_seconds", "cleanup", "poll_seconds")}
    for key in ("nodes", "gpus_per_node", "deadline_seconds"):  # JSON through KFP: 2 arrives as 2.0
        if isinstance(options.get(key), float) and options[key].is_integer():
            options[key] = int(options[key])
    for key in ("node_selector", "image_pull_secrets", "labels"):
        if options.get(key) is not None:
            options[key] = tuple(tuple(item) if isinstance(item, list) else item for item in options[key])
    settings = TrainJobSettings(**options).check()
    name = f"unet3plus-{uuid.uuid4().hex[:10]}"
    workdir = pathlib.Path(settings.workspace_mount) / "unet3plus" / name
    shutil.copytree(data_dir, workdir / "data")
    # The base parameters, and the overrides as the variant `ablation` in a params file on the claim:
    # the job's run is then tagged and grouped under its study as training in the pod is.
    text, selection = variant_params(params, overrides, ablation)
    arguments = train_arguments(load_config(params), str(workdir / "data"), str(workdir / "model"))
    if selection:
        (workdir / "params.yaml").write_text(text)
        arguments += ["--params", str(workdir / "params.yaml"), *selection]
    run_trainjob(render_trainjob(name, namespace, settings, arguments), namespace, **run)
    shutil.copytree(workdir / "model", model.path, dirs_exist_ok=True)
    shutil.rmtree(workdir / "data")  # a copy made above; the model stays on the claim as well
    (workdir / "params.yaml").unlink(missing_ok=True)
    summary = json.loads((pathlib.Path(model.path) / "train_summary.json").read_text())
    return record_training(model, metrics, config, summary, ablation)
