"""How far the slice phase moves Genant's endplate edge: a one-dimensional model of thick-slice CT.

A vertebra does not know where the scanner put its slices, and a thin
endplate is averaged into whichever slice holds it. This models the height
profile across one endplate (mm along the height axis, the body below, the
disc above: body marrow ``T`` HU, an endplate ``--plate-mm`` thick of
``--plate-hu`` HU, a disc of ``--disc-hu`` HU and ``--disc-mm`` thick, then
the next body's endplate and marrow), blurs it with the slice sensitivity
profile (a box of the slice thickness convolved with a Gaussian of
``--sigma-mm``, the in-plane and reconstruction blur), samples it at slice
centres one slice thickness apart, interpolates linearly every
:data:`osteonode.measure.genant.STEP_MM` as :func:`osteonode.measure.genant.grade_levels`
samples the CT, takes the label map's boundary from the slices whose centre
lies in the body (nearest neighbour), and finds the edge with
:func:`osteonode.measure.genant.endplate_edge` (the label map's boundary where
it finds none, as the measurement does). The true edge is moved through one
slice in 24 steps.

Per slice thickness and marrow HU it prints the edge error (found minus
true, mm; positive: outward, into the disc) over the slice phase: median,
minimum, maximum and the range. A body height has two such edges, and a
Genant ratio two heights: the range is how much a deformity that moves an
endplate by a fraction of a slice can be misread, whatever the segmentation.
The model is one-dimensional and its blur a guess; it shows how the
thickness scales the error, not a real scanner's figures.

Then the same on real CT without resampling: T12 of the 1.5 mm thoracic CTA
of ``../shared/data/ct/totalseg-thoracic-cta-crop`` (its reference mask of
the whole vertebra, cut in front of the spinal canal where the arch encloses
it), measured by :func:`osteonode.measure.genant.grade_levels` at 1.5 mm and
on the series made by averaging every 2, 3 or 4 of its slices (3, 4.5 and
6 mm boxes) from each possible first slice (the phases, 1.5 mm apart; the
label map likewise, a voxel of the body where at least half of the group's
slices hold it). It prints the heights, the height loss and the Genant
grade: those of one thickness differ only by where the slices lie. They are
measured with :data:`osteonode.measure.genant.MAX_SLICE_MM` lifted: series
over 3.5 mm are what that limit keeps from being graded, and this shows why.

Usage: python bench/edge_phase.py [--thickness 1,2,3,5] [--marrow -20,40,120,320] [--sigma-mm 0.6]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import THORACIC_CTA  # noqa: E402
from bench.segmentation import grade_label_map  # noqa: E402
from osteonode.anatomy import VERTEBRA_IDS  # noqa: E402
from osteonode.measure import genant  # noqa: E402
from osteonode.measure.genant import STEP_MM, GenantMeasurement, endplate_edge  # noqa: E402
from osteonode.volume import Volume  # noqa: E402

#: Fine grid of the model (mm).
FINE_MM = 0.01
#: Extent of the model and of the sampled profile either side of the edge (mm).
HALF_SPAN_MM = 30.0
#: Steps of the true edge through one slice.
PHASES = 24


def blurred_profile(edge_mm: float, marrow_hu: float, args: argparse.Namespace, thickness_mm: float,
                    z: np.ndarray) -> np.ndarray:
    """The model on the fine grid ``z`` (mm), blurred by the slice sensitivity profile; HU."""
    hu = np.full(z.shape, marrow_hu)
    hu[(z >= edge_mm - args.plate_mm) & (z < edge_mm)] = args.plate_hu
    hu[(z >= edge_mm) & (z < edge_mm + args.disc_mm)] = args.disc_hu
    next_plate = edge_mm + args.disc_mm
    hu[(z >= next_plate) & (z < next_plate + args.plate_mm)] = args.plate_hu
    box = ndi.uniform_filter1d(hu, int(round(thickness_mm / FINE_MM)), mode="nearest")
    return ndi.gaussian_filter1d(box, args.sigma_mm / FINE_MM, mode="nearest")


def edge_error(edge_mm: float, marrow_hu: float, args: argparse.Namespace, thickness_mm: float) -> float:
    """Found minus true edge (mm) of one slice phase."""
    z = np.arange(-HALF_SPAN_MM - thickness_mm, HALF_SPAN_MM + thickness_mm, FINE_MM)
    fine = blurred_profile(edge_mm, marrow_hu, args, thickness_mm, z)
    centres = np.arange(-HALF_SPAN_MM, HALF_SPAN_MM, thickness_mm)  # slice centres
    slices = np.interp(centres, z, fine)
    q = np.arange(-HALF_SPAN_MM + thickness_mm, HALF_SPAN_MM - thickness_mm, STEP_MM)
    profile = np.interp(q, centres, slices)  # linear, as the CT is sampled
    nearest = centres[np.clip(np.rint((q - centres[0]) / thickness_mm).astype(int), 0, centres.size - 1)]
    inside = nearest < edge_mm
    start = int(np.nonzero(inside)[0].max())
    beyond = np.nonzero(nearest >= edge_mm + args.disc_mm)[0]
    found = endplate_edge(profile, start, int(beyond[0]) if beyond.size else None)
    index = start + 0.5 if found is None else found
    return float(q[0] + index * STEP_MM - edge_mm)


def t12_body(mask: np.ndarray) -> np.ndarray:
    """The body of a whole-vertebra mask (``(z, y, x)``, LPS axes, ``y`` posterior): the voxels in front of
    the spinal canal, whose front is taken on the axial slices where the arch encloses it."""
    fronts = []
    for plane in mask:
        canal = ndi.binary_fill_holes(plane) & ~plane
        if canal.any():
            fronts.append(int(np.nonzero(canal)[0].min()))
    if not fronts:
        raise ValueError("the mask encloses no spinal canal")
    return mask & (np.arange(mask.shape[1])[None, :, None] < min(fronts))


def slabs(image: sitk.Image, hu: np.ndarray, body: np.ndarray, group: int, first: int
          ) -> tuple[Volume, np.ndarray]:
    """The series of ``image`` (``hu`` and ``body`` its ``(z, y, x)`` arrays) with every ``group`` slices
    averaged from slice ``first`` on: ``group`` times the slice thickness, each centre at its group's; the
    body where at least half of the group's slices hold it."""
    count = (hu.shape[0] - first) // group
    cut = slice(first, first + group * count)
    thick = sitk.GetImageFromArray(hu[cut].reshape(count, group, *hu.shape[1:]).mean(axis=1).astype(np.float32))
    thick.SetSpacing((*image.GetSpacing()[:2], group * image.GetSpacing()[2]))
    thick.SetDirection(image.GetDirection())
    thick.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, first + (group - 1) / 2)))
    return Volume.from_sitk(thick), body[cut].reshape(count, group, *body.shape[1:]).mean(axis=1) >= 0.5


def real_phases(groups: tuple[int, ...] = (1, 2, 3, 4)) -> list[tuple[str, GenantMeasurement]]:
    """T12 of the thoracic CTA at its own 1.5 mm and averaged over ``groups`` slices at every phase:
    ``(series, measurement)``."""
    image = sitk.ReadImage(str(THORACIC_CTA / "ct_cropped.nii.gz"), sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(image)
    body = t12_body(sitk.GetArrayFromImage(sitk.ReadImage(str(THORACIC_CTA / "ref_vertebrae_T12.nii.gz"))) > 0)
    out = []
    with mock.patch.object(genant, "MAX_SLICE_MM", math.inf):  # the thick series are measured (docstring)
        for group in groups:
            for first in range(group):
                volume, mask = slabs(image, hu, body, group, first)
                measured = grade_label_map(volume, np.where(mask, VERTEBRA_IDS["T12"], 0).astype(np.uint8))["T12"]
                out.append((f"{group * image.GetSpacing()[2]:g} mm, phase {first}", measured))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thickness", default="1,2,3,5", help="slice thicknesses (= spacing), mm")
    parser.add_argument("--marrow", default="-20,40,120,320", help="trabecular HU of the body")
    parser.add_argument("--plate-mm", type=float, default=1.0, help="endplate thickness, mm")
    parser.add_argument("--plate-hu", type=float, default=420.0, help="endplate HU")
    parser.add_argument("--disc-hu", type=float, default=70.0, help="disc HU")
    parser.add_argument("--disc-mm", type=float, default=8.0, help="disc height, mm")
    parser.add_argument("--sigma-mm", type=float, default=0.6, help="Gaussian blur besides the slice box, mm")
    args = parser.parse_args(argv)
    print(f"endplate {args.plate_mm:g} mm of {args.plate_hu:g} HU, disc {args.disc_hu:g} HU x {args.disc_mm:g} mm, "
          f"blur sigma {args.sigma_mm:g} mm; edge error over the slice phase, mm (+ outward)")
    print(f"{'slice mm':>8s} {'marrow HU':>9s} {'median':>7s} {'min':>6s} {'max':>6s} {'range':>6s}")
    for thickness in (float(t) for t in args.thickness.split(",")):
        for marrow in (float(m) for m in args.marrow.split(",")):
            errors = [edge_error(thickness * k / PHASES, marrow, args, thickness) for k in range(PHASES)]
            print(f"{thickness:8g} {marrow:9g} {statistics.median(errors):+7.2f} {min(errors):+6.2f} "
                  f"{max(errors):+6.2f} {max(errors) - min(errors):6.2f}")
    print("\nT12 of the thoracic CTA (real CT): heights Ha / Hm / Hp (mm), height loss, Genant grade")
    for name, m in real_phases():
        if m.height_loss is None:
            print(f"  {name:>18s}: {m.reason}")
        else:
            print(f"  {name:>18s}: {m.height_anterior_mm:.1f} / {m.height_middle_mm:.1f} / "
                  f"{m.height_posterior_mm:.1f}, loss {m.height_loss:.3f}, grade {m.genant_grade}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
