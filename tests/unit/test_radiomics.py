"""Tests of the radiomics presets (validated pyradiomics parameter files) and of the extraction.

Real data: the abdominal CT of ../shared/data/ct (3 mm isotropic) and the same CT
resampled to 0.8 x 0.8 x 1.25 mm (a common thin-slice grid), segmented with the
built-in spine segmentation (``integration``). Time and memory per vertebra are
measured by ``bench/features.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import imageoperations
from scipy import ndimage as ndi

from osteonode.feature_table import FEATURE_TABLE_NAME, META_COLUMNS, read_feature_table, write_feature_table
from osteonode.measure.radiomics import (
    _PYRADIOMICS_BIN_EDGES,
    RadiomicsParamsError,
    _bin_edges,
    _extract_in_workers,
    _LevelCrop,
    _rescale,
    _worker_pool,
    extract_features,
    image_percentiles,
    load_preset,
    start_worker_pool,
)
from osteonode.segment import SpineSegmentation
from osteonode.segment.spine import segment_spine
from osteonode.volume import Volume
from tests.conftest import ABDOMEN_NIFTI, require_data

SHIPPED = Path(__file__).resolve().parents[2] / "dicom_templates" / "radiomics"
SEED003_FEATURES = {
    "original_firstorder_Variance", "original_firstorder_Skewness",
    "original_glcm_JointEnergy", "original_glcm_JointEntropy",
    "original_glrlm_ShortRunEmphasis", "original_glrlm_LongRunEmphasis",
    "original_glrlm_RunLengthNonUniformity", "original_glrlm_RunPercentage",
}
#: seed000 with pyradiomics 3.1: 14 shape + 13 images x (18 first order + 23 GLCM + 16 GLRLM
#: + 16 GLSZM + 14 GLDM + 5 NGTDM); the paper had 1,197.
SEED000_FEATURE_COUNT = 1210


@pytest.fixture(scope="module")
def abdomen() -> tuple[Volume, SpineSegmentation]:
    volume = Volume.from_sitk(sitk.ReadImage(str(require_data(ABDOMEN_NIFTI))))
    return volume, segment_spine(volume)


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, SpineSegmentation]:
    """A small synthetic spine: six textured cylindrical bodies T12-L5 (VerSe 19-24) in soft tissue.

    ``(z, y, x)`` = (66, 40, 40) voxels of 1 mm, z = 0 the most cranial; trabecular ROI = body minus 2 voxels.
    """
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 20.0, (66, 40, 40))
    bodies = np.zeros(hu.shape, np.uint8)
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 12 ** 2
    for i, vertebra in enumerate(range(19, 25)):
        z0 = 2 + 11 * i
        bodies[z0:z0 + 9][:, disc] = vertebra
        hu[z0:z0 + 9][:, disc] = rng.normal(200.0 - 15 * i, 60.0, (9, int(disc.sum())))
    inner = ndi.binary_erosion(bodies > 0, iterations=2)
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]  # (z, y, x) -> LPS; index 0 cranial
    return (Volume(hu=np.round(hu).astype(np.float32), affine=affine),
            SpineSegmentation(bodies=bodies, trabecular=np.where(inner, bodies, 0).astype(np.uint8)))


@pytest.fixture
def params_dir(tmp_path) -> Path:
    """A writable copy of the shipped presets."""
    folder = tmp_path / "radiomics"
    shutil.copytree(SHIPPED, folder)
    return folder


def _feature_names(row: dict) -> list[str]:
    return [k for k in row if k not in META_COLUMNS]


# ---------------------------------------------------------------- presets and parameter files

@pytest.mark.parametrize("name", ["seed000", "seed003", "seed004"])
def test_shipped_presets_validate(name):
    preset, extractor = load_preset(name)
    assert preset.params_file.name == f"{name}.yaml"
    assert len(preset.sha256) == 64
    assert set(preset.levels) <= {"T12", "L1", "L2", "L3", "L4", "L5"}
    if name == "seed000":
        assert set(extractor.enabledImagetypes) == {"Original", "LoG", "Wavelet"}
        assert extractor.enabledImagetypes["LoG"]["sigma"] == [1.0, 1.5, 2.0, 2.5]
        assert preset.levels == ("L1", "L2", "L3", "L4") and preset.roi == "bodies"
        assert (preset.intensity_rescale.lower_percentile, preset.intensity_rescale.upper_percentile) == (0.1, 99.9)
        assert extractor.settings.get("resampledPixelSpacing") is None
    if name == "seed004":
        assert extractor.settings["binWidth"] == 25
        assert extractor.settings["resampledPixelSpacing"] == [1.0, 1.0, 1.0]
        assert extractor.settings["interpolator"] == "sitkBSpline"


def test_presets_are_shipped_as_package_data():
    """pyproject's package-data must carry the presets into a wheel (the lead's pyproject line)."""
    import tomllib
    pyproject = tomllib.loads((SHIPPED.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["dicom_templates"]
    packaged = {path for pattern in patterns for path in SHIPPED.parent.glob(pattern)}  # setuptools' glob rules
    missing = sorted(f.name for f in SHIPPED.iterdir() if f not in packaged)
    assert not missing, f"not in package-data {patterns}: {missing}"


@pytest.mark.parametrize("bad, fragment", [
    ("  glcm: [JointEnergy, NoSuchFeature]\n", "NoSuchFeature"),
    ("  binWidth: -25\n", "binWidth"),
    ("  interpolator: sitkCubicOfCourse\n", "sitkCubicOfCourse"),
    ("  binWidth: [25\n", "seed003.yaml"),
])
def test_invalid_params_file_is_rejected_naming_file_and_fault(params_dir, bad, fragment):
    text = (params_dir / "seed003.yaml").read_text()
    if "glcm" in bad:
        text = text.replace("  glcm: [JointEnergy, JointEntropy]\n", bad)
    else:
        text = text.replace("setting:\n", "setting:\n" + bad)
    (params_dir / "seed003.yaml").write_text(text)
    with pytest.raises(RadiomicsParamsError) as err:
        load_preset("seed003", params_dir)
    assert "seed003.yaml" in str(err.value) and fragment in str(err.value)


def test_unknown_preset_and_bad_preset_entry(params_dir):
    with pytest.raises(RadiomicsParamsError, match="available: seed000, seed003, seed004"):
        load_preset("seed999", params_dir)
    presets = json.loads((params_dir / "presets.json").read_text())
    presets["seed000"]["roi"] = "whole_spine"
    presets["seed003"]["intensity_rescale"] = {"lower_percentile": 99.9, "upper_percentile": 0.1,
                                               "output_min": 0.0, "output_max": 255.0}
    (params_dir / "presets.json").write_text(json.dumps(presets))
    with pytest.raises(RadiomicsParamsError, match="roi must be one of"):
        load_preset("seed000", params_dir)
    with pytest.raises(RadiomicsParamsError, match="lower_percentile < upper_percentile"):
        load_preset("seed003", params_dir)


# ---------------------------------------------------------------- extraction on the real CT

def test_seed003_yields_exactly_the_eight_features(phantom):
    rows = extract_features(*phantom, "seed003")
    assert [r["level"] for r in rows] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    for row in rows:
        assert set(_feature_names(row)) == SEED003_FEATURES
        assert all(math.isfinite(row[k]) for k in SEED003_FEATURES)
        assert row["preset"] == "seed003" and row["roi"] == "bodies"
    # after 1 mm isotropic resampling the run percentage is a fraction, the variance positive
    assert all(0 < r["original_glrlm_RunPercentage"] <= 1 and r["original_firstorder_Variance"] > 0 for r in rows)


@pytest.mark.integration
def test_seed000_rows_and_intensity_rescale(abdomen):
    volume, segmentation = abdomen
    rows = extract_features(volume, segmentation, "seed000")
    assert [r["level"] for r in rows] == ["L1", "L2", "L3", "L4"]
    assert [r["vertebra_id"] for r in rows] == [20, 21, 22, 23]
    for row in rows:
        assert len(_feature_names(row)) == SEED000_FEATURE_COUNT
        assert row["roi_voxel_count"] == int(np.sum(segmentation.bodies == row["vertebra_id"]))
        # intensities were mapped to 0..255 before pyradiomics saw them
        assert 0.0 <= row["original_firstorder_Minimum"] < row["original_firstorder_Maximum"] <= 255.0
        assert "original_glcm_SumAverage" not in row and "original_glcm_MCC" in row
    # a study's percentiles place bone high on the 0-255 scale, soft tissue in the middle
    assert all(row["original_firstorder_Mean"] > 128 for row in rows)


@pytest.mark.integration
def test_crop_margin_leaves_seed000_features_unchanged(abdomen, params_dir):
    """The crop to the ROI (+12 mm) gives the features of a much larger crop (45 mm), within 0.5 %."""
    presets = json.loads((params_dir / "presets.json").read_text())
    presets["seed000"]["crop_margin_mm"] = 45.0
    (params_dir / "presets.json").write_text(json.dumps(presets))
    cropped = extract_features(*abdomen, "seed000")
    wide = extract_features(*abdomen, "seed000", params_dir=params_dir)
    for a, b in zip(cropped, wide):
        names = _feature_names(a)
        got, want = np.array([a[k] for k in names]), np.array([b[k] for k in names])
        np.testing.assert_allclose(got, want, rtol=5e-3, atol=1e-9)


@pytest.mark.parametrize("values", [np.array([3.0, 250.0, 17.5, 99.0]), np.array([50.0, 50.0]),
                                    np.array([-1024.0, 3071.0, 0.0]), np.array([25.0, 75.0, 74.9])])
@pytest.mark.parametrize("settings", [{"binWidth": 25}, {"binWidth": 0.5}, {"binCount": 7}, {}])
def test_bin_edges_equal_pyradiomics(values, settings):
    np.testing.assert_array_equal(_bin_edges(values, **settings), _PYRADIOMICS_BIN_EDGES(values, **settings))


@pytest.mark.integration
def test_features_equal_with_pyradiomics_own_bin_edges(abdomen, monkeypatch):
    """The faster bin edges (installed when an extractor is built) change no feature."""
    ours = extract_features(*abdomen, "seed000")
    assert imageoperations.getBinEdges is _bin_edges
    monkeypatch.setattr(imageoperations, "getBinEdges", _PYRADIOMICS_BIN_EDGES)
    theirs = extract_features(*abdomen, "seed000")
    assert ours == theirs


def test_worker_processes_give_the_rows_of_one_process(phantom):
    """Levels extracted in parallel worker processes (billiard forkserver) give exactly the same rows."""
    one = extract_features(*phantom, "seed000")
    assert extract_features(*phantom, "seed000", processes=2) == one
    assert extract_features(*phantom, "seed000", processes=3) == one  # 4 levels on 3 workers: same order


def test_worker_pool_started_in_the_background_is_the_one_used(phantom):
    start_worker_pool(3)
    pool = _worker_pool(3)  # waits for the background start: one pool per size and process
    assert len(extract_features(*phantom, "seed003", processes=3)) == 6
    assert _worker_pool(3) is pool


class _ExitsWhenRead:
    """A cropped image that ends the worker process reading it, as the kernel's OOM killer would."""

    def to_sitk(self, *args):
        os._exit(1)


@pytest.mark.integration  # some 10 s: billiard reports a killed worker after about 10 s
def test_worker_that_dies_gives_a_clear_error_and_the_pool_recovers(phantom):
    preset, _ = load_preset("seed003")
    crop = _LevelCrop(level="L1", voxel_count=100, image=_ExitsWhenRead(), mask=np.ones((3, 3, 3), np.uint8))
    with pytest.raises(RuntimeError, match="radiomics seed003: a worker process died"):
        _extract_in_workers(preset, None, iter([crop]), 2)
    assert len(extract_features(*phantom, "seed003", processes=2)) == 6  # T12-L5, in the same worker pool


def test_processes_must_be_positive(phantom):
    with pytest.raises(ValueError, match="processes must be >= 1"):
        extract_features(*phantom, "seed000", processes=0)


def test_level_missing_from_the_segmentation_is_skipped(phantom):
    volume, segmentation = phantom
    without_l3 = SpineSegmentation(bodies=np.where(segmentation.bodies == 22, 0, segmentation.bodies),
                                   trabecular=segmentation.trabecular)
    rows = extract_features(volume, without_l3, "seed003")
    assert [r["level"] for r in rows] == ["T12", "L1", "L2", "L4", "L5"]


def test_label_map_off_grid_is_rejected(phantom):
    volume, segmentation = phantom
    small = SpineSegmentation(bodies=segmentation.bodies[1:], trabecular=segmentation.trabecular[1:])
    with pytest.raises(ValueError, match="label map shape"):
        extract_features(volume, small, "seed003")


# ---------------------------------------------------------------- percentiles, rescale, tables

def test_image_percentiles_equal_numpy_on_integer_hu():
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 3000, size=(37, 41, 43)).astype(np.float32)
    for q in [(0.1, 99.9), (0.0, 100.0), (25.0, 50.0)]:
        assert image_percentiles(hu, q) == tuple(np.percentile(hu, q))


def test_image_percentiles_within_one_hu_on_fractional_values():
    rng = np.random.default_rng(4)
    hu = rng.normal(40.0, 300.0, size=(20, 64, 64)).astype(np.float32)
    got = np.array(image_percentiles(hu, (0.1, 99.9)))
    assert np.all(np.abs(got - np.percentile(hu, (0.1, 99.9))) <= 1.0)


def test_rescale_maps_bounds_to_output_range_and_clips():
    preset, _ = load_preset("seed000")
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=np.float32)
    np.testing.assert_allclose(_rescale(hu, (-1000.0, 1000.0), preset.intensity_rescale),
                               [0.0, 0.0, 127.5, 255.0, 255.0])


def test_feature_table_round_trips_exactly(tmp_path):
    rows = [{"level": lv, "vertebra_id": vid, "preset": "seed003", "preset_sha256": "ab" * 32, "roi": "bodies",
             "roi_voxel_count": 1234 + vid, "original_firstorder_Skewness": 0.1 + vid / 3,
             "original_glrlm_RunPercentage": 1 / 7}
            for lv, vid in (("L1", 20), ("L2", 21))]
    path = tmp_path / "study" / FEATURE_TABLE_NAME
    write_feature_table(rows, path)
    assert read_feature_table(path) == rows
    assert not list(path.parent.glob(".*tmp"))


def test_feature_table_rejects_rows_with_different_columns(tmp_path):
    rows = [{"level": "L1", "a": 1.0}, {"level": "L2", "b": 1.0}]
    with pytest.raises(ValueError, match="different columns"):
        write_feature_table(rows, tmp_path / FEATURE_TABLE_NAME)


@pytest.mark.integration
def test_fractured_levels_get_the_seed003_texture_features(abdomen):
    from osteonode.measure.hu import measure_levels
    from osteonode.measure.radiomics import add_fracture_texture

    volume, segmentation = abdomen
    levels = {name: level.model_copy(update={"fracture_suspected": name == "L2"})
              for name, level in measure_levels(volume, segmentation).items()}
    out = add_fracture_texture(levels, volume, segmentation)
    assert set(out["L2"].fracture_texture) == SEED003_FEATURES
    assert all(out[name].fracture_texture is None for name in out if name != "L2")
    unfractured = {name: level.model_copy(update={"fracture_suspected": False}) for name, level in levels.items()}
    assert add_fracture_texture(unfractured, volume, segmentation) == unfractured
