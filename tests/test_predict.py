"""`unet3plus predict` over a folder: one mask per scan, volumes.csv, bad scans skipped and reported."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from unet3plus.checkpoint import save_checkpoint
from unet3plus.cli import main
from unet3plus.config import config_from_dict
from unet3plus.models import create_model


@pytest.fixture
def checkpoint(tmp_path):
    config = config_from_dict({"data": {"size": 32}, "model": {"width": 4, "cgm": False}})
    torch.manual_seed(0)
    model = create_model(**dataclasses.asdict(config.model))
    payload = {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 1}
    return save_checkpoint(tmp_path / "best.pt", payload)


def write_scan(path, shape, spacing, seed):
    hu = np.where(np.random.default_rng(seed).random(shape) < 0.5, 60, -1000).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([*spacing, 1.0])), path)
    return path


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_scan(folder / "a.nii.gz", (24, 20, 5), (0.8, 0.8, 2.5), 0)
    write_scan(folder / "b.nii", (16, 28, 4), (1.0, 0.5, 3.0), 1)
    (folder / "broken.nii.gz").write_bytes((folder / "a.nii.gz").read_bytes()[:60])
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 3, 2), np.int16), np.eye(4)), folder / "series.nii")
    (folder / "notes.txt").write_text("not a scan: ignored")
    return folder


def options():
    return ["--set", "evaluate.device=cpu", "--set", "evaluate.batch_size=2"]


def test_a_folder_is_segmented_scan_by_scan_and_bad_scans_do_not_stop_the_others(checkpoint, scans, tmp_path, capsys):
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(checkpoint), "--input", str(scans), "--output", str(out), *options()]) == 2
    error = capsys.readouterr().err
    assert "2 scan(s) failed" in error and "broken.nii.gz" in error and "series.nii" in error and "4-D" in error
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.nii.gz", "b.nii.gz", "volumes.csv"]
    volumes = pd.read_csv(out / "volumes.csv")
    assert list(volumes.columns) == ["scan", "organ_voxels", "organ_volume_ml"]
    assert list(volumes["scan"]) == ["a.nii.gz", "b.nii"]
    for row in volumes.itertuples():
        single = tmp_path / f"single_{row.scan}.nii.gz"
        assert main(["predict", "--model", str(checkpoint), "--input", str(scans / row.scan), "--output", str(single),
                     *options()]) == 0  # fmt: skip
        mask = nib.load(out / (row.scan.removesuffix(".gz").removesuffix(".nii") + ".nii.gz"))
        voxels = np.asanyarray(mask.dataobj)
        np.testing.assert_array_equal(voxels, np.asanyarray(nib.load(single).dataobj))
        np.testing.assert_array_equal(mask.affine, nib.load(scans / row.scan).affine)
        assert row.organ_voxels == voxels.sum() > 0
        assert row.organ_volume_ml == pytest.approx(voxels.sum() * np.prod(mask.header.get_zooms()) / 1000)


def test_a_rerun_replaces_its_own_masks_but_never_a_file_the_user_put_there(checkpoint, scans, tmp_path, capsys):
    for bad in ("broken.nii.gz", "series.nii"):
        (scans / bad).unlink()
    out = tmp_path / "masks"
    argv = ["predict", "--model", str(checkpoint), "--input", str(scans), "--output", str(out), *options()]
    assert main(argv) == 0 and main(argv) == 0
    (out / "b.nii.gz").write_bytes(b"the user's own file")
    assert main(argv) == 2
    assert "b.nii.gz: not written by unet3plus" in capsys.readouterr().err
    assert (out / "b.nii.gz").read_bytes() == b"the user's own file"


def test_an_empty_folder_or_a_file_as_output_is_a_one_line_error(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--model", str(checkpoint), "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no .nii or .nii.gz scan" in capsys.readouterr().err
    write_scan(empty / "a.nii", (8, 8, 2), (1, 1, 1), 0)
    (tmp_path / "file").write_text("x")
    assert main(["predict", "--model", str(checkpoint), "--input", str(empty), "--output", str(tmp_path / "file")]) == 2
    assert "--output must be a folder" in capsys.readouterr().err
