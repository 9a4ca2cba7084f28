"""Component: train across nodes with a Kubeflow Trainer TrainJob, handing the model on like ``train_model``."""


from kfp import dsl

from components.common import component, input_dir, record_training, start


@component
def train_on_trainjob(
    processed: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    job: dict,
    ablation: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    pipeline_version: str = "",
) -> float:
    """Train on several nodes: stage the data on the workspace claim, run a TrainJob, collect the model.

    The dataset and ``params`` are copied to ``<workspace>/unet3plus/<job name>/`` (``data/``,
    ``params.yaml``) on the claim this pod and the TrainJob's pods mount (ReadWriteMany); the
    TrainJob (``unet3plus.trainjob.render_trainjob``) runs ``unet3plus train --params ... [--ablation
    NAME]`` into ``.../model``; its logs (node 0) are streamed here; then the model directory is
    copied into the ``model`` artifact with the same metadata and metrics as ``train_model``, so
    evaluation and registration work unchanged. Training writes one MLflow run (rank 0 of the
    job), which the artifact's ``mlflow_run_id`` names.

    Args:
        processed: the preprocessed dataset (from ``preprocess_data``).
        model, metrics: as ``train_model``.
        params: text of ``params.yaml``.
        job: the TrainJob settings, compiled in by the pipeline: the fields of
            ``unet3plus.trainjob.TrainJobSettings`` plus ``namespace`` (``""``: this pod's),
            ``timeout_seconds``, ``cleanup`` and ``poll_seconds``.
        ablation: the name of a variant of ``ablations.variants`` to train, or ``""`` for the main
            model (as ``train_model``).
        kfp_run_id, kfp_run_name, pipeline_version: the Kubeflow run's id and name (KFP's placeholders)
            and the pipeline version; every MLflow run this step writes is tagged with them
            (``components.common.start``).

    A dataset already on the claim (the pipeline's workspace, ``components.common.dataset_output``)
    is used in place, not copied.

    Returns:
        The best validation Dice.

    Raises:
        ConfigError: invalid parameters or job settings, or no such variant.
        DataError: the preprocessed input is missing or incomplete.
        UserError: the TrainJob was refused, failed or timed out.
    """
    import json
    import pathlib
    import shutil
    import uuid

    from unet3plus.trainjob import TrainJobSettings, render_trainjob, run_trainjob, worker_arguments

    config = start(params, ablation=ablation, kfp_run=[kfp_run_id, kfp_run_name, pipeline_version])
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
    on_claim = data_dir.resolve().is_relative_to(pathlib.Path(settings.workspace_mount).resolve())
    if not on_claim:
        shutil.copytree(data_dir, workdir / "data")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(params)
    data = data_dir if on_claim else workdir / "data"
    arguments = worker_arguments(str(workdir / "params.yaml"), str(data), str(workdir / "model"), ablation)
    run_trainjob(render_trainjob(name, namespace, settings, arguments), namespace, **run)
    shutil.copytree(workdir / "model", model.path, dirs_exist_ok=True)
    if not on_claim:
        shutil.rmtree(workdir / "data")  # a copy made above; the model stays on the claim as well
    (workdir / "params.yaml").unlink()
    summary = json.loads((pathlib.Path(model.path) / "train_summary.json").read_text())
    return record_training(model, metrics, config, summary, ablation)
