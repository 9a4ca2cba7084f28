"""Segment whole CT volumes: NIfTI in, uint8 NIfTI mask out, in the input's own voxel grid.

The model is either a training checkpoint (``models/liver/best.pt``) or an MLflow model URI
(``models:/unet3plus-liver@champion``, ``runs:/<id>/model``) logged by :mod:`unet3plus.register`.
Both carry the data configuration used in training (slice size, HU window, resize mode), so a new
scan is preprocessed exactly as the training data were.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.config import Config, DataConfig, config_from_dict
from unet3plus.data.geometry import restore_volume
from unet3plus.data.preprocess import prepare_volume
from unet3plus.data.sources import read_volume
from unet3plus.device import autocast_context, memory_format_for, prepare_model, select_device
from unet3plus.errors import CheckpointError, UserError
from unet3plus.models import predict_proba
from unet3plus.utils import atomic_path, redact

logger = logging.getLogger(__name__)

# Key of the MLflow model metadata written by unet3plus.register (MLmodel "metadata" field).
METADATA_KEY = "unet3plus"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


class ProbabilityModel(nn.Module):
    """A segmentation network whose ``forward`` returns probabilities (CGM gate applied).

    This is what :mod:`unet3plus.register` logs to MLflow, so the ``pytorch`` and ``pyfunc``
    flavours both map a (N, 3, S, S) float32 batch to (N, C, S, S) probabilities in [0, 1].
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.network, x)


def is_mlflow_uri(model: str | os.PathLike) -> bool:
    """True for ``scheme:/...`` strings (``models:/``, ``runs:/``, ``s3://``), False for file paths."""
    return bool(_URI_SCHEME.match(str(model)))


def load_predictor(
    model: str | os.PathLike, device_preference: str = "auto", mixed_precision: bool = True
) -> tuple[nn.Module, DataConfig, torch.device]:
    """Load a model for inference, with the data configuration it was trained on.

    Args:
        model: MLflow model URI or checkpoint path.
        device_preference: ``config.evaluate.device`` (``"auto"``, ``"cpu"``, ``"cuda[:N]"``); used
            for checkpoints. MLflow models are ``torch.export`` programs saved on the CPU and run there.
        mixed_precision: on CUDA, lay the checkpoint's network out channels_last for bf16 (see
            :func:`unet3plus.device.prepare_model`).

    Returns:
        (module mapping a (N, 3, S, S) float32 tensor to (N, C, S, S) probabilities, in eval mode
        on the device; the training :class:`DataConfig`; the device).

    Raises:
        CheckpointError: the checkpoint is missing, corrupt or not a unet3plus checkpoint.
        UserError: the MLflow model cannot be loaded or was not logged by unet3plus.
    """
    if not is_mlflow_uri(model):
        checkpoint = load_checkpoint(model)
        device = select_device(device_preference)
        try:
            data_config = config_from_dict({"data": checkpoint["config"]["data"]}).data
        except (KeyError, TypeError, UserError) as err:
            raise CheckpointError(f"{model}: checkpoint has no valid data configuration ({err})") from err
        network = prepare_model(ProbabilityModel(model_from_checkpoint(checkpoint)), device, mixed_precision)
        return network.eval(), data_config, device
    # Imported here: MLflow takes seconds to import and checkpoints do not need it.
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        metadata = mlflow.models.get_model_info(str(model)).metadata or {}
        module = mlflow.pytorch.load_model(str(model))
    except (MlflowException, OSError) as err:
        raise UserError(redact(f"cannot load MLflow model {model} from {mlflow.get_tracking_uri()}: {err}")) from err
    if METADATA_KEY not in metadata:
        raise UserError(f"MLflow model {model} has no {METADATA_KEY!r} metadata; register it with `unet3plus register`")
    data_config = config_from_dict({"data": metadata[METADATA_KEY]["data"]}).data
    return module, data_config, torch.device("cpu")


@torch.no_grad()
def predict_slices(
    forward: Callable[[torch.Tensor], torch.Tensor],
    stacks: np.ndarray,
    batch_size: int,
    device: torch.device,
    description: str = "slices",
    mixed_precision: bool = True,
) -> np.ndarray:
    """Run ``forward`` over a volume's 3-slice stacks in order, batch by batch.

    Args:
        forward: maps a (B, 3, S, S) float32 tensor on ``device`` to (B, C, S, S).
        stacks: (Z, 3, S, S) array (any float dtype).
        batch_size: slices per forward pass (the model itself splits a batch further where an
            up-sampling output would reach INT_MAX elements, see
            :class:`unet3plus.models.SegmentationModel`).
        device: where the batches go.
        description: label of the progress bar.
        mixed_precision: on CUDA, bf16 autocast and channels_last batches (the recipe of
            :func:`unet3plus.device.prepare_model`); ignored on CPU.

    Returns:
        (Z, C, S, S) float32 array.
    """
    memory_format = memory_format_for(device, mixed_precision)
    outputs = []
    for start in tqdm(range(0, len(stacks), batch_size), desc=description, unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(stacks[start : start + batch_size], dtype=np.float32))
        with autocast_context(device, mixed_precision):
            probabilities = forward(batch.to(device, memory_format=memory_format))
        outputs.append(probabilities.float().cpu().numpy())
    return np.concatenate(outputs)


def write_mask(path: str | os.PathLike, mask: np.ndarray, reference: nib.spatialimages.SpatialImage) -> Path:
    """Write a binary mask as uint8 NIfTI with the reference scan's affine and header, atomically.

    Args:
        path: output ``.nii`` or ``.nii.gz``.
        mask: (X, Y, Z) bool or 0/1 array in the reference's voxel grid.
        reference: the scan the mask belongs to.

    Returns:
        The written path.
    """
    if tuple(mask.shape) != tuple(reference.shape):
        raise ValueError(f"mask shape {mask.shape} does not match the reference scan's {reference.shape}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), reference.affine, header=header)
    # A CT header may carry rescale slope/intercept (HU = raw * slope + intercept); a mask must not.
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def predict_file(model: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike, config: Config) -> Path:
    """Segment one CT volume and write its mask.

    Args:
        model: MLflow model URI (``models:/unet3plus-liver@champion``, ``runs:/<id>/model``) or a
            checkpoint path.
        input: 3-D CT volume in Hounsfield units, ``.nii`` or ``.nii.gz``.
        output: mask to write (``.nii.gz``): uint8 0/1, shape and affine of ``input``.
        config: ``evaluate.threshold``, ``evaluate.batch_size``, ``evaluate.device`` and
            ``train.mixed_precision`` (bf16 + channels_last on CUDA) are used;
            ``mlflow`` gives the tracking/registry URI for ``models:/`` URIs. The preprocessing
            parameters come from the model itself.

    Returns:
        ``output`` as a Path.

    Raises:
        DataError: ``input`` is unreadable or not a 3-D volume (nothing is written).
        CheckpointError: the checkpoint is missing or corrupt.
        UserError: the MLflow model cannot be loaded.
    """
    if not str(output).endswith((".nii", ".nii.gz")):
        raise UserError(f"{output}: the mask is written as NIfTI; give an --output ending in .nii.gz or .nii")
    scan = read_volume(input)
    if is_mlflow_uri(model):
        from unet3plus.tracking import configure_for_reading, store_errors

        configure_for_reading(config.mlflow)
        with store_errors(config.mlflow):
            network, data_config, device = load_predictor(model, config.evaluate.device, config.train.mixed_precision)
    else:
        network, data_config, device = load_predictor(model, config.evaluate.device, config.train.mixed_precision)
    image_hu = np.asarray(scan.get_fdata(dtype=np.float32))
    stacks, geometry = prepare_volume(image_hu, scan.affine, data_config)
    probabilities = predict_slices(network, stacks, config.evaluate.batch_size, device, description=Path(input).name,
                                   mixed_precision=config.train.mixed_precision)
    restored = restore_volume(probabilities[:, 0], geometry, interpolation="linear")
    mask = restored > config.evaluate.threshold
    write_mask(output, mask, scan)
    logger.info("%s: %d organ voxels written to %s", input, int(mask.sum()), output)
    return Path(output)

