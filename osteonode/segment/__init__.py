"""Segmentation backends: vertebral levels, bodies, trabecular ROIs.

Every backend is a callable ``(Volume) -> SpineSegmentation``. The built-in
default (:mod:`osteonode.segment.spine`) needs no model weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from osteonode.volume import Volume


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
    """

    bodies: np.ndarray
    trabecular: np.ndarray
    confidence: dict[int, float] = field(default_factory=dict)
    method: str = ""
    not_evaluable_reason: str | None = None


Backend = Callable[[Volume], SpineSegmentation]
