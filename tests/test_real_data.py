"""Real data by a params switch: data/real/dvc.yaml, `dvc import-url` of a Task09-style tar, safe extraction."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from unet3plus.cli import main
from unet3plus.data.archive import extract_dataset
from unet3plus.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("kind", ["traversal", "link", "device"])
def test_unsafe_archives_are_refused_and_nothing_is_written(tmp_path, kind, capsys):
    member = tarfile.TarInfo({"traversal": "../evil.txt", "link": "Task09/l", "device": "Task09/tty"}[kind])
    if kind == "link":
        member.type, member.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    elif kind == "device":
        member.type = tarfile.CHRTYPE
    else:
        member.size = 4
    archive = _tar_with(tmp_path / "bad.tar", member, b"evil" if kind == "traversal" else b"")
    with pytest.raises(DataError, match="unsafe member refused"):
        extract_dataset(archive, tmp_path / "out" / "spleen")
    assert not (tmp_path / "out" / "spleen").exists() and not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no temporary folder left
    assert main(["extract", "--archive", str(archive), "--out", str(tmp_path / "out" / "spleen")]) == 2
    assert "unsafe member refused" in capsys.readouterr().err


def test_existing_output_is_never_overwritten(tmp_path):
    member = tarfile.TarInfo("Task09_Spleen/dataset.json")
    member.size = 2
    archive = _tar_with(tmp_path / "ok.tar", member, b"{}")
    out = tmp_path / "spleen"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not empty"):
        extract_dataset(archive, out)
    assert (out / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in extract_dataset(archive, tmp_path / "fresh").iterdir()) == ["dataset.json"]


def _bomb(path: Path, size: int) -> Path:
    """A gzip-compressed tar of ``size`` zero bytes: a few kB on disk."""
    member = tarfile.TarInfo("Task09_Spleen/imagesTr/zeros.nii")
    member.size = size
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(bytes(size)))
    return path


@pytest.mark.parametrize("kind", ["top link", "size limit", "free space"])
def test_links_bombs_and_full_disks_are_refused_before_anything_is_written(tmp_path, kind, monkeypatch, capsys):
    """The top entry a link to its own folder, an archive above --max-size, one above the free space:
    one line stating the link, the limit or the space, and nothing under --out's folder."""
    if kind == "top link":
        member = tarfile.TarInfo("Task09_Spleen")
        member.type, member.linkname = tarfile.SYMTYPE, "."
        archive, words, options = _tar_with(tmp_path / "link.tar", member), ["link", "'Task09_Spleen'"], []
    else:
        archive = _bomb(tmp_path / "bomb.tar.gz", 32 << 20)
        assert archive.stat().st_size < 1 << 20
        if kind == "size limit":
            words, options = ["10.0 MiB", "--max-size"], ["--max-size", "10M"]
        else:  # a disk with 1 MiB free, whatever this machine's disk holds
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
            words, options = ["32.0 MiB", "1.0 MiB free"], []
    (tmp_path / "out").mkdir()
    assert main(["extract", "--archive", str(archive), "--out", str(tmp_path / "out" / "spleen"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(word in err for word in [archive.name, *words]), err
    assert list((tmp_path / "out").iterdir()) == []


def test_extraction_is_published_with_the_umask(tmp_path):
    """The published folder has the user's umask permissions, not the archive's or a temporary folder's 0700."""
    (tmp_path / "src" / "Task09_Spleen").mkdir(parents=True)
    (tmp_path / "src" / "Task09_Spleen" / "dataset.json").write_text("{}")
    (tmp_path / "src" / "Task09_Spleen").chmod(0o700)
    with tarfile.open(tmp_path / "ok.tar", "w") as tar:
        tar.add(tmp_path / "src" / "Task09_Spleen", "Task09_Spleen")
    umask = os.umask(0o022)
    try:
        out = extract_dataset(tmp_path / "ok.tar", tmp_path / "spleen")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "dataset.json").read_text() == "{}"


@pytest.mark.slow
def test_switching_data_root_to_an_imported_task09_archive_preprocesses_it(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MPLBACKEND": "Agg"}

    def run(*cmd, cwd):
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    # A Task09-style archive (Task09_Spleen/dataset.json, imagesTr/, labelsTr/) made from the phantom.
    # 4 volumes: 3 labelled (one each for train, val and test; preprocessing refuses an empty
    # validation split) and 1 unlabelled in imagesTs.
    build = tmp_path / "build"
    run(f"{bin_dir}/unet3plus", "synth", "--layout", "msd-spleen", "--out", str(build / "Task09_Spleen"),
        "--cases", "4", "--size", "48", "--slices", "12", cwd=tmp_path)
    with tarfile.open(tmp_path / "Task09_Spleen.tar", "w") as tar:
        tar.add(build / "Task09_Spleen", arcname="Task09_Spleen")

    repo = tmp_path / "repo"
    (repo / "data" / "real").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "data" / "real" / "dvc.yaml", repo / "data" / "real" / "dvc.yaml")
    shutil.copytree(ROOT / "unet3plus", repo / "unet3plus", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "reports" / "ablations").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"root": "data/real", "size": 32, "workers": 1, "test_fraction": 0.34})
    params["ablations"]["run"] = []
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "--quiet", cwd=repo)
    run(f"{bin_dir}/dvc", "init", "--quiet", cwd=repo)
    run(f"{bin_dir}/dvc", "import-url", str(tmp_path / "Task09_Spleen.tar"), "data/real/Task09_Spleen.tar", cwd=repo)
    run(f"{bin_dir}/dvc", "repro", "preprocess@spleen", cwd=repo)

    manifest = pd.read_csv(repo / "data" / "processed" / "spleen" / "manifest.csv")
    labelled = json.loads((repo / "data" / "real" / "spleen" / "dataset.json").read_text())["training"]
    assert manifest["case_id"].nunique() == len(labelled) >= 3
    assert set(manifest.drop_duplicates("case_id")["split"]) == {"train", "val", "test"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert "data/real/spleen" in [dep["path"] for dep in lock["preprocess@spleen"]["deps"]]
    assert "synth@spleen" not in lock  # the phantom is not made when real data is selected
    real_lock = yaml.safe_load((repo / "data" / "real" / "dvc.lock").read_text())["stages"]
    assert "Task09_Spleen.tar" in [dep["path"] for dep in real_lock["spleen"]["deps"]]
