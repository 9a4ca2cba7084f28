"""unet3plus.utils: staged_dir, the folder twin of atomic_path (crash safety at every step, permissions)."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unet3plus import utils
from unet3plus.utils import staged_dir

ROOT = Path(__file__).resolve().parents[1]
OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "sub/b.txt": "new b", "c.txt": "new c"}


def _write(folder: Path, files: dict) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _content(folder: Path) -> dict | None:
    if not folder.is_dir():
        return None
    return {path.relative_to(folder).as_posix(): path.read_text() for path in folder.rglob("*") if path.is_file()}


class Crash(Exception):
    pass


def _steps(monkeypatch, crash_at: int) -> list:
    """Make the ``crash_at``-th filesystem step of the swap raise (0: none); returns the steps seen."""
    seen = []

    def wrap(name, function):
        def step(*args, **kwargs):
            seen.append(name)
            if len(seen) == crash_at:
                raise Crash(name)
            return function(*args, **kwargs)
        return step

    monkeypatch.setattr(utils, "_exchange", wrap("exchange", utils._exchange))
    monkeypatch.setattr(utils.os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(utils.shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    return seen


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
@pytest.mark.parametrize("existing", [True, False], ids=["replaces", "creates"])
def test_an_exception_at_any_step_leaves_the_old_or_the_new_folder_whole(tmp_path, monkeypatch, exchange, existing):
    if not exchange:
        monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    target = tmp_path / "out"

    def run(crash_at: int) -> list:
        shutil.rmtree(target, ignore_errors=True)
        for leftover in tmp_path.glob(".out.*"):
            shutil.rmtree(leftover)
        if existing:
            _write(target, OLD)
        with monkeypatch.context() as patch:
            seen = _steps(patch, crash_at)
            try:
                with staged_dir(target) as staging:
                    _write(staging, NEW)
            except Crash:
                pass
        return seen

    steps = run(0)
    assert _content(target) == NEW and not list(tmp_path.glob(".out.*"))
    assert steps, "the swap took no step that could fail"
    for crash_at in range(1, len(steps) + 1):
        run(crash_at)
        assert _content(target) in (OLD if existing else None, NEW), (crash_at, steps)
        if _content(target) != NEW:  # the swap did not happen: nothing of it is left behind
            assert not list(tmp_path.glob(".out.*")), (crash_at, steps)


def test_an_exception_in_the_body_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "out"
    _write(target, OLD)
    with pytest.raises(Crash):
        with staged_dir(target) as staging:
            _write(staging, {"a.txt": "half"})
            raise Crash("while building")
    assert _content(target) == OLD
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


KILLED = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from unet3plus import utils
    target, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    count = 0
    def step(function):
        def run(*args, **kwargs):
            global count
            count += 1
            if count == kill_at:
                os._exit(9)  # as kill -9: no cleanup, no finally
            return function(*args, **kwargs)
        return run
    utils._exchange = step(utils._exchange)
    utils.os.replace = step(os.replace)
    utils.shutil.rmtree = step(utils.shutil.rmtree)
    with utils.staged_dir(target) as staging:
        for name, text in {new!r}.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        if kill_at == 0:
            os._exit(9)  # killed while building
""").replace("{new!r}", repr(NEW))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic exchange is Linux's renameat2")
def test_a_process_killed_at_any_step_leaves_the_old_or_the_new_folder_whole(tmp_path):
    target = tmp_path / "out"
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    if not utils._exchange(a, b):
        pytest.skip("this filesystem cannot exchange two names atomically")
    outcomes = []
    for kill_at in range(0, 6):
        shutil.rmtree(target, ignore_errors=True)
        _write(target, OLD)
        result = subprocess.run([sys.executable, "-c", KILLED, str(target), str(kill_at)], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode in (0, 9), result.stderr
        content = _content(target)
        assert content in (OLD, NEW), (kill_at, content)
        outcomes.append("new" if content == NEW else "old")
    assert outcomes[0] == "old" and outcomes[-1] == "new"  # killed while building; never killed


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_published_folders_get_the_umask_permissions_whatever_the_body_did(tmp_path, mask):
    previous = os.umask(mask)
    try:
        with staged_dir(tmp_path / "made") as staging:
            (staging / "file").write_text("x")
        with staged_dir(tmp_path / "copied") as staging:
            staging.chmod(0o700)  # as copytree does with a 0700 source, or mkdtemp would
    finally:
        os.umask(previous)
    for name in ("made", "copied"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o777 & ~mask, name


def test_folder_lock_names_its_holder_and_the_kernel_releases_it_when_the_holder_is_killed(tmp_path):
    """A second holder is refused naming the first's pid; after ``kill -9`` of the first the lock is free again,
    and a released lock leaves no file behind."""
    from unet3plus.errors import UserError

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from unet3plus.utils import folder_lock\n"
         f"with folder_lock({str(out)!r}, 'a training'):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"a training is already writing here \(a training: pid {holder.pid} on "):
            with utils.folder_lock(out / ".." / "run", "a training"):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with utils.folder_lock(out, "a training"):
        assert (out / utils.LOCK_NAME).is_file()
    assert not (out / utils.LOCK_NAME).exists() and out.is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        with utils.folder_lock(tmp_path / "afile", "a training"):
            pass
    with pytest.raises(UserError, match="refused"), utils.folder_lock(tmp_path / "new" / "run", "a training"):
        raise UserError("refused")  # a refused training leaves no folder it created
    assert not (tmp_path / "new" / "run").exists()
