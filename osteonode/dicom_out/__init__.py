"""DICOM outputs of osteonode, each a new series in the source study.

============================  ==========================================  =================================
builder                       SOP class                                   Series Description (number)
============================  ==========================================  =================================
:func:`build_seg`             Segmentation Storage (PS3.3 A.51)           "osteonode SEG" (901)
:func:`build_sr`              Comprehensive 3D SR Storage (PS3.3          "osteonode Bone Health SR" (902)
                              A.35.13), TID 1500 Measurement Report
:func:`build_key_images`      Secondary Capture Image Storage (PS3.3      "osteonode Key Images" (903)
                              A.8.1): mid-sagittal and axial through L1
:func:`build_pdf_report`      Encapsulated PDF Storage (PS3.3 A.45.1)     "osteonode Report" (904)
============================  ==========================================  =================================

:func:`write` saves any of them as a PS3.10 file. Series numbers come from
``dicom_templates/algorithm.json``.

Identity and character set
    Patient and study attributes are copied from the source instance (same
    Study Instance UID, no placeholder values); the Specific Character Set is
    the source's when it can encode every text of the output, else UTF-8
    (:mod:`.common`).

UIDs, reprocessing and versions
    Every output UID (series, instance, segment tracking and SEG dimension organization UIDs) is
    :func:`osteonode.uids.derived_uid` of the exact set of input instances
    (:func:`osteonode.uids.input_key`: the source Series Instance UID and its
    sorted SOP Instance UIDs), a role (e.g. ``"seg-series"``,
    ``"key-image-axial"``, ``"pdf-instance"``) and ``osteonode.__version__``.
    Processing the same instances again with the same version therefore
    yields the same Series and SOP Instance UIDs: a PACS receiving them again
    keeps (or, by its own policy, replaces) the earlier instances instead of
    filing duplicates. Other input instances (a series completed after a
    fragment was reported, another series of the study analysed) or a new
    osteonode version yield new UIDs, so the new outputs form new series
    beside the earlier ones; the new SR names the SR it supersedes in its
    Predecessor Documents Sequence and says so, as does the PDF
    (:mod:`osteonode.lineage`). Software Versions (0018,1020) and the
    algorithm identification (SEG segments, SR TID 4019) name the version that
    made each series.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom

from osteonode.dicom_out.keyimage import KEY_IMAGES_SERIES_DESCRIPTION, build_key_images
from osteonode.dicom_out.pdf import PDF_SERIES_DESCRIPTION, build_pdf_report
from osteonode.dicom_out.seg import SEG_SERIES_DESCRIPTION, build_seg
from osteonode.dicom_out.sr import SR_SERIES_DESCRIPTION, build_sr

log = logging.getLogger(__name__)


def write(dataset: pydicom.Dataset, path: Path) -> Path:
    """Save ``dataset`` as a PS3.10 file (preamble, ``DICM``, File Meta Information).

    Parameters
    ----------
    dataset : pydicom.Dataset
        A complete SOP instance with ``file_meta`` (every builder here sets it).
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


__all__ = ["build_seg", "build_sr", "build_key_images", "build_pdf_report", "write", "SEG_SERIES_DESCRIPTION",
           "SR_SERIES_DESCRIPTION", "KEY_IMAGES_SERIES_DESCRIPTION", "PDF_SERIES_DESCRIPTION"]
