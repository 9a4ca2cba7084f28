"""unet3plus.data.preprocess: the dataset build (samples, splits, cases.json, fingerprint) end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.conftest import AFFINES, reference_dice
from unet3plus.cli import main
from unet3plus.config import DataConfig
from unet3plus.data import preprocess
from unet3plus.data.dataset import save_sample
from unet3plus.data.geometry import VolumeGeometry, restore_volume
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import assign_splits, preprocess_dataset
from unet3plus.data.sources import SYNTH_MARKER, Case, data_source, discover_cases
from unet3plus.data.transforms import prepare_label, prepare_volume
from unet3plus.errors import DataError


def config(**changes) -> DataConfig:
    return dataclasses.replace(DataConfig(size=32, workers=1), **changes)


# ---- preprocess_dataset end to end on D1's synthetic phantom (tiny: 64 px, 16 slices, 5 cases) ----

LAYOUTS = ("lits", "msd-spleen")
SIZE = 32  # exactly half of the phantom's 64 px, so bilinear resizing = 2x2 block mean


@pytest.fixture(scope="module")
def raw_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    for layout in LAYOUTS:
        write_dataset(layout, root / layout, cases=5, seed=0, size=64, slices=16)
    return {layout: root / layout for layout in LAYOUTS}


@pytest.fixture(scope="module")
def outputs(raw_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preprocessed")
    for layout in LAYOUTS:
        preprocess_dataset(layout, raw_dirs[layout], root / layout, config(size=SIZE))
    return {layout: root / layout for layout in LAYOUTS}


def pls_canonical(image: nib.Nifti1Image) -> np.ndarray:
    """(Z, rows, columns) in the documented orientation, via nibabel's own RAS canonical form."""
    ras = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    return ras[::-1, ::-1, :].transpose(2, 1, 0)  # rows = -A (posterior), columns = -R (left)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_layouts_give_one_correct_sample_per_slice(layout, raw_dirs, outputs):
    raw, out = raw_dirs[layout], outputs[layout]
    manifest = pd.read_csv(out / "manifest.csv", dtype={"case_id": str})
    cases = json.loads((out / "cases.json").read_text())
    assert list(manifest.columns) == ["case_id", "slice_index", "path", "organ_present", "split"]
    assert cases["layout"] == layout and cases["dataset"] == {"lits": "liver", "msd-spleen": "spleen"}[layout]
    assert cases["data_config"]["size"] == SIZE and len(cases["fingerprint"]) == 64
    labelled = [case for case in discover_cases(layout, raw) if case.label is not None]
    assert sorted(manifest.case_id.unique()) == sorted(case.case_id for case in labelled)
    for case in labelled:
        entry = cases["cases"][case.case_id]
        assert (raw / entry["image"]).samefile(case.image) and (raw / entry["label"]).samefile(case.label)
        image, label = nib.load(case.image), nib.load(case.label)
        windowed = np.clip((pls_canonical(image) + 200.0) / 450.0, 0, 1)  # float64 reference
        expected_image = windowed.reshape(-1, SIZE, 2, SIZE, 2).mean(axis=(2, 4))
        organ = np.isin(pls_canonical(label), [1, 2] if layout == "lits" else [1])
        rows = manifest[manifest.case_id == case.case_id]
        assert list(rows.slice_index) == list(range(len(organ))) == list(range(entry["slices"]))
        assert rows.split.nunique() == 1 and rows.split.iloc[0] == entry["split"]
        for row in rows.itertuples():
            assert row.path == f"samples/{case.case_id}/{row.slice_index:04d}.npz"
            with np.load(out / row.path) as sample:
                assert sample["image"].dtype == np.float16 and sample["image"].shape == (3, SIZE, SIZE)
                assert sample["mask"].dtype == np.uint8 and sample["mask"].shape == (SIZE, SIZE)
                assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
                assert set(np.unique(sample["mask"])) <= {0, 1}
                assert sample["organ_present"] == row.organ_present == sample["mask"].any()
                np.testing.assert_allclose(sample["image"][1], expected_image[row.slice_index], atol=2e-3)
                neighbour = expected_image[min(row.slice_index + 1, len(organ) - 1)]
                np.testing.assert_allclose(sample["image"][2], neighbour, atol=2e-3)
                # 2x downsampling: organ where at least 2 pixels of the 2x2 block are (block mean >= 0.5)
                blocks = organ[row.slice_index].reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))
                np.testing.assert_array_equal(sample["mask"], (blocks >= 0.5).astype(np.uint8))
        assert 0 < rows.organ_present.sum() < len(rows)  # organ-free slices exist (what the CGM learns)


def test_lits_uses_the_paper_split_and_carves_val_from_train(raw_dirs, outputs):
    cases = json.loads((outputs["lits"] / "cases.json").read_text())["cases"]
    numbers = {case_id: int(case_id) for case_id in cases}
    assert {c for c, s in cases.items() if s["split"] == "test"} == {c for c, n in numbers.items() if n <= 27} != set()
    train_or_val = [c for c in cases if numbers[c] > 27]
    assert sum(cases[c]["split"] == "val" for c in train_or_val) == 1  # round(4 * 0.15) = 1
    assert sum(cases[c]["split"] == "train" for c in train_or_val) == len(train_or_val) - 1


def test_msd_split_is_seeded_and_unlabelled_cases_are_listed_without_samples(raw_dirs, outputs):
    cases = json.loads((outputs["msd-spleen"] / "cases.json").read_text())["cases"]
    splits = [entry["split"] for entry in cases.values()]
    assert sorted(splits) == ["test", "train", "train", "unlabelled", "val"]  # 4 labelled: 1 test, 1 val, 2 train
    unlabelled = [entry for entry in cases.values() if entry["split"] == "unlabelled"]
    assert unlabelled[0]["label"] is None and unlabelled[0]["geometry"] is None and unlabelled[0]["slices"] == 0
    labelled = [case for case in discover_cases("msd-spleen", raw_dirs["msd-spleen"]) if case.label is not None]
    again = assign_splits("msd-spleen", labelled, config())
    assert again == {c: s["split"] for c, s in cases.items() if s["split"] != "unlabelled"}
    other_seeds = [assign_splits("msd-spleen", labelled, config(split_seed=seed)) for seed in range(1, 6)]
    assert any(split != again for split in other_seeds)


@pytest.mark.parametrize(
    "count,test_fraction,val_fraction,expected",
    [(10, 0.2, 0.15, (2, 1, 7)), (2, 0.2, 0.5, (1, 0, 1)), (1, 0.2, 0.15, (0, 0, 1)), (6, 0.0, 0.0, (0, 0, 6))],
)
def test_split_sizes_for_msd(count, test_fraction, val_fraction, expected):
    cases = [Case(f"spleen_{n}", Path(f"spleen_{n}.nii.gz"), Path("label")) for n in range(count)]
    fractions = config(test_fraction=test_fraction, val_fraction=val_fraction)
    splits = list(assign_splits("msd-spleen", cases, fractions).values())
    assert (splits.count("test"), splits.count("val"), splits.count("train")) == expected


def test_geometry_in_cases_json_maps_masks_back_onto_the_raw_label(raw_dirs, outputs):
    cases = json.loads((outputs["lits"] / "cases.json").read_text())["cases"]
    case_id, entry = next((c, e) for c, e in cases.items() if e["split"] == "train")
    geometry = VolumeGeometry.from_dict(entry["geometry"])
    samples = [outputs["lits"] / f"samples/{case_id}/{z:04d}.npz" for z in range(entry["slices"])]
    masks = np.stack([np.load(path)["mask"] for path in samples])
    label = nib.load(raw_dirs["lits"] / entry["label"])
    restored = restore_volume(masks, geometry, "linear") >= 0.5
    np.testing.assert_array_equal(geometry.affine, label.affine)
    assert reference_dice(restored, np.asanyarray(label.dataobj) > 0) >= 0.9


def test_parallel_workers_write_the_same_bytes(raw_dirs, outputs, tmp_path):
    preprocess_dataset("lits", raw_dirs["lits"], tmp_path, config(size=SIZE, workers=2))
    serial = outputs["lits"]
    assert (tmp_path / "manifest.csv").read_bytes() == (serial / "manifest.csv").read_bytes()
    for path in pd.read_csv(serial / "manifest.csv").path:
        with np.load(serial / path) as a, np.load(tmp_path / path) as b:
            assert all(np.array_equal(a[key], b[key]) for key in ("image", "mask", "organ_present"))


def test_rerun_is_a_no_op_changes_rebuild_and_foreign_files_stay(raw_dirs, tmp_path, caplog):
    raw, out = tmp_path / "raw", tmp_path / "out"
    shutil.copytree(raw_dirs["lits"], raw, copy_function=shutil.copy2)
    preprocess_dataset("lits", raw, out, config(size=SIZE))
    dropped, kept = discover_cases("lits", raw)[-1], discover_cases("lits", raw)[0]
    foreign = [out / "notes.txt", out / "samples" / "README", out / "samples" / dropped.case_id / "mine.npz"]
    for path in foreign:
        path.write_text("user data")
    before = snapshot(out)

    caplog.set_level("INFO")
    preprocess_dataset("lits", raw, out, config(size=SIZE, workers=2))  # workers do not change the output
    assert snapshot(out) == before
    assert "up to date, nothing to do" in caplog.text

    dropped.image.unlink()
    dropped.label.unlink()
    preprocess_dataset("lits", raw, out, config(size=24))
    manifest = pd.read_csv(out / "manifest.csv", dtype={"case_id": str})
    assert dropped.case_id not in set(manifest.case_id)
    assert np.load(out / manifest.path[0])["image"].shape == (3, 24, 24)
    written = {str(p.relative_to(out)) for p in (out / "samples").rglob("*.npz")}
    assert written == set(manifest.path) | {f"samples/{dropped.case_id}/mine.npz"}  # no stale sample, no user file lost
    assert all(path.read_text() == "user data" for path in foreign)

    rebuilt = snapshot(out)
    os.utime(kept.image, ns=(1, 1))  # a changed input is rebuilt too
    preprocess_dataset("lits", raw, out, config(size=24))
    assert snapshot(out)["manifest.csv"] != rebuilt["manifest.csv"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def put_nan(path: Path) -> None:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)


def put_label_7(path: Path) -> None:
    label = nib.load(path)
    data = np.asanyarray(label.dataobj).copy()
    data[1, 2, 3] = 7
    nib.save(nib.Nifti1Image(data, label.affine), path)


def truncate_last_slab(path: Path) -> None:
    """Cut the last slices off an uncompressed volume: it opens, and fails only when its end is read."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])


BAD_INPUTS = {  # problem: (layout, damaged file of the first labelled case, damage)
    "truncated_gz": ("msd-spleen", "image", truncate),
    "truncated_nii_end": ("lits", "image", truncate_last_slab),
    "nan_voxels": ("lits", "image", put_nan),
    "label_7": ("lits", "label", put_label_7),
}


@pytest.mark.parametrize("problem", [*BAD_INPUTS, "empty_folder"])
def test_bad_input_fails_naming_the_file_and_writes_nothing(problem, raw_dirs, outputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: CLI defaults
    raw = tmp_path / "raw"
    if problem == "empty_folder":
        layout, bad = "lits", raw
        raw.mkdir()
    else:
        layout, which, damage = BAD_INPUTS[problem]
        shutil.copytree(raw_dirs[layout], raw)
        bad = getattr(next(case for case in discover_cases(layout, raw) if case.label is not None), which)
        damage(bad)
    with pytest.raises(DataError, match=re.escape(bad.name)):
        preprocess_dataset(layout, raw, tmp_path / "new" / "out", config())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]  # no output, no folder, no staging left

    existing = tmp_path / "existing"  # earlier good output stays exactly as it was
    shutil.copytree(outputs[layout], existing, copy_function=shutil.copy2)
    before = snapshot(existing)
    assert main(["preprocess", "--layout", layout, "--raw", str(raw), "--out", str(existing), "--size", "32"]) == 2
    assert bad.name in capsys.readouterr().err
    assert snapshot(existing) == before
    assert not any(path.name.startswith(".staging-") for path in existing.iterdir())


def test_after_a_bad_case_the_rest_are_only_checked_and_every_problem_is_listed(raw_dirs, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dirs["lits"], raw)
    cases = discover_cases("lits", raw)
    put_label_7(cases[0].label)
    put_nan(cases[3].image)
    saved = []
    monkeypatch.setattr(preprocess, "save_sample", lambda *args: saved.append(args[0]))
    with pytest.raises(DataError) as error:
        preprocess_dataset("lits", raw, tmp_path / "out", config())  # one worker: runs in this process
    message = str(error.value)
    assert "2 problem(s)" in message and cases[0].label.name in message and cases[3].image.name in message
    assert saved == []  # the first case failed, so no later case was resampled or written
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_write_leaves_earlier_output_as_it_was(raw_dirs, outputs, tmp_path, monkeypatch, workers):
    existing = tmp_path / "existing"
    shutil.copytree(outputs["lits"], existing, copy_function=shutil.copy2)
    before = snapshot(existing)
    written = []

    def fail_on_the_fifth(path, *args):
        written.append(path)
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        save_sample(path, *args)

    monkeypatch.setattr(preprocess, "save_sample", fail_on_the_fifth)  # fork: the workers see it too
    with pytest.raises(OSError, match="No space left"):
        preprocess_dataset("lits", raw_dirs["lits"], existing, config(size=24, workers=workers))
    assert snapshot(existing) == before
    assert sorted(path.name for path in existing.iterdir()) == sorted(path.name for path in outputs["lits"].iterdir())


# Volumes on disk in every voxel order must give the samples of prepare_volume/prepare_label on the whole arrays:
# slabs read along the file's third axis (upwards or, flipped, downwards), or the whole volume when that axis is
# not axial. 20 slices: two full slabs of 8 and a partial one.
STORED_AFFINES = {**AFFINES, "feet_first": np.diag([-0.7, -0.7, -2.5, 1.0])}


@pytest.mark.parametrize("name", sorted(STORED_AFFINES))
@pytest.mark.parametrize("resize_mode,size", [("resize", 12), ("crop", 18), ("spacing", 14)])
def test_samples_equal_the_whole_volume_transforms_in_any_voxel_order(tmp_path, name, resize_mode, size):
    rng = np.random.default_rng(7)
    image = rng.integers(-1000, 1000, size=(16, 14, 20)).astype(np.int16)
    labels = rng.choice(np.array([0, 0, 1, 2], np.uint8), size=image.shape)
    affine = STORED_AFFINES[name]
    raw = tmp_path / "raw"
    raw.mkdir()
    nib.save(nib.Nifti1Image(image, affine), raw / "volume-5.nii")  # a test case: one train case would
    nib.save(nib.Nifti1Image(labels, affine), raw / "segmentation-5.nii")  # leave validation empty
    data_config = config(size=size, resize_mode=resize_mode)
    preprocess_dataset("lits", raw, tmp_path / "out", data_config)

    stacks, geometry = prepare_volume(image, affine, data_config)
    masks = prepare_label(labels, affine, data_config, "lits")
    assert geometry.axial_is_file_z == (name != "permuted_axes")
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == len(stacks) == geometry.canonical_shape[2]
    for row in manifest.itertuples():
        with np.load(tmp_path / "out" / row.path) as sample:
            np.testing.assert_array_equal(sample["image"], stacks[row.slice_index].astype(np.float16))
            np.testing.assert_array_equal(sample["mask"], masks[row.slice_index])
            assert sample["organ_present"] == masks[row.slice_index].max() == row.organ_present


def test_the_data_source_is_recorded_and_is_part_of_the_fingerprint(raw_dirs, outputs, tmp_path):
    for layout in LAYOUTS:  # written by `unet3plus synth`: its marker says so
        assert json.loads((outputs[layout] / "cases.json").read_text())["data_source"] == "synthetic"
    real = tmp_path / "real"
    shutil.copytree(raw_dirs["lits"], real)  # same files, same modification times
    (real / SYNTH_MARKER).unlink()
    assert data_source("lits", real) == "lits" and data_source("msd-spleen", raw_dirs["msd-spleen"]) == "synthetic"
    preprocess_dataset("lits", real, tmp_path / "out", config(size=SIZE))
    recorded = json.loads((tmp_path / "out" / "cases.json").read_text())
    assert recorded["data_source"] == "lits"
    assert recorded["fingerprint"] != json.loads((outputs["lits"] / "cases.json").read_text())["fingerprint"]
