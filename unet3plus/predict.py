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
from unet3plus.data.sources import open_volume, read_slab
from unet3plus.device import autocast_context, memory_format_for, prepare_model, select_device
from unet3plus.errors import CheckpointError, DataError, UserError
from unet3plus.models import predict_proba
from unet3plus.utils import atomic_path

logger = logging.getLogger(__name__)

# Key of the MLflow model metadata written by unet3plus.register (MLmodel "metadata" field).
METADATA_KEY = "unet3plus"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
BYTES_PER_VOXEL = 12
"""Memory prediction needs per voxel of the scan: the voxels as float32, the probabilities restored
to the scan's grid (float32), the mask and its uint8 copy for writing, with room for resampling."""


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
        device = select_device(device_preference, "evaluate.device")
        checkpoint = load_checkpoint(model)
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
        raise UserError(f"cannot load MLflow model {model} from {mlflow.get_tracking_uri()}: {err}") from err
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


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else the free pages)."""
    try:
        with open("/proc/meminfo") as stream:
            fields = dict(line.split(":", 1) for line in stream)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def read_scan(path: str | os.PathLike) -> nib.spatialimages.SpatialImage:
    """Read a CT scan to segment, after checking what prediction needs: the one check of every predict path.

    From the header, before any voxel is read: a readable 3-D NIfTI with numeric voxels (not RGB,
    not complex), an invertible affine, and a size whose prediction fits in the memory available
    now (:data:`BYTES_PER_VOXEL`); then every voxel finite.

    Returns:
        The image with its voxels in memory (scaling applied).

    Raises:
        DataError: naming ``path`` and the first problem; nothing has been loaded but the header.
    """
    image = open_volume(path)
    dtype = image.get_data_dtype()
    if dtype.kind not in "iuf":
        raise DataError(f"{path}: voxels of type {dtype}; a CT scan holds one real number per voxel (not RGB)")
    linear = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-9:
        raise DataError(f"{path}: the affine (voxel-to-world matrix) is not invertible: {linear.round(4).tolist()}; "
                        "fix the header's voxel sizes and orientation (pixdim, qform/sform)")
    needed, available = int(np.prod(image.shape, dtype=np.float64)) * BYTES_PER_VOXEL, available_memory()
    if needed > available:
        raise DataError(f"{path}: {' x '.join(map(str, image.shape))} voxels need about {needed / 2**30:.1f} GiB to "
                        f"segment, but only {available / 2**30:.1f} GiB of memory is available")
    voxels = read_slab(image, path, 0, image.shape[2])
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
        raise DataError(f"{path}: {bad} NaN or infinite voxel(s); a CT scan holds finite Hounsfield units")
    return image.__class__(voxels, image.affine, image.header)


def check_mask_path(path: str | os.PathLike) -> None:
    """Refuse a mask path that is a folder or not a named ``.nii``/``.nii.gz`` file (``--output .nii.gz``).

    Raises:
        UserError: naming the path.
    """
    name = Path(path).name
    if Path(path).is_dir():
        raise UserError(f"{path}: is a folder; give the mask's file name, e.g. {Path(path) / 'mask.nii.gz'}")
    if not name.endswith((".nii", ".nii.gz")) or name in (".nii", ".nii.gz"):
        raise UserError(f"{path}: the mask is written as NIfTI; give an --output named like mask.nii.gz or mask.nii")


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
    check_mask_path(output)
    scan = read_scan(input)
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

