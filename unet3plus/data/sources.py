"""Raw dataset sources: find the cases of a LiTS or MSD Task09_Spleen folder and read their volumes.

Two published layouts are understood:

* ``lits``: LiTS 2017 training data, ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]``
  (labels 0 background, 1 liver, 2 tumour). Files are searched recursively, so the official
  "Training Batch 1" / "Training Batch 2" folders work as they are.
* ``msd-spleen``: Medical Segmentation Decathlon Task09_Spleen, ``dataset.json`` listing
  ``imagesTr``/``labelsTr`` pairs (labels 0 background, 1 spleen) and unlabelled ``imagesTs``.

macOS resource forks (``._*``) are ignored everywhere.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np

from unet3plus.config import LAYOUTS
from unet3plus.errors import DataError

LABEL_VALUES: dict[str, frozenset[int]] = {"lits": frozenset({0, 1, 2}), "msd-spleen": frozenset({0, 1})}
"""Label values allowed in the label files of each layout."""

BACKGROUND = 0
"""The label value outside the organ; it is also the smallest allowed value."""

SYNTH_MARKER = ".unet3plus-synth.json"
"""Hidden file naming the synth parameters, written by ``unet3plus synth``: only folders holding it
are ever replaced, and data holding it is synthetic (see :func:`data_source`)."""

SYNTHETIC = "synthetic"
REAL_SOURCE = {"lits": "lits", "msd-spleen": "msd"}
"""The published collection each layout's real data comes from (LiTS 2017, Medical Segmentation Decathlon)."""


_LITS_FILE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
)


@dataclass(frozen=True)
class Case:
    """One scan of a raw dataset.

    Attributes:
        case_id: the dataset's own id, unique and filename-safe: LiTS ``"17"``, MSD ``"spleen_2"``.
        image: path of the CT volume.
        label: path of its label volume; ``None`` for unlabelled cases (MSD ``imagesTs``).
    """

    case_id: str
    image: Path
    label: Path | None

    @property
    def number(self) -> int:
        """The numeric id of the case (LiTS ``"17"`` -> 17, MSD ``"spleen_2"`` -> 2)."""
        return case_number(self.case_id)


def case_number(case_id: str) -> int:
    """Numeric part of a case id: ``"17"`` -> 17, ``"spleen_2"`` -> 2.

    Raises:
        ValueError: if ``case_id`` does not end in digits.
    """
    match = _TRAILING_NUMBER.search(case_id)
    if match is None:
        raise ValueError(f"case id {case_id!r} does not end in a number")
    return int(match.group(1))


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` naming the valid layouts if ``layout`` is not one of them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def data_source(layout: str, raw_dir: str | Path) -> str:
    """Where a raw dataset comes from: ``"synthetic"`` (a phantom written by ``unet3plus synth``) or real data.

    Decided by content, not by folder name: a folder holding :data:`SYNTH_MARKER` is a phantom;
    any other is the real collection of its layout (``"lits"`` or ``"msd"``). Preprocessing
    records it in ``cases.json``; runs and registered versions carry it, and phantom-trained models
    are registered under their own name (:mod:`unet3plus.register`).
    """
    check_layout(layout)
    return SYNTHETIC if (Path(raw_dir) / SYNTH_MARKER).is_file() else REAL_SOURCE[layout]


def scan_cases(layout: str, raw_dir: str | Path) -> tuple[list[Case], list[str]]:
    """Find the cases of a raw dataset without raising for data problems.

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        raw_dir: the dataset folder.

    Returns:
        ``(cases, problems)``: the complete cases sorted by numeric id, and one message per problem
        (missing folder or ``dataset.json``, a volume without its segmentation, an entry naming a
        missing file, duplicate ids, no cases at all). Incomplete cases are left out of ``cases``.

    Raises:
        ValueError: for an unknown ``layout`` (a programming error, not a data problem).
    """
    check_layout(layout)
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return [], [f"{raw_dir}: dataset folder does not exist"]
    cases, problems = _scan_lits(raw_dir) if layout == "lits" else _scan_msd(raw_dir)
    ids = [case.case_id for case in cases]
    for duplicate in sorted({case_id for case_id in ids if ids.count(case_id) > 1}):
        files = ", ".join(str(case.image) for case in cases if case.case_id == duplicate)
        problems.append(f"case id {duplicate!r} appears more than once: {files}")
    if not cases and not problems:
        expected = "volume-N.nii[.gz] files" if layout == "lits" else "cases in dataset.json"
        problems.append(f"{raw_dir}: no cases found (expected {expected} for layout {layout!r})")
    return sorted(cases, key=lambda case: (case.number, case.case_id)), problems


def discover_cases(layout: str, raw_dir: str | Path) -> list[Case]:
    """The cases of a raw dataset, sorted by numeric id.

    Args:
        layout: ``"lits"`` or ``"msd-spleen"``.
        raw_dir: the dataset folder.

    Returns:
        Every case; ``label`` is ``None`` for unlabelled MSD test images.

    Raises:
        DataError: listing every problem :func:`scan_cases` found (empty folder, missing or invalid
            ``dataset.json``, missing files, unpaired volumes, duplicate ids).
        ValueError: for an unknown ``layout``.
    """
    cases, problems = scan_cases(layout, raw_dir)
    if problems:
        raise DataError(f"{raw_dir}: {len(problems)} problem(s) with the {layout} dataset:\n  " + "\n  ".join(problems))
    return cases


def open_volume(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Open a 3-D NIfTI volume: the header is checked now, voxels are read when sliced.

    ``read_slab(image, path, start, stop)`` then reads a few axial slices at a time, so a whole
    volume never has to sit in memory twice. A ``.nii.gz`` file is decompressed into memory here,
    whole, which also checks its gzip CRC (nibabel alone stops after the voxel data, so a
    corrupted byte inside the stream would pass unnoticed as wrong voxel values).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        A nibabel image whose ``dataobj`` reads from memory (``.gz``) or from the file, never
        through a memory map (which would fault if the file changed under it).

    Raises:
        DataError: if the file is missing, not NIfTI, corrupt, not 3-D or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(path, mmap=False)
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                image = type(image).from_bytes(stream.read())
    except _READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the NIfTI file (truncated or corrupt?): {err}") from err
    if image.get_data_dtype().kind == "c":
        raise DataError(f"{path}: complex-valued voxels ({image.get_data_dtype()}); a real-valued CT or label volume is expected")
    if len(image.shape) != 3:
        raise DataError(f"{path}: image is {len(image.shape)}-D with shape {image.shape}; a 3-D volume is expected")
    if 0 in image.shape:
        raise DataError(f"{path}: image is empty (shape {image.shape})")
    return image


def read_slab(image: nib.spatialimages.SpatialImage, path: str | Path, start: int, stop: int) -> np.ndarray:
    """Voxels ``[:, :, start:stop]`` of an :func:`open_volume` image (scaling applied), read now.

    Raises:
        DataError: naming ``path``, if the file is truncated or corrupt.
    """
    try:
        return np.asanyarray(image.dataobj[:, :, start:stop])
    except _READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the NIfTI file (truncated or corrupt?): {err}") from err


def read_volume(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Load a 3-D NIfTI volume completely into memory.

    The voxel data are read here (not lazily), so a truncated or corrupt file fails now, with a
    message naming it, rather than later in the middle of evaluation.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        A nibabel image of the same class whose ``dataobj`` is the in-memory array (X, Y, Z), with
        the file's affine and header (scaling already applied to the array).

    Raises:
        DataError: if the file is missing, not NIfTI, truncated or corrupt, or not 3-D.
    """
    image = open_volume(path)
    data = read_slab(image, path, 0, image.shape[2])
    return image.__class__(data, image.affine, image.header)


def isin(array: np.ndarray, values) -> np.ndarray:
    """``np.isin`` without the copy it makes of Fortran-ordered arrays (NIfTI's native order).

    ``np.isin`` ravels in C order, which copies a whole Fortran-ordered volume (10x slower on a
    512 x 512 x 100 label map); working on the transposed, C-ordered view avoids it.
    """
    values = list(values)
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        return np.isin(array.T, values).T
    return np.isin(array, values)


def organ_mask(label: np.ndarray, layout: str) -> np.ndarray:
    """Binary organ mask from a label array: every allowed label value but background is organ.

    Args:
        label: label values of any shape (integer or float dtype), holding only the values that
            :data:`LABEL_VALUES` allows for ``layout`` (as validation checks).
        layout: ``"lits"`` (liver 1 and tumour 2 -> 1) or ``"msd-spleen"`` (spleen 1 -> 1).

    Returns:
        uint8 array of the same shape, 1 inside the organ and 0 elsewhere.

    Raises:
        ValueError: for an unknown ``layout``.
    """
    check_layout(layout)
    return np.not_equal(label, BACKGROUND).view(np.uint8)


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursively, through symbolic links to folders such as a linked
    "Training Batch 1"), without macOS ``._*`` forks or hidden folders."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        files += [Path(root) / name for name in sorted(names) if not name.startswith(".")]
    return [path for path in files if path.is_file()]


def _scan_lits(raw_dir: Path) -> tuple[list[Case], list[str]]:
    found: dict[str, dict[int, list[Path]]] = {"volume": {}, "segmentation": {}}
    for path in _visible_files(raw_dir):
        match = _LITS_FILE.match(path.name)
        if match:
            found[match.group(1)].setdefault(int(match.group(2)), []).append(path)
    cases, problems = [], []
    for number in sorted(set(found["volume"]) | set(found["segmentation"])):
        volumes = found["volume"].get(number, [])
        segmentations = found["segmentation"].get(number, [])
        for kind, paths in (("volume", volumes), ("segmentation", segmentations)):
            if len(paths) > 1:
                problems.append(f"case {number}: several {kind} files: {', '.join(map(str, sorted(paths)))}")
        if not volumes:
            problems.append(f"{segmentations[0]}: no matching volume-{number}.nii[.gz]")
        elif not segmentations:
            problems.append(f"{volumes[0]}: missing label: no segmentation-{number}.nii[.gz] found")
        elif len(volumes) == 1 and len(segmentations) == 1:
            cases.append(Case(str(number), volumes[0], segmentations[0]))
    return cases, problems


def _scan_msd(raw_dir: Path) -> tuple[list[Case], list[str]]:
    manifest = raw_dir / "dataset.json"
    if not manifest.is_file():
        return [], [f"{manifest}: missing dataset.json (required by the MSD layout)"]
    try:
        description = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [], [f"{manifest}: not valid JSON: {err}"]
    if not isinstance(description, dict) or not isinstance(description.get("training"), list):
        return [], [f"{manifest}: expected an object with a 'training' list of {{'image', 'label'}} entries"]
    entries: list[tuple[object, object]] = [
        (entry.get("image"), entry.get("label")) if isinstance(entry, dict) else (entry, None)
        for entry in description["training"]
    ]
    test = description.get("test", [])
    if not isinstance(test, list):
        return [], [f"{manifest}: 'test' must be a list of image paths"]
    cases, problems = [], []
    for index, (image, label) in enumerate(entries + [(path, None) for path in test]):
        where = f"{manifest}: {'training' if index < len(entries) else 'test'} entry {image!r}"
        paths = [image] if index >= len(entries) else [image, label]
        if not all(isinstance(path, str) and path for path in paths):
            problems.append(f"{where}: expected {'an image path' if len(paths) == 1 else 'image and label paths'}")
            continue
        resolved = [raw_dir / PurePosixPath(path) for path in paths]
        missing = [str(path) for path in resolved if not path.is_file()]
        if missing:
            problems.append(f"{where}: points at missing file(s): {', '.join(missing)}")
            continue
        case_id = resolved[0].name.removesuffix(".gz").removesuffix(".nii")
        if _TRAILING_NUMBER.search(case_id) is None:
            problems.append(f"{where}: cannot read a case number from the file name (expected e.g. spleen_12.nii.gz)")
            continue
        cases.append(Case(case_id, resolved[0], resolved[1] if len(resolved) == 2 else None))
    return cases, problems
