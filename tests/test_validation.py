"""unet3plus.data.validation: every data problem reported at once, naming the file, through the library and the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import first_labelled, save_nifti
from unet3plus.cli import main
from unet3plus.data.phantom import write_dataset
from unet3plus.data.sources import discover_cases, read_volume
from unet3plus.data.validation import SLAB_SLICES, CaseScan, validate_dataset


def test_clean_synthetic_datasets_validate_without_findings(raw_datasets):
    for layout, root in raw_datasets.items():
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
    save_nifti(np.zeros((32, 30, 8), np.uint8), case.label)
    return case.label


def nan_voxels(root: Path) -> Path:
    case = first_labelled("lits", root)
    image = nib.load(case.image)
    voxels = np.asanyarray(image.dataobj).astype(np.float32)
    voxels[3, 4, 5] = np.nan
    save_nifti(voxels, case.image, image.affine)
    return case.image


def label_value_seven(root: Path) -> Path:
    case = first_labelled("lits", root)
    label = nib.load(case.label)
    labels = np.asanyarray(label.dataobj).copy()
    labels[0, 0, 0] = 7
    save_nifti(labels, case.label, label.affine)
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
    save_nifti(np.zeros((32, 32), np.int16), case.image)
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
def test_validation_reports_bad_input_naming_file_and_problem(raw_copy, layout, corrupt, message):
    root = raw_copy(layout)
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
def test_cli_validate_exits_2_with_the_problem_and_writes_the_report(raw_copy, tmp_path, capsys, layout, corrupt, message):
    root = raw_copy(layout)
    culprit = corrupt(root)
    report = tmp_path / "report.json"
    assert main(["validate", "--layout", layout, "--raw", str(root), "--report", str(report)]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and str(culprit) in stderr
    assert any(message in error for error in json.loads(report.read_text())["errors"])


def test_cli_validate_accepts_clean_data(raw_datasets, tmp_path):
    report = tmp_path / "report.json"
    assert main(["validate", "--layout", "lits", "--raw", str(raw_datasets["lits"]), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] is True


def test_every_problem_is_reported_at_once_with_warnings(raw_copy):
    root = raw_copy("lits")
    cases = discover_cases("lits", root)
    label = nib.load(cases[0].label)
    save_nifti(np.zeros(label.shape, np.uint8), cases[0].label, label.affine)  # empty organ
    shifted = nib.load(cases[1].label)
    save_nifti(shifted.get_fdata().astype(np.uint8), cases[1].label, shifted.affine + np.diag([0, 0, 0.5, 0]))
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


def test_gzip_stream_corruption_is_reported(raw_copy):
    path = first_labelled("msd-spleen", raw_copy("msd-spleen")).image
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
    save_nifti(voxels, case.image, image.affine)
    save_nifti(labels, case.label, label.affine)
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
