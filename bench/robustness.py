"""Robustness of segmentation, trabecular HU and Genant grading to edits of the real CT (issue 10).

Every variant of ``bench/variants.py`` (density offsets of the trabecular
cores, noise, bone islands, deformities, scaling and tilt, combinations) goes
through the measurement chain of :mod:`osteonode.pipeline` without writing
DICOM: the built-in segmentation (:func:`osteonode.segment.backends.builtin`:
spine and proximal femurs), :func:`osteonode.measure.hu.measure_levels`,
:func:`osteonode.measure.genant.grade_levels` and
:func:`osteonode.measure.genant.apply_genant`. One table row per variant:

* ``labels``: how many of L1-L4 are found and correctly labelled; a level is
  correct when most of our body (resampled onto the reference grid, nearest
  neighbour) lies in the reference body of that level and no other reference
  body holds more of it;
* ``dHU Lx``: reported trabecular mean minus that of the un-edited CT, and the
  applied core offset after the slash;
* ``Dice``: L1-L4 bodies (``ref_v2_spine_vertebrae`` where
  ``ref_v2_vertebrae_body == 1``) and right femur (v1 label 89), inside the
  variant's field of view, the references moved with the variant;
* ``Genant``: grades of L1-L4 (``-`` not graded, ``.`` absent) and, for a
  deformity, the expected grade of the deformed level (``exp``: Genant's
  grade of the nominal height loss) and the grade of the reference body
  deformed alike and measured by the same
  :func:`osteonode.measure.genant.grade_levels` (``ref``). The nominal loss
  is reached from our own heights of the unedited body (the bench builds from
  the image), so where our label map of the unedited body is wrong (L1 until
  session 12: posterior height 24.9 mm against the reference's 30.4 mm,
  ``bench/reference_heights.py``), the deformity actually made differs from
  the nominal one; ``ref`` says what was made, independently of our
  segmentation;
* ``seg s``: segmentation time; ``MiB``: peak resident memory of this process
  while segmenting and measuring (high-water mark reset before each variant).

The summary checks the targets of issue 10 (PASS/FAIL), with INFO lines that
have no target (among them: our grades against the reference's, how many
grades other than the nominal one carry the ``genant_borderline`` flag, and
the false grades: 1 or more on a level not deformed); the
time and memory targets are measured on the example CT resampled (linear) onto the 512 x 512
x 300 grid of ``bench/common.py`` in memory (median of ``--repeats-512``).
Results go to ``bench/README.md``.

Usage: python bench/robustness.py [--quick] [--only PATTERN] [--out FILE.md] [--repeats-512 N]
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GRID, _hwm_mib, spacing_512  # noqa: E402
from bench.segmentation import (  # noqa: E402
    REF_V2_ID,
    UNCERTAIN,
    dice,
    example_image,
    field_of_view,
    grade_label_map,
    load_references,
    on_reference_grid,
    reference_bodies,
)
from bench.variants import (  # noqa: E402
    CORE_LEVELS,
    Anatomy,
    Variant,
    add_island,
    add_noise,
    baseline,
    deform,
    offset_cores,
    transform,
)
from osteonode.anatomy import FEMUR_RIGHT, VERTEBRA_IDS  # noqa: E402
from osteonode.measure.genant import apply_genant, grade_levels, near_grade_limit  # noqa: E402
from osteonode.measure.hu import measure_levels  # noqa: E402
from osteonode.segment import SpineSegmentation  # noqa: E402
from osteonode.segment.backends import builtin  # noqa: E402
from osteonode.volume import Volume  # noqa: E402

log = logging.getLogger("bench.robustness")

LEVELS = ("L1", "L2", "L3", "L4")
#: Targets of issue 10.
HU_TOLERANCE = 5.0
SLOPE_TOLERANCE = 0.05
MAX_NOISE_FOR_HU = 25.0
MIN_DICE = 0.85
MIN_EXACT_GRADES = 0.90
ROI_SIZE_TOLERANCE = 0.10
MAX_SECONDS_512 = 5.0
MAX_MIB = 2048.0
OFFSETS = tuple(range(-10, -121, -10))
NOISE = (10, 20, 25, 30, 40)
ISLANDS_MM = (5, 10, 15)
LOSSES = (0.20, 0.30, 0.45)


@dataclass
class Analysis:
    """The measurement chain's output for one volume.

    Attributes
    ----------
    levels : dict[str, LevelResult]
        Level name -> trabecular HU statistics with the Genant fields filled in.
    seg : SpineSegmentation
        ``(z, y, x)`` label maps on the volume's grid, ``femurs`` attached.
    seconds : float
        Wall time of the segmentation (spine and femurs), s.
    peak_mib : float
        Peak resident memory of this process from the start of the
        segmentation to the end of the measurement, MiB.
    """

    levels: dict
    seg: SpineSegmentation
    seconds: float
    peak_mib: float


def _reset_peak() -> None:
    """Reset this process's resident high-water mark (Linux >= 4.0; no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib() -> float:
    return _hwm_mib(os.getpid())


def analyse(volume: Volume) -> Analysis:
    """Segment (spine and femurs) and measure ``volume`` as the pipeline does, without writing DICOM.

    Parameters
    ----------
    volume : Volume
        ``(z, y, x)`` HU.

    Returns
    -------
    Analysis
        ``builtin`` -> ``measure_levels`` -> ``grade_levels`` / ``apply_genant``
        (no calibration, contrast or radiomics step: they do not change the
        trabecular HU or the grades).
    """
    _reset_peak()
    start = time.perf_counter()
    seg = builtin(volume)
    seconds = time.perf_counter() - start
    levels = measure_levels(volume, seg)
    levels = apply_genant(levels, grade_levels(volume, seg))
    return Analysis(levels, seg, seconds, _peak_mib())


def level_check(variant: Variant, bodies: np.ndarray) -> dict[str, str]:
    """Per L1-L4 of our ``bodies`` (``(z, y, x)`` VerSe IDs on the variant's grid): ``ok``, ``missing``,
    ``<50%`` (right level, but less than half of our body in it) or the reference level that holds most of
    our body (``none``: no reference body)."""
    refs = variant.refs
    ours = on_reference_grid(variant.volume, bodies, refs)
    bodies = np.where(refs.body == 1, refs.vertebrae, 0)
    name_of = {rid: name for name, rid in ((n, REF_V2_ID[VERTEBRA_IDS[n]]) for n in
                                           ("T12", "L1", "L2", "L3", "L4", "L5"))}
    out = {}
    for name in LEVELS:
        mask = ours == VERTEBRA_IDS[name]
        if not mask.any():
            out[name] = "missing"
            continue
        ids, counts = np.unique(bodies[mask], return_counts=True)
        hits = {int(i): int(c) for i, c in zip(ids, counts) if i != 0}
        best = max(hits, key=hits.get) if hits else 0
        right = best == REF_V2_ID[VERTEBRA_IDS[name]] and hits[best] >= 0.5 * mask.sum()
        out[name] = "ok" if right else ("<50%" if best == REF_V2_ID[VERTEBRA_IDS[name]]
                                          else name_of.get(best, "none"))
    return out


def dices(variant: Variant, result: Analysis) -> dict[str, float]:
    """Dice of the L1-L4 bodies and the right femur inside the variant's field of view (reference grid)."""
    refs = variant.refs
    fov = field_of_view(variant.volume, refs)
    ours = on_reference_grid(variant.volume, result.seg.bodies, refs)
    out = {name: dice((ours == VERTEBRA_IDS[name]) & fov,
                      (refs.vertebrae == REF_V2_ID[VERTEBRA_IDS[name]]) & (refs.body == 1) & fov)
           for name in LEVELS}
    femurs = result.seg.femurs.labels if result.seg.femurs is not None else np.zeros(variant.volume.shape, np.uint8)
    out["femur_R"] = dice(on_reference_grid(variant.volume, femurs, refs) == FEMUR_RIGHT, refs.femur_right & fov)
    return out


def score(variant: Variant, result: Analysis, base: Analysis) -> dict:
    """One table row: labels, HU change vs the un-edited run, Dice, Genant, time and memory.

    Parameters
    ----------
    variant : Variant
        The edited CT, its truth and its moved reference masks.
    result : Analysis
        :func:`analyse` of ``variant.volume``.
    base : Analysis
        :func:`analyse` of the un-edited CT.

    Returns
    -------
    dict
        ``variant``, ``truth``, ``labels`` (:func:`level_check`), ``d_hu``
        (L1-L4 reported trabecular mean minus the base's, HU; ``None`` when
        either is missing), ``offset`` (applied, HU), ``dice``
        (:func:`dices`), ``grades`` (L1-L4 Genant grade, ``None`` not graded,
        ``"."`` absent), ``borderline`` (per measured level: flagged
        ``genant_borderline``, its height loss near a grade limit),
        ``reference_grade`` (of a deformity: the grade of
        the deformed level's reference body, measured alike; ``None`` when
        not graded or no deformity), ``fracture`` (suspected, per measured level),
        ``seconds``, ``peak_mib``, ``not_evaluable``, ``roi_voxels`` (L1-L4
        trabecular ROI size, voxels of the variant's grid), ``confidence``
        (L1-L4 label confidence, 0 when absent).
    """
    d_hu = {}
    for name in LEVELS:
        now, then = result.levels.get(name), base.levels.get(name)
        d_hu[name] = None if now is None or then is None else now.trabecular_hu_mean - then.trabecular_hu_mean
    grades = {name: (result.levels[name].genant_grade if name in result.levels else ".") for name in LEVELS}
    reference_grade = None
    if variant.truth["deformity"] is not None:
        measured = grade_label_map(variant.volume, reference_bodies(variant.volume, variant.refs))
        deformed = measured.get(variant.truth["deformity"]["level"])
        reference_grade = None if deformed is None else deformed.genant_grade
    roi = {name: int((result.seg.trabecular == VERTEBRA_IDS[name]).sum()) for name in LEVELS}
    return {"variant": variant.name, "truth": variant.truth, "labels": level_check(variant, result.seg.bodies),
            "roi_voxels": roi,
            "d_hu": d_hu, "offset": {n: variant.truth["offset"].get(n, 0.0) for n in LEVELS},
            "dice": dices(variant, result), "grades": grades, "reference_grade": reference_grade,
            "fracture": {n: result.levels[n].fracture_suspected for n in LEVELS if n in result.levels},
            "borderline": {n: "genant_borderline" in result.levels[n].quality_flags for n in LEVELS
                           if n in result.levels},
            "seconds": result.seconds, "peak_mib": result.peak_mib,
            "not_evaluable": result.seg.not_evaluable_reason,
            "confidence": {n: result.seg.confidence.get(VERTEBRA_IDS[n], 0.0) for n in LEVELS}}


@dataclass(frozen=True)
class Spec:
    """A variant to build: ``group`` selects the targets it is checked against."""

    name: str
    group: str  # base, offset_all, offset_one, sclerotic, noise, island, deformity, geometry, combination
    build: Callable[[Variant, Anatomy], Variant]


def all_cores(offset: float, levels: tuple[str, ...] = LEVELS) -> Callable[[Variant, Anatomy], Variant]:
    """A builder that offsets the trabecular cores of ``levels`` by ``offset`` HU
    (:func:`bench.variants.offset_cores`); ``CORE_LEVELS`` for every vertebra in view (T12-L5)."""
    return lambda b, a: offset_cores(b, a, dict.fromkeys(levels, offset))


def specs() -> list[Spec]:
    """Every variant of the full bench, in table order."""
    out = [Spec("base", "base", lambda b, a: b)]
    out += [Spec(f"core_all{o:+d}", "offset_all", all_cores(o)) for o in OFFSETS]
    # every vertebra in view (T12-L5) as well: a dark T12 above a dark L1 hides their disc
    out += [Spec(f"core_T12-L5{o:+d}", "offset_all", all_cores(o, CORE_LEVELS)) for o in OFFSETS]
    out += [Spec(f"core_{n}{o:+d}", "offset_one", lambda b, a, n=n, o=o: offset_cores(b, a, {n: o}))
            for n in LEVELS for o in OFFSETS]
    out += [Spec(f"core_all{o:+d}", "sclerotic", all_cores(o)) for o in (100, 200)]
    out += [Spec(f"core_T12-L5{o:+d}", "sclerotic", all_cores(o, CORE_LEVELS)) for o in (100, 200)]
    out += [Spec(f"noise{s}", "noise", lambda b, a, s=s: add_noise(b, s, seed=s)) for s in NOISE]
    out += [Spec(f"island{d}_{n}", "island", lambda b, a, d=d, n=n: add_island(b, a, n, d))
            for n in LEVELS for d in ISLANDS_MM]
    out += [Spec(f"{k}{round(100 * f)}_{n}", "deformity", lambda b, a, k=k, f=f, n=n: deform(b, a, n, k, f))
            for n in ("L1", "L3") for k in ("wedge", "biconcave", "crush") for f in LOSSES]
    out += [Spec(f"scale{s:.2f}", "geometry", lambda b, a, s=s: transform(b, a, scale=s)) for s in (0.9, 1.1)]
    out += [Spec(f"tilt_lr{t:+d}", "geometry", lambda b, a, t=t: transform(b, a, tilt_lr_deg=t)) for t in (10, -10)]
    out += [Spec(f"tilt_ap{t:+d}", "geometry", lambda b, a, t=t: transform(b, a, tilt_ap_deg=t)) for t in (10, -10)]
    out += [
        Spec("core_all-80+noise25", "combination",
             lambda b, a: add_noise(all_cores(-80)(b, a), 25, seed=25)),
        Spec("core_all-60+island10_L2", "combination",
             lambda b, a: add_island(all_cores(-60)(b, a), a, "L2", 10)),
        Spec("tilt_lr+10+scale0.90+core_all-50", "combination",
             lambda b, a: transform(all_cores(-50)(b, a), a, scale=0.9, tilt_lr_deg=10)),
        Spec("wedge30_L1+core_all-60", "combination",
             lambda b, a: deform(all_cores(-60)(b, a), a, "L1", "wedge", 0.30)),
    ]
    return out


QUICK = ("base", "core_all-60", "core_L2-60", "core_all+200", "noise25", "island10_L3", "wedge30_L1",
         "crush45_L3", "tilt_lr+10", "core_all-80+noise25")


def select(all_specs: list[Spec], quick: bool, only: str | None) -> list[Spec]:
    """The specs to run: ``--quick`` keeps ``QUICK``; ``--only`` keeps names matching one of its
    comma-separated globs or substrings (and ``base``, the reference of every row)."""
    chosen = [s for s in all_specs if not quick or s.name in QUICK]
    if only:
        patterns = [p for p in only.split(",") if p]
        chosen = [s for s in chosen if s.name == "base" or any(fnmatch.fnmatch(s.name, p) or p in s.name
                                                                for p in patterns)]
    return chosen


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def row_cells(row: dict) -> list[str]:
    """Table cells of one row (see the module docstring)."""
    labels = row["labels"]
    bad = [f"{n}->{s}" for n, s in labels.items() if s != "ok"]
    deformity = row["truth"]["deformity"]
    expected = ""
    if deformity:
        expected = (f" exp {deformity['level']}={row['truth']['expected_grade'][deformity['level']]}"
                    f" ref {_fmt(row['reference_grade'], 'd')}")
    return [row["variant"], f"{4 - len(bad)}/4" + (f" ({' '.join(bad)})" if bad else ""),
            *[f"{_fmt(row['d_hu'][n], '+.1f')}/{row['offset'][n]:+.0f}" for n in LEVELS],
            " ".join(f"{row['dice'][n]:.2f}" for n in (*LEVELS, "femur_R")),
            "".join("-" if g is None else str(g) for g in row["grades"].values()) + expected,
            f"{row['seconds']:.2f}", f"{row['peak_mib']:.0f}"]


HEADER = ["variant", "L1-L4 labels", "dHU L1", "dHU L2", "dHU L3", "dHU L4", "Dice L1 L2 L3 L4 femR",
          "Genant L1-L4", "seg s", "MiB"]


def table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as plain text (aligned columns) or as a markdown table."""
    cells = [HEADER] + [row_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join(" --- " for _ in HEADER) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _slope(pairs: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (with intercept) of the reported HU change on the applied offset."""
    x = np.array([p[0] for p in pairs], float)
    y = np.array([p[1] for p in pairs], float)
    return None if len(set(x.tolist())) < 2 else float(np.polyfit(x, y, 1)[0])


def _island_move(row: dict) -> float | None:
    """HU change of the island's level beyond its applied core offset."""
    name = row["truth"]["island"]["level"]
    return None if row["d_hu"][name] is None else row["d_hu"][name] - row["offset"][name]


def labels_line(rows: list[dict]) -> tuple[str, bool, str]:
    """(target, passed, detail): L1-L4 found and correctly labelled on every row (:func:`score` dicts).

    A wrong row is named with ``(uncertain)`` when a wrong level's label confidence is under
    :data:`bench.segmentation.UNCERTAIN` (the report flags it), else ``(confident)``: levels are never to be
    confidently wrong (issue 10).
    """
    wrong = [(r["variant"], min(r["confidence"][n] for n, s in r["labels"].items() if s != "ok"))
             for r in rows if any(s != "ok" for s in r["labels"].values())]
    named = [f"{name} ({'uncertain' if conf < UNCERTAIN else 'confident'})" for name, conf in wrong]
    return ("L1-L4 found and correctly labelled (100 % of variants; the edits keep the cortex visible)",
            not wrong, f"{len(rows) - len(wrong)}/{len(rows)}" + (f"; wrong: {', '.join(named)}" if wrong else ""))


#: A spine whose darkest core offset (HU) lies below this is "very dark" in :func:`_genant_by_class`.
VERY_DARK_HU = -60.0


def _genant_by_class(rows: list[dict]) -> tuple[str, bool, str]:
    """(title, all exact, detail): Genant grades exact against the nominal one (and the reference
    body's) by deformity kind and by how dark the spine is (the darkest core offset of L1-L4)."""
    bands = ("cores not darker", f"up to {-VERY_DARK_HU:.0f} HU darker", f"over {-VERY_DARK_HU:.0f} HU darker")
    counts: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        d = r["truth"]["deformity"]
        if d is None:
            continue
        darkest = min(r["offset"].values())
        band = bands[0] if darkest >= 0.0 else bands[1] if darkest >= VERY_DARK_HU else bands[2]
        nominal = r["truth"]["expected_grade"][d["level"]]
        tally = counts.setdefault((d["kind"], band), [0, 0, 0])
        tally[0] += 1
        tally[1] += r["grades"][d["level"]] == nominal
        tally[2] += r["reference_grade"] == nominal
    ordered = sorted(counts.items(), key=lambda kv: (kv[0][0], bands.index(kv[0][1])))
    detail = "; ".join(f"{kind} {band}: {n_exact}/{n} (reference body {n_ref}/{n})"
                       for (kind, band), (n, n_exact, n_ref) in ordered)
    return ("(no target) Genant grade exact by deformity kind and by the darkest core offset",
            all(n_exact == n for n, n_exact, _ in counts.values()), detail)


def genant_lines(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """(target, passed, detail) of the Genant grades of the rows (:func:`score` dicts).

    The issue-10 target (exact against the nominal grade, never off by more
    than one), and without a target: the same for the deformities whose nominal
    loss lies outside the ``genant_borderline`` band of every grade limit (a
    20 % deformity lies on Genant's 20 % limit), the same by deformity kind and by
    how dark the spine is, equality with the reference body deformed
    alike (and those off by more than one), the ``genant_borderline`` flag on
    grades other than the nominal one, and the false grades (1 or more on a
    level not deformed).
    """
    out = []
    # per deformity: (variant, our grade of the deformed level, its nominal grade, the reference body's,
    # whether its nominal loss lies within the genant_borderline band of a grade limit)
    deformed = [(r["variant"], r["grades"][d["level"]], r["truth"]["expected_grade"][d["level"]],
                 r["reference_grade"], near_grade_limit(d["loss"]))
                for r in rows if (d := r["truth"]["deformity"]) is not None]
    if deformed:
        exact = sum(g == e for _, g, e, _, _ in deformed)
        far = [f"{v} {g} vs {e}" for v, g, e, _, _ in deformed if not isinstance(g, int) or abs(g - e) > 1]
        out.append((f"Genant grade exact in >= {MIN_EXACT_GRADES:.0%} of deformities, never off by more than 1",
                    exact >= MIN_EXACT_GRADES * len(deformed) and not far,
                    f"exact {exact}/{len(deformed)}" + (f"; off by > 1 or ungraded: {', '.join(far)}" if far else "")))
        # a nominal loss on a grade limit (a 20 % deformity) is graded on either side of it by any measurement
        # with a scatter: the same count apart from those
        clear = [g == e for _, g, e, _, near in deformed if not near]
        out.append(("(no target) Genant grade exact where the nominal loss lies outside the genant_borderline "
                    "band of every grade limit", all(clear),
                    f"exact {sum(clear)}/{len(clear)}; within the band: exact {exact - sum(clear)}/"
                    f"{len(deformed) - len(clear)}"))
        out.append(_genant_by_class(rows))
        same = sum(g == ref for _, g, _, ref, _ in deformed)
        differ = [f"{v} {g} vs {ref}" for v, g, _, ref, _ in deformed if g != ref]
        two = sum(1 for _, g, _, ref, _ in deformed
                  if isinstance(ref, int) and (not isinstance(g, int) or abs(g - ref) > 1))
        out.append(("(no target) Genant grade equal to that of the reference body deformed alike and measured by "
                    "the same code", not differ,
                    f"equal {same}/{len(deformed)}, off by more than one or ungraded {two}"
                    + (f"; differ (ours vs reference): {', '.join(differ)}" if differ else "")))
    graded = [(r, n, r["grades"][n] == r["truth"]["expected_grade"].get(n, 0)) for r in rows for n in LEVELS
              if isinstance(r["grades"][n], int)]
    off = [(r, n) for r, n, nominal in graded if not nominal]
    unflagged = [f"{r['variant']} {n}" for r, n in off if not r["borderline"].get(n)]
    also = sum(1 for r, n, nominal in graded if nominal and r["borderline"].get(n))
    out.append(("(no target) Genant grades other than the nominal one (0 for an undeformed level) that say "
                "genant_borderline (the grade may be one higher or lower)", not unflagged,
                f"{len(off) - len(unflagged)}/{len(off)}" + (f"; not: {', '.join(unflagged)}" if unflagged else "")
                + f"; flagged as well: {also} of the {len(graded) - len(off)} levels graded as nominal"))
    false = [f"{r['variant']} {n}={r['grades'][n]}" for r in rows for n in LEVELS
             if isinstance(r["grades"][n], int) and r["grades"][n] >= 1 and n not in r["truth"]["expected_grade"]]
    out.append(("(no target) false grades: 1 or more on a level not deformed", not false,
                f"{len(false)}" + (f": {', '.join(false)}" if false else "")))
    ungraded = [f"{r['variant']} {n}" for r in rows for n in LEVELS
                if r["grades"][n] is None and n not in r["truth"]["expected_grade"]]
    out.append(("(no target) levels not deformed, found but not graded (cut by the field of view, heights implausible)",
                not ungraded,
                f"{len(ungraded)}" + (f": {', '.join(ungraded)}" if ungraded else "")))
    return out


def summary(rows: list[tuple[Spec, dict]], time_512: list[float], mib_512: float | None) -> list[tuple[str, bool,
                                                                                                            str]]:
    """(target, passed, detail) for each target of issue 10 that the rows cover."""
    out = [labels_line([r for _, r in rows])]
    for group, title in (("offset_all", "all levels"), ("offset_one", "one level")):
        if not any(s.group == group for s, _ in rows):
            continue
        pairs = [(r["offset"][n], r["d_hu"][n]) for s, r in rows if s.group in (group, "base") for n in LEVELS
                 if (group == "offset_all" or r["offset"][n] or s.group == "base") and r["d_hu"][n] is not None]
        slope = _slope(pairs)
        out.append((f"dHU vs applied offset 0..{min(OFFSETS)} HU, {title}: slope 1.00 +- {SLOPE_TOLERANCE:.2f}",
                    slope is not None and abs(slope - 1.0) <= SLOPE_TOLERANCE,
                    f"slope {_fmt(slope, '.3f')} (least squares with intercept) over {len(pairs)} (level, offset) "
                    "pairs, the edited levels only"))
    checked = [(s, r) for s, r in rows if s.group not in ("island", "geometry", "deformity")
               and r["truth"]["noise_sigma"] <= MAX_NOISE_FOR_HU]
    misses = [f"{r['variant']} {n} {_fmt(r['d_hu'][n], '+.1f')}/{r['offset'][n]:+.0f}" for _, r in checked
              for n in LEVELS if r["d_hu"][n] is None or abs(r["d_hu"][n] - r["offset"][n]) > HU_TOLERANCE]
    out.append((f"every L1-L4 dHU within +-{HU_TOLERANCE:.0f} HU of the offset at noise <= {MAX_NOISE_FOR_HU:.0f} HU "
                "(density, noise, combination variants)", not misses,
                f"{len(checked) * 4 - len(misses)}/{len(checked) * 4} level values" +
                (f"; off: {'; '.join(misses[:12])}{' ...' if len(misses) > 12 else ''}" if misses else "")))
    base_roi = next((r["roi_voxels"] for s, r in rows if s.group == "base"), None)
    same_grid = [(s, r) for s, r in rows if s.group in ("offset_all", "offset_one", "sclerotic", "noise")]
    if base_roi and same_grid:
        off = [f"{r['variant']} {n} {r['roi_voxels'][n]}/{base_roi[n]}" for _, r in same_grid for n in LEVELS
               if base_roi[n] and abs(r["roi_voxels"][n] / base_roi[n] - 1.0) > ROI_SIZE_TOLERANCE]
        out.append((f"trabecular ROI voxel count within +-{ROI_SIZE_TOLERANCE:.0%} of the unedited CT's "
                    "(density and noise variants)", not off,
                    f"{len(same_grid) * 4 - len(off)}/{len(same_grid) * 4} level values"
                    + (f"; off: {'; '.join(off[:12])}{' ...' if len(off) > 12 else ''}" if off else "")))
    islands = [r for _, r in rows if r["truth"]["island"] is not None]
    if islands:
        moves = [(r["variant"], _island_move(r)) for r in islands]
        bad = [f"{v} {_fmt(m, '+.1f')}" for v, m in moves if m is None or abs(m) > HU_TOLERANCE]
        out.append((f"focal lesion 5-15 mm: level HU moves <= {HU_TOLERANCE:.0f} HU", not bad,
                    f"{len(islands) - len(bad)}/{len(islands)}" + (f"; moved: {', '.join(bad)}" if bad else "")))
    geo = [(s, r) for s, r in rows if s.group == "geometry"]
    if geo:
        misses = [f"{r['variant']} {n} {_fmt(r['d_hu'][n], '+.1f')}" for _, r in geo for n in LEVELS
                  if r["d_hu"][n] is None or abs(r["d_hu"][n]) > HU_TOLERANCE]
        out.append((f"(no target) geometric variants: dHU within +-{HU_TOLERANCE:.0f} HU", not misses,
                    f"{len(geo) * 4 - len(misses)}/{len(geo) * 4}" + (f"; off: {'; '.join(misses)}" if misses else "")))
    out += genant_lines([r for _, r in rows])
    low = [f"{r['variant']} {k} {v:.2f}" for _, r in rows for k, v in r["dice"].items() if v < MIN_DICE]
    out.append((f"L1-L4 body and right-femur Dice >= {MIN_DICE} on every variant", not low,
                f"{len(rows) * 5 - len(low)}/{len(rows) * 5}" +
                (f"; below: {'; '.join(low[:12])}{' ...' if len(low) > 12 else ''}" if low else "")))
    if time_512:
        med = statistics.median(time_512)
        out.append((f"segmentation of 512 x 512 x 300 <= {MAX_SECONDS_512:.0f} s", med <= MAX_SECONDS_512,
                    f"median {med:.2f} s of {len(time_512)} run(s)"))
    peaks = [r["peak_mib"] for _, r in rows] + ([mib_512] if mib_512 is not None else [])
    out.append((f"peak memory <= {MAX_MIB / 1024:.0f} GB", max(peaks) <= MAX_MIB,
                f"max {max(peaks):.0f} MiB" + (f" (512 grid {mib_512:.0f} MiB)" if mib_512 is not None else "")))
    return out


def grid_512_volume() -> Volume:
    """The example CT resampled (linear) onto ``bench.common.GRID`` (512 x 512 x 300) in memory."""
    image = example_image()
    out = sitk.Resample(image, GRID, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_512(image),
                        image.GetDirection(), -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(out)


#: ``--only`` of the benches.
ONLY_HELP = "variants whose name matches one of these comma-separated globs or substrings"


def example_chain() -> tuple[Volume, Anatomy, Variant]:
    """Log at INFO (``osteonode`` at WARNING) and load the example CT for a bench.

    Returns
    -------
    tuple
        The volume (``(z, y, x)`` HU), its stored anatomy (:meth:`bench.variants.Anatomy.of_example`) and
        the start of every chain of edits (:func:`bench.variants.baseline`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("osteonode").setLevel(logging.WARNING)
    volume, refs = Volume.from_sitk(example_image()), load_references()
    return volume, Anatomy.of_example(volume), baseline(volume, refs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", metavar="PATTERN", help=ONLY_HELP)
    parser.add_argument("--out", type=Path, metavar="FILE.md", help="also write the table and summary as markdown")
    parser.add_argument("--repeats-512", type=int, default=None,
                        help="segmentations of the 512 x 512 x 300 grid (default 3, --quick 1, 0 to skip)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    volume, anatomy, base_variant = example_chain()
    base = analyse(volume)
    rows = []
    for spec in select(specs(), args.quick, args.only):
        variant = spec.build(base_variant, anatomy)
        variant = replace(variant, name=spec.name)
        rows.append((spec, score(variant, analyse(variant.volume), base)))
        log.info("%s done (%.0f s so far)", spec.name, time.perf_counter() - start)
    repeats = args.repeats_512 if args.repeats_512 is not None else (1 if args.quick else 3)
    times, mib = [], None
    if repeats:
        big = grid_512_volume()
        for _ in range(repeats):
            result = analyse(big)
            times.append(result.seconds)
            mib = max(mib or 0.0, result.peak_mib)
        del big
    text = table([r for _, r in rows])
    checks = summary(rows, times, mib)
    lines = [f"{'INFO' if title.startswith('(no target)') else 'PASS' if ok else 'FAIL'}  {title}: {detail}"
             for title, ok, detail in checks]
    print(text)
    print()
    print("\n".join(lines))
    total = time.perf_counter() - start
    print(f"\n{len(rows)} variants in {total:.0f} s")
    if args.out:
        args.out.write_text(table([r for _, r in rows], markdown=True) + "\n\n" +
                            "\n".join(f"- {line}" for line in lines) + "\n", encoding="utf-8")
    return 0 if all(ok for title, ok, _ in checks if not title.startswith("(no target)")) else 1


if __name__ == "__main__":
    sys.exit(main())
