"""Phantomless (internal) calibration: trabecular HU -> vBMD, mg/cm³ calcium hydroxyapatite.

Method
------
Internal calibration replaces the phantom under the patient by body tissues
of known attenuation: air and either aortic blood or (hip) adipose tissue in
Lee DC, Hoffmann PF, Kopperdahl DL, Keaveny TM, "Phantomless calibration of
CT scans for measurement of BMD and bone strength - inter-operator reanalysis
precision", Bone 2017;103:325-333; air, muscle, blood and subcutaneous fat in
the approaches reviewed in Curr Osteoporos Rep 2023 (PMC9925590, Table 2). Its
precision and its bias under contrast against QCT were measured by Kaesmacher
J et al., J Comput Assist Tomogr 2017;41:217-223.

Here the calibration is done in two linear steps, combined into one line:

1. **Scanner scale.** The measured median HU of air outside the body,
   subcutaneous fat and (unenhanced scans only) aortic blood are fitted by
   least squares against their nominal CT numbers at 120 kVp,
   ``HU_measured = offset + gain * HU_nominal``. Muscle is measured and
   reported but not fitted: its attenuation falls with age and fatty
   infiltration (Boutin RD et al., AJR Am J Roentgenol 2016).
2. **Mineral equivalence.** A calcium hydroxyapatite (HA) concentration of
   1 mg/cm³ in a water-equivalent background raises the CT number by
   :data:`HA_HU_PER_MG_CM3` HU.

``vBMD = (HU - offset) / (gain * HA_HU_PER_MG_CM3)``, i.e. slope
``1 / (gain * k)`` and intercept ``-offset / (gain * k)``.

Assumptions (not validated against a phantom: research use only)
----------------------------------------------------------------
* Nominal CT numbers at 120 kVp: air -1000 HU (the definition of the HU
  scale), subcutaneous fat -100 HU and unenhanced blood +40 HU (typical values;
  the biological spread, about ±15 HU, is the main error of every internal
  calibration).
* ``k = 1.31 HU per mg/cm³ HA`` is computed from X-ray mass attenuation
  coefficients (XrayDB 4.5.8: HA Ca10(PO4)6(OH)2, 3.16 g/cm³, in water)
  at an assumed 70 keV effective energy of a 120 kVp beam behind the
  patient; it is 1.09 at 80 keV and 1.66 at 60 keV, so other tube voltages
  need another value (``kvp`` other than 120 marks the calibration
  implausible).

Quality: the fit residuals (in mg/cm³), the gain and offset of the scanner
scale, and each reference against its plausible range. Any failure sets
``plausible=False``; then no vBMD is reported and the ACR category is
indeterminate.
"""

from __future__ import annotations

import logging

import numpy as np

from osteonode.measure.contrast import unenhanced_equivalent_hu
from osteonode.measure.tissues import ReferenceTissues, measure_reference_tissues
from osteonode.result import Calibration, ContrastPhase, LevelResult
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume

log = logging.getLogger(__name__)

#: HU per mg/cm³ calcium hydroxyapatite in water at 120 kVp (70 keV effective; see module docstring).
HA_HU_PER_MG_CM3 = 1.31
#: Nominal CT numbers (HU) at 120 kVp of the fitted reference tissues.
NOMINAL_HU = {"air": -1000.0, "adipose": -100.0, "blood": 40.0}
#: Plausible measured HU of each reference (unenhanced for blood), else it is not used.
PLAUSIBLE_HU = {"air": (-1040.0, -960.0), "adipose": (-135.0, -65.0), "blood": (20.0, 65.0),
                "muscle": (-10.0, 90.0)}
#: Limits of the fitted scanner scale: gain, and offset in HU.
GAIN_RANGE = (0.9, 1.1)
MAX_OFFSET_HU = 40.0
#: Largest root-mean-square fit residual accepted, mg/cm³.
MAX_RESIDUAL_RMS_MG_CM3 = 15.0
#: Tube voltage (kVp) for which the nominal values and k hold, and the tolerance.
NOMINAL_KVP, KVP_TOLERANCE = 120.0, 5.0

METHOD = ("internal (phantomless) calibration: air, subcutaneous fat and unenhanced aortic blood fitted "
          "against nominal 120 kVp CT numbers, then 1.31 HU per mg/cm3 calcium hydroxyapatite "
          "(Lee et al., Bone 2017;103:325-333)")
NOT_VALIDATED = "nominal tissue values and HA equivalence not validated against a phantom: research use only"


def fit_calibration(reference_hu: dict[str, float], contrast: ContrastPhase | None = None,
                    kvp: float | None = None) -> Calibration:
    """Fit the HU -> vBMD line to measured reference-tissue CT numbers.

    Parameters
    ----------
    reference_hu : dict[str, float]
        Tissue -> measured median HU; ``"air"`` and ``"adipose"`` are needed,
        ``"blood"`` is fitted in unenhanced scans, ``"muscle"`` only reported.
    contrast : ContrastPhase, optional
        Detected phase; blood is fitted only when it is ``non_contrast``.
    kvp : float, optional
        Tube voltage (DICOM KVP); other than 120 ± 5 kVp the calibration is
        implausible.

    Returns
    -------
    Calibration
        ``slope_mg_cm3_per_hu`` and ``intercept_mg_cm3`` (vBMD in mg/cm³ HA
        = slope x HU + intercept), ``residual_rms_mg_cm3`` (``None`` for a
        two-point fit), ``plausible`` and a ``note`` that names every failed
        check; slope and intercept are ``None`` when air or fat are missing.
    """
    failures: list[str] = []  # make the calibration implausible
    remarks: list[str] = []  # a reference left out of the fit
    fitted = ["air", "adipose"]
    if contrast is not None and contrast.phase == "non_contrast":
        fitted.append("blood")
    usable = []
    for tissue in fitted + ["muscle"]:
        hu = reference_hu.get(tissue)
        lo, hi = PLAUSIBLE_HU[tissue]
        problem = (f"{tissue} not found" if hu is None else
                   None if lo <= hu <= hi else f"{tissue} {hu:.0f} HU outside {lo:g}..{hi:g} HU")
        if problem is None:
            usable += [tissue] if tissue in fitted else []
        else:
            (failures if tissue in ("air", "adipose") else remarks).append(problem)
    if kvp is not None and abs(kvp - NOMINAL_KVP) > KVP_TOLERANCE:
        failures.append(f"tube voltage {kvp:g} kVp: nominal values hold for {NOMINAL_KVP:g} kVp")
    reported = {k: round(float(v), 1) for k, v in reference_hu.items()}
    if "air" not in usable or "adipose" not in usable:
        return Calibration(method=METHOD, reference_hu=reported, plausible=False,
                           note="; ".join(failures + remarks + [NOT_VALIDATED]))
    nominal = np.array([NOMINAL_HU[t] for t in usable])
    measured = np.array([reference_hu[t] for t in usable])
    gain, offset = np.polyfit(nominal, measured, 1)
    scale = gain * HA_HU_PER_MG_CM3
    residual_rms = None
    if len(usable) > 2:
        residual_hu = measured - (offset + gain * nominal)
        residual_rms = round(float(np.sqrt(np.mean(residual_hu ** 2)) / scale), 2)
        if residual_rms > MAX_RESIDUAL_RMS_MG_CM3:
            failures.append(f"fit residual {residual_rms:.1f} mg/cm3 > {MAX_RESIDUAL_RMS_MG_CM3:g}")
    if not GAIN_RANGE[0] <= gain <= GAIN_RANGE[1]:
        failures.append(f"scanner gain {gain:.3f} outside {GAIN_RANGE[0]:g}..{GAIN_RANGE[1]:g}")
    if abs(offset) > MAX_OFFSET_HU:
        failures.append(f"scanner offset {offset:.0f} HU beyond ±{MAX_OFFSET_HU:g} HU")
    plausible = not failures
    note = "; ".join([f"fitted {', '.join(usable)}; scanner gain {gain:.3f}, offset {offset:+.1f} HU"]
                     + failures + remarks + [NOT_VALIDATED])
    calibration = Calibration(method=METHOD, slope_mg_cm3_per_hu=round(float(1.0 / scale), 5),
                              intercept_mg_cm3=round(float(-offset / scale), 2), reference_hu=reported,
                              residual_rms_mg_cm3=residual_rms, plausible=plausible, note=note)
    log.info("calibration: plausible=%s, %s", plausible, note)
    return calibration


def calibrate(volume: Volume, segmentation: SpineSegmentation, contrast: ContrastPhase | None = None,
              kvp: float | None = None, tissues: ReferenceTissues | None = None) -> Calibration:
    """Internal calibration of one CT volume from automatically found reference tissues.

    Parameters
    ----------
    volume, segmentation : Volume, SpineSegmentation
        The ``(z, y, x)`` HU volume and its body label map, as for
        :func:`osteonode.measure.tissues.measure_reference_tissues`.
    contrast : ContrastPhase, optional
        From :func:`osteonode.measure.contrast.detect_contrast`; blood is
        fitted only in unenhanced scans.
    kvp : float, optional
        Tube voltage, see :func:`fit_calibration`.
    tissues : ReferenceTissues, optional
        Already measured reference tissues (measured here when omitted).

    Returns
    -------
    Calibration
        See :func:`fit_calibration`; ``reference_hu`` holds air, adipose,
        muscle and blood (those found).

    Raises
    ------
    ValueError
        If the label map is not on the volume's grid.
    """
    tissues = tissues or measure_reference_tissues(volume, segmentation)
    return fit_calibration(tissues.hu, contrast, kvp)


def apply_calibration(levels: dict[str, LevelResult], calibration: Calibration,
                      contrast: ContrastPhase | None = None) -> dict[str, LevelResult]:
    """Per-level vBMD from the mean trabecular HU.

    Parameters
    ----------
    levels : dict[str, LevelResult]
        From :func:`osteonode.measure.hu.measure_levels`.
    calibration : Calibration
        From :func:`calibrate`.
    contrast : ContrastPhase, optional
        In the portal venous phase the HU are first converted to unenhanced
        equivalents (:func:`osteonode.measure.contrast.unenhanced_equivalent_hu`).

    Returns
    -------
    dict[str, LevelResult]
        Copies of ``levels`` with ``vbmd_mg_cm3`` (mg/cm³ HA, 1 decimal) set;
        ``None`` when the calibration is not plausible.
    """
    slope, intercept = calibration.slope_mg_cm3_per_hu, calibration.intercept_mg_cm3
    out = {}
    for name, level in levels.items():
        vbmd = None
        if calibration.plausible and slope is not None and intercept is not None:
            hu = unenhanced_equivalent_hu(level.trabecular_hu_mean, contrast)
            vbmd = round(slope * hu + intercept, 1)
        out[name] = level.model_copy(update={"vbmd_mg_cm3": vbmd})
    return out
