"""`osteonode analyze` on real CT: the four outputs, their geometry and the result.json format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from services import dciodvfy

from tests.conftest import DATA, require_data

pytestmark = pytest.mark.integration


def _analyze(series, out, *options):
    return subprocess.run([sys.executable, "-m", "osteonode", "analyze", str(series[0].parent), "--out", str(out),
                           *options], capture_output=True, text=True, timeout=600)


def test_converted_real_ct_is_a_clean_ct_image_series(abdomen_series):
    ds = pydicom.dcmread(abdomen_series[0])
    assert (ds.BitsAllocated, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (16, 1, -1024.0)
    for path in (abdomen_series[0], abdomen_series[-1]):
        assert dciodvfy(path) == ([], [])


def test_analyze_real_ct_writes_all_outputs(abdomen_series, tmp_path):
    config = tmp_path / "export.toml"
    config.write_text("[analysis]\nradiomics_export = true\n", encoding="utf-8")
    run = _analyze(abdomen_series, tmp_path, "--config", str(config))
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok" and result["reason"] is None
    ct = pydicom.dcmread(abdomen_series[0], stop_before_pixels=True)
    assert result["study_instance_uid"] == ct.StudyInstanceUID
    assert result["series_instance_uid"] == ct.SeriesInstanceUID
    assert {"L1", "L2", "L3", "L4"} <= set(result["levels"])
    for level in result["levels"].values():
        assert 0 <= level["label_confidence"] <= 1
        assert -100 < level["trabecular_hu_mean"] < 600  # plausible trabecular bone
        assert -100 < level["trabecular_hu_median"] < 600
        assert level["trabecular_voxel_count"] > 0 and level["trabecular_roi_volume_mm3"] > 0
    assert result["bone_status"]["category"] in ("normal", "osteopenia", "osteoporosis", "indeterminate")
    assert "Pickhardt" in result["bone_status"]["basis"]
    assert {"load", "segment", "measure", "classify", "encode_sr", "encode_seg", "key_images", "pdf",
            "radiomics"} <= set(result["timings_s"])
    # labels.nii.gz lies on the source CT's voxel grid (the same voxel centres in patient space;
    # the index order may differ), with VerSe IDs
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    source = sitk.ReadImage([str(p) for p in abdomen_series])
    assert sorted(labels.GetSize()) == sorted(source.GetSize())
    def corners(im):
        return sorted(tuple(np.round(im.TransformIndexToPhysicalPoint(
            [c * (n - 1) for c, n in zip(corner, im.GetSize())]), 2)) for corner in np.ndindex(2, 2, 2))

    assert corners(labels) == corners(source)
    on_source = sitk.Resample(labels, source, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(np.sort(sitk.GetArrayFromImage(on_source).ravel()),
                                  np.sort(sitk.GetArrayFromImage(labels).ravel()))
    ids = set(np.unique(sitk.GetArrayFromImage(labels))) - {0}
    assert {20, 21, 22, 23, 90} <= ids <= {18, 19, 20, 21, 22, 23, 24, 25, 26, 90}
    # proximal femurs: the right one segmented, the left (hip implant) excluded with the reason
    femur = result["proximal_femur"]
    assert femur["right"]["status"] == "segmented" and femur["right"]["volume_mm3"] > 0
    assert femur["left"]["status"] == "excluded" and "metal" in femur["left"]["reason"]
    segment_labels = {str(s.SegmentLabel) for s in pydicom.dcmread(tmp_path / "seg.dcm").SegmentSequence}
    assert "Right proximal femur" in segment_labels
    # the other outputs of an evaluable series
    for name in ("key_1.dcm", "key_2.dcm", "report.dcm", "radiomics.csv"):
        assert (tmp_path / name).is_file()
    assert result["radiomics_file"] == "radiomics.csv"
    assert result["calibration"]["plausible"] and result["contrast"]["phase"] == "non_contrast"
    assert all(result["levels"][n]["genant_grade"] in (0, 1, 2, 3) for n in ("L1", "L2", "L3", "L4"))
    for name in ("seg.dcm", "sr.dcm", "key_1.dcm", "key_2.dcm", "report.dcm"):
        assert dciodvfy(tmp_path / name) == ([], [])
    # deterministic outputs: re-analysis yields the same SOP Instance UIDs; by default (no model, no
    # radiomics_export) no radiomics features are extracted
    again = tmp_path / "again"
    assert _analyze(abdomen_series, again).returncode == 0
    for name in ("seg.dcm", "sr.dcm", "key_1.dcm", "key_2.dcm", "report.dcm"):
        assert (pydicom.dcmread(tmp_path / name).SOPInstanceUID == pydicom.dcmread(again / name).SOPInstanceUID)
    default = json.loads((again / "result.json").read_text())
    assert not (again / "radiomics.csv").exists() and default["radiomics_file"] is None
    assert "radiomics" not in default["timings_s"]
    assert default["bone_status"] == result["bone_status"]


def test_analyze_jpeg2000_t11_t12_is_not_evaluable(j2k_series, tmp_path):
    run = _analyze(j2k_series, tmp_path)
    assert run.returncode == 3, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "not_evaluable" and result["reason"]
    assert result["bone_status"]["category"] == "indeterminate"
    assert not (tmp_path / "seg.dcm").exists()
    assert dciodvfy(tmp_path / "sr.dcm")[0] == []


def test_analyze_with_an_imported_totalsegmentator_label_map(abdomen_series, tmp_path):
    label_map = require_data(DATA / "totalseg-example-abdomen" / "ref_v1_multilabel_seg.nii.gz")
    run = _analyze(abdomen_series, tmp_path, "--segmentation", str(label_map))
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert "imported TotalSegmentator label map" in result["labelling_method"]
    assert {"L1", "L2", "L3", "L4"} <= set(result["levels"])
    assert result["proximal_femur"]["right"]["status"] == "segmented"
    assert dciodvfy(tmp_path / "seg.dcm") == ([], [])


def test_analyze_a_study_folder_chooses_the_series_by_the_rules(study, tmp_path):
    """A folder with a localizer, the arterial copy and the soft series (mixed files): the soft one is used."""
    folder = tmp_path / "study"
    folder.mkdir()
    for role in ("localizer", "arterial", "soft"):
        for path in study[role]:
            (folder / f"{role}-{path.name}").write_bytes(path.read_bytes())
    run = subprocess.run([sys.executable, "-m", "osteonode", "analyze", str(folder), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    soft = pydicom.dcmread(study["soft"][0], stop_before_pixels=True)
    assert result["series_instance_uid"] == soft.SeriesInstanceUID
    assert result["series_selection"]["used"] == {"series_number": 2, "description": "Abdomen 3.0 B30f",
                                                  "kernel": "B30f", "slice_thickness_mm": 3.0}
    assert [s["series_number"] for s in result["series_selection"]["not_used"]] == [5, 1]
