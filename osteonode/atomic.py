"""The one atomic-write helper: a file exists under its final name only once it is complete.

Every file the node writes for another process or a restart to read (spooled
instances, ``.jobs`` markers, ``result.json``, ``delivery-*.json``) goes
through :func:`write_atomic`: the bytes go to ``.tmp-<random>`` in the same
folder, are fsynced, and the temporary file is renamed onto the final name
(POSIX rename is atomic), then the folder is fsynced. A crash leaves at most
a ``.tmp-*`` file, which :func:`remove_orphans` deletes at start-up.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; the folder must exist.

    Raises
    ------
    OSError
        If the write fails (disk full, permissions); nothing is left under either name.
    """
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def move_atomic(src: Path, path: Path) -> Path:
    """Make the complete file ``src`` durable under ``path``: fsync it, rename it, fsync the folder.

    ``src`` must be on the file system of ``path`` (a ``.tmp-*`` file of the
    same tree, e.g. one streamed there by the network receive).

    Raises
    ------
    OSError
        If the fsync or the rename fails; ``src`` is then left for the caller.
    """
    _fsync(src)
    os.replace(src, path)
    _fsync(path.parent)
    return path


def _fsync(path: Path) -> None:
    """fsync a file or folder by path (read-only descriptor: enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_orphans(*roots: Path) -> int:
    """Delete the ``.tmp-*`` files left under ``roots`` by a crash; call only while nothing writes there.

    Returns
    -------
    int
        The number of files removed (logged once, without names: they hold UIDs).
    """
    removed = 0
    for root in roots:
        if not root.is_dir():
            continue
        for tmp in root.rglob(f"{TMP_PREFIX}*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.warning("removed %d incomplete file(s) left by an earlier crash (%s*)", removed, TMP_PREFIX)
    return removed
