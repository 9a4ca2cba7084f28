"""unet3plus.data.sources: finding raw cases (LiTS, MSD), their numbers and organ masks, reading volumes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import first_labelled, save_nifti
from unet3plus.data.sources import LABEL_VALUES, case_number, discover_cases, organ_mask, read_volume, scan_cases
from unet3plus.errors import DataError


def test_lits_cases_are_found_recursively_sorted_by_number_and_macos_forks_ignored(raw_copy):
    root = raw_copy("lits")
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


def test_msd_cases_come_from_dataset_json_with_unlabelled_test_images(raw_copy):
    root = raw_copy("msd-spleen")
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


def test_read_volume_loads_the_data_into_memory(raw_copy):
    case = first_labelled("lits", raw_copy("lits"))
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
        (lambda path: save_nifti(np.zeros((16, 16), np.int16), path), "image is 2-D with shape (16, 16)"),
        (lambda path: path.unlink(), "file not found"),
    ],
    ids=["truncated", "not-nifti", "2-d", "missing"],
)
def test_read_volume_names_the_file_and_the_problem(raw_copy, corrupt, message):
    path = first_labelled("msd-spleen", raw_copy("msd-spleen")).image
    corrupt(path)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: ") as error:
        read_volume(path)
    assert message in str(error.value)


def test_discover_cases_raises_one_error_listing_every_problem(raw_copy):
    root = raw_copy("lits")
    cases = discover_cases("lits", root)
    cases[0].label.unlink()
    cases[1].label.unlink()
    with pytest.raises(DataError, match="2 problem") as error:
        discover_cases("lits", root)
    assert str(cases[0].image) in str(error.value) and str(cases[1].image) in str(error.value)
    assert len(scan_cases("lits", root)[0]) == 2
