"""The one palette (``segments.json`` colours via :mod:`osteonode.dicom_out.palette`): distinct, and shared.

* every pair of structure colours differs by CIE76 ΔE*ab > 30 (neighbouring
  levels, the pairs a reader must tell apart, by far more than 20), and each
  ROI tint is visibly lighter than its body colour (ΔE > 8);
* the SEG's Recommended Display CIELab Value (0062,000D) of each body and ROI
  segment is the palette colour, encoded as PS3.3 C.10.7.1.1 scales it;
* the key images draw each body outline and ROI outline in those same colours;
* the ROI segments are coded Tissue / Bone with the vertebra as Anatomic Region.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_dicom_out import BANNER, DIRECTIONS, make_case, make_result

import dicom_templates
from osteonode.dicom_out import build_key_images, build_seg, palette
from osteonode.dicom_out.keyimage import VIEWS, body_centre_lps, render_view

STRUCTURES = list(dicom_templates.load("segments")["segments"])
LEVELS = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "L6", "sacrum"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("palette"), DIRECTIONS["axial_hfs"])


def test_every_pair_of_structure_colours_is_distinct():
    differences = {(a, b): palette.delta_e76(palette.level_rgb(a), palette.level_rgb(b))
                   for a, b in itertools.combinations(STRUCTURES, 2)}
    assert min(differences.values()) > 30, min(differences.items(), key=lambda item: item[1])
    for upper, lower in zip(LEVELS, LEVELS[1:]):  # neighbouring levels
        assert differences[(upper, lower)] > 20
    for level in LEVELS:
        assert palette.delta_e76(palette.level_rgb(level), palette.roi_rgb(level)) > 8  # visibly lighter


def test_delta_e76_and_cielab_encoding():
    assert palette.delta_e76((0, 0, 0), (255, 255, 255)) == pytest.approx(100.0, abs=0.01)
    # PS3.3 C.10.7.1.1: L* 0..100 -> 0..65535, a*/b* -128..127 -> 0..65535 (a* = b* = 0 -> 0x8080 = 32896);
    # sRGB white is the D65 white point up to rounding in highdicom's matrices.
    np.testing.assert_allclose(palette.cielab((255, 255, 255)).value, (65535, 32896, 32896), atol=4)
    assert palette.cielab((0, 0, 0)).value == (0, 32896, 32896)
    assert palette.roi_rgb("L1") == tuple(round(c + 0.3 * (255 - c)) for c in palette.level_rgb("L1"))


def test_seg_colours_are_the_palette_and_roi_segments_are_coded(case):
    seg = build_seg(case.series, case.segmentation)
    by_label = {str(item.SegmentLabel): item for item in seg.SegmentSequence}
    assert list(by_label) == ["L1 vertebra", "L2 vertebra", "L3 vertebra",
                              "L1 trabecular ROI", "L2 trabecular ROI", "L3 trabecular ROI"]
    vertebra_codes = {"L1": "66794005", "L2": "14293000", "L3": "36470004"}
    for level, code in vertebra_codes.items():
        body, roi = by_label[f"{level} vertebra"], by_label[f"{level} trabecular ROI"]
        assert tuple(body.RecommendedDisplayCIELabValue) == palette.cielab(palette.level_rgb(level)).value
        assert tuple(roi.RecommendedDisplayCIELabValue) == palette.cielab(palette.roi_rgb(level)).value
        category, kind = roi.SegmentedPropertyCategoryCodeSequence[0], roi.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
            "85756007", "SCT", "Tissue")
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("3138006", "SCT", "Bone")
        assert [(r.CodeValue, r.CodingSchemeDesignator) for r in roi.AnatomicRegionSequence] == [(code, "SCT")]
        assert roi.TrackingID == f"Trabecular bone ROI of the {level} vertebral body"
        assert roi.TrackingUID != body.TrackingUID


def _colour_pixels(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 3) -> int:
    """Pixels of ``image`` within ``tolerance`` (each channel) of ``rgb``."""
    return int((np.abs(image.astype(int) - rgb).max(axis=-1) <= tolerance).sum())


def test_key_images_draw_outlines_in_the_palette_colours(case):
    result = make_result(case.series)
    volume = case.series.volume
    for view in VIEWS:
        centre = body_centre_lps(volume, case.segmentation.bodies, None if view == "sagittal" else 21)
        pixels = render_view(case.series, case.segmentation, result, view, centre, "test", BANNER)
        panel = pixels[:, :600]  # the image panel, left of the side panel
        levels = ("L1", "L2", "L3") if view == "sagittal" else ("L2",)
        for level in levels:
            assert _colour_pixels(panel, palette.level_rgb(level)) > 40, (view, level)
            assert _colour_pixels(panel, palette.roi_rgb(level), tolerance=12) > 10, (view, level)
        # outlines, not fills: the bone inside the L2 body keeps the grey of the CT
        grey = np.abs(panel.astype(int) - panel.mean(axis=-1, keepdims=True)).max(axis=-1) <= 2
        assert grey.mean() > 0.7


def test_key_images_are_1024_pixels_wide(case):
    images = build_key_images(case.series, case.segmentation, make_result(case.series), banner=BANNER)
    assert {(int(image.Rows), int(image.Columns)) for image in images} == {(640, 1024)}
