"""The one atomic-write helper: a file exists under its final name only once it is complete.

Every file the node writes for another process or a restart to read (spooled
instances, ``.jobs`` markers, ``result.json``, ``delivery-*.json``) goes
through :func:`write_atomic`: the bytes go to ``.tmp-<random>`` in the same
folder, are fsynced, and the temporary file is renamed onto the final name
(POSIX rename is atomic), then the folder is fsynced.

A set of files that belong together (a batch of analysis outputs: the SR with
its ``result.json``, or the key images with the PDF) is written with
:func:`staged`: into a staging folder ``.tmp-<random>`` beside the target
folder (same file system), which then takes the target's place in one
``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; ext4, xfs, btrfs, tmpfs,
overlayfs): a reader sees the whole batch or none of it, never a part.

A crash leaves at most ``.tmp-*`` files or folders, which :func:`remove_orphans`
deletes at start-up.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def staged(folder: Path, *, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Write a batch of files into the yielded staging folder; on a clean exit they appear in ``folder`` at once.

    The staging folder ``.tmp-<random>`` is made beside ``folder`` (created if
    missing). On exit its files are fsynced and joined by hard links to the
    files of ``folder`` that the batch neither holds nor ``replaces``, and the
    staging folder takes the place of ``folder`` in one atomic exchange; the
    old version is then deleted. Open files and ``flock`` locks of ``folder``
    stay valid (hard links keep the inode). An exception in the ``with`` block
    (or a crash) leaves ``folder`` as it was: the staging folder is removed
    (or, after a crash, by :func:`remove_orphans`).

    Where an exchange cannot be made (a file system without ``RENAME_EXCHANGE``,
    ``folder`` holding subfolders, or being the working directory) the files
    are renamed into ``folder`` one by one instead: each is still complete
    under its final name, only the batch is not atomic.

    Parameters
    ----------
    folder : pathlib.Path
        The folder the batch is for (e.g. an outbox entry).
    replaces : iterable of str
        Names of files in ``folder`` that the batch supersedes: absent after
        the exchange unless the batch holds them again.

    Yields
    ------
    pathlib.Path
        The staging folder to write the batch into (plain writes suffice).

    Raises
    ------
    OSError
        If the staging folder cannot be made or the batch cannot be put in place;
        ``folder`` is then unchanged.
    """
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    stage = folder.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    stage.mkdir()
    try:
        yield stage
        _put_in_place(stage, folder, frozenset(replaces))
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the old version after an exchange, else the unused batch


def _put_in_place(stage: Path, folder: Path, replaces: frozenset[str]) -> None:
    """Make the files of ``stage`` the batch of ``folder`` (see :func:`staged`)."""
    batch = sorted(stage.iterdir())
    for path in batch:
        _fsync(path)
    kept = [p for p in folder.iterdir() if p.name not in replaces and not p.name.startswith(TMP_PREFIX)
            and not (stage / p.name).exists()]
    if not any(p.is_dir() and not p.is_symlink() for p in kept) and not Path.cwd().is_relative_to(folder):
        for path in kept:
            os.link(path, stage / path.name, follow_symlinks=False)
        _fsync(stage)
        try:
            _exchange(stage, folder)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
                raise
            log.debug("no atomic folder exchange here (%s); renaming the files one by one", exc.strerror)
        else:
            _fsync(folder.parent)
            return
    for name in replaces:
        if not (stage / name).exists():
            (folder / name).unlink(missing_ok=True)
    for path in batch:
        os.replace(path, folder / path.name)
    _fsync(folder)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> None:
    """Swap the two paths ``a`` and ``b`` atomically (Linux ``renameat2(..., RENAME_EXCHANGE)``).

    Raises
    ------
    OSError
        ENOSYS when the C library or kernel lacks ``renameat2``, EINVAL when the file system
        cannot exchange, or another error of the call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 not in the C library")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path) -> None:
    """fsync a file or folder by path (read-only descriptor: enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_orphans(*roots: Path) -> int:
    """Delete the ``.tmp-*`` files and staging folders left under ``roots`` by a crash; call only while nothing
    writes there.

    Returns
    -------
    int
        The number of files and folders removed (logged once, without names: they hold UIDs).
    """
    removed = 0
    for root in roots:
        if not root.is_dir():
            continue
        for tmp in sorted(root.rglob(f"{TMP_PREFIX}*")):  # a folder before what it holds
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists() or tmp.is_symlink():
                tmp.unlink(missing_ok=True)
            else:
                continue  # inside a staging folder removed just before
            removed += 1
    if removed:
        log.warning("removed %d incomplete file(s) or staging folder(s) left by an earlier crash (%s*)",
                    removed, TMP_PREFIX)
    return removed
