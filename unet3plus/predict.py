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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.config import Config, DataConfig, config_from_dict
from unet3plus.data.geometry import restore_volume
from unet3plus.data.sources import open_volume, read_slab
from unet3plus.data.transforms import prepare_volume
from unet3plus.device import autocast_context, memory_format_for, prepare_model, select_device
from unet3plus.errors import CheckpointError, DataError, UserError
from unet3plus.models import predict_proba
from unet3plus.models.inference import INFERENCE_MEMORY_FORMAT, inference_network
from unet3plus.utils import atomic_path, check_replaceable, record_outputs, redact

logger = logging.getLogger(__name__)

# Key of the MLflow model metadata written by unet3plus.register (MLmodel "metadata" field).
METADATA_KEY = "unet3plus"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUMES_FILE = "volumes.csv"
VOLUME_COLUMNS = ("scan", "organ_voxels", "organ_volume_ml")
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


@dataclass
class Predictor:
    """A network ready for inference and everything that turns a scan into a mask with it.

    The one implementation of "CT volume in, mask out": ``unet3plus predict`` (one scan or a
    folder), the registered MLflow model (:class:`unet3plus.serving.VolumeModel`) and the batch
    pipeline all call :meth:`segment`, so they give the same mask voxel for voxel.

    Attributes:
        network: maps a (N, 3, S, S) float32 batch on ``device`` to (N, C, S, S) probabilities
            (:func:`unet3plus.models.inference.inference_network` wrapped in :class:`ProbabilityModel`).
        data_config: the preprocessing the model was trained with (size, HU window, resize mode).
        threshold: probability above which a voxel is organ; the model's own.
        device: where the network runs.
        batch_size: slices per forward pass.
        mixed_precision: bf16 autocast on CUDA (ignored on the CPU).
    """

    network: nn.Module
    data_config: DataConfig
    threshold: float
    device: torch.device
    batch_size: int = 16
    mixed_precision: bool = True

    def segment(self, scan: nib.spatialimages.SpatialImage, name: str = "scan") -> np.ndarray:
        """Segment one 3-D CT volume (Hounsfield units) read with :func:`read_scan`.

        Args:
            scan: the volume; its affine decides the reorientation.
            name: how messages and the progress bar call it.

        Returns:
            (X, Y, Z) bool mask on the scan's own voxel grid.

        Raises:
            DataError: naming ``name``, when the volume cannot be preprocessed (NaN voxels, a
                singular affine).
        """
        try:
            image_hu = np.asarray(scan.get_fdata(dtype=np.float32))
            stacks, geometry = prepare_volume(image_hu, scan.affine, self.data_config)
        except ValueError as err:
            raise DataError(f"{name}: cannot be segmented: {err}") from err
        probabilities = predict_slices(self.network, stacks, self.batch_size, self.device, description=name,
                                       mixed_precision=self.mixed_precision, memory_format=INFERENCE_MEMORY_FORMAT)
        return restore_volume(probabilities[:, 0], geometry, interpolation="linear") > self.threshold


def predictor_from_checkpoint(
    checkpoint: dict[str, Any],
    source: str | os.PathLike,
    device_preference: str = "auto",
    batch_size: int = 16,
    mixed_precision: bool = True,
) -> Predictor:
    """Build the :class:`Predictor` of a checkpoint: its network in inference form, its data
    configuration and its threshold (``config["evaluate"]["threshold"]``, default 0.5).

    Args:
        checkpoint: a dict from :func:`unet3plus.checkpoint.load_checkpoint`.
        source: where it came from, for messages.
        device_preference: ``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda[:N]"``.
        batch_size: slices per forward pass.
        mixed_precision: bf16 autocast on CUDA.

    Raises:
        CheckpointError: the checkpoint's configuration is invalid.
        UserError: the device is unavailable.
    """
    stored = checkpoint["config"]
    try:
        settings = config_from_dict({"data": stored["data"],
                                     "evaluate": {"threshold": stored.get("evaluate", {}).get("threshold", 0.5)}})
    except (KeyError, TypeError, AttributeError, UserError) as err:
        raise CheckpointError(f"{source}: checkpoint has no valid data configuration ({err})") from err
    device = select_device(device_preference, "evaluate.device")
    network = ProbabilityModel(inference_network(model_from_checkpoint(checkpoint)))
    network = prepare_model(network, device, mixed_precision, memory_format=INFERENCE_MEMORY_FORMAT).eval()
    return Predictor(network, settings.data, settings.evaluate.threshold, device, batch_size, mixed_precision)


def load_predictor(model: str | os.PathLike, config: Config) -> Predictor:
    """Load a checkpoint or a registered MLflow model as a :class:`Predictor`.

    A registered model is loaded as the pyfunc every MLflow client gets
    (:class:`unet3plus.serving.VolumeModel`), and its own predictor is used, so ``unet3plus
    predict models:/...`` and the served model agree voxel for voxel.

    Args:
        model: MLflow model URI or checkpoint path.
        config: ``evaluate.device``, ``evaluate.batch_size`` and ``train.mixed_precision`` choose
            how it runs; ``mlflow`` gives the tracking/registry URI. The preprocessing and the
            threshold come from the model.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt or not a unet3plus checkpoint.
        UserError: the MLflow model cannot be loaded or was not logged by ``unet3plus register``.
    """
    options = {"device": config.evaluate.device, "batch_size": config.evaluate.batch_size,
               "mixed_precision": config.train.mixed_precision}  # fmt: skip
    if not is_mlflow_uri(model):
        return predictor_from_checkpoint(load_checkpoint(model), model, options["device"], options["batch_size"],
                                         options["mixed_precision"])
    # Imported here: MLflow takes seconds to import and checkpoints do not need it.
    import mlflow
    from mlflow.exceptions import MlflowException

    from unet3plus.tracking import configure_for_reading, store_errors

    configure_for_reading(config.mlflow)
    with store_errors(config.mlflow):
        try:
            loaded = mlflow.pyfunc.load_model(str(model), model_config=options)
        except (MlflowException, OSError) as err:
            raise UserError(redact(f"cannot load MLflow model {model} from {mlflow.get_tracking_uri()}: {err}")) from err
    python_model = loaded.unwrap_python_model() if loaded.loader_module == "mlflow.pyfunc.model" else None
    # A unet3plus.serving.VolumeModel carries its Predictor (serving imports this module, not the reverse).
    predictor = getattr(python_model, "predictor", None)
    if not isinstance(predictor, Predictor):
        raise UserError(f"MLflow model {model} is not a unet3plus volume model; register it with `unet3plus register`")
    return predictor


@torch.no_grad()
def predict_slices(
    forward: Callable[[torch.Tensor], torch.Tensor],
    stacks: np.ndarray,
    batch_size: int,
    device: torch.device,
    description: str = "slices",
    mixed_precision: bool = True,
    memory_format: torch.memory_format | None = None,
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
        memory_format: layout of the batches (default: :func:`unet3plus.device.memory_format_for`).

    Returns:
        (Z, C, S, S) float32 array.
    """
    memory_format = memory_format or memory_format_for(device, mixed_precision)
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


def organ_volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Volume of a mask in millilitres: voxels times the voxel volume given by ``affine`` (mm^3 / 1000)."""
    return float(np.count_nonzero(mask) * abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0)


def predict_file(model: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike, config: Config) -> Path:
    """Segment one CT volume and write its mask.

    Args:
        model: MLflow model URI (``models:/unet3plus-liver@champion``, ``runs:/<id>/model``) or a
            checkpoint path.
        input: 3-D CT volume in Hounsfield units, ``.nii`` or ``.nii.gz``.
        output: mask to write (``.nii.gz``): uint8 0/1, shape and affine of ``input``.
        config: how to run it (see :func:`load_predictor`); the preprocessing and the threshold
            come from the model itself.

    Returns:
        ``output`` as a Path.

    Raises:
        DataError: ``input`` is unreadable or not a 3-D volume (nothing is written).
        CheckpointError: the checkpoint is missing or corrupt.
        UserError: the MLflow model cannot be loaded.
    """
    check_mask_path(output)
    scan = read_scan(input)
    predictor = load_predictor(model, config)
    mask = predictor.segment(scan, Path(input).name)
    write_mask(output, mask, scan)
    logger.info("%s: %d organ voxels (%.1f mL) written to %s", input, int(mask.sum()), organ_volume_ml(mask, scan.affine),
                output)
    return Path(output)


def scans_in(folder: str | os.PathLike) -> list[Path]:
    """The NIfTI files (``.nii``, ``.nii.gz``) directly inside ``folder``, sorted; hidden files skipped."""
    return sorted(p for p in Path(folder).iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))


def mask_name(scan: Path) -> str:
    """File name of the mask of ``scan`` in the output folder: the scan's name as ``.nii.gz``."""
    return scan.name.removesuffix(".gz").removesuffix(".nii") + ".nii.gz"


def predict_folder(
    model: str | os.PathLike, input_dir: str | os.PathLike, output_dir: str | os.PathLike, config: Config
) -> dict[str, str]:
    """Segment every scan of a folder: one mask per scan and ``volumes.csv``, bad scans skipped.

    The model is loaded once. A scan that cannot be read or segmented is reported in one log
    line and skipped; the others are still segmented. ``output_dir`` gets ``<scan>.nii.gz`` per
    scan and :data:`VOLUMES_FILE` (columns :data:`VOLUME_COLUMNS`: the scan's file name, organ
    voxels, organ volume in mL), each written atomically, and a record of what was written, so a
    rerun may replace its own outputs but never a file the user put there.

    Args:
        model: MLflow model URI or checkpoint path.
        input_dir: folder of ``.nii`` / ``.nii.gz`` CT volumes.
        output_dir: folder for the masks (created).
        config: as :func:`predict_file`.

    Returns:
        ``{scan file name: reason}`` of the scans that failed (empty when all succeeded).

    Raises:
        DataError: ``input_dir`` holds no NIfTI file, or an output would replace a file unet3plus
            did not write (nothing is written).
        CheckpointError, UserError: as :func:`load_predictor`.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    scans = scans_in(input_dir)
    if not scans:
        raise DataError(f"{input_dir}: no .nii or .nii.gz scan in this folder")
    outputs = [output_dir / mask_name(scan) for scan in scans]
    check_replaceable(output_dir, [*outputs, output_dir / VOLUMES_FILE], "choose another --output")
    predictor = load_predictor(model, config)
    rows, failures = [], {}
    for scan_path, output in zip(tqdm(scans, desc="scans", unit="scan"), outputs):
        try:
            scan = read_scan(scan_path)
            mask = predictor.segment(scan, scan_path.name)
        except DataError as err:
            failures[scan_path.name] = str(err)
            logger.error("skipped %s", err)
            continue
        write_mask(output, mask, scan)
        record_outputs(output_dir, [output])
        rows.append((scan_path.name, int(np.count_nonzero(mask)), organ_volume_ml(mask, scan.affine)))
    with atomic_path(output_dir / VOLUMES_FILE) as tmp:
        pd.DataFrame(rows, columns=VOLUME_COLUMNS).to_csv(tmp, index=False)
    record_outputs(output_dir, [output_dir / VOLUMES_FILE])
    logger.info("%s: %d of %d scans segmented, masks and %s in %s", input_dir, len(rows), len(scans), VOLUMES_FILE,
                output_dir)
    return failures
