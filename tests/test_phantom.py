"""The synthetic CT phantom: published file layouts, labels, geometry, HU values, determinism, preview."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from unet3plus.cli import main
from unet3plus.data.phantom import MARKER, Tissue, render_preview, synthesize_volume, tissue_labels, write_dataset
from unet3plus.data.sources import discover_cases
from unet3plus.errors import ConfigError, DataError

SIZE, SLICES = 64, 20
MSD_FIELDS = {
    "name", "description", "reference", "licence", "release", "tensorImageSize", "modality", "labels",
    "numTraining", "numTest", "training", "test",
}  # fmt: skip


@pytest.fixture(scope="module")
def lits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "lits"
    write_dataset("lits", out, cases=4, seed=3, size=SIZE, slices=SLICES)
    return out


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "msd"
    write_dataset("msd-spleen", out, cases=5, seed=3, size=SIZE, slices=SLICES)
    return out


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def test_lits_layout_has_uncompressed_volume_and_segmentation_pairs(lits):
    names = sorted(path.name for path in lits.iterdir() if not path.name.startswith("."))
    numbers = sorted(int(name.split("-")[1].split(".")[0]) for name in names if name.startswith("volume-"))
    assert names == sorted([f"volume-{n}.nii" for n in numbers] + [f"segmentation-{n}.nii" for n in numbers])
    assert len(numbers) == 4
    assert sum(n <= 27 for n in numbers) == 1 and max(numbers) <= 130
    assert (lits / f"volume-{numbers[0]}.nii").read_bytes()[344:348] == b"n+1\x00"  # plain NIfTI-1, not gzip


@pytest.mark.parametrize("cases, expected_test", [(1, 1), (4, 1), (12, 3), (20, 5)])
def test_about_a_quarter_of_lits_ids_fall_in_the_papers_test_range(tmp_path, cases, expected_test):
    images = write_dataset("lits", tmp_path / "raw", cases=cases, seed=cases, size=32, slices=8)
    numbers = [int(path.name[len("volume-") : -len(".nii")]) for path in images]
    assert len(set(numbers)) == cases
    assert sum(n <= 27 for n in numbers) == expected_test
    assert all(0 <= n <= 130 for n in numbers)


def test_msd_layout_matches_the_published_dataset_json(msd):
    description = json.loads((msd / "dataset.json").read_text())
    assert set(description) == MSD_FIELDS
    assert description["tensorImageSize"] == "3D"
    assert description["modality"] == {"0": "CT"}
    assert description["labels"] == {"0": "background", "1": "spleen"}
    assert description["numTraining"] == len(description["training"]) == 4
    assert description["numTest"] == len(description["test"]) == 1
    numbers = []
    for entry in description["training"]:
        number = int(entry["image"].removeprefix("./imagesTr/spleen_").removesuffix(".nii.gz"))
        assert entry == {"image": f"./imagesTr/spleen_{number}.nii.gz", "label": f"./labelsTr/spleen_{number}.nii.gz"}
        assert (msd / entry["image"]).is_file() and (msd / entry["label"]).is_file()
        numbers.append(number)
    (test_image,) = description["test"]
    assert test_image.startswith("./imagesTs/spleen_") and (msd / test_image).is_file()
    assert not (msd / "labelsTs").exists()
    assert numbers != list(range(numbers[0], numbers[0] + len(numbers)))  # ids are not contiguous
    assert sorted(path.name for path in (msd / "labelsTr").iterdir()) == sorted(
        path.name for path in (msd / "imagesTr").iterdir()
    )


@pytest.mark.parametrize("layout, fixture, allowed", [("lits", "lits", {0, 1, 2}), ("msd-spleen", "msd", {0, 1})])
def test_volumes_have_expected_shape_dtype_labels_and_organ_free_slices(request, layout, fixture, allowed):
    for case in discover_cases(layout, request.getfixturevalue(fixture)):
        image, affine = load(case.image)
        assert image.shape == (SIZE, SIZE, SLICES) and image.dtype == np.int16
        if case.label is None:
            continue
        label, label_affine = load(case.label)
        assert label.shape == image.shape and label.dtype == np.uint8
        np.testing.assert_array_equal(label_affine, affine)
        assert set(np.unique(label)) <= allowed and 1 in label
        organ_slices = (label > 0).any(axis=(0, 1))
        assert organ_slices.any() and organ_slices.mean() <= 0.7, case.case_id  # >= 30% slices without organ


def test_lits_tumours_sit_inside_the_liver(lits):
    tumours, surroundings = 0, []
    for case in discover_cases("lits", lits):
        label, _ = load(case.label)
        components, count = ndimage.label(label == 2)
        for index in range(1, count + 1):
            shell = ndimage.binary_dilation(components == index) & (components != index)
            assert (label[shell] == 1).any(), case.case_id  # every tumour touches the liver
            surroundings.append(label[shell])
        tumours += count
    assert tumours > 0
    assert (np.concatenate(surroundings) == 1).mean() > 0.6  # and is mostly surrounded by it


def test_spacing_and_affine_are_realistic(lits, msd):
    for layout, raw in (("lits", lits), ("msd-spleen", msd)):
        for case in discover_cases(layout, raw):
            _, affine = load(case.image)
            np.testing.assert_array_equal(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))
            spacing = np.abs(np.diag(affine)[:3])
            assert spacing[0] == spacing[1] and 0.6 <= spacing[0] * SIZE / 512 <= 0.9  # a 307-461 mm field of view
            assert 0.7 <= spacing[2] <= 5.0
            assert affine[0, 0] < 0 and affine[2, 2] > 0
    _, _, affine = synthesize_volume(np.random.default_rng(0), size=512, slices=8)
    assert 0.6 <= -affine[0, 0] <= 0.9 and affine[0, 0] == affine[1, 1]


def test_spacing_differs_between_cases(lits):
    spacings = {tuple(np.round(np.diag(load(case.image)[1])[:3], 4)) for case in discover_cases("lits", lits)}
    assert len(spacings) == 4


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


@pytest.mark.parametrize("flip_ap", [False, True])
def test_organs_sit_on_the_anatomical_side_given_by_the_affine(flip_ap):
    image, tissue, affine = synthesize_volume(np.random.default_rng(11), size=64, slices=20, flip_ap=flip_ap)
    body = world_centroid(image > -300, affine)
    liver = world_centroid(tissue_labels(tissue, "lits") > 0, affine)
    spleen = world_centroid(tissue_labels(tissue, "msd-spleen") > 0, affine)
    spine = world_centroid(tissue == Tissue.CANCELLOUS_BONE, affine)
    # RAS+ world: +x towards the patient's right, +y anterior, +z superior.
    assert liver[0] > body[0] > spleen[0]
    assert spleen[1] < body[1] and spine[1] < body[1]
    assert spleen[2] > world_centroid(tissue == Tissue.KIDNEY, affine)[2]  # spleen above the kidneys


def test_flipped_storage_is_the_same_anatomy():
    image, tissue, affine = synthesize_volume(np.random.default_rng(5), size=48, slices=12)
    flipped, flipped_tissue, flipped_affine = synthesize_volume(
        np.random.default_rng(5), size=48, slices=12, flip_ap=True
    )
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(flipped_tissue, tissue[:, ::-1])
    corner = nib.affines.apply_affine(affine, [3, 5, 7])
    np.testing.assert_allclose(nib.affines.apply_affine(flipped_affine, [3, 48 - 1 - 5, 7]), corner)


def test_tissue_intensities_are_plausible_hounsfield_units():
    image, tissue, _ = synthesize_volume(np.random.default_rng(2), size=96, slices=24)
    interior = ndimage.binary_erosion(tissue == Tissue.LIVER, iterations=2)

    def mean(kind: Tissue) -> float:
        return float(image[ndimage.binary_erosion(tissue == kind)].mean())

    assert -1015 < float(image[(tissue == Tissue.AIR) & (image > -1024)].mean()) < -985
    assert image[0, 0, 0] == -1024  # outside the reconstruction circle
    assert -120 < mean(Tissue.FAT) < -80 and -110 < mean(Tissue.VISCERAL_FAT) < -70
    assert 25 < mean(Tissue.MUSCLE) < 60
    assert 40 < float(image[interior].mean()) < 80 and 8 < float(image[interior].std()) < 25  # contrast liver + noise
    assert mean(Tissue.SPLEEN) < float(image[interior].mean()) + 10
    assert mean(Tissue.KIDNEY) > 120 and mean(Tissue.AORTA) > 150 and mean(Tissue.CORTICAL_BONE) > 400
    assert mean(Tissue.LUNG) < -700 and mean(Tissue.GAS) < -800
    assert float(image[tissue == Tissue.TUMOUR].mean()) < float(image[interior].mean()) - 10


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    for layout in ("lits", "msd-spleen"):
        runs = {name: tmp_path / layout / name for name in ("a", "b", "other")}
        for name, seed in (("a", 7), ("b", 7), ("other", 8)):
            write_dataset(layout, runs[name], cases=3, seed=seed, size=32, slices=8)
        files = sorted(path.relative_to(runs["a"]) for path in runs["a"].rglob("*") if path.is_file())
        assert files == sorted(path.relative_to(runs["b"]) for path in runs["b"].rglob("*") if path.is_file())
        for relative in files:
            assert (runs["a"] / relative).read_bytes() == (runs["b"] / relative).read_bytes(), relative
        first = discover_cases(layout, runs["a"])[0].image
        other = discover_cases(layout, runs["other"])[0].image
        assert first.name != other.name or not np.array_equal(load(first)[0], load(other)[0])


def test_synth_replaces_its_own_output_but_never_foreign_data(tmp_path):
    out = tmp_path / "raw"
    write_dataset("lits", out, cases=3, seed=0, size=32, slices=8)
    assert (out / MARKER).is_file()
    write_dataset("lits", out, cases=2, seed=1, size=32, slices=8)
    assert len(discover_cases("lits", out)) == 2  # no stale cases from the first run
    assert [path.name for path in tmp_path.iterdir()] == ["raw"]  # no staging folders left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_dataset("lits", foreign, cases=1, seed=0, size=32, slices=8)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_bad_synth_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cases >= 1"):
        write_dataset("lits", tmp_path / "a", cases=0, seed=0)
    with pytest.raises(ConfigError, match="at most 131"):
        write_dataset("lits", tmp_path / "b", cases=140, seed=0)
    with pytest.raises(ValueError, match="unknown layout"):
        write_dataset("kits", tmp_path / "c", cases=1, seed=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("layout, fixture", [("lits", "lits"), ("msd-spleen", "msd")])
def test_preview_png_is_written(request, tmp_path, layout, fixture):
    png = render_preview(layout, request.getfixturevalue(fixture), tmp_path / "preview.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert [path.name for path in tmp_path.iterdir()] == ["preview.png"]


def test_cli_synth_writes_dataset_and_preview(tmp_path, caplog):
    code = main(["synth", "--layout", "msd-spleen", "--out", str(tmp_path / "raw"), "--cases", "3", "--seed", "4",
                 "--size", "32", "--slices", "8", "--preview", str(tmp_path / "p.png")])  # fmt: skip
    assert code == 0
    assert len(discover_cases("msd-spleen", tmp_path / "raw")) == 3 and (tmp_path / "p.png").is_file()
    assert main(["synth", "--layout", "lits", "--out", str(tmp_path / "x"), "--cases", "0", "--seed", "1"]) == 2
    assert not (tmp_path / "x").exists()


def test_a_larger_field_of_view_pads_the_same_kind_of_body_with_air_and_enlarges_pixels():
    image, tissue, affine = synthesize_volume(np.random.default_rng(3), 64, 8, fov_scale=1.0)
    wide_image, wide_tissue, wide_affine = synthesize_volume(np.random.default_rng(3), 64, 8, fov_scale=2.0)
    assert wide_image.shape == image.shape == (64, 64, 8)
    inner = 32
    pixel, wide_pixel = (float(nib.affines.voxel_sizes(a)[0]) for a in (affine, wide_affine))
    assert wide_pixel == pytest.approx(pixel * 64 / inner)  # same drawn field of view on half the voxels
    border = np.ones((64, 64), bool)
    border[16:48, 16:48] = False
    assert (wide_image[border] == -1024).all() and (wide_tissue[border] == Tissue.AIR).all()
    assert (wide_tissue[16:48, 16:48] == Tissue.LIVER).any()
    # the default phantom is untouched by the option: the digest of these arrays before it existed
    digest = hashlib.sha256(image.tobytes() + tissue.tobytes() + affine.tobytes()).hexdigest()
    assert digest == "640ef8e33bb8e509a1c84bad1b409a9d733e0c33e3922a102dde8fe3dad9fd66"
