"""Check every case of a raw dataset and report all problems at once.

:func:`validate_dataset` never raises for data problems: it reads every volume (in parallel
processes) and collects one message per problem, each naming the file. Errors make the data
unusable (unreadable or truncated file, missing label, shape mismatch, NaN or inf, unexpected
label values, 2-D image, no cases); warnings are worth a look but do not stop the pipeline
(label affine differing from the image's, empty organ in a labelled case, intensities that do not
look like Hounsfield units).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from unet3plus.config import DATASET_OF_LAYOUT
from unet3plus.data.sources import LABEL_VALUES, ORGAN_LABELS, Case, isin, read_volume, scan_cases
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


def check_case(case: Case, layout: str) -> tuple[list[str], list[str]]:
    """Read one case and list its problems.

    Args:
        case: the case to check (``label`` may be ``None``).
        layout: ``"lits"`` or ``"msd-spleen"`` (decides the allowed label values).

    Returns:
        ``(errors, warnings)``, messages naming the offending file.
    """
    errors: list[str] = []
    warnings: list[str] = []
    image = _read(case.image, errors)
    voxels = None if image is None else np.asanyarray(image.dataobj)
    if voxels is not None and _check_finite(case.image, voxels, errors):
        low, high = voxels.min(), voxels.max()
        if low == high:
            errors.append(f"{case.image}: empty volume: every voxel is {low}")
        elif low > -500 or high < 0:
            warnings.append(
                f"{case.image}: intensities span [{low}, {high}], which does not look like CT in Hounsfield units"
            )
    if case.label is None:
        return errors, warnings
    label = _read(case.label, errors)
    if label is None:
        return errors, warnings
    labels = np.asanyarray(label.dataobj)
    if voxels is not None and labels.shape != voxels.shape:
        errors.append(
            f"{case.label}: label shape {labels.shape} does not match image shape {voxels.shape} of {case.image.name}"
        )
    elif voxels is not None and not np.allclose(label.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
        warnings.append(
            f"{case.label}: affine differs from that of {case.image.name}; the image's geometry will be used"
        )
    if not _check_finite(case.label, labels, errors):
        return errors, warnings
    allowed = sorted(LABEL_VALUES[layout])
    unexpected = np.unique(labels[~isin(labels, allowed)])
    if unexpected.size:
        shown = ", ".join(f"{value:g}" for value in unexpected[:10]) + (
            f", ... ({unexpected.size} values)" if unexpected.size > 10 else ""
        )
        errors.append(
            f"{case.label}: label values {{{shown}}} outside the allowed {set(allowed)} for layout {layout!r}"
        )
    if not isin(labels, ORGAN_LABELS[layout]).any():
        warnings.append(f"{case.label}: empty organ: no {DATASET_OF_LAYOUT[layout]} voxels in this labelled case")
    return errors, warnings


def _read(path: Path, errors: list[str]) -> nib.spatialimages.SpatialImage | None:
    """:func:`read_volume`, recording a failure in ``errors`` instead of raising."""
    try:
        return read_volume(path)
    except DataError as err:
        errors.append(str(err))
        return None


def _check_finite(path: Path, array: np.ndarray, errors: list[str]) -> bool:
    """Append an error if ``array`` holds NaN or inf; return whether it is all finite."""
    if array.dtype.kind not in "fc":
        return True
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        errors.append(f"{path}: {bad} NaN or infinite voxel(s)")
    return not bad


def _check_case_safely(case: Case, layout: str) -> tuple[list[str], list[str]]:
    """:func:`check_case`, turning any unexpected failure of a reader into an error about the case."""
    try:
        return check_case(case, layout)
    except Exception as err:  # a corrupt file can break a reader in ways nibabel does not wrap
        logger.debug("unexpected failure checking %s", case.image, exc_info=True)
        return [f"{case.image}: could not be checked: {type(err).__name__}: {err}"], []


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
            with ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=context) as pool:
                return list(tqdm(pool.map(_check_case_safely, cases, [layout] * len(cases)), **progress))
        except (OSError, BrokenProcessPool, NotImplementedError) as err:
            logger.warning("parallel validation unavailable (%s); checking cases one by one", err)
    return [_check_case_safely(case, layout) for case in tqdm(cases, **progress)]
