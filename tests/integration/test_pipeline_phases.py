"""The pipeline writes and publishes the SEG and SR before the key images and the PDF, on real CT."""

from __future__ import annotations

import pytest

from osteonode.pipeline import analyze_files

pytestmark = pytest.mark.integration


def _recorder(out_dir):
    """A ``publish`` callback that records each batch and the files the folder held at that moment."""
    batches = []

    def publish(result, paths):
        batches.append((result.status, [p.name for p in paths], sorted(p.name for p in out_dir.iterdir()),
                        {p.name: p.read_bytes() for p in paths}))
    return batches, publish


def test_seg_and_sr_are_published_before_the_rest_is_written(abdomen_series, tmp_path):
    batches, publish = _recorder(tmp_path)
    result = analyze_files(abdomen_series, tmp_path, publish=publish)
    assert result.status == "ok"
    (status, first, present, sent), (_, second, _, _) = batches
    assert status == "ok" and first == ["seg.dcm", "sr.dcm"]
    assert not {"key_1.dcm", "key_2.dcm", "report.dcm", "labels.nii.gz", "radiomics.csv"} & set(present), present
    assert second == ["key_1.dcm", "key_2.dcm", "report.dcm"]
    # the SEG and SR sent first are the final ones: the follow-up phase does not rewrite them
    assert all((tmp_path / name).read_bytes() == data for name, data in sent.items())
    assert {"encode", "labels", "key_images", "pdf"} <= set(result.timings_s)
    assert "radiomics" not in result.timings_s and result.radiomics_file is None  # no model, no export


def test_a_not_evaluable_series_publishes_its_sr_then_its_pdf(j2k_series, tmp_path):
    batches, publish = _recorder(tmp_path)
    result = analyze_files(j2k_series, tmp_path, publish=publish)
    assert result.status == "not_evaluable"
    assert [(status, names) for status, names, _, _ in batches] == [("not_evaluable", ["sr.dcm"]),
                                                                 ("not_evaluable", ["report.dcm"])]
