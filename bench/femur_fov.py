"""Right-femur Dice of the example CT cut from below: how much of the Dice the field of view alone takes.

The scaled and tilted variants of ``bench/robustness.py`` move the right
femur down, so that the bottom of the image cuts it 10-17 mm below the head
centre instead of 33 mm. This script cuts the *unmodified* CT from below,
slice by slice (no resampling: the head centre cannot move with the grid),
segments the proximal femurs again, and prints per cut: where the bottom of
the field of view lies against the head centre of the uncut CT (mm along the
patient axis), the head centre's shift and radius, our Dice against the
reference right femur inside the cut field of view, and the Dice of the uncut
CT's mask cut alike (the part of the drop that comes from the cut alone).

Usage: python bench/femur_fov.py [--slices N]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.segmentation import dice, example_image, field_of_view, load_references, on_reference_grid  # noqa: E402
from osteonode.anatomy import FEMUR_RIGHT  # noqa: E402
from osteonode.segment.femur import segment_proximal_femurs  # noqa: E402
from osteonode.volume import Volume  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=9, help="cut 0 .. N-1 slices from the bottom (default 9)")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)
    volume, refs = Volume.from_sitk(example_image()), load_references()
    base = segment_proximal_femurs(volume)
    centre = np.array(base.sides["right"].head_centre_mm)
    base_mask = on_reference_grid(volume, base.labels, refs) == FEMUR_RIGHT
    bottom = min(float(volume.index_to_lps(np.array([k, 0.0, 0.0]))[2]) for k in (0, volume.shape[0] - 1))
    step = float(volume.spacing[0])
    print("cut  FOV bottom - head centre (mm)  centre shift (mm)   radius (mm)  Dice  uncut mask cut alike")
    for k in range(args.slices):
        # index 0 of axis 0 is the inferior end when the slices' index direction points superior (LPS z)
        cut = volume.crop((slice(k, None), slice(None), slice(None))) if volume.index_direction(0)[2] > 0 else \
            volume.crop((slice(0, volume.shape[0] - k), slice(None), slice(None)))
        seg = segment_proximal_femurs(cut)
        side = seg.sides["right"]
        fov = field_of_view(cut, refs)
        ref = refs.femur_right & fov
        ours = on_reference_grid(cut, seg.labels, refs) == FEMUR_RIGHT
        shift = None if side.head_centre_mm is None else np.round(np.array(side.head_centre_mm) - centre, 1)
        print(f"{k:3d}  {bottom + k * step - centre[2]:+28.1f}  {str(shift):>18}  {str(side.head_radius_mm):>11}  "
              f"{dice(ours, ref):.3f}  {dice(base_mask & fov, ref):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
