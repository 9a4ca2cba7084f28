"""Small helpers used everywhere: atomic writes, output records, logging setup (no PyTorch: see device.py)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file lives in the same directory (same filesystem), so the final
    ``os.replace`` is atomic: readers see either the old file or the complete new one, never a
    half-written file. On any exception the temporary file is removed and ``path`` is untouched.

    The temporary name keeps the final suffix (``x.npz`` -> ``.x.npz.<random>.tmp.npz``) so that
    libraries which choose a format from the suffix (numpy, nibabel, matplotlib) behave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, not a created file (mkstemp would make it 0600): the writer creates it with
    # the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder next to ``path``; on success swap it in as ``path`` (the folder twin of
    :func:`atomic_path`).

    Build the whole folder inside the staging one. When the ``with`` body ends without an
    exception, a previous ``path`` is first renamed aside (``.<name>.<random>.old``), the staged
    folder is renamed onto ``path`` and only then is the old one deleted; renames on one
    filesystem are atomic. On Linux the two renames are one atomic exchange
    (``renameat2(RENAME_EXCHANGE)``), so even a process killed at any moment (``kill -9``, power
    loss) leaves ``path`` as the old folder or the new one, whole. Elsewhere a failed swap puts the
    old folder back, and only a process killed between the two renames leaves ``path`` missing,
    with both folders whole under their hidden names. On any exception in the body the staging
    folder is removed and ``path`` is untouched.

    The staging folder is made with ``mkdir``, and the published folder is given the user's
    umask permissions (``0o777 & ~umask``) even when the body replaced it (``shutil.copytree`` copies
    its source's mode; ``tempfile.mkdtemp`` would make it 0700, readable by its owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        yield staging
        staging.chmod(0o777 & ~umask())
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``; a previous ``path`` is deleted only once ``new`` is in its place."""
    if not (path.exists() or path.is_symlink()):
        os.replace(new, path)
        return
    if _exchange(new, path):  # one atomic step: `new` now holds the old folder
        _remove(new)
        return
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the system or the filesystem cannot (nothing was changed then).
    """
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove(path: Path) -> None:
    """Delete a replaced folder (or file); what cannot be deleted stays, hidden, with a warning."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as err:
        logger.warning("could not delete the replaced %s (%s); it is safe to delete", path, err)


def umask() -> int:
    """The process's file mode creation mask (read without changing it for longer than two calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


USERINFO = re.compile(r"(?<=://)[^\s/?#]*@")
"""The ``user:password@`` of a URI (its authority up to the last ``@``, as ``urllib`` parses it)."""


def redact(text: str) -> str:
    """``text`` with the userinfo of every URI in it replaced by ``***`` (``http://***@host:5000``).

    The one place credentials are scrubbed: every URI or error text the project prints, logs or
    records (MLflow tags) goes through it.
    """
    return USERINFO.sub("***@", text)


class RedactingFormatter(logging.Formatter):
    """A log formatter that passes every formatted record (tracebacks included) through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


LOCK_NAME = ".unet3plus.lock"
"""Lock file of :func:`folder_lock`, inside the locked folder while a writer holds it."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block; refuse a second holder.

    The lock is an ``flock`` on :data:`LOCK_NAME` inside the folder, so the kernel releases it
    when the holder dies, however it dies; the file names the holder (pid, host, start time) for
    the refusal message and is removed at the end. A folder the lock had to create is removed again
    when it is still empty at the end (a refused command leaves nothing behind).

    Args:
        folder: the output folder.
        what: the holder's activity, for the message (e.g. "a training").

    Raises:
        UserError: another process holds the lock, naming it.
    """
    from unet3plus.errors import UserError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: --out is a file, not a folder; choose another --out")
    created = not folder.exists()
    lock = folder / LOCK_NAME
    try:
        while True:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"{folder}: cannot write there ({err.strerror})") from err
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock.read_text(errors="replace").strip() if lock.exists() else ""
                os.close(descriptor)
                raise UserError(f"{folder}: {what} is already writing here ({holder or 'another process'}); wait "
                                "for it to end, or choose another --out") from None
            # The holder before us may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else sees, and must take the new one.
            if lock.exists() and os.path.samestat(os.fstat(descriptor), os.stat(lock)):
                break
            os.close(descriptor)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{what}: pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            os.close(descriptor)
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def setup_logging(verbosity: int = 0) -> None:
    """Configure root logging once for command-line use (``-v`` for debug); URIs are logged redacted."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("urllib3", "git", "alembic", "matplotlib", "PIL", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


OUTPUTS_RECORD = ".unet3plus-outputs.json"
"""File beside a verb's outputs listing what it wrote (relative path -> sha256); see :func:`record_outputs`."""


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file: same real path, or same inode (hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_outputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Refuse to run when an output cannot be written, or would be written over or inside an input.

    Spellings are resolved (relative paths, ``..``, symbolic links) and hard links are detected by
    inode, so every name of an input counts. The nearest existing folder above each output must
    be a writable folder. Call before anything is computed or written.

    Args:
        outputs: ``{"--option": path}`` of what the verb writes (None values are skipped).
        inputs: ``{"--option": path}`` of what it reads; a folder input also protects everything
            inside it.

    Raises:
        UserError: naming both options and paths.
    """
    from unet3plus.errors import UserError

    for out_name, out_path in outputs.items():
        if out_path is None:
            continue
        ancestor = Path(os.path.abspath(out_path)).parent
        while not ancestor.exists() and not ancestor.is_symlink():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"{out_path}: cannot write {out_name} there: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"{out_path}: cannot write {out_name} there: no write permission on {ancestor}")
        for in_name, in_path in inputs.items():
            if in_path is None:
                continue
            out_path, in_path = Path(out_path), Path(in_path)
            if _same_file(out_path, in_path) or (in_path.is_dir() and _inside(out_path, in_path)):
                raise UserError(
                    f"{out_path}: {out_name} would overwrite the input {in_name} {in_path}; choose another {out_name}"
                )


def _recorded(folder: Path) -> dict[str, str]:
    try:
        record = json.loads((folder / OUTPUTS_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_outputs(folder: str | os.PathLike, paths: list[str | os.PathLike]) -> None:
    """Add ``paths`` (files, or folders whose files are all added) with their hashes to ``folder``'s record.

    The record (:data:`OUTPUTS_RECORD`) is what :func:`check_replaceable` trusts: a file may be
    replaced or deleted later only if it is listed there with the same content.
    """
    folder = Path(folder)
    # Several commands may record into one folder at once (validate and register both write into
    # reports/<organ>/): the read-modify-write of the record holds a lock on the folder itself.
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        record = _recorded(folder)
        for path in map(Path, paths):
            files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
            for file in files:
                if file.is_file() and file.name != OUTPUTS_RECORD:
                    record[file.relative_to(folder).as_posix()] = file_digest(file)
        write_json_atomic(folder / OUTPUTS_RECORD, record)
    finally:
        os.close(descriptor)


def check_replaceable(folder: str | os.PathLike, paths: list[str | os.PathLike], how: str) -> None:
    """Refuse when replacing ``paths`` (files or whole folders) would lose a file this project did not write.

    Every existing file among ``paths`` (recursively for folders) must be listed in ``folder``'s
    :data:`OUTPUTS_RECORD` with its current hash: a file the user put there, or one of ours that
    the user edited since, stops the verb before anything is written.

    Args:
        folder: the output folder holding the record.
        paths: the files and folders the verb is about to replace.
        how: what the user can do instead (e.g. "use --force or another --out").

    Raises:
        DataError: naming the first foreign file.
    """
    from unet3plus.errors import DataError

    folder = Path(folder)
    record = _recorded(folder)
    for path in map(Path, paths):
        if path.is_symlink() or (path.exists() and not path.is_dir() and not path.is_file()):
            raise DataError(f"{path}: exists and is not a regular file written by unet3plus; refusing to overwrite it ({how})")
        files = sorted(p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()) if path.is_dir() else [path]
        for file in files:
            if (not file.exists() and not file.is_symlink()) or file == folder / OUTPUTS_RECORD:
                continue
            key = file.relative_to(folder).as_posix()
            if file.is_symlink() or not file.is_file() or record.get(key) != file_digest(file):
                raise DataError(
                    f"{file}: not written by unet3plus (or changed since); refusing to overwrite or delete it ({how})"
                )


def check_files_replaceable(option: str, files: list[str | os.PathLike | None], force: bool = False,
                            folders: list[str | os.PathLike] = ()) -> None:
    """Refuse, before anything is computed, to replace a file the user made with a verb's output file.

    The one check of every output *file* (``predict --output``, ``report --out`` and the files
    beside it, ``python -m pipeline compile --output``...): an existing file may be replaced only
    when the :data:`OUTPUTS_RECORD` of its folder lists it unchanged (it is ours), or with
    ``force``. Pair with :func:`record_outputs` after writing.

    Args:
        option: the command-line option that names the output, for the message.
        files: the files the verb will write; None is skipped.
        force: replace foreign files anyway (``--force``).
        folders: folders of output files (``report``'s plots), replaced only when every file in
            them is ours.

    Raises:
        UserError: a folder where a file is expected or the reverse, or a foreign file (without ``force``).
    """
    from unet3plus.errors import UserError

    files = [Path(p) for p in files if p is not None]
    for path in files:
        if path.is_dir():
            raise UserError(f"{path}: {option} names a folder; give a file name")
    for path in map(Path, folders):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: {option} writes a folder here, but it is a file")
    if not force:
        for path in [*files, *map(Path, folders)]:
            check_replaceable(path.parent, [path], f"use another {option}, or --force to replace it")
