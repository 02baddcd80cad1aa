"""Genant heights of the built-in bodies against those of the reference bodies, on the example CT.

The only ground truth of vertebral heights we have is the reference label map
(TotalSegmentator ``ref_v2_spine_vertebrae`` where ``ref_v2_vertebrae_body ==
1``) of the example CT. This resamples it (nearest neighbour) onto the CT's
grid and measures it with :func:`osteonode.measure.genant.grade_levels`
exactly as our own label map is measured, so that the two differ only by the
label map. Per level T12-L5 it prints, for ours and the reference's:

* anterior, middle and posterior height (mm) and Genant's height loss;
* the tilt (degrees) of the posterior and anterior body walls against the
  height axis of ``grade_levels`` (positive: the wall leans anteriorly going
  up), per mid-sagittal plane: a line fitted to the label map's most posterior
  and most anterior sample of each 0.5 mm row over the middle 60 % of the
  body's height. A wall that leans where the reference's does not is a
  corner of the body that our label map cuts.

Usage: python bench/reference_heights.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.segmentation import example_image, grade_label_map, load_references, reference_bodies  # noqa: E402
from osteonode.anatomy import VERTEBRA_IDS  # noqa: E402
from osteonode.measure import genant  # noqa: E402
from osteonode.measure.tissues import body_centres_mm  # noqa: E402
from osteonode.segment.backends import builtin  # noqa: E402
from osteonode.volume import Volume  # noqa: E402

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")


def wall_tilts(volume: Volume, bodies: np.ndarray, name: str) -> list[tuple[float, float]]:
    """(posterior, anterior) wall tilt (degrees) of body ``name`` on each plane of ``genant.PLANE_OFFSETS_MM``."""
    vid = VERTEBRA_IDS[name]
    centres = body_centres_mm(volume, bodies)
    a, _, indices = genant.sagittal_planes(volume, centres[vid], genant.body_frame(centres, vid))
    grid = genant.PLANE_GRID_MM
    out = []
    for index in indices:
        inside = ndi.map_coordinates(bodies, index, order=0).reshape(a.shape) == vid
        rows = np.nonzero(inside.any(axis=0))[0]
        if rows.size < 5:
            continue
        hh = grid[rows]
        middle = (hh > hh.min() + 0.2 * np.ptp(hh)) & (hh < hh.max() - 0.2 * np.ptp(hh))
        back = [grid[np.nonzero(inside[:, r])[0].min()] for r in rows[middle]]
        front = [grid[np.nonzero(inside[:, r])[0].max()] for r in rows[middle]]
        out.append(tuple(float(np.degrees(np.arctan(np.polyfit(hh[middle], wall, 1)[0]))) for wall in (back, front)))
    return out


def main() -> int:
    image = example_image()
    volume = Volume.from_sitk(image)
    maps = {"ours": builtin(volume).bodies, "reference": reference_bodies(volume, load_references())}
    heights = {key: grade_label_map(volume, m) for key, m in maps.items()}
    print("level  label map   Ha    Hm    Hp  (mm)  loss   posterior/anterior wall tilt per plane (deg)")
    for name in LEVELS:
        for key, m in maps.items():
            g = heights[key].get(name)
            if g is None:
                continue
            cells = ("  cut by the field of view" if g.cut_by_field_of_view else
                     f"{g.height_anterior_mm:5.1f} {g.height_middle_mm:5.1f} {g.height_posterior_mm:5.1f}"
                     f"       {g.height_loss:.3f}")
            tilts = " ".join(f"{p:+5.1f}/{q:+5.1f}" for p, q in wall_tilts(volume, m, name))
            print(f"{name:5s}  {key:9s} {cells}   {tilts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
