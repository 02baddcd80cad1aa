"""Quality and cost of the built-in segmentation on the real CT and its variants.

Reference masks (TotalSegmentator model output, used only to measure):
vertebral bodies = ``ref_v2_spine_vertebrae`` (L1 = 31 ... L4 = 28) where
``ref_v2_vertebrae_body == 1``; right femur = label 89 of ``ref_v1_multilabel_seg``.
Our labels are resampled onto the reference grid by physical coordinates
(nearest neighbour); Dice is computed inside the variant's field of view.

Variants of ``totalseg-example-abdomen/example_ct.nii.gz`` (3 mm):

* ``as_given``;
* ``thin``: resampled (linear) to 0.8 x 0.8 x 1.25 mm;
* ``feet_first``: slice order reversed and rows mirrored as a feet-first
  acquisition stores them (same patient positions);
* ``crop_L4``: cropped so that nothing below the L4 body is in view;
* ``noise35``: Gaussian noise of sigma 35 HU added (a new seed per run);
* ``grid512``: the 512 x 512 x 300 CT Image Storage series of
  ``bench/common.py``, loaded with :func:`osteonode.volume.load_series`;

and two other patients that must come out "not evaluable" with no lumbar
level named: ``j2k_T11_T12`` (JPEG 2000 DICOM series) and ``cta_thorax``.

Per variant: Dice of the L1-L4 bodies and of the right femur (median and
minimum over the runs; whole vertebrae against ``ref_v2_spine_vertebrae`` for
information, no target), whether each labelled level is right ("ok"),
wrong with confidence < 0.5 ("uncertain") or wrong with confidence
("WRONG"), the median time of the segmentation (spine + femurs) and that
time as a ratio to reading the same volume from disk in the same process
(NIfTI for the NIfTI variants, the DICOM files for the DICOM ones), and the
peak resident memory of the process (each variant runs in its own process,
one after the other; the peak includes making and reading the input, e.g.
writing and loading the 300 DICOM files of ``grid512``).

Usage: python bench/segmentation.py [--repeats 3] [--variants as_given thin ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import median, series_512  # noqa: E402

from osteonode.anatomy import VERTEBRA_IDS  # noqa: E402
from osteonode.measure.genant import GenantMeasurement, grade_levels  # noqa: E402
from osteonode.segment import FemurSegmentation, SpineSegmentation  # noqa: E402
from osteonode.segment.femur import segment_proximal_femurs  # noqa: E402
from osteonode.segment.frame import canonical_view  # noqa: E402
from osteonode.segment.spine import segment_spine  # noqa: E402
from osteonode.volume import Volume, load_series  # noqa: E402

# References, example_image and load_references are also imported from here by the other benches
from tests.ctdata import CTA, J2K_DIR, References, example_image, load_references  # noqa: E402, F401

#: VerSe ID -> TotalSegmentator v2 vertebra ID in ``ref_v2_spine_vertebrae``.
REF_V2_ID = {VERTEBRA_IDS[n]: i for n, i in (("T12", 32), ("L1", 31), ("L2", 30), ("L3", 29), ("L4", 28),
                                             ("L5", 27))}
LUMBAR = tuple(VERTEBRA_IDS[n] for n in ("L1", "L2", "L3", "L4"))
FEMUR_RIGHT = 90
#: Below this label confidence a wrong level counts as flagged uncertain.
UNCERTAIN = 0.5
THIN_MM = (0.8, 0.8, 1.25)
NOISE_HU = 35.0


def thin(image: sitk.Image, spacing: tuple[float, float, float] = THIN_MM) -> Volume:
    """``image`` resampled (linear) to ``spacing`` (x, y, z mm) over the same extent."""
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                        image.GetDirection(), -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(out)


def reversed_axes(volume: Volume, axes: tuple[int, ...]) -> Volume:
    """The same patient with the array reversed along ``axes`` (0 = z, 1 = y, 2 = x).

    Reversing z and x is how a feet-first acquisition stores an axial series
    (slice order and row direction reversed); every voxel keeps its LPS position.
    """
    flip = [slice(None, None, -1) if ax in axes else slice(None) for ax in range(3)]
    return volume.crop((flip[0], flip[1], flip[2]))


def crop_below(volume: Volume, refs: References, level: str = "L4") -> Volume:
    """``volume`` cropped so that nothing below the reference body of ``level`` is in view.

    The crop plane is the lowest physical z of that reference body; the
    volume's slices must be axial (as the example CT's are).
    """
    body = (refs.vertebrae == REF_V2_ID[VERTEBRA_IDS[level]]) & (refs.body == 1)
    k = int(np.nonzero(body.any(axis=(1, 2)))[0].min())
    z_min = refs.image.TransformIndexToPhysicalPoint((0, 0, k))[2]
    z = volume.affine[2, 3] + volume.affine[2, 0] * np.arange(volume.shape[0])
    keep = np.nonzero(z >= z_min - 1e-3)[0]
    return volume.crop((slice(int(keep[0]), int(keep[-1]) + 1), slice(None), slice(None)))


def noisy(volume: Volume, sigma: float, seed: int) -> Volume:
    """``volume`` plus Gaussian noise of ``sigma`` HU."""
    rng = np.random.default_rng(seed)
    return Volume(hu=volume.hu + rng.normal(0.0, sigma, volume.shape).astype(np.float32), affine=volume.affine)


def on_reference_grid(volume: Volume, labels: np.ndarray, refs: References) -> np.ndarray:
    """``labels`` ``(z, y, x)`` on ``volume``'s grid, resampled onto the reference grid (nearest)."""
    image = sitk.Resample(volume.to_sitk(labels), refs.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image)


def field_of_view(volume: Volume, refs: References) -> np.ndarray:
    """Boolean mask, on the reference grid, of the reference voxels that ``volume`` covers (nearest)."""
    return on_reference_grid(volume, np.ones(volume.shape, np.uint8), refs) > 0


def grade_label_map(volume: Volume, bodies: np.ndarray) -> dict[str, GenantMeasurement]:
    """:func:`osteonode.measure.genant.grade_levels` of a body label map alone (``(z, y, x)`` VerSe IDs on
    ``volume``'s grid, no trabecular ROI), e.g. of :func:`reference_bodies` or of a stored segmentation."""
    return grade_levels(volume, SpineSegmentation(bodies=bodies, trabecular=np.zeros_like(bodies)))


def reference_bodies(volume: Volume, refs: References) -> np.ndarray:
    """The reference bodies T12-L5 on ``volume``'s grid: a ``(z, y, x)`` uint8 label map of VerSe IDs.

    ``ref_v2_spine_vertebrae`` where ``ref_v2_vertebrae_body == 1``,
    resampled nearest-neighbour (the inverse of :func:`on_reference_grid`).
    For scoring only, e.g. to measure the reference bodies with the code that
    measures ours.
    """
    ref = sitk.GetImageFromArray(np.where(refs.body == 1, refs.vertebrae, 0).astype(np.uint8))
    ref.CopyInformation(refs.image)
    grid = volume.to_sitk(np.zeros(volume.shape, np.uint8))
    on_grid = sitk.GetArrayFromImage(sitk.Resample(ref, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    out = np.zeros(on_grid.shape, np.uint8)
    for vid, rid in REF_V2_ID.items():
        out[on_grid == rid] = vid
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def evaluate(volume: Volume, seg: SpineSegmentation, femurs: FemurSegmentation, refs: References) -> dict:
    """Dice per L1-L4 body and right femur, and level correctness, on the reference grid.

    Returns ``{"dice": {name: float}, "dice_whole": {name: float}, "levels":
    {name: "ok" | "uncertain" | "WRONG" | "missing"}, "evaluable": bool,
    "femur": {side: status}}``; a structure counts only where at least half of
    its reference mask lies in the volume's field of view. ``dice_whole``
    compares the whole vertebrae with ``ref_v2_spine_vertebrae`` (no target).
    """
    fov = field_of_view(volume, refs)
    ours = on_reference_grid(volume, seg.bodies, refs)
    whole = on_reference_grid(volume, seg.whole, refs) if seg.whole is not None else None
    out: dict = {"dice": {}, "dice_whole": {}, "levels": {}, "evaluable": seg.not_evaluable_reason is None}
    for vid, rid in REF_V2_ID.items():
        name = {v: k for k, v in VERTEBRA_IDS.items()}[vid]
        ref = (refs.vertebrae == rid) & (refs.body == 1)
        mask = ours == vid
        if mask.any():
            centre = tuple(int(round(c)) for c in ndi.center_of_mass(mask))
            right = int(refs.vertebrae[centre]) == rid
            out["levels"][name] = "ok" if right else (
                "uncertain" if seg.confidence.get(vid, 0.0) < UNCERTAIN else "WRONG")
        elif (ref & fov).sum() >= 0.5 * ref.sum() and vid in LUMBAR:
            out["levels"][name] = "missing"
        if vid in LUMBAR and (ref & fov).sum() >= 0.5 * ref.sum():
            out["dice"][name] = dice(mask & fov, ref & fov)
            if seg.whole is not None:  # informative: no target for the whole vertebra
                out["dice_whole"][name] = dice((whole == vid) & fov, (refs.vertebrae == rid) & fov)
    femur_ref = refs.femur_right & fov
    if femur_ref.sum() >= 0.5 * refs.femur_right.sum():
        out["dice"]["femur_R"] = dice((on_reference_grid(volume, femurs.labels, refs) == FEMUR_RIGHT) & fov,
                                      femur_ref)
    out["femur"] = {side: f.status for side, f in femurs.sides.items()}
    return out


def _segment(volume: Volume) -> tuple[SpineSegmentation, FemurSegmentation, float]:
    start = time.perf_counter()
    view = canonical_view(volume)
    seg = segment_spine(volume, view)
    femurs = segment_proximal_femurs(volume, view)
    return seg, femurs, time.perf_counter() - start


def _nifti_reader(volume: Volume, work: Path) -> Callable[[], Volume]:
    path = work / "variant.nii"
    sitk.WriteImage(volume.to_sitk(), str(path))
    return lambda: Volume.from_sitk(sitk.ReadImage(str(path)))


def _run_variant(name: str, repeats: int, queue: multiprocessing.Queue) -> None:
    """Measure one variant in this (child) process and put the row on ``queue``."""
    with tempfile.TemporaryDirectory(prefix="osteonode-bench-seg-") as tmp:
        work = Path(tmp)
        refs = load_references() if name not in ("j2k_T11_T12", "cta_thorax") else None
        base = example_image()
        if name == "grid512":
            files = series_512(work / "ct")
            read = lambda: load_series(files).volume  # noqa: E731
        elif name == "j2k_T11_T12":
            files = sorted(J2K_DIR.iterdir())
            read = lambda: load_series(files).volume  # noqa: E731
        elif name == "cta_thorax":
            read = _nifti_reader(Volume.from_sitk(sitk.ReadImage(str(CTA))), work)
        else:
            volume = {"as_given": lambda: Volume.from_sitk(base), "noise35": lambda: Volume.from_sitk(base),
                      "thin": lambda: thin(base),
                      "feet_first": lambda: reversed_axes(Volume.from_sitk(base), (0, 2)),
                      "crop_L4": lambda: crop_below(Volume.from_sitk(base), refs)}[name]()
            read = _nifti_reader(volume, work)
        rows, times, reads = [], [], []
        for run in range(repeats):
            start = time.perf_counter()
            volume = read()
            reads.append(time.perf_counter() - start)
            if name == "noise35":
                volume = noisy(volume, NOISE_HU, seed=run)
            seg, femurs, seconds = _segment(volume)
            times.append(seconds)
            if refs is not None:
                rows.append(evaluate(volume, seg, femurs, refs))
            else:
                lumbar = [v for v in LUMBAR if v in seg.confidence]
                rows.append({"dice": {}, "dice_whole": {}, "evaluable": seg.not_evaluable_reason is None,
                             "levels": {"lumbar named": "WRONG" if lumbar else "ok"},
                             "femur": {side: f.status for side, f in femurs.sides.items()}})
        dices = {k: [r["dice"][k] for r in rows if k in r["dice"]] for k in rows[0]["dice"]}
        wholes = {k: [r["dice_whole"][k] for r in rows if k in r["dice_whole"]] for k in rows[0]["dice_whole"]}
        levels = {}
        for r in rows:
            for k, v in r["levels"].items():
                levels.setdefault(k, set()).add(v)
        queue.put({
            "variant": name, "shape": list(volume.shape), "runs": repeats,
            "dice_median": {k: round(median(v), 3) for k, v in dices.items()},
            "dice_min": {k: round(min(v), 3) for k, v in dices.items()},
            "dice_whole_median": {k: round(median(v), 3) for k, v in wholes.items()},
            "levels": {k: "/".join(sorted(v)) for k, v in levels.items()},
            "evaluable": sorted({r["evaluable"] for r in rows}),
            "femur": rows[-1]["femur"],
            "seconds": round(median(times), 2), "read_seconds": round(median(reads), 3),
            "x_read": round(median(times) / median(reads), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        })


VARIANTS = ("as_given", "thin", "feet_first", "crop_L4", "noise35", "grid512", "j2k_T11_T12", "cta_thorax")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for name in args.variants:
        queue = context.Queue()
        proc = context.Process(target=_run_variant, args=(name, args.repeats, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(_format(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def _format(row: dict) -> str:
    dices = " ".join(f"{k} {row['dice_median'][k]:.3f} (min {row['dice_min'][k]:.3f})" for k in row["dice_median"])
    levels = " ".join(f"{k}:{v}" for k, v in row["levels"].items())
    wholes = " ".join(f"{k} {v:.3f}" for k, v in row["dice_whole_median"].items())
    return (f"{row['variant']:12} {'x'.join(map(str, row['shape'])):>12}  {row['seconds']:5.2f} s "
            f"(x{row['x_read']} read)  {row['peak_rss_mib']:5d} MiB  evaluable {row['evaluable']}  "
            f"femur {row['femur']}\n    Dice: {dices or '-'}\n    whole-vertebra Dice (no target): {wholes or '-'}"
            f"\n    levels: {levels or '-'}")


if __name__ == "__main__":
    main()
