"""The aorta probe that ranks a study's series by contrast phase: result and time per series.

Usage::

    python bench/aorta_probe.py            # variants of the 3 mm example CT, real contrast CTs, 512 and thin grids
    python bench/aorta_probe.py --runs 5   # more timing runs on the grids

Prints one row per input: the probe's aortic HU (``enhanced`` lumen, or
``plain``: no enhanced vessel beside the spine), the phase of its bands, the
expected phase, and seconds. The 3 mm variants are built from the example CT
with the reference aorta and bowel masks (``tests/ctdata.py``); the probe reads
none of them. The grid rows time :func:`probe_aorta_hu` from the DICOM files
(header pass, slice subset, coarse copy, column tracking, lumen search), as
the ranking does; the median of ``--runs`` runs is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import median, series_512  # noqa: E402

from osteonode.measure.aorta_probe import AortaProbe, probe_aorta, probe_aorta_hu  # noqa: E402
from osteonode.measure.contrast import classify_phase  # noqa: E402
from osteonode.volume import Volume, load_series  # noqa: E402
from tests.ctdata import CONTRAST_EDITS, CTA, J2K_DIR, contrast_variant, example_image, example_labels_v1  # noqa: E402

VARIANTS = [("non-contrast", None, None, "non_contrast"), ("delayed 110 HU", 110.0, None, "delayed"),
            ("portal venous 180 HU", 180.0, None, "portal_venous"), ("arterial 320 HU", 320.0, None, "arterial"),
            *((f"non-contrast + {edit}", None, edit, "non_contrast or none") for edit in CONTRAST_EDITS),
            *((f"arterial 320 HU + {edit}", 320.0, edit,
               "arterial or none" if edit == "aorta against the spine" else "arterial") for edit in CONTRAST_EDITS)]


def _row(name: str, probe: AortaProbe | None, seconds: float, expected: str) -> str:
    if probe is None:
        found, phase = "not confident", "none"
    else:
        found = f"{probe.hu:.0f} HU ({'enhanced' if probe.enhanced else 'plain'}, {probe.slices} slices)"
        phase = classify_phase(probe.hu).phase
    return f"| {name} | {found} | {phase} | {expected} | {seconds:.2f} |"


def _timed(function, *args) -> tuple[AortaProbe | None, float]:
    start = time.perf_counter()
    probe = function(*args)
    return probe, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timing runs on the 512 and thin grids")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}\n")
    print("| input | aorta probe | phase | expected | s |\n| --- | --- | --- | --- | --- |")
    volume = Volume.from_sitk(example_image())
    labels = example_labels_v1()
    for name, lumen_hu, edit, expected in VARIANTS:
        variant = Volume(contrast_variant(volume.hu, labels, lumen_hu, edit), volume.affine)
        print(_row(f"example 3 mm, {name}", *_timed(probe_aorta, variant), expected), flush=True)
    cta = Volume.from_sitk(sitk.ReadImage(str(CTA)))
    print(_row("thoracic CTA crop 1.5 mm (real contrast)", *_timed(probe_aorta, cta), "arterial"))
    j2k = load_series(sorted(J2K_DIR.iterdir())).volume
    print(_row("JPEG 2000 series T11-T12 (real contrast, aorta 151 HU)", *_timed(probe_aorta, j2k), "portal_venous"))
    with tempfile.TemporaryDirectory() as tmp:
        for grid in ("512", "thin"):
            files = series_512(Path(tmp) / grid, grid)
            runs = [_timed(probe_aorta_hu, files) for _ in range(args.runs)]
            label = f"example on the {grid} grid, {len(files)} DICOM files (median of {args.runs})"
            print(_row(label, runs[0][0], median([s for _, s in runs]), "non_contrast"), flush=True)


if __name__ == "__main__":
    main()
