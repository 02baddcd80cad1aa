"""Variants beyond the issue-10 list, to check the method on its class of problem, not on one list.

``bench/robustness.py`` builds the variants named in issue 10 (L1 and L3
deformities, islands at base density, tilts of 10 degrees, ...). The method
was changed while looking at those, so they no longer test it blind. This
script builds other members of the same classes from the same CT with the same
edits (:mod:`bench.variants`): deformities of L2 and L4, deformities and bone
islands in osteoporotic spines, densities beyond the list (+300 HU), two
levels edited differently, noise 35 HU, scaling by 5 % and tilts of 5 degrees,
tilt with density; and (session 9) crushes of 30 and 45 % of every level in
spines at -60 and -100 HU, 45 % deformities of L2 and L4, a wedge with noise,
scaling with tilt; and (session 10) noise on dark and sclerotic spines, two
dark levels, deformities of 25, 35 and 40 % in dark spines, tilted and scaled
dark spines; and (session 14) crushes of 55-75 % (down to a vertebra plana), at base density
and in spines at -80 HU (L1-L4, or T12-L5), and a wedge of 65 %; and (session 15) spines dark
from T12 to L5 with noise, an island, tilts, scales and deformities of 30-45 %; and (session 16)
45 % crushes and wedges of L2-L4 in spines 80-120 HU dark (L1-L4 or T12-L5); and (session 29) tilts of
6 degrees, tilts with scales, plain and in spines 100-110 HU dark, noise with a tilt on a dark spine,
and a 35 % crush of L1 in a dark spine. It prints the table
of ``bench/robustness.py`` (same
columns, same scoring) and, without PASS/FAIL (these rows have no targets of
their own, they say where the method still fails), the counts of its label
and Genant lines (:func:`bench.robustness.labels_line`,
:func:`bench.robustness.genant_lines`): labels, grades against the nominal
one and the reference body's, the borderline flag and the false grades.

Usage: python bench/beyond.py [--only PATTERN] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.robustness import (  # noqa: E402
    LEVELS,
    ONLY_HELP,
    Spec,
    analyse,
    example_chain,
    genant_lines,
    labels_line,
    score,
    select,
    table,
)
from bench.robustness import all_cores as _all  # noqa: E402
from bench.robustness import specs as robustness_specs  # noqa: E402
from bench.variants import (  # noqa: E402
    CORE_LEVELS,
    Variant,
    add_island,
    add_noise,
    deform,
    offset_cores,
    transform,
)

log = logging.getLogger("bench.beyond")


def _dark(offset: float):
    """Every vertebra in view (T12-L5) ``offset`` HU darker."""
    return _all(offset, CORE_LEVELS)


def _deformed_dark(kind: str, level: str, loss: float, offset: int, spine: str = "all") -> Spec:
    """``kind`` deformity of ``level`` by ``loss`` in a spine ``offset`` HU darker: L1-L4 (``spine`` "all") or
    T12-L5 ("T12-L5"); row ``{kind}{loss %}_{level}+core_{spine}{offset}``."""
    dark = _dark if spine == "T12-L5" else _all
    return Spec(f"{kind}{round(100 * loss)}_{level}+core_{spine}{offset}", "deformity",
                lambda b, a: deform(dark(offset)(b, a), a, level, kind, loss))


def specs() -> list[Spec]:
    """The variants, in table order (``Spec.group`` only names the class)."""
    out = [Spec("base", "base", lambda b, a: b)]
    out += [Spec(f"{k}30_{n}", "deformity", lambda b, a, k=k, n=n: deform(b, a, n, k, 0.30))
            for n in ("L2", "L4") for k in ("wedge", "biconcave", "crush")]
    out += [
        _deformed_dark("wedge", "L2", 0.30, -80),
        _deformed_dark("crush", "L4", 0.30, -60),
        _deformed_dark("biconcave", "L2", 0.45, -40),
        Spec("core_all+300", "density", _all(300)),
        Spec("core_L1+300", "density", lambda b, a: offset_cores(b, a, {"L1": 300})),
        Spec("core_L2-60+noise20", "density", lambda b, a: add_noise(offset_cores(b, a, {"L2": -60}), 20, seed=7)),
        Spec("core_L2-100+core_L3-40", "density", lambda b, a: offset_cores(b, a, {"L2": -100, "L3": -40})),
    ]
    out += [Spec(f"core_all{o:+d}+island{d}_{n}", "island",
                 lambda b, a, o=o, d=d, n=n: add_island(_all(o)(b, a), a, n, d))
            for o, d, n in ((-90, 12, "L1"), (-90, 15, "L1"), (-60, 15, "L3"), (-120, 8, "L4"))]
    out += [
        Spec("core_L2-80+island10_L2", "island", lambda b, a: add_island(offset_cores(b, a, {"L2": -80}), a, "L2", 10)),
        Spec("noise35", "noise", lambda b, a: add_noise(b, 35, seed=35)),
        Spec("scale0.95", "geometry", lambda b, a: transform(b, a, scale=0.95)),
        Spec("scale1.05", "geometry", lambda b, a: transform(b, a, scale=1.05)),
        Spec("tilt_lr+5", "geometry", lambda b, a: transform(b, a, tilt_lr_deg=5)),
        Spec("tilt_ap+5", "geometry", lambda b, a: transform(b, a, tilt_ap_deg=5)),
        Spec("tilt_ap-5+scale1.05", "geometry", lambda b, a: transform(b, a, tilt_ap_deg=-5, scale=1.05)),
        Spec("tilt_lr-10+core_all-80", "geometry", lambda b, a: transform(_all(-80)(b, a), a, tilt_lr_deg=-10)),
    ]
    # added in session 9: crushes in osteoporotic spines, severe deformities of L2 and L4, scale with tilt
    out += [_deformed_dark("crush", n, f, o)
            for n in LEVELS for f in (0.30, 0.45) for o in (-60, -100) if (n, f, o) != ("L4", 0.30, -60)]
    out += [Spec(f"{k}45_{n}", "deformity", lambda b, a, k=k, n=n: deform(b, a, n, k, 0.45))
            for k, n in (("wedge", "L2"), ("wedge", "L4"), ("biconcave", "L4"), ("crush", "L2"))]
    out += [
        Spec("wedge35_L1+noise20", "deformity", lambda b, a: add_noise(deform(b, a, "L1", "wedge", 0.35), 20, seed=3)),
        _deformed_dark("crush", "L3", 0.35, -80),
        Spec("scale0.93+tilt_lr+7", "geometry", lambda b, a: transform(b, a, scale=0.93, tilt_lr_deg=7)),
        Spec("scale1.07+tilt_ap-7", "geometry", lambda b, a: transform(b, a, scale=1.07, tilt_ap_deg=-7)),
    ]
    # added in session 10: noise on dark and sclerotic spines, two dark levels, deformities at 25/35/40 %
    # in dark spines, tilts and scales of dark spines
    out += [
        Spec("core_all-40+noise30", "density", lambda b, a: add_noise(_all(-40)(b, a), 30, seed=3)),
        Spec("core_all-110+noise20", "density", lambda b, a: add_noise(_all(-110)(b, a), 20, seed=4)),
        Spec("core_all+150+island12_L3", "island", lambda b, a: add_island(_all(150)(b, a), a, "L3", 12)),
        Spec("core_L3-70+core_L1-30", "density", lambda b, a: offset_cores(b, a, {"L3": -70, "L1": -30})),
        Spec("core_L1-100+core_L4-100", "density", lambda b, a: offset_cores(b, a, {"L1": -100, "L4": -100})),
        _deformed_dark("wedge", "L2", 0.25, -50),
        _deformed_dark("biconcave", "L1", 0.35, -90),
        _deformed_dark("crush", "L4", 0.40, -80),
        _deformed_dark("wedge", "L3", 0.40, -110),
        Spec("crush25_L1", "deformity", lambda b, a: deform(b, a, "L1", "crush", 0.25)),
        Spec("tilt_ap+8+core_all-70", "geometry", lambda b, a: transform(_all(-70)(b, a), a, tilt_ap_deg=8)),
        Spec("tilt_lr-7+scale1.05+core_all-90", "geometry",
             lambda b, a: transform(_all(-90)(b, a), a, scale=1.05, tilt_lr_deg=-7)),
        Spec("scale0.92+core_L2-80", "geometry",
             lambda b, a: transform(offset_cores(b, a, {"L2": -80}), a, scale=0.92)),
        Spec("wedge30_L3+noise25", "deformity", lambda b, a: add_noise(deform(b, a, "L3", "wedge", 0.30), 25, seed=5)),
        Spec("crush35_L2+island10_L3", "deformity",
             lambda b, a: deform(add_island(b, a, "L3", 10), a, "L2", "crush", 0.35)),
    ]
    # added in session 14: crushes beyond 45 % (grade 3 down to a vertebra plana), at base density and in
    # dark spines, and a severe wedge
    out += [Spec(f"crush{round(100 * f)}_{n}", "deformity", lambda b, a, n=n, f=f: deform(b, a, n, "crush", f))
            for n, f in (("L1", 0.60), ("L1", 0.75), ("L2", 0.60), ("L2", 0.75), ("L4", 0.65), ("L4", 0.75))]
    out += [_deformed_dark("crush", n, f, o) for n, f, o in (("L2", 0.55, -80), ("L3", 0.65, -80), ("L4", 0.75, -80))]
    out += [Spec("wedge65_L3", "deformity", lambda b, a: deform(b, a, "L3", "wedge", 0.65))]
    # ... and with T12 and L5 dark as well (the edits above darken L1-L4 only)
    out += [_deformed_dark("crush", n, f, -80, "T12-L5") for n in ("L2", "L3", "L4") for f in (0.55, 0.65, 0.75)]
    # added in session 15: the combinations of bench/robustness.py, deformities of 30-45 %, tilts, scales,
    # noise and an island with T12-L5 dark (a dark T12 above a dark L1 hid their disc)
    out += [
        Spec("core_T12-L5-80+noise25", "combination", lambda b, a: add_noise(_dark(-80)(b, a), 25, seed=25)),
        Spec("core_T12-L5-60+island10_L2", "combination", lambda b, a: add_island(_dark(-60)(b, a), a, "L2", 10)),
        Spec("tilt_lr+10+scale0.90+core_T12-L5-50", "combination",
             lambda b, a: transform(_dark(-50)(b, a), a, scale=0.9, tilt_lr_deg=10)),
        Spec("core_T12-L5-70+noise20", "combination", lambda b, a: add_noise(_dark(-70)(b, a), 20, seed=9)),
    ]
    out += [_deformed_dark(k, n, f, o, "T12-L5")
            for o in (-60, -100) for k, n, f in (("wedge", "L1", 0.30), ("crush", "L2", 0.30), ("crush", "L3", 0.45))]
    out += [
        Spec("tilt_ap+10+core_T12-L5-90", "geometry", lambda b, a: transform(_dark(-90)(b, a), a, tilt_ap_deg=10)),
        Spec("tilt_ap-10+core_T12-L5-90", "geometry", lambda b, a: transform(_dark(-90)(b, a), a, tilt_ap_deg=-10)),
        Spec("tilt_lr-10+core_T12-L5-100", "geometry", lambda b, a: transform(_dark(-100)(b, a), a, tilt_lr_deg=-10)),
        Spec("scale1.10+core_T12-L5-80", "geometry", lambda b, a: transform(_dark(-80)(b, a), a, scale=1.1)),
        Spec("scale0.90+core_T12-L5-80", "geometry", lambda b, a: transform(_dark(-80)(b, a), a, scale=0.9)),
        Spec("core_T12-L5-110+noise25", "combination", lambda b, a: add_noise(_dark(-110)(b, a), 25, seed=11)),
        Spec("core_T12-L5-90+island12_L1", "island", lambda b, a: add_island(_dark(-90)(b, a), a, "L1", 12)),
    ]
    out += [_deformed_dark(k, n, f, o, "T12-L5")
            for k, n, f, o in (("wedge", "L1", 0.45, -80), ("crush", "L1", 0.45, -80), ("biconcave", "L1", 0.30, -90),
                               ("crush", "L4", 0.30, -120), ("crush", "L1", 0.45, -40), ("crush", "L1", 0.45, -100),
                               ("crush", "L1", 0.45, -120))]
    out += [_deformed_dark("crush", "L1", 0.45, -120)]
    # added in session 16: 45 % crushes and wedges of L2-L4 in spines 80-120 HU dark (bench/README.md,
    # "Session 16": where the body outlines fail most)
    out += [_deformed_dark(k, n, 0.45, o, spine)
            for n in ("L2", "L3", "L4") for k in ("crush", "wedge") for o in (-80, -90, -110, -120)
            for spine in ("all", "T12-L5")]
    # added in session 29: tilts of 6 degrees and tilts with scales, plain and in dark spines, from a probe of
    # parameter values in neither bench (bench/README.md, "Session 29"), a crush of 35 % in a dark spine, and
    # noise with a tilt on a dark spine
    out += [
        Spec("tilt_lr+6", "geometry", lambda b, a: transform(b, a, tilt_lr_deg=6)),
        Spec("tilt_ap+6", "geometry", lambda b, a: transform(b, a, tilt_ap_deg=6)),
        Spec("scale1.09+tilt_lr-6", "geometry", lambda b, a: transform(b, a, scale=1.09, tilt_lr_deg=-6)),
        Spec("scale0.95+tilt_ap+6", "geometry", lambda b, a: transform(b, a, scale=0.95, tilt_ap_deg=6)),
        Spec("tilt_lr-5+scale0.95+core_T12-L5-100", "geometry",
             lambda b, a: transform(_dark(-100)(b, a), a, scale=0.95, tilt_lr_deg=-5)),
        Spec("tilt_lr+4+tilt_ap+4+core_T12-L5-110", "geometry",
             lambda b, a: transform(_dark(-110)(b, a), a, tilt_lr_deg=4, tilt_ap_deg=4)),
        Spec("tilt_lr+6+core_all-65+noise18", "combination",
             lambda b, a: transform(add_noise(_all(-65)(b, a), 18, seed=18), a, tilt_lr_deg=6)),
        _deformed_dark("crush", "L1", 0.35, -60),
    ]
    return out


def every_variant(only: str | None) -> Iterator[Variant]:
    """Every variant of ``bench/robustness.py`` and of this bench (one per name; ``only``: ``--only``), built.

    Loads the example CT (:func:`bench.robustness.example_chain`) and builds each
    variant when asked for, as the two benches build it.
    """
    _, anatomy, start = example_chain()
    every = {spec.name: spec for spec in robustness_specs() + specs()}
    for spec in select(list(every.values()), False, only):
        yield replace(spec.build(start, anatomy), name=spec.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="PATTERN", help=ONLY_HELP)
    parser.add_argument("--out", type=Path, metavar="FILE.md", help="also write the table as markdown")
    args = parser.parse_args(argv)
    volume, anatomy, base_variant = example_chain()
    base = analyse(volume)
    rows = []
    for spec in select(specs(), False, args.only):
        variant = replace(spec.build(base_variant, anatomy), name=spec.name)
        rows.append(score(variant, analyse(variant.volume), base))
        log.info("%s done", spec.name)
    # no targets of their own: every line is a count
    lines = [f"INFO  {title.removeprefix('(no target) ')}: {detail}"
             for title, _, detail in [labels_line(rows), *genant_lines(rows)]]
    print(table(rows))
    print()
    print("\n".join(lines))
    if args.out:
        args.out.write_text(table(rows, markdown=True) + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n",
                            encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
