"""Level anchors and level naming: sacrum, lowest rib-bearing vertebra, disc counting.

* *Sacrum (caudal anchor)*: the field of view continues at least 40 mm below the
  lowest disc (so a further disc would have been seen), and in at least 60 % of
  the slices 8-30 mm below it thick bone (> 120 HU, surviving an opening with an
  8 mm disc, which removes ribs and transverse processes) lies on both sides,
  24-110 mm lateral: the iliac bones at the sacro-iliac joints. The lowest
  mobile vertebra above it is L5. The lowest notch may be a residual S1/S2
  disc inside the sacrum, and an L5 between high iliac crests passes the test
  too: :func:`caudal_anchor` chooses between the two lowest discs when both
  pass (with confidence 0.4): the next one when the vertebra above the lowest
  would be short (more likely S1 than a crushed L5), else the cranial anchor
  decides.
* *Lowest rib-bearing vertebra = T12 (cranial anchor)*: bone components lateral
  to the column (> ``RIB_BONE_HU``, after removing a 44 mm wide central column) that
  start at the column, reach at least ``RIB_REACH_MM`` lateral (lumbar
  transverse processes end within ~50 mm) and run at least 16 mm
  cranio-caudally are ribs, unless the bottom of the field of view cuts them (a
  cut iliac crest looks alike); the vertebra at the z of their medial end bears
  the rib. It counts as T12 only if at least one complete rib-free vertebra is
  seen below it.
* The discs themselves come from :func:`osteonode.segment.column.disc_chain`,
  which admits the short segment of a fractured vertebra.
* Levels are then counted disc by disc from each anchor (:func:`name_levels`):
  both anchors agreeing (five lumbar vertebrae between them) gives confidence
  0.9; one anchor 0.7 (sacrum) or 0.6 (T12); disagreeing anchors (transitional
  anatomy or a missed hypoplastic 12th rib) 0.4, counting from the sacrum, as
  most radiology reports do. No anchor: nothing is labelled.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import REQUIRED_LEVELS, VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.segment.column import Disc
from osteonode.segment.frame import COARSE_MM, IN_PLANE, fill_holes

log = logging.getLogger(__name__)

#: A rib reaches at least this far (mm) from the midline; lumbar transverse processes end within
#: ~50 mm (L3, the longest, measured 48-50 mm on the example CT), a 12th rib beyond 70 mm.
RIB_REACH_MM = 60.0

#: The medial end of a rib spans at most this far (mm) cranio-caudally (26 mm on the example CT: the
#: head, neck and the slope of the shaft); beyond it, a rib merged with the transverse process of the
#: vertebra below (60 mm under a 5-degree coronal tilt: the mean put the 12th rib at L1).
RIB_HEAD_SPAN_MM = 36.0

#: Rib bone on the 2 mm coarse copy, after a 4 mm in-plane mean (HU). On a copy of the example CT scaled
#: by 0.9 and tilted by 10 degrees the thin 12th ribs read below 150 HU at 9 of 16 points 48-76 mm off the
#: midline (96-145 HU; 1 of 16 unedited), and at 150 HU they broke into pieces that did not reach
#: ``RIB_REACH_MM``: no rib, and a dark spine there was labelled one level off from the sacrum alone.
#: At 110 HU the ribs of the copy scaled by 1.1 merged with other bone and were lost (bench/README.md,
#: "Session 16").
RIB_BONE_HU = 130.0


SACRUM = VERTEBRA_IDS["sacrum"]


T12 = VERTEBRA_IDS["T12"]


L5 = VERTEBRA_IDS["L5"]


def reference_height(heights: list[float | None], i: int) -> float:
    """Typical body height (mm) near segment ``i``: the median of the nearest three complete segments'.

    Parameters
    ----------
    heights : list of float or None
        Body height (mm, between the disc boundaries) of each segment, caudal
        to cranial; None for a segment cut by the field of view (one disc not
        seen).
    i : int
        The segment whose neighbours serve as the reference.

    Returns
    -------
    float
        The median of the heights of the (up to) three complete segments
        nearest to ``i`` (not ``i`` itself); ``inf`` if there is none. A
        median, not the adjacent segment alone: that may be a fractured,
        short body.
    """
    near = sorted((abs(j - i), h) for j, h in enumerate(heights) if j != i and h is not None)
    return float(np.median([h for _, h in near[:3]])) if near else np.inf


#: An open segment (one disc out of view) whose extent in view exceeds this multiple of the
#: neighbours' body heights holds more than one vertebra and a disc that was not found: a body,
#: its disc (~0.3 of a body) and the ~0.3 of the next body beside the disc that finding it needs.
OPEN_BODY_MAX = 1.6


def open_segment_extent(extent_mm: float, reference_mm: float) -> str:
    """What an open segment (one bounding disc not seen) holds, from its extent in the field of view.

    Parameters
    ----------
    extent_mm : float
        From the seen disc's boundary to the end of the field of view, mm.
    reference_mm : float
        :func:`reference_height` of the neighbours, mm.

    Returns
    -------
    str
        ``"whole"`` (at least 90 % of the reference: the body is in view),
        ``"cut"`` (less: cut by the field of view) or ``"more than one
        vertebra"`` (more than ``OPEN_BODY_MAX`` times the reference: a disc
        in it was not found, so the body cannot be bounded).
    """
    if extent_mm > OPEN_BODY_MAX * reference_mm:
        return "more than one vertebra"
    return "whole" if extent_mm >= 0.9 * reference_mm else "cut"


#: Field of view (mm) below a disc that the sacrum test needs.
SACRUM_TEST_DEPTH_MM = 40.0


def has_sacrum(coarse: np.ndarray, path: np.ndarray, disc: Disc, grid_mm: float = COARSE_MM) -> bool:
    """Whether the bone below ``disc`` is the sacrum (see module docstring)."""
    z = int(disc.z)
    z_lo = z - int(round(SACRUM_TEST_DEPTH_MM / grid_mm))
    if z_lo < 0:
        return False
    # both iliac bones flank the bone below the disc: thick bone (an 8 mm disc survives an
    # opening; ribs and transverse processes do not) lateral to the body on each side
    zs = np.arange(z - int(round(30.0 / grid_mm)), z - int(round(8.0 / grid_mm)))
    bone = ndi.uniform_filter(coarse[zs], size=(1, 3, 3)) > 120.0
    bone = fill_holes(bone, IN_PLANE)
    r = int(round(4.0 / grid_mm))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    thick = ndi.binary_opening(bone, structure=(yy ** 2 + xx ** 2 <= r * r)[None])
    both = 0
    for i, zz in enumerate(zs):
        y, x = int(path[zz, 0]), int(path[zz, 1])
        ya, yb = max(0, y - int(45 / grid_mm)), min(coarse.shape[1], y + int(15 / grid_mm))
        lw = thick[i, ya:yb, max(0, x - int(110 / grid_mm)):max(0, x - int(24 / grid_mm))]
        rw = thick[i, ya:yb, x + int(24 / grid_mm):x + int(110 / grid_mm)]
        if lw.size and rw.size and min(lw.mean(), rw.mean()) >= 0.06:
            both += 1
    frac = both / max(len(zs), 1)
    log.debug("sacrum test below disc at coarse z=%d: iliac bones beside %.0f%% of slices", z, 100 * frac)
    return frac >= 0.6


def caudal_anchor(below_lowest: bool | None, below_next: bool | None, agrees: dict[int, bool],
                  lowest_short: bool = False) -> tuple[int | None, bool]:
    """Which of the two lowest discs tops the sacrum (0 the lowest, 1 the next), or None (a pure function).

    The lowest notch of the column may be a residual S1/S2 disc inside the
    sacrum, and the iliac bones flank the bone below it as they flank S1.

    Parameters
    ----------
    below_lowest, below_next : bool or None
        The sacrum test (:func:`has_sacrum`) below the lowest disc and below
        the next one; None when it was not made (too little field of view
        below the lowest disc, or no second disc).
    agrees : dict
        For each disc index whose test passed: whether the lowest
        rib-bearing vertebra (T12) lies five mobile vertebrae above the
        sacrum so placed.
    lowest_short : bool
        The segment between the two lowest discs is a short one against the
        next (:func:`osteonode.segment.column.is_short_segment`): as L5 it
        would be a crushed vertebra; as S1 below a residual S1/S2 disc it is
        of the usual size. With a dark L5 (its disc with S1 a weak notch) the
        chain takes such a residual disc, 25 mm below L5/S1, and the cranial
        anchor may then agree with it through a disc the chain lost higher up:
        in 8 of 20 copies of the example CT with T12-L5 40-120 HU below
        normal, plain or with a crushed or wedged vertebra, every level was
        named one off (bench/README.md, "Session 14", item 4).

    Returns
    -------
    tuple
        ``(disc, ambiguous)``. ``disc``: 0 when the test passes below the
        lowest disc (or both pass, the lowest segment is not short and the
        cranial anchor does not favour the next one); 1 when it failed there
        but passes below the next disc, or both pass and the lowest segment is
        short or only the next agrees with the cranial anchor; None when
        the test failed or was not made below the lowest disc and did not
        pass below the next one. The next disc is never taken when the test
        below the lowest could not be made: a scan ending in S1 must not make
        L5, flanked by high iliac crests, the sacrum. ``ambiguous``: the
        next disc was taken only because the cranial anchor agrees then or
        the lowest segment is short (L5 flanked by high iliac crests passes
        the test too, a missed 12th rib would agree likewise, and L5 may be
        crushed), so the levels are uncertain (:func:`name_levels`).
    """
    if below_lowest is None:
        return None, False
    if below_lowest and below_next:
        flip = lowest_short or (bool(agrees.get(1)) and not agrees.get(0))
        return (1, True) if flip else (0, False)
    if below_lowest:
        return 0, False
    return (1, False) if below_next else (None, False)


def rib_levels(coarse: np.ndarray, path: np.ndarray, grid_mm: float = COARSE_MM) -> list[float]:
    """Coarse z of the medial ends of rib-like bone components."""
    bone = ndi.uniform_filter(coarse, size=(1, 2, 2)) > RIB_BONE_HU
    nz, ny, nx = coarse.shape
    xs = np.arange(nx)
    dist_x = np.abs(xs[None, :] - path[:, 1:2]) * grid_mm  # (nz, nx)
    bone &= (dist_x >= 22.0)[:, None, :]
    lab, n = ndi.label(bone, structure=np.ones((3, 3, 3), bool))
    ends = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        m = lab[sl] == i + 1
        vol_cm3 = m.sum() * grid_mm ** 3 / 1000.0
        if vol_cm3 < 0.3 or vol_cm3 > 40.0:
            continue
        zz, yy, xx = np.nonzero(m)
        zz = zz + sl[0].start
        yy = yy + sl[1].start
        xx = xx + sl[2].start
        dx = np.abs(xx - path[zz, 1]) * grid_mm
        dy = (yy - path[zz, 0]) * grid_mm
        if dx.min() > 26.0 or dx.max() < RIB_REACH_MM or (zz.max() - zz.min() + 1) * grid_mm < 16.0:
            continue
        if zz.min() == 0:  # cut by the bottom of the field of view (e.g. an iliac crest): cannot be told
            continue
        medial = dx < dx.min() + 8.0
        if not (-60.0 < dy[medial].mean() < 15.0):
            continue
        if (zz[medial].max() - zz[medial].min() + 1) * grid_mm > RIB_HEAD_SPAN_MM:  # merged with a transverse process
            continue
        ends.append(float(zz[medial].mean()))
    return ends


def rib_segment(rib_z: list[float], bounds: list[tuple[float | None, float | None]]) -> int | None:
    """Index of the lowest segment that holds a rib end (a pure function).

    Parameters
    ----------
    rib_z : list of float
        Coarse z of the rib ends (:func:`rib_levels`).
    bounds : list of tuple
        Per segment, caudal to cranial, the coarse z of its lower and upper
        disc; ``None`` for an open end (the segment below the lowest disc, or
        above the highest).

    Returns
    -------
    int or None
        The lowest segment with a rib end between its discs. A rib end above
        the upper disc of the last segment, when that segment is closed (the
        one above its disc held too little of the field of view for a body
        and was left out), belongs to that left-out segment: ``len(bounds)``
        (the 12th rib of a 6 degree sagittally tilted copy of the example CT,
        whose T12 the tilt cut). None without a rib end in or above them.
    """
    held = [i for z in rib_z for i, (lo, hi) in enumerate(bounds)
            if (-np.inf if lo is None else lo) <= z < (np.inf if hi is None else hi)]
    if held:
        return min(held)
    top = bounds[-1][1] if bounds else None
    return len(bounds) if top is not None and any(z >= top for z in rib_z) else None


def ribs_observable(path: np.ndarray, nx: int, z_lo: float, z_hi: float, grid_mm: float = COARSE_MM) -> bool:
    """Whether a rib could be seen beside the column between coarse slices ``z_lo`` and ``z_hi``.

    A rib reaches :data:`RIB_REACH_MM` from the midline (:func:`rib_levels`);
    where the field of view ends closer than that (plus 10 mm) on either
    side of the centreline ``path`` ``(ns, 2)`` (a, l coarse indices) -- a
    reconstruction cropped to the spine, e.g. -- a vertebra without a
    detected rib may still bear one, so it cannot tell the lowest
    rib-bearing vertebra.
    """
    reach = (RIB_REACH_MM + 10.0) / grid_mm
    rows = path[int(max(0, np.floor(z_lo))):int(min(len(path), np.ceil(z_hi) + 1)), 1]
    return bool(rows.size) and bool(np.all((rows - reach >= 0) & (rows + reach <= nx - 1)))


#: Consecutive disc spacings differing by more than this ratio (either way) are a jump.
SPACING_JUMP = 0.75


def unexplained_spacing_jump(spacings_mm: list[float]) -> int | None:
    """The first jump of the disc spacing along the chain that no fractured vertebra explains, or None.

    Vertebral segments change slowly along the column (by well under 25 %
    from one level to the next). A fractured vertebra's segment is short
    between normal ones: a jump down and back up (:func:`disc_chain
    <osteonode.segment.column.disc_chain>` admits it). A jump that does not
    return -- a spacing that stays a quarter shorter or longer -- means a
    disc missed and a mid-body dip taken instead (an osteoporotic body's),
    which may leave both anchors agreeing while levels between them are off.
    A short last segment (the cranial end, which may be a fractured top
    vertebra) is not a jump.

    Parameters
    ----------
    spacings_mm : list of float
        Disc-to-disc spacings (mm), caudal to cranial.

    Returns
    -------
    int or None
        Index of the first segment after an unexplained jump.
    """
    for k in range(1, len(spacings_mm)):
        ratio = spacings_mm[k] / spacings_mm[k - 1]
        if SPACING_JUMP <= ratio <= 1.0 / SPACING_JUMP:
            continue
        if k + 1 == len(spacings_mm) and ratio < 1.0:
            continue  # a short last segment: a fractured top vertebra
        if k + 1 < len(spacings_mm) and ratio < 1.0:
            back = spacings_mm[k + 1] / spacings_mm[k]
            across = spacings_mm[k + 1] / spacings_mm[k - 1]
            if back > 1.0 / SPACING_JUMP and SPACING_JUMP <= across <= 1.0 / SPACING_JUMP:
                continue  # short between normal ones: a fractured vertebra
        if k >= 2 and ratio > 1.0:
            before = spacings_mm[k - 1] / spacings_mm[k - 2]
            if before < SPACING_JUMP:
                continue  # the way back up after a fractured vertebra
        return k
    return None


#: Label confidence of levels whose anchors disagree or are ambiguous (below 0.5: flagged uncertain).
UNCERTAIN_CONFIDENCE = 0.4


#: Segments from the sacrum's up to the lowest rib-bearing vertebra's (T12), L5-L1 between them; as
#: many discs, L5/S1 to T12/L1, lie below the lowest rib.
ANCHOR_SEGMENTS = 6


def anchors_agree(sacrum_segment: int, t12_segment: int | None) -> bool:
    """Whether the lowest rib-bearing segment lies six segments above the sacrum's (L5..L1 between them)."""
    return t12_segment is not None and t12_segment - sacrum_segment == ANCHOR_SEGMENTS


def name_levels(n_segments: int, sacrum_segment: int | None, t12_segment: int | None,
                caudal_ambiguous: bool = False, spacings_mm: list[float] | None = None,
                fracture_ambiguous: bool = False, rib_guided: bool = False, rib_placed: bool = False
                ) -> tuple[dict[int, int], float, str] | None:
    """Name the segments between discs from the anchors, by counting (a pure function).

    Parameters
    ----------
    n_segments : int
        Number of vertebral segments between the detected discs, caudal (0)
        to cranial.
    sacrum_segment : int or None
        Index of the segment that is the sacrum (caudal anchor), if found.
    t12_segment : int or None
        Index of the lowest rib-bearing segment (cranial anchor), if found.
    caudal_ambiguous : bool
        The sacrum was placed above a notch that the sacrum test could not
        tell from the lumbosacral disc (:func:`caudal_anchor`): confidence
        at most ``UNCERTAIN_CONFIDENCE``.
    spacings_mm : list of float, optional
        Disc-to-disc spacings (mm) along the chain: an
        :func:`unexplained_spacing_jump` caps the confidence at
        ``UNCERTAIN_CONFIDENCE``.
    fracture_ambiguous : bool
        The disc chain holds a short (fractured) segment that another chain
        nearly explains, or holds none where a chain with one nearly ties
        (:func:`osteonode.segment.column.ambiguous_fracture_discs`): the
        discs beside a fractured vertebra, hence the bodies, may be
        misplaced; confidence at most ``UNCERTAIN_CONFIDENCE``.
    rib_guided : bool
        The anchors disagreed by a vertebra too few, and agree only on a
        chain that the ribs asked for (:func:`osteonode.segment.column.disc_chain`,
        ``below``): a crushed vertebra's disc, or, in transitional anatomy, a
        mid-body dip; confidence at most ``UNCERTAIN_CONFIDENCE``.
    rib_placed : bool
        A disc of the chain was placed below the lowest rib where the disc
        profile has no minimum (:func:`osteonode.segment.column.below_lowest_rib`:
        bodies as dark as the disc on both sides); confidence at most
        ``UNCERTAIN_CONFIDENCE``.

    Returns
    -------
    tuple or None
        ``(labels, confidence, method)``: segment index -> VerSe ID (T12-L5 and
        the sacrum only), the label confidence (0.9 both anchors agree -- five
        lumbar vertebrae between them; 0.4 they disagree, counted from the
        sacrum; 0.7 sacrum only; 0.6 T12 only) and the method in words for the
        SR. None when there is no anchor.
    """
    if sacrum_segment is not None:
        labels = {i: SACRUM if i == sacrum_segment else L5 - (i - sacrum_segment - 1) for i in range(n_segments)}
        if t12_segment is None:
            conf, method = 0.7, ("sacrum as caudal anchor (lowest mobile vertebra above it = L5), disc counting; "
                                 "lowest rib-bearing vertebra not confirmed")
        elif anchors_agree(sacrum_segment, t12_segment):
            conf, method = 0.9, ("sacrum (caudal anchor) and lowest rib-bearing vertebra T12 (cranial anchor), "
                                 "disc counting; anchors agree")
        else:
            conf, method = UNCERTAIN_CONFIDENCE, (
                "sacrum (caudal anchor) and lowest rib-bearing vertebra (cranial anchor) DISAGREE "
                f"({t12_segment - sacrum_segment - 1} mobile vertebrae between them; transitional "
                "anatomy or a missed rib); levels counted from the sacrum")
    elif t12_segment is not None:
        labels = {i: T12 + (t12_segment - i) for i in range(n_segments)}
        conf, method = 0.6, ("lowest rib-bearing vertebra as T12 (cranial anchor), disc counting; "
                             "sacrum not in the field of view or not confirmed")
    else:
        return None
    doubts = []
    if caudal_ambiguous and sacrum_segment is not None:
        doubts.append("the iliac bones flank the bone below each of the two lowest discs; the lowest was taken "
                      "for a residual S1/S2 disc because the anchors agree then or the vertebra above it would "
                      "be short")
    if fracture_ambiguous:
        doubts.append("the discs were chosen between a chain with a fractured (short) vertebra and one "
                      "without, which explain the image nearly as well (weak discs beside dark bodies)")
    if rib_guided:
        doubts.append("the anchors agree only with one more disc, found below the lowest rib, than the best "
                      "chain of discs holds (a crushed vertebra's disc, or a mid-body dip in transitional anatomy)")
    if rib_placed:
        doubts.append("the disc below the lowest rib-bearing vertebra was placed from the rib, where the disc "
                      "profile has no minimum (the bodies on both sides are as dark as the disc)")
    jump = unexplained_spacing_jump(spacings_mm) if spacings_mm else None
    if spacings_mm and jump is not None:
        doubts.append(f"the disc spacing jumps from {spacings_mm[jump - 1]:.0f} to {spacings_mm[jump]:.0f} mm "
                      "and stays there (a disc may have been missed)")
    if doubts:
        conf = min(conf, UNCERTAIN_CONFIDENCE)
        method += "".join(f"; UNCERTAIN: {doubt}" for doubt in doubts)
    labels = {i: v for i, v in labels.items() if v in VERTEBRA_NAMES and (v <= L5 or v == SACRUM)}
    return labels, conf, method


def missing_levels_reason(complete: set[int], confidence: dict[int, float]) -> str | None:
    """The "not evaluable" reason when any of L1-L4 is not labelled or not complete, else None.

    Parameters
    ----------
    complete : set of int
        VerSe IDs of the vertebrae seen whole (not cut by the field of view).
    confidence : dict
        VerSe ID -> label confidence of every labelled vertebra.
    """
    missing = [name for name in REQUIRED_LEVELS if VERTEBRA_IDS[name] not in complete
               or VERTEBRA_IDS[name] not in confidence]
    if not missing:
        return None
    seen = [VERTEBRA_NAMES[v] for v in sorted(confidence)]
    return (f"L1-L4 are not all in the field of view (missing or cut off: {', '.join(missing)}; "
            f"levels seen: {', '.join(seen) or 'none'})")
