"""DICOM outputs of osteonode: a binary SEG of the vertebral bodies and a TID 1500 SR.

* :func:`build_seg` -> Segmentation Storage (PS3.3 A.51), see :mod:`.seg`.
* :func:`build_sr` -> Comprehensive 3D SR Storage (PS3.3 A.35.13) holding a
  TID 1500 Measurement Report (PS3.16), see :mod:`.sr`.
* :func:`write` saves either as a PS3.10 file.

Every output UID comes from :func:`osteonode.uids.derived_uid`, so processing
the same series twice with the same version yields identical UIDs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom

from osteonode.dicom_out.seg import SEG_SERIES_DESCRIPTION, build_seg
from osteonode.dicom_out.sr import SR_SERIES_DESCRIPTION, build_sr

log = logging.getLogger(__name__)


def write(dataset: pydicom.Dataset, path: Path) -> Path:
    """Save ``dataset`` as a PS3.10 file (preamble, ``DICM``, File Meta Information).

    Parameters
    ----------
    dataset : pydicom.Dataset
        A complete SOP instance with ``file_meta`` (highdicom instances have it).
    path : pathlib.Path
        Destination file; its folder is created if missing.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If the dataset or its File Meta Information is incomplete (from
        :meth:`pydicom.Dataset.save_as` with ``enforce_file_format=True``).
    OSError
        If the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    log.debug("wrote %s (%s)", path.name, dataset.get("SOPClassUID", "?"))
    return path


#: Alias of :func:`write` (the name :mod:`osteonode.pipeline` uses).

__all__ = ["build_seg", "build_sr", "write", "SEG_SERIES_DESCRIPTION", "SR_SERIES_DESCRIPTION"]
