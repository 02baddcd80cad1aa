"""The spool: received instances on disk, one folder per series.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
Each file is written with :func:`osteonode.atomic.write_atomic` (temporary
name, fsync, rename, folder fsync), so a file that exists under its final name
is complete and durable. Only then does the SCP answer success.
"""

from __future__ import annotations

import re
from pathlib import Path

from osteonode.atomic import TMP_PREFIX, write_atomic
from osteonode.dimse_status import DATA_SET_DOES_NOT_MATCH_SOP_CLASS
from osteonode.errors import InputRejected

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Process umask of the node: files it writes are 0640, folders 0750 (patient data are not world-readable).
UMASK = 0o027


def check_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string safe to use as a file name.

    Raises
    ------
    InputRejected
        With status 0xA900 if the UID is missing or malformed (PS3.5 9.1).
    """
    text = str(value or "").strip()
    if not text or len(text) > 64 or not _UID.match(text):
        raise InputRejected(f"{keyword} is missing or not a valid UID",
                            status=DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    return text


def series_dir(spool: Path, study_uid: str, series_uid: str) -> Path:
    """Folder of one series in the spool."""
    return spool / study_uid / series_uid


def write_instance(spool: Path, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
    """Durably write one encoded PS3.10 file into the spool.

    Parameters
    ----------
    spool : pathlib.Path
        Spool root.
    study_uid, series_uid, sop_uid : str
        UIDs already checked with :func:`check_uid`.
    data : bytes
        The complete file (preamble, file meta, data set).

    Returns
    -------
    pathlib.Path
        The final path.

    Raises
    ------
    OSError
        If the disk write fails; nothing is left under the final name.
    """
    folder = series_dir(spool, study_uid, series_uid)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / f"{sop_uid}.dcm", data)


def instance_files(folder: Path) -> list[Path]:
    """The complete instance files of one series folder, sorted by name."""
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith(TMP_PREFIX))
