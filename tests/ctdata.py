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
from scipy import ndimage as ndi

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



def example_labels_v1() -> np.ndarray:
    """TotalSegmentator v1 labels of the example CT, ``(z, y, x)`` on its grid (aorta 7, bowel 55-57)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN / "ref_v1_multilabel_seg.nii.gz")))


#: Edits of :func:`contrast_variant` besides the aortic lumen.
CONTRAST_EDITS = ("noise SD 40 HU", "oral contrast in the bowel", "calcified aortic wall", "aorta against the spine")


def contrast_variant(hu: np.ndarray, labels: np.ndarray, lumen_hu: float | None, edit: str | None = None) -> np.ndarray:
    """A copy of the example CT's ``(z, y, x)`` HU with the aortic lumen at ``lumen_hu`` and one edit.

    The reference labels only build the variant (no method may read them).
    ``lumen_hu``: the lumen is shifted to this median, its noise kept (None:
    unchanged, non-contrast). ``edit`` (one of :data:`CONTRAST_EDITS`): white
    noise of SD 40 HU (seed 11); small bowel, duodenum and colon at 300 HU
    (positive oral contrast); 800 HU plaques on half the aortic wall's
    circumference every other slice; the lumen (at ``lumen_hu``, else 45 HU)
    painted 6 mm further back, over the front of the vertebral bodies (the
    example's array axis 1 runs posterior to anterior), its old place left
    as it was.
    """
    aorta = labels == REF_AORTA
    out = hu.astype(np.float32, copy=True)
    if edit == "aorta against the spine":
        moved = np.roll(aorta, -2, axis=1)  # 2 voxels of 3 mm towards the spine
        noise = np.random.default_rng(11).normal(0.0, 15.0, int(moved.sum()))
        out[moved] = (45.0 if lumen_hu is None else lumen_hu) + noise
        return out
    if lumen_hu is not None:
        out[aorta] += lumen_hu - float(np.median(out[aorta]))
    if edit == "noise SD 40 HU":
        out += np.random.default_rng(11).normal(0.0, 40.0, out.shape).astype(np.float32)
    elif edit == "oral contrast in the bowel":
        out[np.isin(labels, (55, 56, 57))] = 300.0
    elif edit == "calcified aortic wall":
        wall = ndi.binary_dilation(aorta) & ~aorta
        wall[1::2] = False
        wall &= np.indices(wall.shape)[2] < np.median(np.nonzero(aorta)[2])
        out[wall] = 800.0
    elif edit is not None:
        raise ValueError(f"unknown edit {edit!r}")
    return out
