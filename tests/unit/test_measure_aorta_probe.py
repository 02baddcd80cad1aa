"""The aorta probe (contrast phase before the analysis) on the shared real CTs and contrast-phase variants.

The variants raise the example CT's aortic lumen (reference mask, used only to
build them) to portal-venous and arterial attenuation, keeping its noise.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from osteonode.config import SelectionSettings
from osteonode.ctseries import write_ct_series
from osteonode.measure.aorta_probe import probe_aorta, probe_aorta_hu, read_probe_volume
from osteonode.measure.contrast import classify_phase
from osteonode.series import describe_series, rank_series
from osteonode.volume import Volume
from tests.conftest import require_data
from tests.ctdata import ABDOMEN, CONTRAST_EDITS, CTA, DATA, REF_AORTA, contrast_variant, example_labels_v1


@pytest.fixture(scope="module")
def labels(volume) -> np.ndarray:
    """Reference labels of the example CT (aorta, bowel), only to build the variants."""
    require_data(ABDOMEN / "ref_v1_multilabel_seg.nii.gz")
    labels = example_labels_v1()
    assert labels.shape == volume.shape
    return labels


def _variant(volume: Volume, labels: np.ndarray, lumen_hu: float | None, edit: str | None = None) -> Volume:
    return Volume(contrast_variant(volume.hu, labels, lumen_hu, edit), volume.affine)


@pytest.mark.parametrize("lumen_hu, phase", [(None, "non_contrast"), (180.0, "portal_venous"), (320.0, "arterial")])
def test_phase_of_the_example_ct_and_its_contrast_variants(volume, labels, lumen_hu, phase):
    variant = _variant(volume, labels, lumen_hu)
    probe = probe_aorta(variant)
    assert probe is not None and classify_phase(probe.hu).phase == phase
    assert probe.enhanced == (lumen_hu is not None)
    truth = float(np.median(variant.hu[labels == REF_AORTA]))
    # enhanced: the lumen itself (within 15 HU); plain: only an upper bound of blood, below the 80 HU band
    assert abs(probe.hu - truth) <= 15.0 if lumen_hu is not None else truth <= probe.hu < 80.0


@pytest.mark.parametrize("edit", CONTRAST_EDITS)
def test_dense_structures_never_make_a_plain_ct_enhanced(volume, labels, edit):
    """Non-contrast with low-dose noise, positive oral contrast or wall calcium: non-contrast or not confident."""
    probe = probe_aorta(_variant(volume, labels, None, edit))
    assert probe is None or (not probe.enhanced and probe.hu < 80.0)


@pytest.mark.parametrize("edit, lumen_hu, phase", [("noise SD 40 HU", 320.0, "arterial"),
                                                   ("oral contrast in the bowel", 180.0, "portal_venous"),
                                                   ("calcified aortic wall", 320.0, "arterial")])
def test_enhanced_lumen_found_despite_noise_bowel_contrast_or_calcium(volume, labels, edit, lumen_hu, phase):
    probe = probe_aorta(_variant(volume, labels, lumen_hu, edit))
    assert probe is not None and probe.enhanced and classify_phase(probe.hu).phase == phase


@pytest.mark.parametrize("lumen_hu", [180.0, 320.0])
def test_an_enhanced_aorta_lying_on_the_spine_is_never_called_plain(volume, labels, lumen_hu):
    """The lumen merges with the front of the bodies: enhanced, or not confident (the description ranks)."""
    probe = probe_aorta(_variant(volume, labels, lumen_hu, "aorta against the spine"))
    assert probe is None or (probe.enhanced and probe.hu >= 150.0)


@pytest.mark.integration  # reads the shared CT without a fixture
def test_real_contrast_ct_angiography():
    """The thoracic CTA crop (contrast, 1.5 mm): the descending aorta beside T12 is found, arterial."""
    probe = probe_aorta(Volume.from_sitk(sitk.ReadImage(str(require_data(CTA)))))
    assert probe is not None and probe.enhanced and classify_phase(probe.hu).phase == "arterial"


def test_real_contrast_dicom_series(j2k_series):
    """The JPEG 2000 series (contrast applied, T11-T12): the probe reads the files; its HU is the reference's."""
    image = sitk.ReadImage([str(p) for p in j2k_series])
    labels = sitk.ReadImage(str(require_data(DATA / "totalseg-example-dicom" / "ref_v2_multilabel_seg.nii.gz")))
    reference = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)  # by position
    truth = float(np.median(sitk.GetArrayFromImage(image)[sitk.GetArrayFromImage(reference) == 52]))  # v2 aorta
    probe = probe_aorta_hu(j2k_series)
    assert probe is not None and probe.enhanced and abs(probe.hu - truth) <= 15.0


def test_enhanced_ct_multiframe_series(abdomen_series, tmp_path):
    """One Legacy Converted Enhanced CT file of the example: loaded whole, same answer as the single frames."""
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in abdomen_series], series_instance_uid=pydicom.uid.generate_uid(),
        series_number=9, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    probe = probe_aorta_hu([tmp_path / "enhanced.dcm"])
    assert probe is not None and not probe.enhanced and probe.hu < 80.0


def test_nothing_found_without_a_spine():
    """A water cylinder: no column, no aorta: None (the ranking then uses the description)."""
    z, y, x = np.mgrid[0:40, 0:120, 0:120]
    hu = np.where((y - 60) ** 2 + (x - 60) ** 2 < 50 ** 2, 0.0, -1000.0).astype(np.float32)
    assert probe_aorta(Volume(hu, np.diag([3.0, 2.0, 2.0, 1.0]))) is None


def test_ranking_chooses_the_non_contrast_series_of_a_study(tmp_path, volume, labels):
    """Two series whose descriptions name no phase: the arterial copy (lower series number) and the plain CT."""
    study_uid = pydicom.uid.generate_uid()
    folders = {}
    for number, lumen_hu in ((2, 320.0), (3, None)):
        paths = write_ct_series(_variant(volume, labels, lumen_hu).to_sitk(), tmp_path / str(number),
                                study_instance_uid=study_uid, series_description="Abdomen 3.0")
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.SeriesNumber, ds.ConvolutionKernel = number, "B30f"
            ds.save_as(path, enforce_file_format=True)
        folders[number] = paths
    rules = SelectionSettings()
    series = [describe_series(paths, rules) for paths in folders.values()]
    assert [s.series_number for s in rank_series(series, rules).candidates] == [2, 3]  # description only
    ranking = rank_series(series, rules, files_of=lambda info: folders[info.series_number])
    assert [(s.series_number, s.phase) for s in ranking.candidates] == [(3, "non_contrast"), (2, "arterial")]


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (1, 0, 0, 0, 1, 0, 0, 0, -1)])
def test_probe_volume_geometry_follows_the_files(tmp_path, direction):
    """A ramp of HU over LPS position: every coarse voxel holds the ramp at the position its affine gives."""
    size, spacing, origin = (90, 70, 100), (0.7, 0.8, 1.0), (-30.0, 20.0, 400.0)
    index = np.indices(size[::-1], dtype=float)[::-1]  # x, y, z index arrays, (z, y, x) shaped
    lps = (np.tensordot(np.array(direction, float).reshape(3, 3) * spacing, index, axes=1)
           + np.array(origin)[:, None, None, None])
    ramp = lambda p: 2.0 * p[0] - 1.5 * p[1] + 0.5 * p[2]  # noqa: E731 - HU of an LPS position
    image = sitk.GetImageFromArray(np.rint(ramp(lps)).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    files = write_ct_series(image, tmp_path)
    coarse = read_probe_volume(list(reversed(files)))  # file order does not matter
    assert coarse is not None and coarse.shape == (25, 35, 45)  # every 4th of 100 1 mm slices, 2 x 2 mm blocks
    index = np.indices(coarse.shape).reshape(3, -1)
    expected = ramp(coarse.affine[:3, :3] @ index + coarse.affine[:3, 3:4])
    assert np.abs(coarse.hu.reshape(-1) - expected).max() < 1.0
