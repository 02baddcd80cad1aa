"""Precision of the Genant heights: the example CT shifted by fractions of a slice.

A vertebra does not know where the scanner put its slices. This shifts the
example CT (3 mm slices) along the patient's cranio-caudal axis by fractions of
a slice (linear resampling, the same for every shift, including 0), runs the
built-in segmentation and :func:`osteonode.measure.genant.grade_levels` on each
copy, and prints per level T12-L5 the anterior, middle and posterior heights
(mm) and Genant's height loss of every shift, then their standard deviations
over the shifts. The spread is the scatter that decides a deformity at a grade
limit (20, 25 and 40 % of Genant et al. 1993): the heights of an unchanged body
should not depend on the slice phase.

Usage: python bench/genant_precision.py [--shifts 0,0.5,1,1.5,2,2.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.segmentation import example_image  # noqa: E402
from osteonode.measure.genant import grade_levels  # noqa: E402
from osteonode.segment.backends import builtin  # noqa: E402
from osteonode.volume import Volume  # noqa: E402

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
FIELDS = (("Ha", "height_anterior_mm"), ("Hm", "height_middle_mm"), ("Hp", "height_posterior_mm"),
          ("loss", "height_loss"))


def shifted(image: sitk.Image, shift_mm: float) -> Volume:
    """``image`` with its content moved ``shift_mm`` along patient z (LPS superior), linear, same grid."""
    transform = sitk.TranslationTransform(3, (0.0, 0.0, -shift_mm))  # output point -> input point
    out = sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", default="0,0.5,1,1.5,2,2.5", help="shifts in mm, comma-separated")
    args = parser.parse_args(argv)
    shifts = [float(s) for s in args.shifts.split(",")]
    image = example_image()
    rows: dict[str, dict[str, list[float]]] = {name: {key: [] for key, _ in FIELDS} for name in LEVELS}
    print("shift mm  " + "  ".join(f"{name:>22s}" for name in LEVELS))
    for shift in shifts:
        volume = shifted(image, shift)
        measured = grade_levels(volume, builtin(volume))
        cells = []
        for name in LEVELS:
            m = measured.get(name)
            if m is None or m.height_loss is None:
                cells.append(f"{'-':>22s}")
                continue
            for key, attr in FIELDS:
                rows[name][key].append(float(getattr(m, attr)))
            cells.append(f"{m.height_anterior_mm:4.1f} {m.height_middle_mm:4.1f} {m.height_posterior_mm:4.1f} "
                         f"{m.height_loss:.3f}")
        print(f"{shift:8.1f}  " + "  ".join(cells))
    print("SD (mm, loss) over the shifts:")
    for name in LEVELS:
        values = rows[name]
        if len(values["loss"]) >= 2:
            print(f"  {name}: " + ", ".join(f"{key} {statistics.stdev(values[key]):.{3 if key == 'loss' else 2}f}"
                                           for key, _ in FIELDS)
                  + f" (loss {min(values['loss']):.3f}-{max(values['loss']):.3f}, {len(values['loss'])} shifts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
