"""Raw CT volumes -> one ``.npz`` per axial slice (3-slice stack + mask) plus a manifest.

:func:`prepare_volume` and :func:`prepare_label` are the single implementation of "what the
network sees" and are used both here and when predicting a new scan; the way back to the scan's
own voxel grid is :func:`unet3plus.data.geometry.restore_volume`.

Output layout of ``out_dir`` (see CONTRACTS.md)::

    manifest.csv   case_id, slice_index, path (relative to out_dir), organ_present (0/1), split
    cases.json     layout, dataset, data_config, fingerprint, and per case: image/label paths
                   relative to raw_dir, split, slices, geometry (VolumeGeometry.to_dict())
    samples/<case_id>/<slice_index:04d>.npz   image float16 (3, S, S) in [0, 1], mask uint8 (S, S),
                                              organ_present uint8

Decisions:

* Unlabelled cases (MSD ``imagesTs``) get no samples; they are listed in ``cases.json`` with split
  ``"unlabelled"``, ``label`` and ``geometry`` null, so the dataset's full content stays visible.
* The fingerprint hashes the raw files' relative names, sizes and modification times (hashing
  tens of GB of LiTS content on every run would cost more than preprocessing), the parameters
  that change the output and the source of the modules that compute it. Workers and synth_*
  settings do not change the output and are not part of it.
* When the fingerprint matches and every sample listed in the manifest exists, nothing is read
  or written (so unchanged inputs are not validated again: they passed when this output was made).
* Only files listed in our own previous ``cases.json`` are ever deleted; anything else in
  ``out_dir`` (including inside ``samples/``) is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from unet3plus.config import DATASET_OF_LAYOUT, DataConfig
from unet3plus.data.dataset import CASES_FILE, MANIFEST_COLUMNS, MANIFEST_FILE, SAMPLES_DIR, load_preprocessed
from unet3plus.data.geometry import VolumeGeometry, resample_to_slices, volume_geometry
from unet3plus.data.sources import Case, discover_cases, organ_mask, read_volume
from unet3plus.data.validation import validate_dataset
from unet3plus.errors import DataError
from unet3plus.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

OUTPUT_PARAMS = ("size", "hu_window", "resize_mode", "val_fraction", "test_fraction", "split_seed")
"""DataConfig fields that change what preprocessing writes (and so enter the fingerprint)."""

UNLABELLED = "unlabelled"

CODE_FILES = tuple(Path(__file__).with_name(name) for name in ("preprocess.py", "geometry.py", "sources.py"))
"""Modules whose source decides the output: any edit to them invalidates previous output."""


def prepare_volume(
    image_hu: np.ndarray, affine: np.ndarray, data_config: DataConfig
) -> tuple[np.ndarray, VolumeGeometry]:
    """CT volume in Hounsfield units -> the network's 3-channel inputs, one per axial slice.

    Maps ``data_config.hu_window`` linearly onto [0, 1] (clipping outside), reorients to the
    canonical orientation (see :mod:`unet3plus.data.geometry`), resizes every axial plane to
    ``size x size`` bilinearly (or centre crops/pads with 0 in ``"crop"`` mode) and stacks each
    slice with its neighbours (previous, current, next; the first and last slice repeat themselves).

    Args:
        image_hu: (X, Y, Z) volume as stored in the file, any real dtype.
        affine: (4, 4) voxel-to-world matrix of the file.
        data_config: uses ``size``, ``hu_window`` and ``resize_mode``.

    Returns:
        ``(stacks, geometry)``: float32 (Z, 3, S, S) in [0, 1], channel 1 is slice z itself;
        and the :class:`VolumeGeometry` that :func:`restore_volume` needs to map predictions back.

    Raises:
        ValueError: not a 3-D volume, NaN voxels, bad affine, or invalid ``data_config``.
    """
    geometry = volume_geometry(np.shape(image_hu), affine, data_config.size, data_config.resize_mode)
    # Window first: crop mode pads with 0, which must mean "below the window", not 0 HU.
    windowed = window_hu(image_hu, data_config.hu_window)
    if np.isnan(windowed).any():
        raise ValueError(f"image_hu holds {np.isnan(windowed).sum()} NaN voxel(s)")
    planes = resample_to_slices(windowed, geometry, "linear")
    neighbours = np.clip(np.arange(planes.shape[0])[:, None] + np.array([-1, 0, 1]), 0, planes.shape[0] - 1)
    return planes[neighbours], geometry


def prepare_label(label01: np.ndarray, affine: np.ndarray, data_config: DataConfig) -> np.ndarray:
    """Binary organ mask (X, Y, Z) -> (Z, S, S) uint8 planes aligned with :func:`prepare_volume`.

    Same reorientation and in-plane step as the image, with nearest-neighbour resizing so the
    mask stays binary.

    Args:
        label01: (X, Y, Z) array of 0/1 (e.g. :func:`unet3plus.data.sources.organ_mask`).
        affine: the (4, 4) affine of the image it belongs to.
        data_config: uses ``size`` and ``resize_mode``.

    Returns:
        uint8 (Z, S, S) with values 0/1.

    Raises:
        ValueError: values other than 0 and 1, not 3-D, or bad affine.
    """
    label01 = np.asarray(label01)
    if label01.size and (label01.min() < 0 or label01.max() > 1):
        raise ValueError(f"label01 must hold only 0 and 1, found values in [{label01.min()}, {label01.max()}]")
    geometry = volume_geometry(label01.shape, affine, data_config.size, data_config.resize_mode)
    return resample_to_slices(label01.astype(np.uint8, copy=False), geometry, "nearest")


def window_hu(image_hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Map ``[low, high]`` HU linearly onto [0, 1], clipping outside; returns float32, same shape."""
    low, high = hu_window
    image = np.array(image_hu, dtype=np.float32)
    np.clip(image, low, high, out=image)
    image -= low
    image *= np.float32(1.0 / (high - low))
    return image


def assign_splits(layout: str, cases: list[Case], data_config: DataConfig) -> dict[str, str]:
    """Deterministic split of every case: ``"train"``, ``"val"``, ``"test"`` or ``"unlabelled"``.

    LiTS follows the paper: case numbers 0-27 are test, all others train. MSD: a seeded share
    ``test_fraction`` of the labelled cases is test. Then a seeded share ``val_fraction`` of the
    train cases becomes val (at least one case when train has >= 2 cases and val_fraction > 0,
    and at least one case always stays in train). The seed is ``data_config.split_seed``.

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        cases: from :func:`discover_cases` (sorted by number).
        data_config: uses ``test_fraction``, ``val_fraction``, ``split_seed``.

    Returns:
        ``{case_id: split}`` for every case.
    """
    rng = np.random.default_rng(data_config.split_seed)
    labelled = [case.case_id for case in cases if case.label is not None]
    if layout == "lits":
        test = {case.case_id for case in cases if case.label is not None and 0 <= case.number <= 27}
    else:
        test = set(rng.permutation(labelled)[: _share(len(labelled), data_config.test_fraction)])
    train = [case_id for case_id in labelled if case_id not in test]
    val = set(rng.permutation(train)[: _share(len(train), data_config.val_fraction)])
    splits = {case.case_id: UNLABELLED for case in cases}
    for case_id in labelled:
        splits[case_id] = "test" if case_id in test else "val" if case_id in val else "train"
    return splits


def _share(count: int, fraction: float) -> int:
    """round(count * fraction), but at least 1 and at most count - 1 (0 when count < 2 or fraction 0)."""
    if count < 2 or fraction <= 0:
        return 0
    return int(min(max(round(count * fraction), 1), count - 1))


def dataset_fingerprint(layout: str, raw_dir: Path, cases: list[Case], data_config: DataConfig) -> str:
    """SHA-256 over the raw files (relative name, size, mtime), output parameters and code.

    Args:
        layout: the raw layout.
        raw_dir: the dataset folder the case paths are relative to.
        cases: from :func:`discover_cases`.
        data_config: only the fields in :data:`OUTPUT_PARAMS` count.

    Returns:
        64 hex digits.
    """
    files = []
    for case in cases:
        for path in (case.image, case.label):
            if path is not None:
                stat = path.stat()
                files.append([_relative(path, raw_dir), stat.st_size, stat.st_mtime_ns])
    code = hashlib.sha256()
    for path in CODE_FILES:
        code.update(path.read_bytes())
    payload = {
        "layout": layout,
        "files": files,
        "params": {name: getattr(data_config, name) for name in OUTPUT_PARAMS},
        "code": code.hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def preprocess_dataset(
    layout: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike, data_config: DataConfig
) -> Path:
    """Validate a raw dataset and write its preprocessed samples, ``cases.json`` and ``manifest.csv``.

    Nothing is written unless every case passes validation. Volumes are processed in
    ``data_config.workers`` processes; every sample file is written atomically, and
    ``cases.json`` then ``manifest.csv`` are written last, so a crash never leaves a manifest
    pointing at missing samples. Re-running with unchanged raw files, parameters and code does
    nothing; otherwise our previous samples are removed first and everything is rebuilt.

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        raw_dir: the raw dataset folder.
        out_dir: output folder (created if needed; foreign files in it are kept).
        data_config: the ``data`` section of the configuration.

    Returns:
        Path of ``out_dir/manifest.csv``.

    Raises:
        DataError: the raw dataset has problems (the message lists all of them, each naming its
            file) or has no labelled case.
        ValueError: unknown layout.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    cases = discover_cases(layout, raw_dir)
    fingerprint = dataset_fingerprint(layout, raw_dir, cases, data_config)
    manifest_path = out_dir / MANIFEST_FILE
    previous = _own_cases_file(out_dir)
    if previous is not None and previous.get("fingerprint") == fingerprint and _complete(out_dir):
        logger.info("%s: up to date, nothing to do", out_dir)
        return manifest_path

    report = validate_dataset(layout, raw_dir, workers=data_config.workers)
    if report.errors:
        raise DataError(
            f"{raw_dir}: {len(report.errors)} problem(s) found, nothing was written to {out_dir}:\n  "
            + "\n  ".join(report.errors)
        )
    for warning in report.warnings:
        logger.warning("%s", warning)
    labelled = [case for case in cases if case.label is not None]
    if not labelled:
        raise DataError(f"{raw_dir}: no labelled case to preprocess (every case lacks a label file)")
    splits = assign_splits(layout, cases, data_config)

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_own_output(out_dir, previous)
    results = _process_all(labelled, layout, out_dir, data_config)

    case_entries = {}
    for case in cases:
        result = results.get(case.case_id, {"slices": 0, "geometry": None})
        case_entries[case.case_id] = {
            "image": _relative(case.image, raw_dir),
            "label": None if case.label is None else _relative(case.label, raw_dir),
            "split": splits[case.case_id],
            "slices": result["slices"],
            "geometry": result["geometry"],
        }
    write_json_atomic(
        out_dir / CASES_FILE,
        {
            "layout": layout,
            "dataset": DATASET_OF_LAYOUT[layout],
            "data_config": dataclasses.asdict(data_config),
            "fingerprint": fingerprint,
            "cases": case_entries,
        },
    )
    rows = [
        (case.case_id, index, _sample_path(case.case_id, index), int(flag), splits[case.case_id])
        for case in labelled
        for index, flag in enumerate(results[case.case_id]["organ_present"])
    ]
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
    counts = {split: list(splits.values()).count(split) for split in ("train", "val", "test")}
    summary = ", ".join(f"{count} {split}" for split, count in counts.items())
    logger.info("%s: %d samples from %d cases (%s)", out_dir, len(manifest), len(labelled), summary)
    if not counts["train"]:
        logger.warning("%s: no training case (%s); check the case numbers or data.test_fraction", out_dir, summary)
    return manifest_path


def _sample_path(case_id: str, index: int) -> str:
    return f"{SAMPLES_DIR}/{case_id}/{index:04d}.npz"


def _own_cases_file(out_dir: Path) -> dict[str, Any] | None:
    """Our previous ``cases.json`` if ``out_dir`` holds one that parses as ours, else None."""
    try:
        payload = json.loads((out_dir / CASES_FILE).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(payload, dict) and isinstance(payload.get("cases"), dict) and "fingerprint" in payload:
        return payload
    return None


def _complete(out_dir: Path) -> bool:
    try:
        load_preprocessed(out_dir)
    except DataError:
        return False
    return True


def _remove_own_output(out_dir: Path, previous: dict[str, Any] | None) -> None:
    """Delete the manifest first (so it never outlives its samples), then our own previous samples.

    Only ``samples/<case_id>/<NNNN>.npz`` files counted in our previous ``cases.json`` go, and
    folders only when that leaves them empty.
    """
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    (out_dir / CASES_FILE).unlink(missing_ok=True)
    if previous is None:
        return
    removed = 0
    for case_id, entry in previous["cases"].items():
        slices = entry.get("slices") if isinstance(entry, dict) else None
        if not isinstance(slices, int) or not _is_plain_name(case_id):
            continue
        for index in range(slices):
            path = out_dir / _sample_path(case_id, index)
            if path.is_file():
                path.unlink()
                removed += 1
        _remove_if_empty(out_dir / SAMPLES_DIR / case_id)
    _remove_if_empty(out_dir / SAMPLES_DIR)
    logger.info("%s: parameters or inputs changed; removed %d old samples", out_dir, removed)


def _is_plain_name(case_id: str) -> bool:
    """True for a name that stays inside ``samples/`` (guards deletion against an edited cases.json)."""
    return Path(case_id).name == case_id and case_id not in ("", ".", "..")


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _process_all(cases: list[Case], layout: str, out_dir: Path, data_config: DataConfig) -> dict[str, dict[str, Any]]:
    """Run :func:`_process_case` on every case, in parallel when workers > 1, with a progress bar."""
    workers = min(data_config.workers, len(cases))
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            done = (_process_case(case, layout, out_dir, data_config) for case in cases)
        else:
            # fork starts workers in milliseconds (spawn re-imports torch: seconds per worker); one
            # torch thread per worker keeps OpenMP out of the children, as DataLoader workers do.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    workers,
                    mp_context=multiprocessing.get_context(method),
                    initializer=torch.set_num_threads,
                    initargs=(1,),
                )
            )
            futures = [pool.submit(_process_case, case, layout, out_dir, data_config) for case in cases]
            done = (future.result() for future in as_completed(futures))
        progress = tqdm(done, total=len(cases), desc="preprocess", unit="volume", disable=None)
        return {result["case_id"]: result for result in progress}


def _process_case(case: Case, layout: str, out_dir: Path, data_config: DataConfig) -> dict[str, Any]:
    """Read one labelled case and write its samples; returns case_id, slices, organ_present, geometry."""
    image = read_volume(case.image)
    label = read_volume(case.label)
    stacks, geometry = prepare_volume(np.asanyarray(image.dataobj), image.affine, data_config)
    masks = prepare_label(organ_mask(np.asanyarray(label.dataobj), layout), image.affine, data_config)
    organ_present = masks.reshape(len(masks), -1).max(axis=1)
    images = torch.from_numpy(stacks).half().numpy()  # same rounding as numpy's astype, twice as fast
    for index, (image_f16, mask) in enumerate(zip(images, masks)):
        with atomic_path(out_dir / _sample_path(case.case_id, index)) as tmp:
            np.savez(tmp, image=image_f16, mask=mask, organ_present=organ_present[index])
    return {
        "case_id": case.case_id,
        "slices": len(stacks),
        "organ_present": organ_present.tolist(),
        "geometry": geometry.to_dict(),
    }
