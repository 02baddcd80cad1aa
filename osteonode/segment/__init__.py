"""Segmentation backends: vertebral levels, bodies, trabecular ROIs, proximal femurs.

Every backend is a callable ``(Volume) -> SpineSegmentation``. The built-in
default (:mod:`osteonode.segment.spine` for the spine,
:mod:`osteonode.segment.femur` for the proximal femurs) needs no model weights;
:mod:`osteonode.segment.imported` reads a TotalSegmentator label map instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from osteonode.config import usable_cores
from osteonode.volume import Volume

Side = Literal["right", "left"]

#: Vertebral bodies the built-in segmentation works on at once, in threads (the scipy.ndimage filters and
#: numpy release the GIL). At most two: the node's target machine has two cores (issue 10), and
#: ``analysis_concurrency`` runs one analysis per core under load, so more would only take turns.
SEGMENTATION_THREADS = min(2, usable_cores())


@dataclass(frozen=True)
class FemurSide:
    """Outcome of the proximal femur segmentation on one side.

    Attributes
    ----------
    status : {"segmented", "excluded", "not_in_view"}
        As :attr:`osteonode.result.ProximalFemurResult.status`.
    reason : str or None
        Why the side is excluded or not in view (for the SR); None when segmented.
    head_centre_mm : tuple of float or None
        Femoral head (hip joint) centre in LPS mm, when one was found.
    head_radius_mm : float or None
        Radius of the hip joint space around that centre, mm.
    """

    status: Literal["segmented", "excluded", "not_in_view"]
    reason: str | None = None
    head_centre_mm: tuple[float, float, float] | None = None
    head_radius_mm: float | None = None


@dataclass
class FemurSegmentation:
    """Proximal femurs on the grid of the input volume.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(z, y, x)`` uint8 label map: 90 = right proximal femur, 91 = left, 0 = background.
    sides : dict
        ``"right"`` and ``"left"`` -> :class:`FemurSide`.
    """

    labels: np.ndarray
    sides: dict[Side, FemurSide] = field(default_factory=dict)


@dataclass
class SpineSegmentation:
    """Output of a segmentation backend, on the grid of the input volume.

    Attributes
    ----------
    bodies : numpy.ndarray
        ``(z, y, x)`` uint8 label map of the vertebral bodies, VerSe IDs
        (19 = T12 ... 24 = L5, 26 = sacrum), 0 = background.
    trabecular : numpy.ndarray
        ``(z, y, x)`` uint8 label map of the trabecular ROIs, same IDs, each ROI
        inside its body and clear of cortex and endplates.
    confidence : dict[int, float]
        VerSe ID -> label confidence in ``[0, 1]`` for every labelled level.
    method : str
        How the levels were identified, in words for the SR (e.g. "sacrum
        anchor and disc counting").
    not_evaluable_reason : str or None
        Why no level could be identified, when that is the case.
    whole : numpy.ndarray or None
        ``(z, y, x)`` uint8 label map of the whole vertebrae (body and posterior
        elements), same IDs; None when the backend does not provide it.
    femurs : FemurSegmentation or None
        Proximal femurs, when the backend segments them (the imported label map
        does); None otherwise (the pipeline then runs
        :func:`osteonode.segment.femur.segment_proximal_femurs`).
    cut_by_field_of_view : set of int
        VerSe IDs of the labelled vertebrae whose body is cut by the edge of
        the scan (heights not reported for them).
    """

    bodies: np.ndarray
    trabecular: np.ndarray
    confidence: dict[int, float] = field(default_factory=dict)
    method: str = ""
    not_evaluable_reason: str | None = None
    whole: np.ndarray | None = None
    femurs: FemurSegmentation | None = None
    cut_by_field_of_view: set[int] = field(default_factory=set)

    def label_map(self) -> np.ndarray:
        """``(z, y, x)`` uint8: vertebral bodies (VerSe IDs) and proximal femurs (90 right, 91 left).

        This is what ``labels.nii.gz`` and the SEG hold.
        """
        labels = np.asarray(self.bodies, dtype=np.uint8).copy()
        if self.femurs is not None:
            femur = self.femurs.labels > 0
            labels[femur] = self.femurs.labels[femur]
        return labels


Backend = Callable[[Volume], SpineSegmentation]
