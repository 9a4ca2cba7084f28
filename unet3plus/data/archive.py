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


def extract_dataset(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Extract ``archive`` (tar, optionally compressed) into ``out_dir``, unwrapping its single top-level folder.

    Raises:
        DataError: the archive is missing, not a tar file, or has a member that would land outside
            ``out_dir`` (path traversal, absolute path, link outside, device file); ``out_dir``
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
                tar.extractall(scratch, filter="data")
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
