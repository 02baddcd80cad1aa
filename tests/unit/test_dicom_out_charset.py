"""Specific Character Set: the patient's name survives into every output, and dciodvfy stays clean.

Each output keeps the source's character set when it can encode every text
of the output, and is UTF-8 (ISO_IR 192) otherwise
(:func:`osteonode.dicom_out.common.settle_character_set`).
"""

from __future__ import annotations

import warnings

import pydicom
import pytest
from test_dicom_out import BANNER, DIRECTIONS, all_outputs, assert_valid, make_case, make_result, pdf_document, pdf_text

from osteonode.dicom_out import build_key_images, build_sr, render, summary
from osteonode.dicom_out.common import settle_character_set
from osteonode.result import AnalysisResult

#: (source Specific Character Set, Patient's Name, Study Description, expected output character set).
CASES = {
    "utf8": ("ISO_IR 192", "Łukasz^Müller=山田^太郎", "Ganzkörper ½", "ISO_IR 192"),
    "latin1": ("ISO_IR 100", "Müller^Jürgen", "Abdomen nativ", "ISO_IR 100"),
    "iso2022_japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "CT", "ISO_IR 192"),
    "default": (None, "DOE^JOHN", "CT ABDOMEN", None),
}


def _source(tmp_path, charset, name, description):
    """The phantom CT with this name and study description in ``charset`` (``None``: no (0008,0005))."""
    return make_case(tmp_path, DIRECTIONS["axial_hfs"], header_updates={
        "SpecificCharacterSet": charset, "PatientName": name, "StudyDescription": description})


@pytest.mark.integration
@pytest.mark.parametrize("key", sorted(CASES))
def test_patient_name_survives_into_every_output(tmp_path, key):
    charset, name, description, expected = CASES[key]
    case = _source(tmp_path, charset, name, description)
    source = pydicom.dcmread(case.files[0])
    assert str(source.PatientName) == name  # the source file itself decodes as intended
    for output, ds in all_outputs(case, make_result(case.series)).items():
        path = assert_valid(ds, tmp_path / f"{output}.dcm")
        back = pydicom.dcmread(path)
        assert back.get("SpecificCharacterSet") == expected, output
        assert str(back.PatientName) == name, output
        assert back.StudyDescription == description, output


@pytest.mark.integration
def test_latin1_source_with_a_text_outside_latin1_gives_utf8(tmp_path):
    case = _source(tmp_path, "ISO_IR 100", "Müller^Jürgen", "Abdomen")
    reason = "slice thickness ≥ 5 mm"
    result = AnalysisResult.not_evaluable(reason, case.series.study_instance_uid, case.series.series_instance_uid)
    path = assert_valid(build_sr(case.series, result, None), tmp_path / "sr.dcm")
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Müller^Jürgen"
    texts = [item.TextValue for item in back.ContentSequence[-1].ContentSequence if item.ValueType == "TEXT"]
    assert any(reason in text for text in texts)


def test_settle_keeps_or_replaces_the_character_set():
    source = pydicom.Dataset()
    source.SpecificCharacterSet = "ISO_IR 100"
    output = pydicom.Dataset()
    output.SpecificCharacterSet = "ISO_IR 192"
    output.PatientName = "Müller^Jürgen"
    settle_character_set(output, source)
    assert output.SpecificCharacterSet == "ISO_IR 100"
    output.PatientName = "Łukasz^Müller"  # Ł is not in Latin-1
    settle_character_set(output, source)
    assert output.SpecificCharacterSet == "ISO_IR 192"
    del source.SpecificCharacterSet
    output.PatientName = "DOE^JOHN"
    settle_character_set(output, source)
    assert "SpecificCharacterSet" not in output


def test_display_name_uses_the_alphabetic_group():
    name = pydicom.valuerep.PersonName("Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert summary.display_name(name) == "Yamada, Tarou"
    assert summary.display_name("=山田^太郎") == "山田 太郎"
    assert summary.display_name("") == summary.NA


@pytest.mark.integration
def test_rendered_name_has_every_glyph(tmp_path):
    """A Latin-extended UTF-8 name is drawn with real glyphs in the key images and the PDF."""
    case = _source(tmp_path, "ISO_IR 192", "Łukasz^Müller", "Ganzkörper")
    result = make_result(case.series)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_key_images(case.series, case.segmentation, result, banner=BANNER)
    assert [str(w.message) for w in caught if "missing from font" in str(w.message)] == []
    text = pdf_text(pdf_document(all_outputs(case, result)["pdf"]), tmp_path)
    assert "Patient: Łukasz, Müller" in text
    assert "Study: " in text and "Ganzkörper" in text


@pytest.mark.parametrize("fallbacks", ["installed", "none"])
def test_characters_without_a_font_are_replaced_not_warned(tmp_path, monkeypatch, fallbacks):
    """A CJK-only name draws with a fallback font when one is installed, else as "?"; never a warning."""
    if fallbacks == "none":
        monkeypatch.setattr(render, "_installed_fallbacks", lambda: ())
        assert render.drawable("山田 太郎") == ("?? ??", ["DejaVu Sans"])
    text, families = render.drawable("Ab\U0010FFFD")
    assert (text, families[0]) == ("Ab?", "DejaVu Sans")
    case = _source(tmp_path, "ISO_IR 192", "=山田^太郎", "CT")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_key_images(case.series, case.segmentation, make_result(case.series), banner=BANNER)
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
