"""Safe extraction of a downloaded dataset archive (the MSD ``Task09_Spleen.tar``) into a raw data folder.

Python's :mod:`tarfile` with the ``data`` extraction filter refuses absolute paths, ``..`` and links
pointing outside the destination, device files, and strips unsafe permission bits. The archive's
one top-level folder (``Task09_Spleen/``) is unwrapped, so the output is the dataset layout itself
(``dataset.json``, ``imagesTr/``, ``labelsTr/``). Extraction goes to a temporary folder beside the
output (:func:`unet3plus.utils.staged_dir`), swapped into place only when complete, with the
user's umask permissions.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import uuid
from pathlib import Path

from unet3plus.errors import DataError
from unet3plus.utils import staged_dir

logger = logging.getLogger(__name__)

MAX_BYTES = 8 << 30
"""Default limit on the extracted size (``--max-size``): Task09_Spleen unpacks to 1.6 GB."""


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _checked_members(tar: tarfile.TarFile, archive: Path, out_dir: Path, max_bytes: int) -> list[tarfile.TarInfo]:
    """The archive's members, read (not written) first: no link at the top, a total size under ``max_bytes``
    and under the free space where ``out_dir`` goes. A compression bomb is refused here, before any byte of it
    lands on disk.

    Raises:
        DataError: stating the limit or the space it needs and has.
    """
    members, total = [], 0
    for member in tar:
        name = os.path.normpath(member.name).lstrip("/")
        if "/" not in name and (member.issym() or member.islnk()):
            raise DataError(f"{archive}: its top-level entry {name!r} is a link (to {member.linkname!r}), not a "
                            "folder; refusing to publish it as the dataset")
        total += member.size if member.isfile() else 0
        if total > max_bytes:
            raise DataError(f"{archive}: unpacks to more than the size limit of {_size(max_bytes)} (--max-size); "
                            "if this is the dataset, raise --max-size")
        members.append(member)
    folder = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if total > free:
        raise DataError(f"{archive}: unpacks to {_size(total)} but {folder} has only {_size(free)} "
                        "free; free some space or choose another --out")
    return members


def extract_dataset(archive: str | os.PathLike, out_dir: str | os.PathLike, max_bytes: int = MAX_BYTES) -> Path:
    """Extract ``archive`` (tar, optionally compressed) into ``out_dir``, unwrapping its single top-level folder.

    Raises:
        DataError: the archive is missing, not a tar file, or has a member that would land outside
            ``out_dir`` (path traversal, absolute path, link outside, device file) or a link as its
            top-level entry; it unpacks to more than ``max_bytes`` or than the free space; ``out_dir``
            exists and is not empty (nothing is overwritten).
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found (download it first, e.g. `dvc import-url` as in the README)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: already exists and is not empty; move it away or choose another --out")
    with staged_dir(out_dir) as staging:
        scratch = staging / f".archive-{uuid.uuid4().hex}"
        scratch.mkdir()
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, members=_checked_members(tar, archive, out_dir, max_bytes), filter="data")
        except tarfile.FilterError as err:
            raise DataError(f"{archive}: unsafe member refused ({err}); the archive is not a plain dataset") from err
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{archive}: cannot extract ({err}); is it a complete tar file?") from err
        entries = [entry for entry in scratch.iterdir() if not entry.name.startswith("._")]
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else scratch
        for entry in list(root.iterdir()):  # the dataset's own files, moved up beside the scratch folder
            os.replace(entry, staging / entry.name)
        shutil.rmtree(scratch)  # what is left: the unwrapped folder and any AppleDouble "._" files beside it
    logger.info("extracted %s to %s", archive, out_dir)
    return out_dir
