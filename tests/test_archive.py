"""unet3plus.data.archive: safe extraction of a dataset archive (`unet3plus extract`), published whole or not at all."""

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from unet3plus.cli import main
from unet3plus.data.archive import extract_dataset
from unet3plus.errors import DataError


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


def test_extract_publishes_an_archive_without_a_top_folder_with_the_umask(tmp_path):
    source = tmp_path / "source"
    (source / "imagesTr").mkdir(parents=True)
    (source / "dataset.json").write_text("{}")
    (source / "imagesTr" / "a.nii.gz").write_text("x")
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False)
    previous = os.umask(0o022)
    try:
        out = extract_dataset(archive, tmp_path / "raw")
    finally:
        os.umask(previous)
    assert {path.relative_to(out).as_posix(): path.read_text() for path in out.rglob("*") if path.is_file()} == {
        "dataset.json": "{}", "imagesTr/a.nii.gz": "x"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert sorted(path.name for path in tmp_path.iterdir()) == ["flat.tar", "raw", "source"]
