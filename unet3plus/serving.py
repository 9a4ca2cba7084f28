"""The registered model: a CT volume in, a mask out, for any MLflow client, server or KServe.

What :func:`log_volume_model` logs (and ``unet3plus register`` registers) is an MLflow ``pyfunc``
model, :class:`VolumeModel`, with the ``unet3plus`` package as its code and the trained weights
plus their configuration as an artifact (a checkpoint holding only tensors and plain data). The
preprocessing (HU window, reorientation, 3-slice stacks, resize / spacing), the way back to the
scan's grid and the threshold are the model's own, so every client gets exactly what
``unet3plus predict`` gives: both call :meth:`unet3plus.predict.Predictor.segment`.

Contract (the model's signature):

- input: a DataFrame, one row per scan, string column ``nifti_base64``: the bytes of a ``.nii``
  or ``.nii.gz`` file, base64-encoded (:func:`encode_scan`);
- output: one row per scan with ``mask_base64`` (a ``.nii.gz`` of the uint8 0/1 mask on the
  input's exact voxel grid and affine, base64; :func:`decode_mask`), ``organ_voxels`` (int),
  ``organ_volume_ml`` (float) and ``error`` (empty when the row succeeded; a failed row has an
  empty ``mask_base64`` and 0 voxels);
- parameter ``on_error``: ``"raise"`` (default) refuses a request with any unreadable row, with
  one message naming every bad row (an :class:`~mlflow.exceptions.MlflowException` that a
  server answers with HTTP 400), before any scan is segmented; ``"column"`` segments the good
  rows and puts each bad row's message in its ``error`` column.

Loading chooses the device: ``model_config={"device": ...}`` (``"auto"``, ``"cpu"``, ``"cuda"``,
``"cuda:N"``), else the ``MLFLOW_DEFAULT_PREDICTION_DEVICE`` environment variable, else
``"auto"`` (CUDA when the host has it). ``batch_size`` and ``mixed_precision`` may be set the
same way.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import unet3plus
from unet3plus.checkpoint import load_checkpoint, save_checkpoint
from unet3plus.errors import DataError, UserError
from unet3plus.predict import METADATA_KEY, Predictor, organ_volume_ml, predictor_from_checkpoint, write_mask
from unet3plus.utils import redact

logger = logging.getLogger(__name__)

INPUT_COLUMN = "nifti_base64"
OUTPUT_COLUMNS = ("mask_base64", "organ_voxels", "organ_volume_ml", "error")
ON_ERROR = ("raise", "column")
WEIGHTS_ARTIFACT = "weights"
DEVICE_ENV = "MLFLOW_DEFAULT_PREDICTION_DEVICE"
"""What MLflow sets on GPU hosts for its own flavours; honoured when ``model_config`` names no device."""

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
    outputs=Schema([ColSpec("string", "mask_base64"), ColSpec("long", "organ_voxels"),
                    ColSpec("double", "organ_volume_ml"), ColSpec("string", "error")]),
    params=ParamSchema([ParamSpec("on_error", "string", "raise")]),
)  # fmt: skip
DEFAULT_BATCH_SIZE = 16
PACKAGES = ("numpy", "pandas", "nibabel", "pyyaml", "tqdm", "scipy")
"""Unpinned requirements of the package code the model carries (torch, torchvision and mlflow are pinned)."""


def encode_scan(path: str | os.PathLike) -> str:
    """The ``nifti_base64`` value of a ``.nii`` / ``.nii.gz`` file."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_mask(value: str) -> nib.Nifti1Image:
    """The mask image of a ``mask_base64`` value (voxels loaded into memory)."""
    raw = gzip.decompress(base64.b64decode(value))
    image = nib.Nifti1Image.from_bytes(raw)
    return nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)


def scan_from_bytes(raw: bytes, name: str) -> nib.spatialimages.SpatialImage:
    """Read a 3-D CT volume from the bytes of a ``.nii`` or ``.nii.gz`` file, checked as any input file.

    The bytes go through :func:`unet3plus.predict.read_scan` (the checks of ``unet3plus predict``:
    readable, not truncated, numeric, 3-D, not empty, invertible affine, a size that fits in memory,
    finite voxels) via a private temporary file.

    Raises:
        DataError: ``"<name>: <problem>"``.
    """
    from unet3plus.predict import read_scan

    suffix = ".nii.gz" if raw[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory(prefix="unet3plus-scan-") as folder:
        path = Path(folder) / f"{uuid.uuid4().hex}{suffix}"
        path.write_bytes(raw)
        try:
            return read_scan(path)
        except DataError as err:
            raise DataError(str(err).replace(str(path), name)) from err


def mask_to_bytes(mask: np.ndarray, scan: nib.spatialimages.SpatialImage) -> bytes:
    """The ``.nii.gz`` bytes of ``mask`` as :func:`unet3plus.predict.write_mask` writes it for ``scan``."""
    with tempfile.TemporaryDirectory(prefix="unet3plus-mask-") as folder:
        return write_mask(Path(folder) / "mask.nii.gz", mask, scan).read_bytes()


def device_preference(model_config: dict[str, Any] | None) -> str:
    """The device a loading model asks for: ``model_config["device"]`` unless it is ``"auto"`` (the
    logged default), else ``$MLFLOW_DEFAULT_PREDICTION_DEVICE``, else ``"auto"``."""
    asked = str((model_config or {}).get("device") or "auto")
    return asked if asked != "auto" else os.environ.get(DEVICE_ENV) or "auto"


class VolumeModel(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc of a registered version: rows of ``nifti_base64`` CT in, masks out (see the module doc)."""

    predictor: Predictor

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the weights artifact on the device chosen now (:func:`device_preference`)."""
        options = dict(context.model_config or {})
        weights = context.artifacts[WEIGHTS_ARTIFACT]
        checkpoint = load_checkpoint(weights)
        self.predictor = predictor_from_checkpoint(
            checkpoint, weights, device_preference(options),
            batch_size=int(options.get("batch_size") or DEFAULT_BATCH_SIZE),
            mixed_precision=bool(options.get("mixed_precision", True)),
        )  # fmt: skip
        logger.info("unet3plus volume model loaded on %s (threshold %s)", self.predictor.device, self.predictor.threshold)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Segment every row's scan; see the module doc for the columns and ``on_error``."""
        on_error = (params or {}).get("on_error", "raise")
        if on_error not in ON_ERROR:
            raise MlflowException.invalid_parameter_value(f"on_error = {on_error!r}; valid values: {', '.join(ON_ERROR)}")
        if INPUT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"input has no {INPUT_COLUMN!r} column (columns: {', '.join(map(str, model_input.columns))})"
            )
        scans, errors = {}, {}
        for row, value in enumerate(model_input[INPUT_COLUMN]):
            try:
                scans[row] = scan_from_bytes(_decode(value, row), f"row {row}")
            except DataError as err:
                errors[row] = str(err)
        if errors and on_error == "raise":
            raise MlflowException.invalid_parameter_value(
                f"{len(errors)} of {len(model_input)} row(s) are not a readable 3-D CT volume: "
                + "; ".join(errors.values()) + " (nothing was segmented; send params on_error=column to get the "
                "other rows' masks)"
            )  # fmt: skip
        results = []
        for row in range(len(model_input)):
            if row in scans:
                try:
                    mask = self.predictor.segment(scans[row], f"row {row}")
                except DataError as err:
                    if on_error == "raise":
                        raise MlflowException.invalid_parameter_value(str(err)) from err
                    errors[row] = str(err)
            if row in errors:
                results.append(("", 0, 0.0, errors[row]))
                continue
            encoded = base64.b64encode(mask_to_bytes(mask, scans[row])).decode("ascii")
            results.append((encoded, int(np.count_nonzero(mask)), organ_volume_ml(mask, scans[row].affine), ""))
        return pd.DataFrame(results, columns=OUTPUT_COLUMNS)


def _decode(value: Any, row: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise DataError(f"row {row}: {INPUT_COLUMN} is empty or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise DataError(f"row {row}: {INPUT_COLUMN} is not base64 ({err})") from err


def example_scan() -> str:
    """A tiny CT-like volume (soft tissue in air, 8 x 8 x 3 voxels) as ``nifti_base64``: the input example."""
    hu = np.full((8, 8, 3), -1000, dtype=np.int16)
    hu[2:6, 2:6] = 60
    with tempfile.TemporaryDirectory(prefix="unet3plus-example-") as folder:
        path = Path(folder) / "example.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 5.0, 1.0])), path)
        return encode_scan(path)


def log_volume_model(
    payload: dict[str, Any], threshold: float, registered_model_name: str, version_tags: dict[str, str] | None = None
) -> mlflow.models.model.ModelInfo:
    """Log a trained network as a :class:`VolumeModel` in the active run and register it.

    The weights artifact is a checkpoint of the network's weights, its full training
    configuration (``config["evaluate"]["threshold"]`` set to ``threshold``) and dataset; the
    MLmodel metadata repeats ``{"unet3plus": {"data", "model", "dataset", "threshold"}}`` for
    people and tools reading the registry.

    Args:
        payload: a checkpoint dict (:func:`unet3plus.checkpoint.load_checkpoint`).
        threshold: the probability threshold the model answers with (evaluate's).
        registered_model_name: the registry name.
        version_tags: tags the new version is created with (in the same call: no version exists without them).

    Returns:
        MLflow's ``ModelInfo`` (``registered_model_version`` is the new version).
    """
    config = {**payload["config"], "evaluate": {**payload["config"].get("evaluate", {}), "threshold": threshold}}
    weights = {"model": payload["model"], "config": config, "dataset": payload["dataset"], "epoch": payload["epoch"]}
    metadata = {METADATA_KEY: {"data": config["data"], "model": config["model"], "dataset": payload["dataset"],
                               "threshold": threshold}}  # fmt: skip
    import torchvision  # here: importing it costs ~2 s, and only logging needs its version

    pinned = {"torch": torch.__version__, "torchvision": torchvision.__version__, "mlflow": mlflow.__version__}
    requirements = [*(f"{name}=={version.split('+')[0]}" for name, version in pinned.items()), *PACKAGES]
    with tempfile.TemporaryDirectory(prefix="unet3plus-weights-") as folder:
        path = save_checkpoint(Path(folder) / "weights.pt", weights)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=VolumeModel(),
            artifacts={WEIGHTS_ARTIFACT: str(path)},
            code_paths=[str(Path(unet3plus.__file__).parent)],
            signature=SIGNATURE,
            # The options a loader may set (model_config={...}); these are the defaults.
            model_config={"device": "auto", "batch_size": DEFAULT_BATCH_SIZE,
                          "mixed_precision": bool(config.get("train", {}).get("mixed_precision", True))},
            input_example=(pd.DataFrame({INPUT_COLUMN: [example_scan()]}), {"on_error": "raise"}),
            registered_model_name=registered_model_name,
            tags=version_tags,
            metadata=metadata,
            # Listing requirements skips MLflow's slow inference (it reloads the model in a subprocess).
            pip_requirements=requirements,
        )


def export_model(model_uri: str, out_dir: str | os.PathLike) -> Path:
    """Copy a registered model (``models:/<name>@champion``) to a folder that a server or KServe reads.

    The folder is the MLflow model as logged (``MLmodel``, the ``unet3plus`` code, the weights,
    ``requirements.txt``): ``mlflow models serve -m DIR`` and the InferenceServices of
    ``deploy/serving/`` serve it. It appears complete or not at all (staged beside it, then renamed).

    Raises:
        UserError: ``out_dir`` exists and is not empty, or the model cannot be downloaded.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not an empty folder; export into a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging))
        except (MlflowException, OSError) as err:
            raise UserError(redact(f"cannot export {model_uri} from {mlflow.get_tracking_uri()}: {err}")) from err
        if not (staging / "MLmodel").is_file():
            raise UserError(f"{model_uri}: not an MLflow model (no MLmodel file)")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s", model_uri, out_dir)
    return out_dir

