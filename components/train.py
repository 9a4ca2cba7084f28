"""Component: train a model on the preprocessed dataset, tracked in MLflow (several processes under torchrun)."""


from kfp import dsl

from components.common import ablation_failed, component, input_dir, record_training, start


@component
def train_model(
    processed: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    ablation: str = "",
    nproc: int = 1,
    workspace: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    pipeline_version: str = "",
) -> float:
    """Train the network of the ``model``, ``loss`` and ``train`` sections (``unet3plus train``).

    With ``nproc`` > 1 the pod runs ``torchrun --standalone --nproc_per_node NPROC -m unet3plus
    train --params FILE [--ablation NAME]`` (one process per GPU, or CPU processes with the gloo
    backend); rank 0 alone tracks and writes, so the outputs and the MLflow run are the same as
    with one process.

    The MLflow tracking URI comes from ``MLFLOW_TRACKING_URI`` when set (on the cluster, from a
    Kubernetes secret), else from ``mlflow.tracking_uri``.

    Args:
        processed: the preprocessed dataset (from ``preprocess_data``).
        model: output directory with ``best.pt`` (best validation Dice), ``last.pt``,
            ``history.csv`` and ``train_summary.json``; metadata gets the dataset, architecture,
            MLflow run id and best validation Dice.
        metrics: ``best_val_dice``, ``best_epoch`` and ``epochs``.
        params: text of ``params.yaml``.
        ablation: the name of a variant of ``ablations.variants`` to train (its overrides applied to
            the main configuration; the MLflow run is tagged ``ablation=NAME`` and filed under the
            study of the main configuration), or ``""`` for the main model (tagged ``main``).
        nproc: training processes in this pod (the pod's GPUs on a GPU node).
        workspace: where the workspace claim is mounted, or ``""``. With a claim, checkpoints are
            written to ``<workspace>/unet3plus/checkpoints/<KFP run id>/<ablation or main>`` as
            training writes them (every epoch), so a retried step resumes from the last one into
            the same MLflow run; the model artifact gets a copy at the end. Without one, a retry
            starts over (the checkpoints lived in the lost pod).
        kfp_run_id, kfp_run_name, pipeline_version: the Kubeflow run's id and name (KFP's placeholders)
            and the pipeline version; every MLflow run this step writes is tagged with them
            (``components.common.start``).

    An ablation that fails (``ablation`` set) does not fail the step: its error is in its FAILED
    MLflow run and in the model artifact's ``FAILED.json`` (``components.common.ablation_failed``),
    so the other branches and the report run on any backend. The main model's failure fails the step.

    Returns:
        The best validation Dice.

    Raises:
        ConfigError: invalid parameters, no such variant, or a bad ``nproc``.
        DataError: the preprocessed input is missing or incomplete.
        RuntimeError: a torchrun worker failed (its error is in the log above).
    """
    import json
    import logging
    import pathlib
    import shutil
    import subprocess
    import sys
    import tempfile

    from unet3plus.config import parse_config
    from unet3plus.errors import ConfigError
    from unet3plus.train import train
    from unet3plus.trainjob import worker_arguments

    config = start(params, ablation=ablation, kfp_run=[kfp_run_id, kfp_run_name, pipeline_version])
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be a positive integer, got {nproc!r}")
    data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
    out = pathlib.Path(model.path)
    if workspace:
        out = pathlib.Path(workspace) / "unet3plus" / "checkpoints" / (kfp_run_id or "local") / (ablation or "main")
    resume = (out / "last.pt").is_file()
    if resume:
        logging.getLogger("unet3plus").info("%s: a previous attempt's checkpoint; resuming from it", out / "last.pt")
    try:
        if nproc == 1:
            # The run is tagged with the variant and grouped under the study of the main configuration.
            summary = train(config, data_dir=data_dir, out_dir=out, ablation=ablation or "main",
                            base=parse_config(params), resume=resume)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                params_file = pathlib.Path(scratch) / "params.yaml"
                params_file.write_text(params)
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "unet3plus",
                           *worker_arguments(str(params_file), str(data_dir), str(out), ablation),
                           *(["--resume"] if resume else [])]
                logging.getLogger("unet3plus").info("running %d training processes: %s", nproc, " ".join(command))
                status = subprocess.run(command, check=False).returncode
            if status != 0:
                raise RuntimeError(f"torchrun exited with status {status}; the failing rank's error is in the log above")
            summary = json.loads((out / "train_summary.json").read_text())
    except Exception as err:
        if not ablation:
            raise
        return ablation_failed(model, err)
    if out != pathlib.Path(model.path):
        shutil.copytree(out, model.path, dirs_exist_ok=True)
    return record_training(model, metrics, config, summary, ablation)
