"""Build a preprocessed dataset: raw CT volumes -> one ``.npz`` per axial slice (3-slice stack + mask) plus a manifest.

The transforms (what the network sees) are :mod:`unet3plus.data.transforms`, shared with
prediction; the sample file format, its writer and its reader, is :mod:`unet3plus.data.dataset`.
This module checks, splits, fingerprints and stages a whole dataset.

Output layout of ``out_dir``::

    manifest.csv   case_id, slice_index, path (relative to out_dir), organ_present (0/1), split
    cases.json     layout, dataset, data_source (synthetic, lits or msd: sources.data_source),
                   data_config, fingerprint, and per case: image/label paths relative to
                   raw_dir, split, slices, geometry (VolumeGeometry.to_dict())
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
* One pass over the raw data: each volume is read once, slab by slab, checked on the way
  (:class:`unet3plus.data.validation.CaseScan`, the same checks as ``unet3plus validate``),
  resampled and written into a hidden staging folder by writer threads, all overlapping. The
  staging folder replaces the previous samples only when every case passed, so bad data leaves
  the previous output untouched. A run killed hard (``kill -9``, power loss) can leave
  ``out_dir/.staging-<random>`` behind: nothing reads it, and it is safe to delete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from unet3plus.config import DATASET_OF_LAYOUT, DataConfig
from unet3plus.data.dataset import (
    CASES_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    SAMPLES_DIR,
    load_preprocessed,
    save_sample,
)
from unet3plus.data.geometry import VolumeGeometry, canonical_slab, chunks, volume_geometry
from unet3plus.data.sources import Case, data_source, discover_cases
from unet3plus.data.transforms import image_chunk, mask_chunk, neighbour_index
from unet3plus.data.validation import SLAB_SLICES, CaseScan
from unet3plus.errors import DataError
from unet3plus.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

OUTPUT_PARAMS = ("size", "hu_window", "resize_mode", "spacing_mm", "val_fraction", "test_fraction", "split_seed")
"""DataConfig fields that change what preprocessing writes (and so enter the fingerprint)."""

UNLABELLED = "unlabelled"

WRITER_THREADS = 2
"""Threads writing samples per volume (checksumming and writing release the GIL)."""

STAGING_PREFIX = ".staging-"
"""Samples are written into ``out_dir/.staging-<random>`` first and moved into place only when every case passed."""

CODE_FILES = (
    *(Path(__file__).with_name(name) for name in ("preprocess.py", "transforms.py", "dataset.py", "geometry.py",
                                                  "sources.py", "validation.py")),
    *(Path(__file__).parents[1] / name for name in ("config.py", "errors.py", "utils.py")),
)
"""Every module preprocessing imports (tests/test_dvc_deps.py derives the list from the imports):
any edit to them invalidates previous output."""


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
    """SHA-256 over the data source, raw files (relative name, size, mtime), output parameters and code.

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
        "source": data_source(layout, raw_dir),
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

    One pass: every volume is read once, checked (:class:`CaseScan`) and, when nothing is wrong,
    preprocessed into a hidden staging folder inside ``out_dir``. Only when every case passed
    does the staging folder replace our previous samples; then ``cases.json`` and
    ``manifest.csv`` are written last, so a crash never leaves a manifest pointing at missing
    samples, and a dataset with problems leaves ``out_dir`` exactly as it was. After the first
    case with a problem the remaining cases are only checked, so the full list of problems comes
    quickly. Volumes are processed in ``data_config.workers`` processes. Re-running with
    unchanged raw files, parameters and code does nothing.

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
    labelled = [case for case in cases if case.label is not None]
    if not labelled:
        raise DataError(f"{raw_dir}: no labelled case to preprocess (every case lacks a label file)")
    splits = assign_splits(layout, cases, data_config)
    if "train" in splits.values() and "val" not in splits.values():
        raise DataError(
            f"{raw_dir}: the validation split would be empty ({list(splits.values()).count('train')} training "
            f"case(s), data.val_fraction = {data_config.val_fraction}); training needs at least 2 training cases "
            "and data.val_fraction > 0"
        )

    created = _missing_folders(out_dir)
    staging = out_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        results = _process_all(cases, layout, staging, data_config)
        errors = [error for case in cases for error in results[case.case_id]["errors"]]
        if errors:
            raise DataError(
                f"{raw_dir}: {len(errors)} problem(s) found, nothing was written to {out_dir}:\n  "
                + "\n  ".join(errors)
            )
        _remove_own_output(out_dir, previous)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first; only the folders this call made, and only when empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging)
    for warning in (warning for case in cases for warning in results[case.case_id]["warnings"]):
        logger.warning("%s", warning)

    case_entries = {}
    for case in cases:
        result = results[case.case_id]
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
            "data_source": data_source(layout, raw_dir),
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


def _missing_folders(folder: Path) -> list[Path]:
    """The folders that creating ``folder`` would make, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged samples into ``out_dir/samples`` (renames on one filesystem: no copying)."""
    for staged in sorted((staging / SAMPLES_DIR).iterdir()):
        target = out_dir / SAMPLES_DIR / staged.name
        if target.exists():  # it holds files that are not ours: keep them, add ours
            for path in staged.iterdir():
                os.replace(path, target / path.name)
        else:
            target.parent.mkdir(exist_ok=True)
            os.replace(staged, target)


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


def _process_all(cases: list[Case], layout: str, staging: Path, data_config: DataConfig) -> dict[str, dict[str, Any]]:
    """:func:`_process_case` for every case, in ``data_config.workers`` processes, with a progress bar.

    Cases start in order, at most one per worker at a time; once a case has a problem, the cases
    not yet started are only read and checked (nothing more will be written). With one worker
    (or one case) everything runs in this process, which saves starting one (about 40 ms).
    Each volume is resampled with one torch thread: the cores are left to the threads writing
    samples, which is 1.4x faster than torch's own threads competing with them.
    """
    results: dict[str, dict[str, Any]] = {}
    pending = iter(cases)

    def next_job() -> tuple[Any, ...] | None:
        case = next(pending, None)
        failed = any(result["errors"] for result in results.values())
        return None if case is None else (case, layout, None if failed else staging, data_config)

    def finish(result: dict[str, Any]) -> None:
        results[result["case_id"]] = result
        progress.update()

    workers = min(data_config.workers, len(cases))
    with tqdm(total=len(cases), desc="preprocess", unit="volume", disable=None) as progress:
        if workers <= 1:
            with torch_threads(1):
                while (job := next_job()) is not None:
                    finish(_process_case(*job))
            return results
        # fork starts workers in milliseconds (spawn re-imports torch: seconds per worker)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            running = {pool.submit(_process_case, *job) for job in itertools.islice(iter(next_job, None), workers)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(future.result())
                    if (job := next_job()) is not None:
                        running.add(pool.submit(_process_case, *job))
    return results


def _init_worker() -> None:
    """One torch thread per worker; Ctrl-C is the parent's to handle (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` torch intra-op threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _process_case(case: Case, layout: str, staging: Path | None, data_config: DataConfig) -> dict[str, Any]:
    """Read and check one case; while it has no problem and ``staging`` is set, write its samples there.

    Slabs of a few slices are read, checked, resampled and handed to the writer threads one after
    another, so reading, computing and writing overlap and no whole volume is ever copied.

    Returns:
        ``case_id``, ``errors``, ``warnings``, and (0, [], None when nothing was written)
        ``slices``, ``organ_present`` (one 0/1 per slice) and ``geometry``.
    """
    scan = CaseScan(case, layout)
    result = {"case_id": case.case_id, "slices": 0, "organ_present": [], "geometry": None}
    geometry = None
    if not scan.errors and scan.label is not None and staging is not None:
        try:
            geometry = volume_geometry(
                scan.image.shape, scan.image.affine, data_config.size, data_config.resize_mode, data_config.spacing_mm
            )
        except ValueError as err:  # e.g. a singular affine, which opening and checking accept
            scan.errors.append(f"{case.image}: cannot be preprocessed: {err}")
    if geometry is None:
        for _ in scan.slabs():
            pass
        return {**result, "errors": scan.errors, "warnings": scan.warnings}
    slab_slices = SLAB_SLICES if geometry.axial_is_file_z else geometry.original_shape[2]
    with SampleWriter(staging / SAMPLES_DIR / case.case_id, geometry) as writer:
        for start, image_slab, label_slab in scan.slabs(slab_slices):
            first, image_planes = canonical_slab(image_slab, start, geometry)
            _, label_planes = canonical_slab(label_slab, start, geometry)
            for offset, planes in chunks(image_planes):
                masks = mask_chunk(label_planes[offset : offset + len(planes)], geometry, layout)
                writer.add(first + offset, image_chunk(planes, geometry, data_config.hu_window), masks)
    result = {**result, "errors": scan.errors, "warnings": scan.warnings}
    if scan.errors:
        return result
    return {
        **result,
        "slices": len(writer.masks),
        "organ_present": writer.organ_present(),
        "geometry": geometry.to_dict(),
    }


class SampleWriter:
    """Writes each slice's sample into a folder as soon as the slice and its neighbours are known.

    Writer threads save samples while the caller reads and resamples the next slabs: reading,
    checksums, file writes and resampling all release the GIL, so the work overlaps. Samples go
    into the staging folder, which is only published whole, so they need no atomic rename.

    Attributes:
        planes: float16 (Z, S, S) network input of every slice known so far.
        masks: uint8 (Z, S, S) organ masks of every slice known so far.
    """

    def __init__(self, folder: Path, geometry: VolumeGeometry) -> None:
        depth, side = geometry.canonical_shape[2], (geometry.size, geometry.size)
        self.folder = folder
        self.planes = np.empty((depth, *side), np.float16)
        self.masks = np.empty((depth, *side), np.uint8)
        self._neighbours = neighbour_index(depth)
        self._known = np.zeros(depth, bool)
        self._queued = np.zeros(depth, bool)
        self._futures: list[Future] = []
        self._pool = ThreadPoolExecutor(WRITER_THREADS)
        folder.mkdir(parents=True)

    def add(self, first: int, planes: np.ndarray, masks: np.ndarray) -> None:
        """Slices ``first .. first + n - 1``: float32 (n, S, S) planes and uint8 (n, S, S) masks."""
        stop = first + len(planes)
        self.planes[first:stop] = torch.from_numpy(planes).half().numpy()  # numpy's rounding, twice as fast
        self.masks[first:stop] = masks
        self._known[first:stop] = True
        for z in range(max(first - 1, 0), min(stop + 1, len(self._known))):
            if not self._queued[z] and self._known[self._neighbours[z]].all():
                self._queued[z] = True
                image = [self.planes[i] for i in self._neighbours[z]]
                self._futures.append(self._pool.submit(save_sample, self.folder / f"{z:04d}.npz", image, self.masks[z]))

    def organ_present(self) -> list[int]:
        """0/1 per slice: whether its mask holds any organ voxel."""
        return self.masks.reshape(len(self.masks), -1).max(axis=1).tolist()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Wait for every queued sample; a failed write raises here."""
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()
