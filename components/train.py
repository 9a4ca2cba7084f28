"""Component: train a model on the preprocessed dataset, tracked in MLflow (several processes under torchrun)."""

from kfp import dsl

from components.common import component, input_dir, record_training, start


@component
def train_model(
    processed: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    ablation: str = "",
    nproc: int = 1,
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
    import subprocess
    import sys
    import tempfile

    from unet3plus.config import parse_config
    from unet3plus.errors import ConfigError
    from unet3plus.train import train
    from unet3plus.trainjob import worker_arguments

    config = start(params, ablation=ablation)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be a positive integer, got {nproc!r}")
    data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
    if nproc == 1:
        # The run is tagged with the variant and grouped under the study of the main configuration.
        summary = train(config, data_dir=data_dir, out_dir=model.path, ablation=ablation or "main",
                        base=parse_config(params))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            params_file = pathlib.Path(scratch) / "params.yaml"
            params_file.write_text(params)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                       "-m", "unet3plus", *worker_arguments(str(params_file), str(data_dir), model.path, ablation)]
            logging.getLogger("unet3plus").info("running %d training processes: %s", nproc, " ".join(command))
            status = subprocess.run(command, check=False).returncode
        if status != 0:
            raise RuntimeError(f"torchrun exited with status {status}; the failing rank's error is in the log above")
        summary = json.loads((pathlib.Path(model.path) / "train_summary.json").read_text())
    return record_training(model, metrics, config, summary, ablation)
