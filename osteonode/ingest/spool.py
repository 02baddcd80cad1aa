"""The spool: received instances on disk, one folder per series.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A received data set is streamed by the SCP to a ``.tmp-*`` file in
``<spool>/.incoming`` (a dot folder: never taken for a study), checked, and
moved into place with :func:`osteonode.atomic.move_atomic` (fsync, rename,
folder fsync); other writers use :func:`osteonode.atomic.write_atomic`. So a
file that exists under its final name is complete and durable. Only then does
the SCP answer success.
"""

from __future__ import annotations

import re
from pathlib import Path

from osteonode.atomic import TMP_PREFIX, move_atomic, write_atomic
from osteonode.dimse_status import DATA_SET_DOES_NOT_MATCH_SOP_CLASS
from osteonode.errors import InputRejected

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Process umask of the node: files it writes are 0640, folders 0750 (patient data are not world-readable).
UMASK = 0o027
#: Folder of the spool where the SCP streams data sets as they arrive, before they are checked.
INCOMING_DIR = ".incoming"


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


def move_instance(spool: Path, study_uid: str, series_uid: str, sop_uid: str, received: Path) -> Path:
    """Durably move a received PS3.10 file (in the spool's :data:`INCOMING_DIR`) to its place.

    Same parameters, return value and errors as :func:`write_instance`, with
    ``received`` the complete file instead of its bytes.
    """
    received.chmod(0o666 & ~UMASK)  # a temporary file is created 0600
    folder = series_dir(spool, study_uid, series_uid)
    folder.mkdir(parents=True, exist_ok=True)
    return move_atomic(received, folder / f"{sop_uid}.dcm")


def instance_files(folder: Path) -> list[Path]:
    """The complete instance files of one series folder, sorted by name."""
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith(TMP_PREFIX))
