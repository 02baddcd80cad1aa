"""Genant heights and ratios of each deformed level, ours and the reference body's deformed alike.

For every deformity variant of ``bench/robustness.py`` and ``bench/beyond.py``
(built as they build it) this segments the variant with the built-in
segmentation, measures the deformed level with :func:`osteonode.measure.genant.grade_levels`
on our label map and on the reference body moved with the deformation, and
prints per variant the nominal loss and the shortening the bench applied
(mm), the heights the deformity was sized to leave (``sized for``: the
stored heights of the unmodified body, each window shortened by its share,
:func:`bench.variants.deform`), then for ours and the reference body: the anterior/posterior,
middle/posterior and posterior/reference ratios, the height loss, the grade
and the heights Ha, Hm, Hp and the neighbours' reference posterior height
(mm): whether a grade other than the nominal one is our measurement's or
the deformity the bench made, and whether the bench made the deformity it
was sized for.

Usage: python bench/deformity_heights.py [--only PATTERN]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import beyond, robustness  # noqa: E402
from bench.segmentation import grade_label_map, reference_bodies  # noqa: E402
from bench.variants import BodyHeights  # noqa: E402
from osteonode.measure.genant import GenantMeasurement, grade_levels  # noqa: E402
from osteonode.segment.backends import builtin  # noqa: E402


def _heights(anterior: float, middle: float, posterior: float, reference: float | None) -> str:
    return (f"(Ha {anterior:.1f}, Hm {middle:.1f}, Hp {posterior:.1f}, "
            f"ref {'-' if reference is None else f'{reference:.1f}'} mm)")


def _line(m: GenantMeasurement | None) -> str:
    if m is None or m.height_loss is None:
        return "not measured"
    r = m.height_ratios
    ref = r.get("posterior_reference")
    return (f"A/P {r['anterior_posterior']:.3f}  M/P {r['middle_posterior']:.3f}  "
            f"P/R {'-' if ref is None else f'{ref:.3f}'}  loss {m.height_loss:.3f}  grade {m.genant_grade}  "
            + _heights(m.height_anterior_mm, m.height_middle_mm, m.height_posterior_mm, m.reference_posterior_mm))


def _sized(heights: BodyHeights) -> str:
    return (f"loss {heights.loss():.3f}  "
            + _heights(heights.anterior_mm, heights.middle_mm, heights.posterior_mm, heights.reference_posterior_mm))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="PATTERN", help=robustness.ONLY_HELP)
    args = parser.parse_args(argv)
    for variant in beyond.every_variant(args.only):
        deformity = variant.truth["deformity"]
        if deformity is None:
            continue
        level = deformity["level"]
        ours = grade_levels(variant.volume, builtin(variant.volume)).get(level)
        theirs = grade_label_map(variant.volume, reference_bodies(variant.volume, variant.refs))
        print(f"{variant.name}: {level} nominal loss {deformity['loss']:.2f}, shortening "
              f"{deformity['shortening_mm']:.1f} mm\n  sized for  {_sized(deformity['sized_for'])}\n"
              f"  ours       {_line(ours)}\n"
              f"  reference  {_line(theirs.get(level))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
