"""Finding and reading raw cases (LiTS, MSD) and reporting every data problem, through the library and the CLI."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unet3plus.cli import main
from unet3plus.data.phantom import write_dataset
from unet3plus.data.sources import LABEL_VALUES, Case, case_number, discover_cases, organ_mask, read_volume, scan_cases
from unet3plus.data.validation import SLAB_SLICES, CaseScan, validate_dataset
from unet3plus.errors import DataError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    write_dataset("lits", root / "lits", cases=4, seed=1, size=32, slices=8)
    write_dataset("msd-spleen", root / "msd-spleen", cases=4, seed=1, size=32, slices=8)
    return {"lits": root / "lits", "msd-spleen": root / "msd-spleen"}


@pytest.fixture
def raw(pristine, tmp_path) -> Callable[[str], Path]:
    """A fresh, writable copy of a small synthetic dataset of the given layout."""

    def copy(layout: str) -> Path:
        return Path(shutil.copytree(pristine[layout], tmp_path / layout))

    return copy


def save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def first_labelled(layout: str, root: Path) -> Case:
    return next(case for case in discover_cases(layout, root) if case.label is not None)


# --- sources ---------------------------------------------------------------------------------


def test_lits_cases_are_found_recursively_sorted_by_number_and_macos_forks_ignored(raw):
    root = raw("lits")
    cases = discover_cases("lits", root)
    numbers = [case.number for case in cases]
    assert numbers == sorted(numbers) and [case.case_id for case in cases] == [str(n) for n in numbers]
    batch = root / "Training Batch 1"
    batch.mkdir()
    moved = cases[0]
    shutil.move(moved.image, batch / moved.image.name)
    image = nib.load(cases[1].image)
    nib.save(image, cases[1].image.with_suffix(".nii.gz"))  # compressed copies are accepted too
    cases[1].image.unlink()
    (root / f"._volume-{numbers[0]}.nii").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "._segmentation-999.nii").write_bytes(b"junk")
    again = discover_cases("lits", root)
    assert [case.number for case in again] == numbers
    assert again[0].image == batch / moved.image.name and again[0].label == moved.label
    assert again[1].image.name == f"volume-{numbers[1]}.nii.gz"


def test_msd_cases_come_from_dataset_json_with_unlabelled_test_images(raw):
    root = raw("msd-spleen")
    cases = discover_cases("msd-spleen", root)
    description = json.loads((root / "dataset.json").read_text())
    assert len(cases) == 4
    assert {case.case_id for case in cases if case.label is None} == {
        Path(p).name[: -len(".nii.gz")] for p in description["test"]
    }
    for case in cases:
        assert case.case_id.startswith("spleen_") and case.number == int(case.case_id.split("_")[1])
        assert case.image.is_file() and (case.label is None or case.label.parent.name == "labelsTr")
    assert [case.number for case in cases] == sorted(case.number for case in cases)


def test_case_number_reads_the_trailing_number():
    assert case_number("17") == 17 and case_number("spleen_2") == 2
    with pytest.raises(ValueError, match="does not end in a number"):
        case_number("spleen")


def test_organ_mask_merges_tumour_into_liver_and_keeps_spleen():
    labels = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    np.testing.assert_array_equal(organ_mask(labels, "lits"), [[0, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(organ_mask(np.array([0.0, 1.0, 0.0]), "msd-spleen"), [0, 1, 0])
    assert organ_mask(labels, "lits").dtype == np.uint8
    assert LABEL_VALUES == {"lits": {0, 1, 2}, "msd-spleen": {0, 1}}
    with pytest.raises(ValueError, match="unknown layout 'kits'"):
        organ_mask(labels, "kits")


def test_read_volume_loads_the_data_into_memory(raw):
    case = first_labelled("lits", raw("lits"))
    image = read_volume(case.image)
    assert isinstance(image.dataobj, np.ndarray) and image.shape == (32, 32, 8)
    np.testing.assert_array_equal(image.affine, nib.load(case.image).affine)
    expected = np.asanyarray(image.dataobj).copy()
    with open(case.image, "r+b") as file:  # overwrite the voxels in place: a memory map would see this
        file.seek(352)
        file.write(bytes(case.image.stat().st_size - 352))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected)
    assert expected.std() > 0


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]), "truncated or corrupt"),
        (lambda path: path.write_text("not a NIfTI file"), "cannot read the NIfTI file"),
        (lambda path: save(np.zeros((16, 16), np.int16), path), "image is 2-D with shape (16, 16)"),
        (lambda path: path.unlink(), "file not found"),
    ],
    ids=["truncated", "not-nifti", "2-d", "missing"],
)
def test_read_volume_names_the_file_and_the_problem(raw, corrupt, message):
    path = first_labelled("msd-spleen", raw("msd-spleen")).image
    corrupt(path)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: ") as error:
        read_volume(path)
    assert message in str(error.value)


def test_discover_cases_raises_one_error_listing_every_problem(raw):
    root = raw("lits")
    cases = discover_cases("lits", root)
    cases[0].label.unlink()
    cases[1].label.unlink()
    with pytest.raises(DataError, match="2 problem") as error:
        discover_cases("lits", root)
    assert str(cases[0].image) in str(error.value) and str(cases[1].image) in str(error.value)
    assert len(scan_cases("lits", root)[0]) == 2


# --- validation ------------------------------------------------------------------------------


def test_clean_synthetic_datasets_validate_without_findings(pristine):
    for layout, root in pristine.items():
        report = validate_dataset(layout, root, workers=2)
        assert report.errors == [] and report.warnings == [] and report.ok
        assert report.cases == 4
        assert report.to_dict() == {
            "layout": layout,
            "raw_dir": str(root),
            "cases": 4,
            "errors": [],
            "warnings": [],
            "ok": True,
        }


def truncate_gz(root: Path) -> Path:
    path = first_labelled("msd-spleen", root).image
    path.write_bytes(path.read_bytes()[:-400])
    return path


def mismatched_label_shape(root: Path) -> Path:
    case = first_labelled("msd-spleen", root)
    save(np.zeros((32, 30, 8), np.uint8), case.label)
    return case.label


def nan_voxels(root: Path) -> Path:
    case = first_labelled("lits", root)
    image = nib.load(case.image)
    voxels = np.asanyarray(image.dataobj).astype(np.float32)
    voxels[3, 4, 5] = np.nan
    save(voxels, case.image, image.affine)
    return case.image


def label_value_seven(root: Path) -> Path:
    case = first_labelled("lits", root)
    label = nib.load(case.label)
    labels = np.asanyarray(label.dataobj).copy()
    labels[0, 0, 0] = 7
    save(labels, case.label, label.affine)
    return case.label


def empty_directory(root: Path) -> Path:
    shutil.rmtree(root)
    root.mkdir()
    return root


def missing_dataset_json(root: Path) -> Path:
    (root / "dataset.json").unlink()
    return root / "dataset.json"


def dataset_json_pointing_at_missing_file(root: Path) -> Path:
    case = first_labelled("msd-spleen", root)
    case.label.unlink()
    return case.label


def two_d_image(root: Path) -> Path:
    case = first_labelled("lits", root)
    save(np.zeros((32, 32), np.int16), case.image)
    return case.image


def missing_segmentation(root: Path) -> Path:
    case = first_labelled("lits", root)
    case.label.unlink()
    return case.image


def invalid_dataset_json(root: Path) -> Path:
    (root / "dataset.json").write_text('{"training": [')
    return root / "dataset.json"


BAD_INPUTS = [
    ("msd-spleen", truncate_gz, "truncated or corrupt"),
    ("msd-spleen", mismatched_label_shape, "label shape (32, 30, 8) does not match image shape (32, 32, 8)"),
    ("lits", nan_voxels, "1 NaN or infinite voxel(s)"),
    ("lits", label_value_seven, "label values {7} outside the allowed {0, 1, 2}"),
    ("lits", empty_directory, "no cases found"),
    ("msd-spleen", empty_directory, "missing dataset.json"),
    ("msd-spleen", missing_dataset_json, "missing dataset.json"),
    ("msd-spleen", dataset_json_pointing_at_missing_file, "points at missing file(s)"),
    ("lits", two_d_image, "image is 2-D"),
    ("lits", missing_segmentation, "missing label"),
    ("msd-spleen", invalid_dataset_json, "not valid JSON"),
]


@pytest.mark.parametrize(
    "layout, corrupt, message", BAD_INPUTS, ids=[case[1].__name__ + "-" + case[0] for case in BAD_INPUTS]
)
def test_validation_reports_bad_input_naming_file_and_problem(raw, layout, corrupt, message):
    root = raw(layout)
    culprit = corrupt(root)
    report = validate_dataset(layout, root, workers=2)
    assert not report.ok
    matching = [error for error in report.errors if message in error]
    assert matching, report.errors
    assert str(culprit) in matching[0]


@pytest.mark.parametrize(
    "layout, corrupt, message",
    [BAD_INPUTS[i] for i in (0, 1, 3, 4, 6, 8)],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_cli_validate_exits_2_with_the_problem_and_writes_the_report(raw, tmp_path, capsys, layout, corrupt, message):
    root = raw(layout)
    culprit = corrupt(root)
    report = tmp_path / "report.json"
    assert main(["validate", "--layout", layout, "--raw", str(root), "--report", str(report)]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and str(culprit) in stderr
    assert any(message in error for error in json.loads(report.read_text())["errors"])


def test_cli_validate_accepts_clean_data(pristine, tmp_path):
    report = tmp_path / "report.json"
    assert main(["validate", "--layout", "lits", "--raw", str(pristine["lits"]), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] is True


def test_every_problem_is_reported_at_once_with_warnings(raw):
    root = raw("lits")
    cases = discover_cases("lits", root)
    label = nib.load(cases[0].label)
    save(np.zeros(label.shape, np.uint8), cases[0].label, label.affine)  # empty organ
    shifted = nib.load(cases[1].label)
    save(shifted.get_fdata().astype(np.uint8), cases[1].label, shifted.affine + np.diag([0, 0, 0.5, 0]))
    two_d_image(root)  # cases[0].image
    cases[2].image.write_bytes(cases[2].image.read_bytes()[:1000])
    report = validate_dataset("lits", root, workers=1)
    assert len(report.errors) == 2
    assert str(cases[0].image) in report.errors[0] and str(cases[2].image) in report.errors[1]
    assert report.warnings == [
        f"{cases[0].label}: empty organ: no liver voxels in this labelled case",
        f"{cases[1].label}: affine differs from that of {cases[1].image.name}; the image's geometry will be used",
    ]
    assert validate_dataset("lits", root, workers=2).to_dict() == report.to_dict()


def test_gzip_stream_corruption_is_reported(raw):
    path = first_labelled("msd-spleen", raw("msd-spleen")).image
    payload = bytearray(gzip.decompress(path.read_bytes()))
    compressed = bytearray(gzip.compress(bytes(payload)))
    compressed[len(compressed) // 2] ^= 0xFF
    path.write_bytes(bytes(compressed))
    report = validate_dataset("msd-spleen", path.parent.parent)
    assert any(error.startswith(f"{path}: ") for error in report.errors), report.errors


def test_problems_in_different_slabs_are_added_up_over_the_whole_volume(tmp_path):
    """Validation reads a few slices at a time; counts and value lists must still cover every slab."""
    root = tmp_path / "lits"
    write_dataset("lits", root, cases=1, seed=3, size=32, slices=3 * SLAB_SLICES + 2)
    (case,) = discover_cases("lits", root)
    image, label = nib.load(case.image), nib.load(case.label)
    voxels = np.asanyarray(image.dataobj).astype(np.float32)
    voxels[1, 1, 0] = voxels[2, 2, SLAB_SLICES] = np.nan  # first and second slab
    voxels[3, 3, -1] = np.inf  # the short last slab
    labels = np.asanyarray(label.dataobj).copy()
    labels[0, 0, 1], labels[0, 0, -1] = 7, 9
    save(voxels, case.image, image.affine)
    save(labels, case.label, label.affine)
    report = validate_dataset("lits", root, workers=1)
    assert report.errors == [
        f"{case.image}: 3 NaN or infinite voxel(s)",
        f"{case.label}: label values {{7, 9}} outside the allowed {{0, 1, 2}} for layout 'lits'",
    ]


def test_a_clean_volume_is_handed_out_slab_by_slab_in_file_order(tmp_path):
    root = tmp_path / "msd"
    write_dataset("msd-spleen", root, cases=1, seed=3, size=32, slices=2 * SLAB_SLICES + 3)
    case = first_labelled("msd-spleen", root)
    scan = CaseScan(case, "msd-spleen")
    slabs = list(scan.slabs())
    assert [start for start, _, _ in slabs] == [0, SLAB_SLICES, 2 * SLAB_SLICES]
    np.testing.assert_array_equal(
        np.concatenate([image for _, image, _ in slabs], axis=2), read_volume(case.image).dataobj
    )
    np.testing.assert_array_equal(
        np.concatenate([label for _, _, label in slabs], axis=2), read_volume(case.label).dataobj
    )
    assert scan.errors == [] and scan.warnings == []
