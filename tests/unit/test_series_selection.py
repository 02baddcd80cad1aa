"""Series selection rules: header summaries, candidate rules and ranking (pure functions, no services)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, SecondaryCaptureImageStorage

from osteonode.config import SelectionSettings
from osteonode.measure import aorta_probe
from osteonode.series import (
    aortic_attenuation,
    axial_deviation_deg,
    contrast_phase,
    describe_headers,
    kernel_class,
    lower_rank_reason,
    rank_series,
)

AXIAL = (1, 0, 0, 0, 1, 0)
CORONAL = (1, 0, 0, 0, 0, -1)
RULES = SelectionSettings()


def _header(number: int, description: str = "Abdomen", *, kernel: str = "B30f", thickness: float = 3.0,
            orientation=AXIAL, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), modality: str = "CT",
            sop_class: str = CTImageStorage, tilt: float | None = None) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SeriesInstanceUID = f"1.2.3.{number}"
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.Modality = modality
    ds.SOPClassUID = sop_class
    ds.ImageType = list(image_type)
    ds.ConvolutionKernel = kernel
    ds.SliceThickness = thickness
    ds.ImageOrientationPatient = list(orientation)
    if tilt is not None:
        ds.GantryDetectorTilt = tilt
    return ds


def _series(number: int, slices: int = 100, **kwargs):
    return describe_headers([_header(number, **kwargs)], RULES, series_dir=f"/spool/s/{number}",
                            instance_count=slices)


@pytest.mark.parametrize("kernel, expected", [
    ("B30f", "soft"), ("Br40d", "soft"), ("I30f", "soft"), ("Qr40", "soft"), ("B60s", "bone"),
    ("B70f", "sharp"), ("Br64", "bone"), ("Bl57", "lung"),
    ("STANDARD", "soft"), ("SOFT", "soft"), ("BONE", "bone"), ("BONEPLUS", "bone"), ("LUNG", "lung"),
    ("A", "soft"), ("B", "soft"), ("C", "soft"), ("D", "bone"), ("L", "lung"), ("YA", "lung"),
    ("FC03", "soft"), ("FC18", "soft"), ("FC30", "bone"), ("FC52", "lung"), ("XYZ", "unknown"), ("", "unknown"),
])
def test_vendor_kernel_table(kernel, expected):
    assert kernel_class(kernel) == expected


@pytest.mark.parametrize("description, phase", [
    ("Abdomen nativ 3.0 B30f", "non_contrast"), ("ABD W/O CONTRAST", "non_contrast"),
    ("Non-contrast abdomen", "non_contrast"), ("Arterial phase 1mm", "arterial"), ("CTA aorta", "arterial"),
    ("Portal venous 3mm", "portal_venous"), ("ABD PV", "portal_venous"), ("Delayed 5 min", "delayed"),
    ("Abdomen 3.0 B30f", "unknown"), ("Partial", "unknown"),  # "art" only as a whole word
])
def test_phase_from_series_description(description, phase):
    assert contrast_phase(description, RULES) == phase


def test_axial_deviation_from_image_orientation():
    assert axial_deviation_deg(AXIAL) == pytest.approx(0.0)
    assert axial_deviation_deg(CORONAL) == pytest.approx(90.0)
    assert axial_deviation_deg((0, 1, 0, 0, 0, -1)) == pytest.approx(90.0)  # sagittal
    assert axial_deviation_deg((1, 0, 0, 0, 0.98480775, 0.17364818)) == pytest.approx(10.0)


def test_candidates_and_rejections_with_reasons():
    study = [
        _series(1, 2, description="Topogram", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        _series(2, description="Abdomen 3.0 B30f"),
        _series(3, description="Coronal MPR", orientation=CORONAL, image_type=("DERIVED", "SECONDARY", "MPR")),
        _series(4, 1, description="Dose screen", sop_class=SecondaryCaptureImageStorage),
        _series(5, description="Abdomen 8 mm", thickness=8.0),
        _series(6, description="Tilted", tilt=12.0),
        _series(7, description="Axial MPR 2 mm", thickness=2.0, image_type=("DERIVED", "SECONDARY", "MPR")),
        _series(8, description="MR", modality="MR"),
    ]
    ranking = rank_series(study, RULES)
    assert [s.series_number for s in ranking.candidates] == [2]
    reasons = {r.series.series_number: r.reason for r in ranking.rejected}
    assert "localizer" in reasons[1]
    assert "not axial (coronal or sagittal" in reasons[3]
    assert "not a CT image (Secondary Capture Image Storage)" in reasons[4]
    assert "8 mm exceeds 5 mm" in reasons[5]
    assert "gantry tilt 12" in reasons[6]
    assert "derived" in reasons[7] and "original axial series exists" in reasons[7]
    assert "not CT (modality MR)" in reasons[8]
    assert list(reasons) == sorted(reasons)


def test_derived_axial_series_is_a_candidate_when_no_original_exists():
    study = [_series(3, description="Axial MPR", image_type=("DERIVED", "SECONDARY", "MPR")),
             _series(4, description="Coronal MPR", orientation=CORONAL, image_type=("DERIVED", "SECONDARY"))]
    ranking = rank_series(study, RULES)
    assert [s.series_number for s in ranking.candidates] == [3]


def test_ranking_kernel_then_phase_then_thickness_then_slices():
    study = [
        _series(10, description="Bone 1.0", kernel="B70f", thickness=1.0),
        _series(11, description="Lung", kernel="Bl57", thickness=1.0),
        _series(12, description="Arterial 3.0", thickness=3.0),
        _series(13, description="Portal venous 3.0", thickness=3.0),
        _series(14, description="Abdomen 3.0", thickness=3.0, slices=100),
        _series(15, description="Abdomen 2.0", thickness=2.0, slices=150),
        _series(16, description="Abdomen 0.6", thickness=0.6, slices=500),
        _series(17, description="Abdomen 2.0 short", thickness=2.0, slices=90),
        _series(18, description="Nativ 5.0", thickness=5.0),
        _series(19, description="Abdomen unknown kernel", kernel="XR99", thickness=3.0),
    ]
    order = [s.series_number for s in rank_series(study, RULES).candidates]
    # soft first: non-contrast (18), then unknown phase by thickness (2 mm: more slices first), 3 mm, 0.6 mm;
    # then portal venous, arterial; then the unknown kernel; then bone, lung
    assert order == [18, 15, 17, 14, 16, 13, 12, 19, 10, 11]


def test_rules_from_config_change_the_ranking():
    rules = SelectionSettings(kernel_order=["bone", "soft", "unknown", "sharp", "lung"], max_slice_thickness_mm=8.0)
    study = [_series(1, description="Abdomen", kernel="B30f"), _series(2, description="Bone", kernel="B60s"),
             _series(3, description="Thick", thickness=8.0)]
    assert [s.series_number for s in rank_series(study, rules).candidates] == [2, 1, 3]


def test_enhanced_ct_attributes_are_read_from_functional_groups():
    ds = pydicom.Dataset()
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = "1.2.9", 9, "CT"
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = 120
    shared = pydicom.Dataset()
    orientation, measures, reconstruction = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    measures.SliceThickness, measures.PixelSpacing = 2.0, [0.7, 0.7]
    reconstruction.ConvolutionKernel = "Br40"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.CTReconstructionSequence = [reconstruction]
    ds.SharedFunctionalGroupsSequence = [shared]
    info = describe_headers([ds], RULES)
    assert (info.slice_count, info.slice_thickness_mm, info.kernel, info.kernel_class) == (120, 2.0, "Br40", "soft")
    assert info.axial_deviation_deg == pytest.approx(0.0)
    assert rank_series([info], RULES).candidates == [info]


def _probe_by_folder(monkeypatch, aorta_hu: dict[str, float | None]) -> list[str]:
    """Replace the aorta probe by a table (folder -> HU, None: not confident); returns the folders probed."""
    probed: list[str] = []

    def probe(files):
        folder = str(files[0])
        probed.append(folder)
        hu = aorta_hu[folder]
        if hu is None:
            return None
        return aorta_probe.AortaProbe(hu=hu, slices=10, length_mm=80.0, enhanced=hu >= 80.0)

    monkeypatch.setattr(aorta_probe, "probe_aorta_hu", probe)
    aortic_attenuation.cache_clear()
    return probed


def test_measured_aortic_attenuation_ranks_phases_the_description_leaves_open(monkeypatch):
    study = [_series(2, description="Abdomen 3.0"), _series(3, description="Abdomen 3.0"),
             _series(4, description="Abdomen 3.0"), _series(5, description="Nativ 3.0"),
             _series(6, description="Bone", kernel="B60f")]
    probed = _probe_by_folder(monkeypatch, {"/spool/s/2": 320.0, "/spool/s/3": 190.0, "/spool/s/4": 45.0})
    ranking = rank_series(study, RULES, files_of=lambda info: [info.series_dir])
    # 5 is non-contrast by its description (not probed), 4 measured non-contrast (then series number);
    # portal venous before arterial
    assert [s.series_number for s in ranking.candidates] == [4, 5, 3, 2, 6]
    assert sorted(probed) == ["/spool/s/2", "/spool/s/3", "/spool/s/4"]  # the bone series has no rival: not probed
    phases = {s.series_number: (s.phase, s.aorta_hu) for s in ranking.candidates}
    assert phases == {5: ("non_contrast", None), 4: ("non_contrast", 45.0), 3: ("portal_venous", 190.0),
                      2: ("arterial", 320.0), 6: ("unknown", None)}


def test_without_a_confident_probe_the_description_ranks(monkeypatch):
    study = [_series(2, description="Abdomen 3.0"), _series(3, description="Abdomen 3.0")]
    _probe_by_folder(monkeypatch, {"/spool/s/2": None, "/spool/s/3": 45.0})
    ranking = rank_series(study, RULES, files_of=lambda info: [info.series_dir])
    assert [(s.series_number, s.phase) for s in ranking.candidates] == [(3, "non_contrast"), (2, "unknown")]
    _probe_by_folder(monkeypatch, {"/spool/s/2": None, "/spool/s/3": None})
    assert [s.series_number for s in rank_series(study, RULES, files_of=lambda i: [i.series_dir]).candidates] == [2, 3]


def test_probe_failure_or_switch_off_means_not_measured(monkeypatch):
    study = [_series(2, description="Abdomen 3.0"), _series(3, description="Abdomen 3.0")]

    def broken(files):
        raise OSError("disk gone")

    monkeypatch.setattr(aorta_probe, "probe_aorta_hu", broken)
    aortic_attenuation.cache_clear()
    ranking = rank_series(study, RULES, files_of=lambda info: [info.series_dir])
    assert [(s.series_number, s.phase, s.aorta_hu) for s in ranking.candidates] == [(2, "unknown", None),
                                                                                     (3, "unknown", None)]
    probed = _probe_by_folder(monkeypatch, {"/spool/s/2": 320.0, "/spool/s/3": 45.0})
    rank_series(study, SelectionSettings(phase_from_aorta=False), files_of=lambda info: [info.series_dir])
    assert probed == []


def test_lower_rank_reason_names_the_deciding_rule(monkeypatch):
    used = _series(4, description="Abdomen 3.0").model_copy(update={"phase": "non_contrast", "aorta_hu": 45.0})
    arterial = _series(2, description="Abdomen arterial 3.0")
    assert lower_rank_reason(arterial, used, RULES) == (
        "ranked lower than the series used: contrast phase arterial (series description), "
        "the series used non-contrast (aortic attenuation 45 HU)")
    assert lower_rank_reason(_series(6, kernel="B60f"), used, RULES) == (
        "ranked lower than the series used: kernel class bone, the series used soft")
    same_phase = used.model_copy(update={"series_number": 7, "slice_thickness_mm": 0.6})
    assert lower_rank_reason(same_phase, used, RULES) == (
        "ranked lower than the series used: slice thickness 0.6 mm, the series used 3 mm")
    assert lower_rank_reason(used.model_copy(update={"series_number": 8}), used, RULES) == (
        "ranked lower than the series used")


def test_a_series_ranked_again_with_the_same_files_is_not_probed_again(monkeypatch):
    study = [_series(2, description="Abdomen 3.0"), _series(3, description="Abdomen 3.0")]
    probed = _probe_by_folder(monkeypatch, {"/spool/s/2": 320.0, "/spool/s/3": 45.0})
    for _ in range(3):
        ranking = rank_series(study, RULES, files_of=lambda info: [info.series_dir])
    assert [s.series_number for s in ranking.candidates] == [3, 2] and sorted(probed) == ["/spool/s/2", "/spool/s/3"]
    rank_series(study, RULES, files_of=lambda info: [info.series_dir, "/spool/s/new-instance"])
    assert len(probed) == 4  # other files: measured again
