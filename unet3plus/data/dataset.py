"""Preprocessed data: the manifest, the per-case metadata, the sample file format (:func:`save_sample`
writes it, :func:`load_sample` reads it) and a torch Dataset of slices.

Augmentation is paired: one random affine (left-right flip, rotation, scale) becomes one sampling
grid that both image (bilinear) and mask (nearest, so it stays 0/1) are resampled with, so they
cannot drift apart. Intensity jitter (contrast, brightness) touches only the image.

Determinism: the random draws of item ``i`` come from ``numpy.random.default_rng([seed, epoch, i])``,
so an epoch's augmentations depend only on ``seed``, the epoch and the index, never on which
DataLoader worker (or how many) loads the item. Call :meth:`SliceDataset.set_epoch` before
iterating each epoch; with ``persistent_workers=True`` the workers keep the epoch they were
started with, so use non-persistent workers (the default) when augmenting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from unet3plus.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
CASES_FILE = "cases.json"
SAMPLES_DIR = "samples"
MANIFEST_COLUMNS = ("case_id", "slice_index", "path", "organ_present", "split")
SPLITS = ("train", "val", "test")

MAX_ROTATION_DEGREES = 10.0
SCALE_RANGE = (0.9, 1.1)
CONTRAST_RANGE = (0.9, 1.1)
BRIGHTNESS_RANGE = (-0.05, 0.05)


def load_preprocessed(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read and check the output of :func:`unet3plus.data.preprocess.preprocess_dataset`.

    Args:
        data_dir: the preprocessed folder.

    Returns:
        ``(manifest, cases)``: the manifest with columns :data:`MANIFEST_COLUMNS` (``case_id``
        always str) and the parsed ``cases.json``.

    Raises:
        DataError: the folder, ``manifest.csv`` or ``cases.json`` is missing or corrupt, the
            manifest names an unknown case or split, or sample files it lists are missing
            (the message names the file).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: preprocessed data folder not found (run `unet3plus preprocess` first)")
    manifest_path, cases_path = data_dir / MANIFEST_FILE, data_dir / CASES_FILE
    for path in (manifest_path, cases_path):
        if not path.is_file():
            raise DataError(f"{path}: missing; not a complete preprocessed folder (run `unet3plus preprocess`)")
    try:
        manifest = pd.read_csv(manifest_path, dtype={"case_id": str, "path": str, "split": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{manifest_path}: unreadable or corrupt manifest ({err})") from err
    missing_columns = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing_columns:
        raise DataError(f"{manifest_path}: corrupt manifest, missing column(s) {', '.join(missing_columns)}")
    try:
        cases = json.loads(cases_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{cases_path}: unreadable or corrupt JSON ({err})") from err
    if not isinstance(cases, dict) or not isinstance(cases.get("cases"), dict) or "layout" not in cases:
        raise DataError(f"{cases_path}: corrupt metadata, expected an object with 'layout' and 'cases'")
    unknown = sorted(set(manifest["case_id"]) - set(cases["cases"]))
    if unknown:
        raise DataError(f"{manifest_path}: case(s) {', '.join(unknown[:5])} are not in {cases_path}")
    bad_splits = sorted(set(manifest["split"]) - set(SPLITS))
    if bad_splits:
        raise DataError(f"{manifest_path}: unknown split(s) {bad_splits}; expected {', '.join(SPLITS)}")
    missing = [path for path in manifest["path"] if not (data_dir / path).is_file()]
    if missing:
        raise DataError(
            f"{data_dir / missing[0]}: sample missing ({len(missing)} of {len(manifest)} in {manifest_path} absent)"
        )
    return manifest, cases


def load_sample(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one ``.npz`` sample.

    Returns:
        ``(image, mask)``: float32 tensors (3, S, S) and (1, S, S).

    Raises:
        DataError: unreadable, truncated, or without the expected arrays and shapes.
    """
    try:
        with np.load(path) as sample:
            image, mask = sample["image"], sample["mask"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: corrupt or unreadable sample ({err})") from err
    if image.ndim != 3 or image.shape[0] != 3 or mask.shape != image.shape[1:]:
        raise DataError(f"{path}: expected image (3, S, S) and mask (S, S), got {image.shape} and {mask.shape}")
    # torch converts float16 to float32 ~30x faster than numpy's astype
    return torch.from_numpy(image).float(), torch.from_numpy(mask).float()[None]


def save_sample(path: str | os.PathLike, image_planes: list[np.ndarray], mask: np.ndarray) -> None:
    """Write one sample, as ``np.savez(path, image=np.stack(image_planes), mask=mask, organ_present=mask.max())``.

    The (previous, current, next) planes go straight from the volume into the file, without
    building the stack first (a 600 KB copy per sample at 320 x 320).
    """
    with zipfile.ZipFile(path, "w") as archive:
        _write_npy(archive, "image", (len(image_planes), *image_planes[0].shape), image_planes)
        _write_npy(archive, "mask", mask.shape, [mask])
        _write_npy(archive, "organ_present", (), [mask.max(keepdims=True).reshape(())])


def _write_npy(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], parts: list[np.ndarray]) -> None:
    """One ``name.npy`` member holding the C-ordered ``parts`` one after another, with ``shape``."""
    header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False, "shape": shape}
    with archive.open(f"{name}.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        for part in parts:
            member.write(np.ascontiguousarray(part).reshape(-1).view(np.uint8))


def augment_pair(
    image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random paired flip/rotation/scale plus image-only intensity jitter.

    Args:
        image: float32 (C, H, W) in [0, 1].
        mask: float32 (1, H, W) of 0/1.
        rng: source of all random draws.

    Returns:
        ``(image, mask)`` of the same shapes; image clipped to [0, 1], mask 0/1. Pixels brought in
        from outside the plane are 0 in both.
    """
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    scale = rng.uniform(*SCALE_RANGE)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    contrast, brightness = rng.uniform(*CONTRAST_RANGE), rng.uniform(*BRIGHTNESS_RANGE)
    # output -> input coordinates: rotation, zoom by `scale`, left-right flip
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    grid = sampling_grid(((flip * cos, -sin), (flip * sin, cos)), *image.shape[1:])
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return image.mul_(contrast).add_(brightness).clamp_(0.0, 1.0), mask


def sampling_grid(matrix: tuple[tuple[float, float], tuple[float, float]], height: int, width: int) -> torch.Tensor:
    """``F.affine_grid`` for a translation-free 2x2 ``matrix`` (``align_corners=False``), 4x cheaper.

    Returns:
        (1, height, width, 2) grid of input (x, y) in [-1, 1] for every output pixel centre.
    """
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    (a, b), (c, d) = matrix
    return torch.stack([a * xs[None, :] + b * ys[:, None], c * xs[None, :] + d * ys[:, None]], dim=-1)[None]


class SliceDataset(Dataset):
    """The samples of one split of a preprocessed folder.

    Items are dicts: ``"image"`` float32 (3, S, S) in [0, 1], ``"mask"`` float32 (1, S, S) of 0/1,
    ``"organ_present"`` float32 scalar tensor (1.0 when the mask is non-empty), ``"case_id"`` str,
    ``"slice_index"`` int. Works with DataLoader workers (fork or spawn).

    Args:
        data_dir: the preprocessed folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        augment: apply :func:`augment_pair` (train only, usually).
        seed: augmentation seed; see the module docstring for determinism.

    Attributes:
        cases: the parsed ``cases.json`` (geometry per case, data_config, ...).
        paths, case_ids, slice_indices, organ_present: per item, in manifest order (the last,
            float32 0/1, suits a ``WeightedRandomSampler``).

    Raises:
        ValueError: unknown split.
        DataError: from :func:`load_preprocessed`.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, augment: bool = False, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir)
        manifest, self.cases = load_preprocessed(self.data_dir)
        rows = manifest[manifest["split"] == split]
        # numpy string arrays rather than lists of str: forked workers then share them without
        # copy-on-write page duplication from Python reference counting.
        self.paths = np.array([str(self.data_dir / path) for path in rows["path"]])
        self.case_ids = rows["case_id"].to_numpy(dtype=str)
        self.slice_indices = rows["slice_index"].to_numpy(dtype=np.int64)
        self.organ_present = rows["organ_present"].to_numpy(dtype=np.float32)
        self.split, self.augment, self.seed, self.epoch = split, augment, seed, 0
        if not len(rows):
            logger.warning("%s: split %r has no samples", self.data_dir, split)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next iteration draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = load_sample(self.paths[index])
        if self.augment:
            image, mask = augment_pair(image, mask, np.random.default_rng([self.seed, self.epoch, index]))
        return {
            "image": image,
            "mask": mask,
            "organ_present": (mask.amax() > 0).float(),
            "case_id": str(self.case_ids[index]),
            "slice_index": int(self.slice_indices[index]),
        }
