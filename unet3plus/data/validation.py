"""Check every case of a raw dataset and report all problems at once.

:func:`validate_dataset` never raises for data problems: it reads every volume (in parallel
processes) and collects one message per problem, each naming the file. Errors make the data
unusable (unreadable or truncated file, missing label, shape mismatch, NaN or inf, unexpected
label values, 2-D image, no cases); warnings are worth a look but do not stop the pipeline
(label affine differing from the image's, empty organ in a labelled case, intensities that do not
look like Hounsfield units).

:class:`CaseScan` does the checking for one case, reading a few slices at a time, and hands the
slabs on while the case is clean: preprocessing uses it so that every file is read once.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from unet3plus.config import DATASET_OF_LAYOUT
from unet3plus.data.sources import BACKGROUND, LABEL_VALUES, Case, isin, open_volume, read_slab, scan_cases
from unet3plus.errors import DataError

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found.

    Attributes:
        layout: the layout checked.
        raw_dir: the dataset folder.
        cases: number of cases found (labelled and unlabelled).
        errors: one message per problem that makes the dataset unusable.
        warnings: one message per suspicious finding.
    """

    layout: str
    raw_dir: str
    cases: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no error was found."""
        return not self.errors

    def to_dict(self) -> dict:
        """JSON-ready dictionary of the report (``ok`` included)."""
        return {**asdict(self), "ok": self.ok}


SLAB_SLICES = 8
"""Axial slices read at a time: a whole 512 x 512 x 1000 LiTS volume never has to sit in memory."""


class CaseScan:
    """Read one case slab by slab along the file's third axis, checking every slab on the way.

    Opening checks the headers (readable NIfTI, 3-D, label shape and affine against the image);
    :meth:`slabs` then reads the voxels a few slices at a time, checks them (NaN or inf, label
    values, CT-like intensities, organ present) and hands them out while no error has been found,
    so preprocessing reads every file once and validation never holds a whole volume. After the
    last slab, :attr:`errors` and :attr:`warnings` are complete, each message naming its file.

    Attributes:
        case: the case scanned.
        image: the opened CT volume (:func:`open_volume`), ``None`` when it cannot be read.
        label: the opened label volume, ``None`` when the case has none or it cannot be read.
        errors: problems that make the case unusable.
        warnings: suspicious findings.
    """

    def __init__(self, case: Case, layout: str) -> None:
        self.case, self.layout = case, layout
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.image = self._open(case.image)
        self.label = None if case.label is None else self._open(case.label)
        self._paired = self.image is not None and (self.label is None) == (case.label is None)
        if self.image is not None and self.label is not None:
            if self.label.shape != self.image.shape:
                self._paired = False
                self.errors.append(
                    f"{case.label}: label shape {self.label.shape} does not match image shape {self.image.shape} "
                    f"of {case.image.name}"
                )
            elif not np.allclose(self.label.affine, self.image.affine, atol=AFFINE_TOLERANCE_MM):
                self.warnings.append(
                    f"{case.label}: affine differs from that of {case.image.name}; the image's geometry will be used"
                )
        self._nonfinite = {case.image: 0, case.label: 0}
        self._range: list = []  # [low, high] of the image
        self._unexpected: set = set()
        self._organ = False

    def slabs(self, slices: int = SLAB_SLICES) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Read and check the whole case; yield its slabs while it has no error.

        Args:
            slices: slices per slab (the whole depth reads the volume in one piece).

        Yields:
            ``(start, image[:, :, start:stop], label[:, :, start:stop] or None)``.
        """
        volumes = [(self.image, self.case.image, self._check_image), (self.label, self.case.label, self._check_label)]
        volumes = [entry for entry in volumes if entry[0] is not None]
        groups = [volumes] if self._paired else [[entry] for entry in volumes]  # mismatched: check each alone
        unreadable: set[Path] = set()
        for group in groups:
            for start in range(0, group[0][0].shape[2], slices):
                slabs = []
                for volume, path, check in group:
                    if path in unreadable:
                        continue
                    try:
                        slabs.append(read_slab(volume, path, start, start + slices))
                    except DataError as err:  # truncated: the other volume is still checked to its end
                        self.errors.append(str(err))
                        unreadable.add(path)
                        continue
                    check(path, slabs[-1])
                if self._paired and not (self.errors or any(self._nonfinite.values()) or self._unexpected):
                    yield start, slabs[0], slabs[1] if len(slabs) > 1 else None
        self._finish()

    def _open(self, path: Path) -> nib.spatialimages.SpatialImage | None:
        try:
            return open_volume(path)
        except DataError as err:
            self.errors.append(str(err))
            return None

    def _check_image(self, path: Path, slab: np.ndarray) -> None:
        if self._count_nonfinite(path, slab):
            return
        low, high = slab.min(), slab.max()
        self._range = [min(self._range[0], low), max(self._range[1], high)] if self._range else [low, high]

    def _check_label(self, path: Path, slab: np.ndarray) -> None:
        if self._count_nonfinite(path, slab):
            return
        allowed = LABEL_VALUES[self.layout]
        low, high = slab.min(), slab.max()
        # Integer labels spanning only allowed values (the usual case) need two reductions, not np.isin.
        if not (slab.dtype.kind in "iub" and set(range(int(low), int(high) + 1)) <= allowed):
            self._unexpected.update(np.unique(slab[~isin(slab, sorted(allowed))]).tolist())
        # every allowed value but background is organ (organ_mask); with other values, an error comes first
        self._organ = self._organ or high != BACKGROUND

    def _count_nonfinite(self, path: Path, slab: np.ndarray) -> int:
        bad = 0 if slab.dtype.kind not in "fc" else int(slab.size - np.count_nonzero(np.isfinite(slab)))
        self._nonfinite[path] += bad
        return bad

    def _finish(self) -> None:
        """The checks that need every slab: counts, the intensity range, label values, the organ."""
        image, label = self.case.image, self.case.label
        if self._nonfinite[image]:
            self.errors.append(f"{image}: {self._nonfinite[image]} NaN or infinite voxel(s)")
        elif self._range:
            low, high = self._range
            if low == high:
                self.errors.append(f"{image}: empty volume: every voxel is {low}")
            elif low > -500 or high < 0:
                self.warnings.append(
                    f"{image}: intensities span [{low}, {high}], which does not look like CT in Hounsfield units"
                )
        if self.label is None:
            return
        if self._nonfinite[label]:
            self.errors.append(f"{label}: {self._nonfinite[label]} NaN or infinite voxel(s)")
        elif self._unexpected:
            unexpected = sorted(self._unexpected)
            shown = ", ".join(f"{value:g}" for value in unexpected[:10]) + (
                f", ... ({len(unexpected)} values)" if len(unexpected) > 10 else ""
            )
            self.errors.append(
                f"{label}: label values {{{shown}}} outside the allowed {set(LABEL_VALUES[self.layout])} "
                f"for layout {self.layout!r}"
            )
        elif not self._organ:
            self.warnings.append(
                f"{label}: empty organ: no {DATASET_OF_LAYOUT[self.layout]} voxels in this labelled case"
            )


def _check_case_safely(case: Case, layout: str) -> tuple[list[str], list[str]]:
    """Scan one case; any unexpected failure of a reader becomes an error about the case."""
    try:
        scan = CaseScan(case, layout)
        for _ in scan.slabs():
            pass
    except Exception as err:  # a corrupt file can break a reader in ways nibabel does not wrap
        logger.debug("unexpected failure checking %s", case.image, exc_info=True)
        return [f"{case.image}: could not be checked: {type(err).__name__}: {err}"], []
    return scan.errors, scan.warnings


def validate_dataset(layout: str, raw_dir: str | Path, workers: int = 2) -> ValidationReport:
    """Read every case of a raw dataset and collect every problem.

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        raw_dir: the dataset folder.
        workers: parallel processes (1 = in this process; falls back to that if processes
            cannot be started).

    Returns:
        A :class:`ValidationReport`; ``report.errors`` is empty when the data can be used.
        Messages keep the order of the cases.

    Raises:
        ValueError: for an unknown ``layout`` (data problems never raise).
    """
    cases, problems = scan_cases(layout, raw_dir)
    report = ValidationReport(layout=layout, raw_dir=str(raw_dir), cases=len(cases), errors=list(problems))
    for errors, warnings in _check_all(cases, layout, workers):
        report.errors.extend(errors)
        report.warnings.extend(warnings)
    logger.debug(
        "validated %s: %d cases, %d errors, %d warnings",
        raw_dir,
        report.cases,
        len(report.errors),
        len(report.warnings),
    )
    return report


def _check_all(cases: list[Case], layout: str, workers: int) -> list[tuple[list[str], list[str]]]:
    progress = {"desc": "validate", "unit": "case", "total": len(cases), "disable": None}
    if workers > 1 and len(cases) > 1:
        # fork (where available) spares each worker re-importing torch through the package.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=context,
                                     initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
                return list(tqdm(pool.map(_check_case_safely, cases, [layout] * len(cases)), **progress))
        except (OSError, BrokenProcessPool, NotImplementedError) as err:
            logger.warning("parallel validation unavailable (%s); checking cases one by one", err)
    return [_check_case_safely(case, layout) for case in tqdm(cases, **progress)]
