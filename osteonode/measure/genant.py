"""Vertebral body heights and Genant semi-quantitative grading.

Genant HK, Wu CY, van Kuijk C, Nevitt MC. Vertebral fracture assessment using
a semiquantitative technique. J Bone Miner Res 1993;8:1137-1148. Grade by the
reduction of anterior, middle and/or posterior height: 0 normal (< 20 %),
1 mild (20-25 %), 2 moderate (25-40 %), 3 severe (> 40 %).

Measurement
-----------
Each body of the label map is measured in its own frame, in patient space
(LPS mm, so any orientation and slice order works):

* **height axis**: the spine axis at this level, the line through the
  centroids of the neighbouring bodies (cranial minus caudal; one neighbour:
  this centroid and that one; none: patient superior); it is not the body's
  own principal axis, which a wedge deformity would tilt;
* **lateral axis**: patient left, made perpendicular to it; **anterior axis**:
  perpendicular to both, pointing to patient anterior.

The label map (nearest neighbour) and the CT (linear) are sampled every
0.5 mm on five sagittal planes through the centroid and 3 and 6 mm to either
side (mid-sagittal). On each plane, every anterior-posterior column of the body
gives a height: between the outer edges of its two endplates, each found on
the image next to the label map's boundary (:func:`endplate_edge`: the
steepest fall from the endplate to the disc, within 4 mm inside and 5 mm
outside the boundary, moving it by at most 3 mm; where the profile still
rises 4 mm inside, a dented endplate up to 10 mm inside, unless it still rises
10 mm inside, into a bone island, or to a ridge followed by bone rather than
disc up to the boundary (the flank of a dense focus, whose fall is no
endplate's: the boundary stays); where there is none and the
next body's label map lies beyond, the endplate is followed outward up to
10 mm, as a dark body's label map stops short of it; the label map's boundary
where the image shows no endplate). The label map alone would quantise a
height to the slice thickness (3 mm is 10 % of a lumbar body, half a Genant
grade); the image places an edge to a fraction of a voxel, and a bright focus
inside the body or the neighbour's endplate are out of reach. Over the body
depth ``D`` (posterior to anterior margin on that plane, the margins being the
outermost columns of the label map at least half its median column height
tall):

* anterior height ``Ha``: columns 5-15 % of ``D`` behind the anterior margin,
* middle height ``Hm``: 45-55 % of ``D``,
* posterior height ``Hp``: 5-15 % of ``D`` in front of the posterior margin,

each the median over the five planes of the median over the window's columns
on that plane (the 5 % keep the rounded corners and the cortical rim out, as
the six-point placement of morphometry does; the median over the columns, a
wrong edge in a few columns; the median over the planes, a label map that
lacks a corner of the body on up to two planes -- a low-density body is
under-segmented in patches, and a short window there would be graded as a
fracture).

Grading
-------
Height loss is the largest of ``1 - Ha/Hp`` (wedge), ``1 - Hm/Hp``
(biconcave) and ``1 - max(Hp, min(Ha, Hm))/Hp_ref`` (crush), where
``Hp_ref`` is the mean posterior height of the neighbouring levels
(:func:`reference_posterior`): the vertebra's own posterior height cannot
serve as the reference when the whole body is compressed. A crush lowers the
whole body, so a posterior height short on its own (its anterior and middle
heights both taller) is not graded as one: it is a measurement of a posterior
corner that the label map missed (the basivertebral foramen and a tilted disc
plane cut it) more often than a fracture. A neighbour that is itself deformed
(by its own ratios, or a posterior height 20 % below the median of the graded
levels) is no reference: the nearest undeformed level within two levels on
that side is used, as osteoporotic fractures often lie next to each other. A
grade of 1 or more flags a possible fracture. Measured but not graded (and
not used as a reference): L5, which is wedge-shaped in health (Genant's
method grades T4-L4).

Bodies cut by the field of view
-------------------------------
A body within 3 mm of the edge of the volume, or listed in
``SpineSegmentation.cut_by_field_of_view`` by the segmentation backend, may
be cut by the edge of the scan: its heights would be those of the cut, not of
the vertebra. It gets no heights, no ratios and no grade, is not a reference
for its neighbours, and :func:`apply_genant` sets its ``cut_by_field_of_view``
and adds the quality flag ``"cut_by_field_of_view"``
(:data:`osteonode.dicom_out.summary.QUALITY_FLAG_TEXT`).

Slices too thick
----------------
On slices thicker than :data:`MAX_SLICE_MM` (3.5 mm) no heights are
measured and no level is graded: an endplate thinner than the slice is
averaged into whichever slice holds it, and its edge moves by up to a slice
with the slice position. T12 of a 1.5 mm CTA, its slices averaged by threes
(4.5 mm) at the three phases, read height losses of 0.000, 0.150 and 0.176,
and by fours (6 mm) 0.000 and 0.500, graded 3; by twos (3 mm) 0.111 at both
phases (``bench/edge_phase.py``). The benches of issue 10 measure 3 mm
slices. The limit lies above them by a sixth (the edge's error grows in
proportion to the slice, ``bench/edge_phase.py``'s model), so that a 3 mm
series whose slices lie a little further apart (3.3 mm for the example CT
scaled by 10 % through its spacing) is still measured, and well below the
4.5 mm where T12 failed.
The thickness is the larger of the slice spacing and the nominal Slice
Thickness (0018,0050) when given (an overlapping reconstruction's slices
are thicker than their spacing). Every level gets the reason
:data:`THICK_SLICE_REASON` and, from :func:`apply_genant`, the quality flag
``"slices_too_thick"``; the trabecular HU is measured as on any slices.

Implausible heights
-------------------
A fracture lowers a body; it does not make it taller than its neighbours. A
graded body whose posterior height exceeds its reference posterior height
(:func:`reference_posterior`) by more than :data:`MAX_POSTERIOR_EXCESS` (20 %,
Genant's own smallest deformity) and whose grade would rest on that posterior
height (a wedge or biconcave loss of 20 % or more against it) has been
measured beyond its endplates, not on the vertebra: on the bench's copies of
the example CT with dark marrow, the endplate followed outward from L1's label
map reached T12's endplate across the disc (posterior heights 36-39 mm
against 31-32 mm for the reference body), and the anterior height against
that posterior one was graded 2 or 3. Such a body gets no heights, ratios or
grade (reason :data:`IMPLAUSIBLE_POSTERIOR_REASON`) and :func:`apply_genant`
adds the quality flag ``"heights_implausible"``; its loss already makes it no reference
for its neighbours (:func:`_deformed`). A tall posterior height without a
short anterior or middle one is not enough: next to a crushed neighbour that
is not recognised as deformed, the reference itself is too low (a 30 % crush
of L2 in a dark spine of the bench, measured on the reference bodies: L1 and
L3 at 1.37 and 1.22 of their reference). On the unedited example CT the
reference bodies' posterior heights of L1-L4 are 0.90-1.03 of their
reference, ours 0.90-1.07.

Nor does a fracture raise a body's middle above both its margins: a wedge
lowers the anterior height, a biconcave deformity the middle one, a crush
all three, and in health the middle height is the lowest (the endplates are
concave; on the reference bodies of 34 of the bench's copies, 0.71-1.00 of
the taller margin on the 110 undeformed levels, 0.27-0.80 on the 27
deformed ones). A graded body (grade 1 or more) whose middle height exceeds
both its anterior and its posterior height by more than
:data:`MAX_MIDDLE_EXCESS` (10 %) has an endplate edge missed at a margin:
on nine of the bench's copies with a 45-65 % wedge of L2-L4 (eight with
marrow 90-120 HU darker), the label map of the undeformed L1 lacked a
corner, and its anterior height of 8.5-20 mm or posterior height of
17.7-23.6 mm (the reference body's 27-31 and 31-33 mm) was graded 1-3.
Such a body likewise gets no heights, ratios or grade (reason
:data:`IMPLAUSIBLE_MIDDLE_REASON`) and the quality flag
``"heights_implausible"``; it stays a reference for its neighbours only if
neither its own ratios nor its posterior height make it deformed
(:func:`_deformed`). Graded as measured are such a body whose
middle height itself lies 20 % or more below its reference posterior height
(a crush, whichever margin is short: on the bench, a 30 % crush of L1 and a
45 % crush of L2 in spines 100-120 HU dark read middle heights of 19.2 and
21.5 mm, 1.2 times their margins', against references of 29.9 and 27.3 mm),
and one graded 0 (the grade does not rest on the short margin).

Grades near a limit
-------------------
A graded body whose height loss lies within :data:`BORDERLINE_LOSS` (4
points) of a grade limit gets the quality flag ``"genant_borderline"`` from
:func:`apply_genant`. On 3 mm slices the standard deviation of the height
loss of an unchanged L2-L4 over the slice phase alone reaches 0.021 (L1's
0.043; ``bench/genant_precision.py``), so within twice that of a limit the
grade may be one higher or lower. Genant's semiquantitative method has a
"borderline" grade for the same doubt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from osteonode.anatomy import REPORTED_LEVELS, VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.measure.tissues import body_centres_mm
from osteonode.result import LevelResult, QualityFlag
from osteonode.segment import SpineSegmentation
from osteonode.segment.column import FOCAL_DENSE_HU
from osteonode.volume import Volume

log = logging.getLogger(__name__)

#: Sampling step on the sagittal planes, mm.
STEP_MM = 0.5
#: Lateral offsets (mm) of the sagittal planes from the body centroid.
PLANE_OFFSETS_MM = (-6.0, -3.0, 0.0, 3.0, 6.0)
#: Fractions of the body depth, from the anterior margin, of the three height windows.
WINDOWS = {"anterior": (0.05, 0.15), "middle": (0.45, 0.55), "posterior": (0.85, 0.95)}
#: Columns shorter than this fraction of the median column height do not set the body's margins.
MARGIN_HEIGHT_FRACTION = 0.5
#: The endplate ridge is looked for up to this far (mm) inside the label map's boundary.
RIDGE_SEARCH_MM = 4.0
#: ... and, where the profile still rises inward there (a dented endplate), climbed to up to this far (mm).
DENT_REACH_MM = 10.0
#: The disc beyond an endplate ridge is looked for up to this far (mm) outside the label map's boundary.
DISC_REACH_MM = 5.0
#: The image moves the label map's boundary by at most this much (mm) ...
MAX_SHIFT_MM = 3.0
#: ... unless no endplate is near it: then the endplate is followed up to this far (mm) outward, before the
#: next body's label map.
NEIGHBOUR_REACH_MM = 10.0
#: Falls within this fraction of the steepest one form the run whose centre is the edge (:func:`_fall`).
PLATEAU_FRACTION = 0.95
#: The endplate must stand this many HU above the disc beyond it ...
MIN_EDGE_DROP_HU = 30.0
#: ... and this many when followed beyond the label map (a dark body's endplate, dimmed by its marrow).
CLIMB_DROP_HU = 20.0
#: Heights are measured, and levels graded, on slices no thicker than this (mm; module docstring, "Slices too
#: thick").
MAX_SLICE_MM = 3.5
#: Reason of every level on slices thicker than :data:`MAX_SLICE_MM`.
THICK_SLICE_REASON = (f"not measured: slices thicker than {MAX_SLICE_MM:g} mm (an endplate's edge moves by up to a "
                      "slice with the slice position)")
#: Levels graded (Genant et al. 1993 grade T4-L4; L5 is measured only).
GRADED_LEVELS = ("T12", "L1", "L2", "L3", "L4")
#: A body closer than this (mm) to the edge of the volume may be cut by the field of view.
EDGE_MARGIN_MM = 3.0
#: Reason of a level whose body is cut by the field of view.
CUT_REASON = "not measured: the body reaches the edge of the volume (cut by the field of view)"
#: A crush is judged against the nearest undeformed level up to this many levels away on either side.
REFERENCE_REACH = 2
#: Height-loss limits of grades 1, 2, 3 (Genant et al. 1993).
GRADE_LIMITS = (0.20, 0.25, 0.40)
#: A posterior height more than this fraction above the reference posterior height is implausible (module
#: docstring, "Implausible heights"): the smallest deformity Genant's method grades, the other way.
MAX_POSTERIOR_EXCESS = GRADE_LIMITS[0]
#: Reason of a level whose posterior height is implausible.
IMPLAUSIBLE_POSTERIOR_REASON = (f"not graded: posterior height over {100 * MAX_POSTERIOR_EXCESS:g} % above the "
                                "neighbouring levels' (measured beyond the endplates)")
#: A middle height more than this fraction above the taller of the anterior and posterior heights is
#: implausible (module docstring, "Implausible heights"): about twice the largest standard deviation of the
#: height loss over the slice phase on 3 mm slices (L1's 0.043, ``bench/genant_precision.py``).
MAX_MIDDLE_EXCESS = 0.10
#: Reason of a level whose middle height is implausible.
IMPLAUSIBLE_MIDDLE_REASON = (f"not graded: middle height over {100 * MAX_MIDDLE_EXCESS:g} % above both the anterior "
                             "and the posterior height (an endplate missed at a margin)")
GENANT_CITATION = "Genant HK et al., J Bone Miner Res 1993;8:1137-1148"
#: A height loss this close (fraction of the height) to one of :data:`GRADE_LIMITS` is flagged
#: ``genant_borderline``: twice the largest standard deviation of the height loss of L2-L4 over the
#: slice phase on 3 mm slices (0.021; L1's is 0.043), ``bench/genant_precision.py``. Genant's
#: semiquantitative method has a "borderline" grade (0.5) for the same doubt.
BORDERLINE_LOSS = 0.04


@dataclass(frozen=True)
class GenantMeasurement:
    """Heights, ratios and Genant grade of one vertebral body.

    Attributes
    ----------
    height_anterior_mm, height_middle_mm, height_posterior_mm : float or None
        Body heights along the spine axis, mm; None for a body cut by the field of view.
    reference_posterior_mm : float or None
        Mean posterior height of the nearest undeformed neighbouring levels
        (:func:`reference_posterior`), mm.
    height_ratios : dict[str, float]
        ``anterior_posterior``, ``middle_posterior`` and, with a reference,
        ``posterior_reference``.
    height_loss : float
        Largest relative height reduction (0..1).
    genant_grade : int or None
        0-3, ``None`` when not graded (see ``reason``).
    fracture_suspected : bool or None
        Grade >= 1; ``None`` when not graded.
    reason : str or None
        Why the level was not graded.
    cut_by_field_of_view : bool
        The body is (possibly) cut by the edge of the scan: not measured.
    heights_implausible : bool
        The posterior height exceeds the neighbours' by more than :data:`MAX_POSTERIOR_EXCESS`, or the middle
        height both margins' by more than :data:`MAX_MIDDLE_EXCESS`, and the grade would rest on it: no heights
        are reported (module docstring, "Implausible heights").
    slices_too_thick : bool
        The slices are thicker than :data:`MAX_SLICE_MM`: not measured (module docstring, "Slices too thick").
    """

    height_anterior_mm: float | None
    height_middle_mm: float | None
    height_posterior_mm: float | None
    reference_posterior_mm: float | None
    height_ratios: dict[str, float]
    height_loss: float | None
    genant_grade: int | None
    fracture_suspected: bool | None
    reason: str | None = None
    cut_by_field_of_view: bool = False
    heights_implausible: bool = False
    slices_too_thick: bool = False

    @classmethod
    def without_heights(cls, reason: str, *, cut_by_field_of_view: bool = False, heights_implausible: bool = False,
                        slices_too_thick: bool = False) -> GenantMeasurement:
        """A level reported without heights, ratios or grade, and ``reason``."""
        return cls(height_anterior_mm=None, height_middle_mm=None, height_posterior_mm=None,
                   reference_posterior_mm=None, height_ratios={}, height_loss=None, genant_grade=None,
                   fracture_suspected=None, reason=reason, cut_by_field_of_view=cut_by_field_of_view,
                   heights_implausible=heights_implausible, slices_too_thick=slices_too_thick)


def near_grade_limit(height_loss: float) -> bool:
    """Whether a relative height loss (0..1) lies within :data:`BORDERLINE_LOSS` of a Genant grade limit.

    Within it, the measurement's precision on 3 mm slices cannot tell the
    grade from the next one up or down (source of the width: the
    :data:`BORDERLINE_LOSS` comment).
    """
    return any(abs(height_loss - limit) <= BORDERLINE_LOSS for limit in GRADE_LIMITS)


def genant_grade(height_loss: float) -> int:
    """Genant grade (0-3) of a relative height loss (0..1): < 20 %, 20-25 %, 25-40 %, > 40 %."""
    if height_loss < GRADE_LIMITS[0]:
        return 0
    if height_loss < GRADE_LIMITS[1]:
        return 1
    return 2 if height_loss <= GRADE_LIMITS[2] else 3


def body_frame(centres: dict[int, np.ndarray], vid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit height (superior), anterior and left axes (LPS) of body ``vid``, in which its heights are measured.

    ``centres``: VerSe ID -> body centroid (LPS mm, :func:`osteonode.measure.tissues.body_centres_mm`).
    The height axis runs through the centroids of the neighbouring bodies (module docstring,
    "Measurement"). Raises ``KeyError`` if ``vid`` has no centroid.
    """
    above, below = centres.get(vid - 1), centres.get(vid + 1)
    here = centres[vid]
    axis = (above if above is not None else here) - (below if below is not None else here)
    if np.linalg.norm(axis) < 1e-6:
        axis = np.array([0.0, 0.0, 1.0])
    height = axis / np.linalg.norm(axis) * (1.0 if axis[2] >= 0 else -1.0)
    left = np.array([1.0, 0.0, 0.0]) - height * height[0]
    left /= np.linalg.norm(left)
    return height, np.cross(left, height), left  # left x superior = anterior (LPS: -y)


def endplate_edge(profile: np.ndarray, start: int, limit: int | None = None) -> float | None:
    """Sub-sample outer edge of an endplate near the label map's boundary, on a profile running outward.

    The label map places the edge to within a voxel; the image refines it.
    The endplate is the brightest sample from :data:`RIDGE_SEARCH_MM` inside
    to one sample outside ``start`` (the label map's outermost sample of the
    body), the disc the darkest from there to :data:`DISC_REACH_MM` beyond
    ``start``, and the edge the point between them where the profile falls
    most steeply: the centre of the run of falls within
    :data:`PLATEAU_FRACTION` of the steepest (a profile sampled every 0.5 mm
    across 3 mm slices is linear between the slice centres, so its steepest
    fall spans a whole interval, and taking its first sample would move the
    edge by up to a slice with the position of the slices), else refined
    between samples by a parabola. The centre of that run is itself a slice
    midpoint, so the edge still moves in steps of a slice with the slice
    position: on T12 of a 1.5 mm CTA averaged to 3 mm at two phases 1.5 mm
    apart, the middle height read 27.0 and 24.0 mm (the height loss 0.111 at
    both, as both margins moved alike; ``bench/edge_phase.py``, whose model
    finds the edge's offset varying by a whole slice). The edge half-way down
    the fall on a cubic B-spline profile moved about half as much, but graded
    more undeformed dark levels (``bench/README.md``, session 32). The steepest fall
    marks a blurred step where it is, whatever the blur of the scanner, the
    density of the trabecular bone (the endplate stays brighter than the disc
    in osteoporosis and in a sclerotic body alike) or the thinness of the
    endplate (whose blurred peak is lower, which would move a half-maximum
    edge outward); searching only next to the label map's boundary keeps a
    bright focus inside the body, and the neighbour's endplate, out.

    Where the profile still rises inward at the inner end of that search,
    the endplate has sunk into the body (a biconcave or crushed endplate,
    the disc filling the dent) and the label map reaches into the dent: the
    profile is climbed inward to its local maximum, up to
    :data:`DENT_REACH_MM` inside ``start``; when that ridge stands at least
    :data:`MIN_EDGE_DROP_HU` above the search's inner end and is no dense
    focus (above :data:`osteonode.segment.column.FOCAL_DENSE_HU`, a bone
    island), the edge is looked for from it and may lie that far inside --
    provided that the dent holds disc: between the ridge and ``start`` the
    profile comes down to within :data:`MIN_EDGE_DROP_HU` of the disc beyond
    ``start`` (the darkest sample up to :data:`DISC_REACH_MM` out). A ridge
    followed by bone all the way to the boundary is something denser inside
    the body, not a sunken endplate: ``None`` (L1 of the bench's 20 %
    biconcave copy of the example CT: the focus 8 mm inside, its flank
    falling without a step through the sunken endplate, the profile 30-132 HU
    above the disc up to the boundary; its middle height read 1.3 mm short).
    When the climb reaches :data:`DENT_REACH_MM` still rising, or a bone
    island, the search began on the flank of a dense focus inside the body,
    and the flank's fall is no endplate's: ``None``. (L1 of the example CT
    holds a focus of 400-580 HU on the sampling planes 5-11 mm below its
    superior endplate, whose flank falls more steeply than the endplate does:
    its middle height was 24.5 mm on that flank, the reference body's 27.4.)

    Where that finds no endplate and the next body's label map (``limit``)
    lies beyond, the label map of a dark body may stop short of its endplate
    (its marrow as dark as the disc or darker: the outline misses a corner by
    up to 10 mm). The profile is then followed outward from ``start`` up to
    the first local maximum (the endplate), within :data:`NEIGHBOUR_REACH_MM`
    and before the next body's label map, and the disc looked for up to
    :data:`DISC_REACH_MM` beyond it; a fall of :data:`CLIMB_DROP_HU` will do
    (the partial volume of the dark marrow dims a thin endplate).

    Parameters
    ----------
    profile : numpy.ndarray
        ``(n,)`` HU sampled every :data:`STEP_MM` along the height axis,
        index increasing away from the body.
    start : int
        Index of the label map's outermost sample of the body on this profile.
    limit : int or None
        Index of the next body's first sample of the label map beyond
        ``start`` on this profile; ``None`` when there is none.

    Returns
    -------
    float or None
        Index of the edge (fractional), at most :data:`MAX_SHIFT_MM` from the
        label map's boundary, inside it at a climbed dent, or beyond it at a
        followed endplate; ``None``
        when no endplate stands out above a disc, or the search began on a
        dense focus's flank (then the label map's boundary is kept).
    """
    n = profile.size
    lo = max(0, start - int(round(RIDGE_SEARCH_MM / STEP_MM)))
    ridge = lo + int(np.argmax(profile[lo:min(n - 1, start + 1) + 1]))
    inward = MAX_SHIFT_MM / STEP_MM
    if ridge == lo and lo > 0 and profile[lo - 1] > profile[lo]:
        # still rising inward: the endplate sank into the body (a biconcave or crushed endplate,
        # the disc filling the dent) and the label map reaches into the dent; climb to the ridge
        deep, climb = max(0, start - int(round(DENT_REACH_MM / STEP_MM))), lo
        while climb > deep and profile[climb - 1] >= profile[climb]:
            climb -= 1
        # a ridge clearly above the search's inner end (not the top of the same blurred endplate
        # half a sample on), and not a bone island
        if climb > deep and profile[lo] + MIN_EDGE_DROP_HU <= profile[climb] <= FOCAL_DENSE_HU:
            # a dent holds disc: between the ridge and the boundary the profile comes down to the disc
            disc = float(profile[start:_disc_reach_end(profile, start)].min())
            if float(profile[climb:start + 1].min()) > disc + MIN_EDGE_DROP_HU:
                return None
            ridge, inward = climb, start + 0.5 - climb
        elif climb == deep or profile[climb] > FOCAL_DENSE_HU:
            # still rising DENT_REACH_MM inside, or into a bone island: the search began on the flank of
            # something denser inside the body, whose fall is no endplate's
            return None
    edge = _fall(profile, ridge, start, MIN_EDGE_DROP_HU)
    if edge is not None:
        boundary = start + 0.5
        return float(np.clip(edge, boundary - inward, boundary + MAX_SHIFT_MM / STEP_MM))
    if limit is None:
        return None
    # a dark body's label map may stop short of its endplate: follow the rising profile to the ridge
    ridge, top = start, min(n - 1, start + int(round(NEIGHBOUR_REACH_MM / STEP_MM)), limit - 1)
    while ridge < top and profile[ridge + 1] >= profile[ridge]:
        ridge += 1
    return _fall(profile, ridge, ridge, CLIMB_DROP_HU) if start < ridge < top else None


def _disc_reach_end(profile: np.ndarray, start: int) -> int:
    """End (exclusive index) of the samples up to :data:`DISC_REACH_MM` beyond ``start`` (the disc's)."""
    return min(profile.size, start + int(round(DISC_REACH_MM / STEP_MM)) + 1)


def _fall(profile: np.ndarray, ridge: int, start: int, min_drop: float) -> float | None:
    """Steepest fall (fractional index) from ``ridge`` to the darkest sample up to :data:`DISC_REACH_MM`
    beyond ``start``; ``None`` when the fall is under ``min_drop`` HU."""
    valley = ridge + int(np.argmin(profile[ridge:_disc_reach_end(profile, start)]))
    if profile[ridge] - profile[valley] < min_drop:
        return None
    # the steepest fall between them: the centre of the run of steepest falls (a profile sampled
    # finer than the slices is piecewise linear, steepest along a whole interval between two
    # slices), or a parabola through the falls around a single steepest one
    falls = profile[ridge:valley] - profile[ridge + 1:valley + 1]
    k = int(np.argmax(falls))
    steep = falls >= PLATEAU_FRACTION * falls[k]
    first, last = k, k
    while first > 0 and steep[first - 1]:
        first -= 1
    while last < falls.size - 1 and steep[last + 1]:
        last += 1
    if last > first:
        return ridge + 0.5 * (first + last) + 0.5
    offset = 0.0
    if 0 < k < falls.size - 1:
        curvature = falls[k - 1] - 2.0 * falls[k] + falls[k + 1]
        if curvature < 0:
            offset = float(np.clip(0.5 * (falls[k - 1] - falls[k + 1]) / curvature, -0.5, 0.5))
    return ridge + k + 0.5 + offset


def _column_height(hu_column: np.ndarray, inside: np.ndarray, other: np.ndarray) -> float:
    """Height (mm) of one anterior-posterior position: between the outer edges of both endplates.

    ``hu_column``, ``inside`` (this body's label map) and ``other`` (any
    other body's) are ``(n,)`` samples along the height axis (inferior to
    superior, :data:`STEP_MM` apart). An endplate whose edge is not found on
    the image keeps the label map's boundary.
    """
    idx = np.nonzero(inside)[0]
    bottom_in, top_in = int(idx.min()), int(idx.max())
    above, below = np.nonzero(other[top_in:])[0], np.nonzero(other[:bottom_in + 1])[0]
    n = hu_column.size
    top = endplate_edge(hu_column, top_in, top_in + int(above[0]) if above.size else None)
    bottom = endplate_edge(hu_column[::-1], n - 1 - bottom_in, n - 1 - int(below[-1]) if below.size else None)
    top_mm = (top_in + 0.5) if top is None else top
    bottom_mm = (bottom_in - 0.5) if bottom is None else n - 1 - bottom
    return (top_mm - bottom_mm) * STEP_MM


#: Positions (mm from the body centroid) of the samples along the anterior and the height axis of a plane.
PLANE_GRID_MM = np.arange(-45.0, 45.0 + STEP_MM / 2, STEP_MM)


def sagittal_planes(volume: Volume, centre: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray]):
    """Voxel indices of the mid-sagittal sampling planes of one body, one plane per ``PLANE_OFFSETS_MM``.

    Parameters
    ----------
    volume : Volume
        Only its grid (``affine``, LPS mm) is used.
    centre : numpy.ndarray
        ``(3,)`` body centroid, LPS mm.
    axes : tuple of numpy.ndarray
        Unit height, anterior and left axes (:func:`body_frame`).

    Returns
    -------
    tuple
        ``(a, h, indices)``: ``a`` and ``h`` the ``(n, n)`` anterior and height
        position (mm) of each sample (``PLANE_GRID_MM`` along both), and
        ``indices`` a list of ``(3, n * n)`` fractional ``(z, y, x)`` voxel
        indices, one per plane, for ``scipy.ndimage.map_coordinates``.
    """
    height_ax, anterior_ax, left_ax = axes
    a, h = np.meshgrid(PLANE_GRID_MM, PLANE_GRID_MM, indexing="ij")  # (anterior, height) samples
    inverse = np.linalg.inv(volume.affine[:3, :3])
    indices = []
    for offset in PLANE_OFFSETS_MM:
        pts = (centre + offset * left_ax)[None, :] + a.reshape(-1, 1) * anterior_ax + h.reshape(-1, 1) * height_ax
        indices.append(((pts - volume.affine[:3, 3]) @ inverse.T).T)
    return a, h, indices


def _plane_windows(inside: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """The body's columns on one sampling plane and which of them lie in each of :data:`WINDOWS`.

    ``inside`` and ``h`` are ``(n, n)`` (anterior, height) samples of
    :func:`sagittal_planes`: the body's samples and their height position
    (mm). Returns ``(cols, windows)``: indices of the body's columns into
    ``PLANE_GRID_MM`` and, per window name, a boolean over ``cols``; ``None``
    when the plane holds fewer than two columns or a window is empty.
    """
    cols = np.nonzero(inside.any(axis=1))[0]
    if cols.size < 2:
        return None
    top = np.where(inside[cols], h[cols], -np.inf).max(axis=1)
    bottom = np.where(inside[cols], h[cols], np.inf).min(axis=1)
    col_height = top - bottom + STEP_MM
    pos = PLANE_GRID_MM[cols]
    # the margins are those of the body proper: columns at least MARGIN_HEIGHT_FRACTION of the
    # median column height (a thin protrusion -- osteophyte, pedicle base, a voxel of the
    # posterior wall at mid-height -- would otherwise move a margin and its 5-15 % window)
    proper = col_height >= MARGIN_HEIGHT_FRACTION * float(np.median(col_height))
    front, back = pos[proper].max(), pos[proper].min()
    depth = front - back
    windows = {name: (pos <= front - f0 * depth + 1e-9) & (pos >= front - f1 * depth - 1e-9)
               for name, (f0, f1) in WINDOWS.items()}
    return (cols, windows) if all(sel.any() for sel in windows.values()) else None


def measurement_windows(volume: Volume, bodies: np.ndarray, vid: int) -> list[tuple[float, dict[str, np.ndarray]]]:
    """Where :func:`grade_levels` measures the anterior, middle and posterior heights of body ``vid``.

    Parameters
    ----------
    volume : Volume
        Only its grid is used.
    bodies : numpy.ndarray
        ``(z, y, x)`` body label map (VerSe IDs) on the volume's grid.
    vid : int
        VerSe ID of the body.

    Returns
    -------
    list of (float, dict[str, numpy.ndarray])
        One item per sampling plane that holds all three windows: the plane's
        offset along the body frame's left axis (mm, :data:`PLANE_OFFSETS_MM`)
        and, per window name (``anterior``, ``middle``, ``posterior``), the
        anterior positions (mm from the body's centroid along the frame's
        anterior axis) of its columns. Empty when the body is absent.
    """
    centres = body_centres_mm(volume, bodies)
    if vid not in centres:
        return []
    a, h, indices = sagittal_planes(volume, centres[vid], body_frame(centres, vid))
    out = []
    for offset, index in zip(PLANE_OFFSETS_MM, indices):
        inside = ndi.map_coordinates(bodies, index, order=0, mode="constant", cval=0).reshape(a.shape) == vid
        found = _plane_windows(inside, h)
        if found is not None:
            cols, windows = found
            out.append((offset, {name: PLANE_GRID_MM[cols[sel]] for name, sel in windows.items()}))
    return out


def _heights(volume: Volume, bodies: np.ndarray, vid: int, centre: np.ndarray,
             axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float] | None:
    """Anterior, middle and posterior heights (mm) of body ``vid`` of the label map on the mid-sagittal planes."""
    a, h, indices = sagittal_planes(volume, centre, axes)
    per_plane = []
    for index in indices:
        labels = ndi.map_coordinates(bodies, index, order=0, mode="constant", cval=0).reshape(a.shape)
        inside, other = labels == vid, (labels != 0) & (labels != vid)
        found = _plane_windows(inside, h)
        if found is None:
            continue
        cols, windows = found
        hu = ndi.map_coordinates(volume.hu, index, order=1, mode="nearest").reshape(a.shape)
        per_plane.append({name: float(np.median([_column_height(hu[col], inside[col], other[col])
                                                 for col in cols[sel]])) for name, sel in windows.items()})
    if not per_plane:
        return None
    # the median over the planes of each plane's median: a plane on which the label map lacks a
    # corner (under-segmentation at low density) is outvoted by the others
    return {name: float(np.median([p[name] for p in per_plane])) for name in WINDOWS}


def _shape_loss(heights: dict[str, float]) -> float:
    """Height loss of a body against its own posterior height (wedge, biconcave)."""
    return 1.0 - min(heights["anterior"], heights["middle"]) / heights["posterior"]


def height_loss(anterior_mm: float, middle_mm: float, posterior_mm: float,
                reference_posterior_mm: float | None = None) -> float:
    """Genant height loss (0..1) of a body from its heights (mm): the module docstring's "Grading".

    The largest of the wedge ``1 - Ha/Hp`` and biconcave ``1 - Hm/Hp`` losses
    and, with a reference posterior height ``Hp_ref``, the crush loss ``1 -
    max(Hp, min(Ha, Hm))/Hp_ref``; 0 when none is positive (Genant et al. 1993).
    """
    losses = [_shape_loss({"anterior": anterior_mm, "middle": middle_mm, "posterior": posterior_mm})]
    if reference_posterior_mm is not None:
        losses.append(1.0 - max(posterior_mm, min(anterior_mm, middle_mm)) / reference_posterior_mm)
    return max(0.0, max(losses))


def _deformed(raw: dict[int, tuple[dict[str, float], str | None]], posterior: dict[int, float]) -> set[int]:
    """Graded levels that are no reference for their neighbours' crush ratio: deformed by their own
    ratios (a wedge or biconcave loss of :data:`GRADE_LIMITS` ``[0]``), or a posterior height that much below
    the median of the graded levels (a crush)."""
    if not posterior:
        return set()
    typical = float(np.median(list(posterior.values())))
    return {vid for vid, hp in posterior.items()
            if _shape_loss(raw[vid][0]) >= GRADE_LIMITS[0] or hp < (1.0 - GRADE_LIMITS[0]) * typical}


def reference_posterior(vid: int, posterior: dict[int, float], deformed: set[int]) -> float | None:
    """Expected posterior height (mm) of body ``vid``: the mean over its neighbours.

    Genant et al. 1993 judge a crush against the adjacent vertebrae; a
    deformed neighbour (often beside a fracture in osteoporosis) would lower
    the expected height and hide the crush. On each side the nearest level
    within :data:`REFERENCE_REACH` levels that is not in ``deformed`` counts;
    the search on a side stops at a level without a posterior height (absent,
    cut by the field of view, or not graded).

    Parameters
    ----------
    vid : int
        VerSe ID of the body (19 = T12 ... 23 = L4).
    posterior : dict[int, float]
        VerSe ID -> posterior height (mm) of the graded, measured levels.
    deformed : set[int]
        VerSe IDs of levels that are no reference.

    Returns
    -------
    float or None
        Mean of the neighbours found, mm; ``None`` when there is none.
    """
    found = []
    for step in (-1, 1):
        for k in range(1, REFERENCE_REACH + 1):
            n = vid + step * k
            if n not in posterior:
                break
            if n not in deformed:
                found.append(posterior[n])
                break
    return float(np.mean(found)) if found else None


def grade_levels(volume: Volume, segmentation: SpineSegmentation, slice_thickness_mm: float | None = None
                 ) -> dict[str, GenantMeasurement]:
    """Measure body heights and grade every reported level (T12-L5) by Genant's method.

    Parameters
    ----------
    volume : Volume
        CT volume: only its grid (``affine`` to LPS mm, shape ``(z, y, x)``) is used.
    segmentation : SpineSegmentation
        ``bodies`` ``(z, y, x)`` label map, VerSe IDs, on the volume's grid;
        ``cut_by_field_of_view``: VerSe IDs of bodies cut by the edge of the scan.
    slice_thickness_mm : float or None
        Nominal Slice Thickness (0018,0050), mm, when known; the slices are
        taken as thick as the larger of it and the spacing of the volume's
        axis 0.

    Returns
    -------
    dict[str, GenantMeasurement]
        Level name -> measurement, cranio-caudal order; levels whose body is
        missing or too small to sample are absent. A body within
        :data:`EDGE_MARGIN_MM` of the edge of the volume or in
        ``segmentation.cut_by_field_of_view`` has a measurement without heights
        (``cut_by_field_of_view=True``, reason :data:`CUT_REASON`). On slices
        thicker than :data:`MAX_SLICE_MM` every level present has a
        measurement without heights (``slices_too_thick=True``, reason
        :data:`THICK_SLICE_REASON`).

    Raises
    ------
    ValueError
        If the label map is not on the volume's grid.
    """
    bodies = segmentation.bodies
    volume.require_grid(bodies, "body label map")
    centres = body_centres_mm(volume, bodies)
    thickness = max(volume.spacing[0], slice_thickness_mm or 0.0)
    if thickness > MAX_SLICE_MM + 1e-3:
        log.info("slices of %.2f mm: heights not measured, no level graded", thickness)
        return {name: GenantMeasurement.without_heights(THICK_SLICE_REASON, slices_too_thick=True)
                for name in REPORTED_LEVELS if VERTEBRA_IDS[name] in centres}
    raw: dict[int, tuple[dict[str, float], str | None]] = {}
    margin = [1 + int(np.ceil(EDGE_MARGIN_MM / sp)) for sp in volume.spacing]  # edge voxel + 3 mm
    cut: list[int] = []
    for name in REPORTED_LEVELS:
        vid = VERTEBRA_IDS[name]
        if vid not in centres:
            continue
        mask = bodies == vid
        if vid in segmentation.cut_by_field_of_view or any(
                mask.take(np.r_[0:m, n - m:n], axis=ax).any() for ax, (m, n) in enumerate(zip(margin, mask.shape))):
            cut.append(vid)
            continue
        heights = _heights(volume, bodies, vid, centres[vid], body_frame(centres, vid))
        if heights is None:
            continue
        reason = None
        if name not in GRADED_LEVELS:
            reason = f"{name} not graded: wedge-shaped in health (Genant's method grades T4-L4)"
        raw[vid] = (heights, reason)
    out = {VERTEBRA_NAMES[vid]: GenantMeasurement.without_heights(CUT_REASON, cut_by_field_of_view=True)
           for vid in cut}
    posterior = {vid: heights["posterior"] for vid, (heights, reason) in raw.items() if reason is None}
    deformed = _deformed(raw, posterior)
    implausible = {vid for vid, hp in posterior.items()
                   if _shape_loss(raw[vid][0]) >= GRADE_LIMITS[0]
                   and hp > (1.0 + MAX_POSTERIOR_EXCESS) * (reference_posterior(vid, posterior, deformed) or np.inf)}
    for vid in implausible:
        log.info("%s: posterior height %.1f mm, implausible against its neighbours': not graded",
                 VERTEBRA_NAMES[vid], posterior[vid])
        out[VERTEBRA_NAMES[vid]] = GenantMeasurement.without_heights(IMPLAUSIBLE_POSTERIOR_REASON,
                                                                     heights_implausible=True)
    for vid, (heights, reason) in raw.items():
        if vid in implausible:
            continue
        reference = reference_posterior(vid, posterior, deformed)
        ha, hm, hp = heights["anterior"], heights["middle"], heights["posterior"]
        ratios = {"anterior_posterior": round(ha / hp, 3), "middle_posterior": round(hm / hp, 3)}
        if reference is not None:
            ratios["posterior_reference"] = round(hp / reference, 3)
        loss = height_loss(ha, hm, hp, reference)
        grade = None if reason else genant_grade(loss)
        if (grade and hm > (1.0 + MAX_MIDDLE_EXCESS) * max(ha, hp)
                and (reference is None or hm > (1.0 - GRADE_LIMITS[0]) * reference)):
            log.info("%s: middle height %.1f mm, implausible against its anterior and posterior heights (%.1f, "
                     "%.1f mm): not graded", VERTEBRA_NAMES[vid], hm, ha, hp)
            out[VERTEBRA_NAMES[vid]] = GenantMeasurement.without_heights(IMPLAUSIBLE_MIDDLE_REASON,
                                                                         heights_implausible=True)
            continue
        out[VERTEBRA_NAMES[vid]] = GenantMeasurement(
            height_anterior_mm=round(ha, 1), height_middle_mm=round(hm, 1), height_posterior_mm=round(hp, 1),
            reference_posterior_mm=None if reference is None else round(reference, 1),
            height_ratios=ratios, height_loss=round(loss, 3), genant_grade=grade,
            fracture_suspected=None if grade is None else grade >= 1,
            reason=reason)
    log.info("Genant grades: %s; cut by the field of view: %s; heights implausible: %s",
             {k: m.genant_grade for k, m in out.items()}, [VERTEBRA_NAMES[vid] for vid in cut],
             [name for name, m in out.items() if m.heights_implausible])
    return {name: out[name] for name in REPORTED_LEVELS if name in out}


def apply_genant(levels: dict[str, LevelResult], measurements: dict[str, GenantMeasurement]
                 ) -> dict[str, LevelResult]:
    """Copy heights, ratios, grade and fracture flag into the level results.

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level results (trabecular HU, vBMD).
    measurements : dict[str, GenantMeasurement]
        From :func:`grade_levels`.

    Returns
    -------
    dict[str, LevelResult]
        Copies of ``levels``; a level without a measurement is unchanged. A
        level whose body is cut by the field of view gets no heights, ratios,
        grade or fracture flag, ``cut_by_field_of_view=True`` and the quality
        flag ``"cut_by_field_of_view"`` (added once); one with implausible
        heights the same without heights and with ``"heights_implausible"``;
        one on slices too thick likewise with ``"slices_too_thick"``. A graded level whose height
        loss is near a grade limit (:func:`near_grade_limit`) gets the quality
        flag ``"genant_borderline"`` (added once).
    """
    out = {}
    for name, level in levels.items():
        m = measurements.get(name)
        if m is None:
            out[name] = level
            continue
        update: dict[str, object] = {"height_anterior_mm": m.height_anterior_mm, "height_middle_mm": m.height_middle_mm,
                  "height_posterior_mm": m.height_posterior_mm, "height_ratios": m.height_ratios or None,
                  "genant_grade": m.genant_grade, "fracture_suspected": m.fracture_suspected}
        flags = list(level.quality_flags)
        if m.cut_by_field_of_view:
            update["cut_by_field_of_view"] = True
        # why the body has no heights (the three are exclusive), first among the flags
        unmeasured: QualityFlag | None = ("cut_by_field_of_view" if m.cut_by_field_of_view
                                          else "heights_implausible" if m.heights_implausible
                                          else "slices_too_thick" if m.slices_too_thick else None)
        if unmeasured is not None:
            flags = flags if unmeasured in flags else [unmeasured, *flags]
        elif (m.genant_grade is not None and m.height_loss is not None and near_grade_limit(m.height_loss)
              and "genant_borderline" not in flags):
            flags.append("genant_borderline")
        update["quality_flags"] = flags
        out[name] = level.model_copy(update=update)
    return out
