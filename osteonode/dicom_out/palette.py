"""The one colour palette of osteonode: SEG segment colours and key-image overlays.

Colours are sRGB triples (0..255) stored once, as ``color_rgb`` of each
structure in ``dicom_templates/segments.json``: one qualitative colour per
vertebral level (T11 ... L6, sacrum) and proximal femur, saturated so that it
stays visible on a grey CT. A level's trabecular ROI has the level's colour
mixed with white by ``trabecular_roi.tint`` of the same file, so that ROI and
body can be told apart where they overlap.

The SEG stores each colour as Recommended Display CIELab Value (0062,000D):
CIE L*a*b* (D65 white point, sRGB transfer curve undone) scaled to unsigned
16 bit, L* 0..100 -> 0..65535 and a*, b* -128..127 -> 0..65535 (PS3.3
C.10.7.1.1). The conversion is highdicom's :class:`highdicom.color.CIELabColor`.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np

import dicom_templates

RGB = tuple[int, int, int]


def level_rgb(key: str) -> RGB:
    """sRGB colour (0..255) of the structure ``key`` (e.g. ``"L1"``, ``"sacrum"``, ``"femur_left"``).

    Raises
    ------
    KeyError
        If ``segments.json`` has no such structure.
    """
    r, g, b = dicom_templates.load("segments")["segments"][key]["color_rgb"]
    return int(r), int(g), int(b)


def roi_rgb(key: str) -> RGB:
    """sRGB colour (0..255) of the trabecular ROI of level ``key``: the level colour tinted toward white.

    Each channel is ``c + tint * (255 - c)``, rounded, with ``tint`` from
    ``segments.json`` (``trabecular_roi.tint``).

    Raises
    ------
    KeyError
        If ``segments.json`` has no such structure.
    """
    tint = float(dicom_templates.load("segments")["trabecular_roi"]["tint"])
    r, g, b = (int(round(c + tint * (255 - c))) for c in level_rgb(key))
    return r, g, b


def unit_rgb(rgb: RGB) -> tuple[float, float, float]:
    """``rgb`` (0..255) as matplotlib's 0..1 floats."""
    r, g, b = (c / 255.0 for c in rgb)
    return r, g, b


def cielab(rgb: RGB) -> hd.color.CIELabColor:
    """The DICOM CIELab colour of an sRGB triple (0..255); ``.value`` is the encoded (L, a, b) in 0..65535."""
    return hd.color.CIELabColor.from_rgb(*rgb)


def delta_e76(first: RGB, second: RGB) -> float:
    """CIE 1976 colour difference ΔE*ab between two sRGB colours (Euclidean distance in L*a*b*).

    About 2.3 is a just-noticeable difference; above 20 the colours read as different colours.
    """
    def lab(rgb: RGB) -> np.ndarray:
        colour = cielab(rgb)
        return np.array([colour.l_star, colour.a_star, colour.b_star])

    return float(np.linalg.norm(lab(first) - lab(second)))


__all__ = ["RGB", "level_rgb", "roi_rgb", "unit_rgb", "cielab", "delta_e76"]
