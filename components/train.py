"""Component: train a model on the preprocessed dataset, tracked in MLflow (several processes under torchrun)."""

from typing import List, Optional

from kfp import dsl

from components.common import component, input_dir, load_config, record_training, variant_params


@component
def train_model(
    processed: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    params: str,
    overrides: Optional[List[str]] = None,
    ablation: str = "",
    nproc: int = 1,
) -> float:
    """Train the network of the ``model``, ``loss`` and ``train`` sections (``unet3plus train``).

    With ``nproc`` > 1 the pod runs ``torchrun --standalone --nproc_per_node NPROC -m unet3plus
    train`` (one process per GPU, or CPU processes with the gloo backend); rank 0 alone tracks and
    writes, so the outputs and the MLflow run are the same as with one process.

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
            the main model, tagged ``main``); with ``nproc`` > 1, lower-case letters, digits and ``_``
            (it names the variant the workers train).
        nproc: training processes in this pod (the pod's GPUs on a GPU node).

    Returns:
        The best validation Dice.

    Raises:
        ConfigError: invalid parameters, overrides or ``nproc``.
        DataError: the preprocessed input is missing or incomplete.
        RuntimeError: a torchrun worker failed (its error is in the log above).
    """
    import json
    import logging
    import pathlib
    import subprocess
    import sys
    import tempfile

    from unet3plus.errors import ConfigError
    from unet3plus.train import train
    from unet3plus.utils import setup_logging

    setup_logging()
    config = load_config(params, overrides)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be a positive integer, got {nproc!r}")
    data_dir = input_dir(processed, "preprocessed dataset", "preprocess_data", required="manifest.csv")
    if nproc == 1:
        # The run is tagged with the variant and grouped under the study of the base parameters.
        summary = train(config, data_dir=data_dir, out_dir=model.path, ablation=ablation or "main",
                        base=load_config(params))
    else:
        # The overrides travel as the variant `ablation` (see variant_params), so that the run is
        # tagged and grouped under its study as in the 1-process path.
        text, selection = variant_params(params, overrides, ablation)
        with tempfile.TemporaryDirectory() as scratch:
            params_file = pathlib.Path(scratch) / "params.yaml"
            params_file.write_text(text)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                       "-m", "unet3plus", "train", "--params", str(params_file), "--data", str(data_dir),
                       "--out", model.path, *selection]
            logging.getLogger("unet3plus").info("running %d training processes: %s", nproc, " ".join(command))
            status = subprocess.run(command, check=False).returncode
        if status != 0:
            raise RuntimeError(f"torchrun exited with status {status}; the failing rank's error is in the log above")
        summary = json.loads((pathlib.Path(model.path) / "train_summary.json").read_text())
    return record_training(model, metrics, config, summary, ablation)
