"""The shared real CT of ``../shared/data/ct`` (never copied into the repository) and its reference masks.

Used by the tests' fixtures and by ``bench/``. Nothing here needs pytest; a
test that reads these files is ``integration`` (``tests/conftest.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(os.environ.get("OSTEONODE_TEST_DATA",
                           Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"))
ABDOMEN = DATA / "totalseg-example-abdomen"
ABDOMEN_NIFTI = ABDOMEN / "example_ct.nii.gz"
J2K_DIR = DATA / "totalseg-example-dicom" / "dicom"
CTA = DATA / "totalseg-thoracic-cta-crop" / "ct_cropped.nii.gz"
REF_FEMUR_RIGHT = 89  # TotalSegmentator v1 femur_right
REF_AORTA = 7  # TotalSegmentator v1 aorta
REFERENCE_FILES = ("example_ct.nii.gz", "ref_v2_spine_vertebrae.nii.gz", "ref_v2_vertebrae_body.nii.gz",
                   "ref_v1_multilabel_seg.nii.gz")


@dataclass(frozen=True)
class References:
    """Reference masks (TotalSegmentator output) of the example CT on the reference grid ``(z, y, x)``."""

    image: sitk.Image  # the reference grid
    vertebrae: np.ndarray  # v2 vertebra IDs
    body: np.ndarray  # 1 = vertebral body, 2 = disc
    femur_right: np.ndarray  # bool


def load_references(check: Callable[[Path], Path] = Path) -> References:
    """Read the reference masks of the example CT, passing each file through ``check`` first.

    ``check`` is e.g. the tests' ``require_data``, which fails when a file is missing.
    """
    for name in REFERENCE_FILES:
        check(ABDOMEN / name)
    image = sitk.ReadImage(str(ABDOMEN / "ref_v2_spine_vertebrae.nii.gz"))
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN / "ref_v2_vertebrae_body.nii.gz")))
    v1 = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN / "ref_v1_multilabel_seg.nii.gz")))
    return References(image, sitk.GetArrayFromImage(image), body, v1 == REF_FEMUR_RIGHT)


def example_image() -> sitk.Image:
    """The example CT (3 mm, HU)."""
    return sitk.ReadImage(str(ABDOMEN_NIFTI))


def aorta_mask() -> np.ndarray:
    """The aorta of the example CT (TotalSegmentator v1 reference), ``(z, y, x)`` bool on the example's grid.

    For building contrast-phase variants of the example only; no method may read it.
    """
    return sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN / "ref_v1_multilabel_seg.nii.gz"))) == REF_AORTA
