"""Which series to analyse.

A series is analysed when it is an axial-stack CT of the body with enough
slices to hold lumbar vertebrae. Anything else is "not evaluable" with the
reason, which the node reports in an SR (or skips, per configuration).
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom

from osteonode.errors import NotEvaluable

MIN_SLICES = 8
MAX_SLICE_THICKNESS_MM = 6.0


def check_series(headers: Sequence[pydicom.Dataset]) -> None:
    """Raise :class:`NotEvaluable` if the series is not one we can analyse.

    Parameters
    ----------
    headers : sequence of pydicom.Dataset
        The series' instances (pixel data not needed).

    Raises
    ------
    NotEvaluable
        Not CT, a localizer/scout, too few slices, or slices thicker than 6 mm.
    """
    first = headers[0]
    modality = str(first.get("Modality", ""))
    if modality != "CT":
        raise NotEvaluable(f"the series is not CT (modality {modality or 'missing'})")
    image_type = [str(v).upper() for v in first.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        raise NotEvaluable("the series is a localizer (scout), not a cross-sectional CT")
    n_slices = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
    if n_slices < MIN_SLICES:
        raise NotEvaluable(f"the series has {n_slices} slice(s); at least {MIN_SLICES} are needed")
    thickness = first.get("SliceThickness")
    if thickness not in (None, "") and float(thickness) > MAX_SLICE_THICKNESS_MM:
        raise NotEvaluable(f"slice thickness {float(thickness):g} mm exceeds {MAX_SLICE_THICKNESS_MM:g} mm")
