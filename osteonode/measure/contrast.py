"""Intravenous contrast: phase from the aortic blood attenuation, and its handling.

Contrast medium raises the attenuation of the vertebral trabecular bone, of
muscle and, most of all, of blood (Boutin RD et al., "Influence of IV contrast
administration on CT measures of muscle and bone attenuation: implications
for sarcopenia and osteoporosis evaluation", AJR Am J Roentgenol 2016). The
phase is named from the median HU of the aortic lumen (see
:mod:`osteonode.measure.tissues`); the bands are a heuristic from typical
aortic enhancement at 120 kVp, not a validated phase classifier:

======================  =================
aorta (HU)              phase
======================  =================
< 80                    ``non_contrast``
80 - 150                ``delayed``
150 - 250               ``portal_venous``
>= 250                  ``arterial``
not found               ``unknown``
======================  =================

Handling (recorded in :attr:`ContrastPhase.handling`):

* portal venous: the trabecular HU are converted to unenhanced equivalents
  before calibration, ``HU_unenhanced = 0.87 x HU_enhanced`` (L1 trabecular
  HU, parenchymal phase; Perez AA, Pickhardt PJ et al., "Fully automated CT
  imaging biomarkers of bone, muscle, and fat: correcting for the effect of
  intravenous contrast", Abdom Radiol 2021);
* arterial and delayed: no validated correction is known to us; the values
  are marked as affected (contrast-enhanced phases biased BMD by more than
  6 mg/mL even with internal calibration: Kaesmacher J et al., J Comput Assist
  Tomogr 2017;41:217-223);
* every enhanced phase: the calibration uses only air and fat, which do not
  enhance (blood and muscle do).
"""

from __future__ import annotations

import logging

from osteonode.config import ContrastPhaseName
from osteonode.measure.tissues import ReferenceTissues, measure_reference_tissues
from osteonode.result import ContrastPhase
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume

log = logging.getLogger(__name__)

NON_CONTRAST_MAX_HU = 80.0
DELAYED_MAX_HU = 150.0
PORTAL_VENOUS_MAX_HU = 250.0
#: Perez et al. 2021: unenhanced L1 trabecular HU = 0.87 x parenchymal-phase HU.
PORTAL_VENOUS_TO_UNENHANCED = 0.87

_PEREZ = ("Perez AA, Pickhardt PJ et al., Abdom Radiol 2021 (L1 trabecular HU, "
          "unenhanced = 0.87 x parenchymal phase)")
_KAESMACHER = "Kaesmacher J et al., J Comput Assist Tomogr 2017;41:217-223"


def classify_phase(aorta_hu: float | None) -> ContrastPhase:
    """Contrast phase and its handling from the aortic blood attenuation.

    Parameters
    ----------
    aorta_hu : float or None
        Median HU of the aortic lumen; ``None`` when the aorta was not found.

    Returns
    -------
    ContrastPhase
        Phase by the bands of the module docstring, with ``handling`` saying
        which correction is applied or that the results are affected.
    """
    if aorta_hu is None:
        return ContrastPhase(phase="unknown", aorta_hu=None,
                             handling="aorta not found: contrast enhancement unknown; trabecular HU and vBMD "
                                      "may be affected by contrast; calibration uses air and fat only")
    aorta_hu = round(float(aorta_hu), 1)
    if aorta_hu < NON_CONTRAST_MAX_HU:
        return ContrastPhase(phase="non_contrast", aorta_hu=aorta_hu, handling="no contrast correction needed")
    calibration = "calibration uses air and fat only (blood and muscle enhance)"
    phase: ContrastPhaseName
    if aorta_hu < DELAYED_MAX_HU:
        phase = "delayed"
    elif aorta_hu < PORTAL_VENOUS_MAX_HU:
        return ContrastPhase(
            phase="portal_venous", aorta_hu=aorta_hu,
            handling=(f"corrected: trabecular HU x {PORTAL_VENOUS_TO_UNENHANCED:g} before calibration "
                      f"({_PEREZ}); reported trabecular HU are as measured; {calibration}"))
    else:
        phase = "arterial"
    return ContrastPhase(
        phase=phase, aorta_hu=aorta_hu,
        handling=(f"affected: no validated correction for the {phase.replace('_', ' ')} phase; trabecular HU "
                  f"and vBMD are overestimated by an unknown amount ({_KAESMACHER}); {calibration}"))


def detect_contrast(volume: Volume, segmentation: SpineSegmentation,
                    tissues: ReferenceTissues | None = None) -> ContrastPhase:
    """Detect intravenous contrast from the aortic lumen beside the segmented spine.

    Parameters
    ----------
    volume : Volume
        CT volume, ``hu`` ``(z, y, x)`` in HU.
    segmentation : SpineSegmentation
        ``bodies`` ``(z, y, x)`` label map on the volume's grid (the aorta is
        searched in front of T12-L3).
    tissues : ReferenceTissues, optional
        Already measured reference tissues (measured here when omitted).

    Returns
    -------
    ContrastPhase
        See :func:`classify_phase`.

    Raises
    ------
    ValueError
        If the label map is not on the volume's grid.
    """
    tissues = tissues or measure_reference_tissues(volume, segmentation)
    phase = classify_phase(tissues.hu.get("blood"))
    log.info("contrast phase: %s (aorta %s HU)", phase.phase, phase.aorta_hu)
    return phase


def unenhanced_equivalent_hu(hu: float, contrast: ContrastPhase | None) -> float:
    """Trabecular HU converted to its unenhanced equivalent where a correction is known.

    Parameters
    ----------
    hu : float
        Trabecular attenuation, HU.
    contrast : ContrastPhase or None
        The detected phase; ``None`` means not assessed (no correction).

    Returns
    -------
    float
        ``0.87 * hu`` in the portal venous phase (Perez et al. 2021), else ``hu``.
    """
    if contrast is not None and contrast.phase == "portal_venous":
        return PORTAL_VENOUS_TO_UNENHANCED * hu
    return hu
