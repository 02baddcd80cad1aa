"""Conventions shared by every DICOM object osteonode writes.

* Identity: the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1)
  are copied from the first source instance, so every output lands in the
  source study under the source patient. Absent Type 2 attributes are written
  empty, never with a placeholder value.
* Character set (Specific Character Set (0008,0005), PS3.3 C.12.1.1.2,
  PS3.5 6.1): pydicom decodes the source values with the source's character
  set, so values are plain text in memory. An output keeps the source's
  character set when that is a single repertoire without code extensions
  (default, ``ISO_IR 100`` ... ``ISO_IR 192``, ``GB18030``, ``GBK``) and
  encodes every text value of the output, our own texts included; otherwise
  (e.g. an ``ISO 2022 IR 87`` source, or a Latin-1 source and a reason text
  with "≥") the output is UTF-8, ``ISO_IR 192``. Nothing is lost either way,
  and receivers that handle the source study handle the usual case unchanged.
* Equipment and series numbers come from ``dicom_templates/algorithm.json``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import TypedDict

import highdicom as hd
import pydicom
from pydicom.multival import MultiValue

import dicom_templates
from osteonode import __version__
from osteonode.volume import Series

#: Specific Character Set (0008,0005) of UTF-8: the outputs are built in it (see :func:`settle_character_set`).
UTF8 = "ISO_IR 192"

#: Source character sets an output may keep, with the Python codec of their repertoire.
#: An absent or empty value is the default repertoire (ASCII, PS3.5 6.1.2.1).
_KEEPABLE_CHARACTER_SETS = {
    "": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 126": "iso8859_7", "ISO_IR 127": "iso8859_6",
    "ISO_IR 138": "iso8859_8", "ISO_IR 144": "iso8859_5", "ISO_IR 148": "iso8859_9",
    UTF8: "utf_8", "GB18030": "gb18030", "GBK": "gbk",
}
#: Value representations whose values are encoded with the Specific Character Set (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})

#: Type 2 Patient / General Study attributes (PS3.3 C.7.1.1, C.7.2.1) that highdicom reads
#: from the first source dataset without a default.
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                       "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")

#: Type 3 Patient / General Study / Patient Study attributes carried over when the source has
#: them (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2): issuer of the IDs, study description and the
#: de-identification status, so an output of a de-identified study says so too.
OPTIONAL_IDENTITY = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
                     "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                     "StudyDescription", "IssuerOfAccessionNumberSequence", "PatientAge")


def coded(entry: Mapping[str, str]) -> hd.sr.CodedConcept:
    """Return the coded concept of a template entry ``{"value", "scheme", "meaning"}``.

    Raises
    ------
    KeyError
        If the entry lacks one of the three keys.
    """
    return hd.sr.CodedConcept(value=entry["value"], scheme_designator=entry["scheme"],
                              meaning=entry["meaning"])


class EquipmentAttributes(TypedDict):
    """highdicom keyword arguments of the General Equipment module (PS3.3 C.7.5.1)."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


def equipment_attributes() -> EquipmentAttributes:
    """General Equipment module values of every object osteonode writes (PS3.3 C.7.5.1).

    Returns
    -------
    dict
        highdicom keyword arguments ``manufacturer``, ``manufacturer_model_name``,
        ``software_versions`` (``osteonode.__version__``) and ``device_serial_number``.
    """
    algo = dicom_templates.load("algorithm")
    return {"manufacturer": algo["manufacturer"], "manufacturer_model_name": algo["manufacturer_model_name"],
            "software_versions": __version__, "device_serial_number": algo["device_serial_number"]}


def series_number(output: str) -> int:
    """Series Number (0020,0011) of the output series ``output``.

    Parameters
    ----------
    output : str
        ``"seg"``, ``"sr"``, ``"key_images"`` or ``"pdf"``.

    Raises
    ------
    KeyError
        If ``algorithm.json`` has no series number for ``output``.
    """
    return int(dicom_templates.load("algorithm")["series_numbers"][output])


def source_datasets(series: Series | Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source instances' headers of a loaded series, or the given headers.

    Raises
    ------
    ValueError
        If there is no source instance.
    """
    datasets = list(series.datasets if isinstance(series, Series) else series)
    if not datasets:
        raise ValueError("no source instance")
    return datasets


def with_type2_defaults(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Return ``datasets`` with the first one completed by empty Type 2 patient/study attributes.

    highdicom copies the Patient and General Study modules from the first
    source dataset and fails with ``AttributeError`` when a Type 2 attribute is
    absent (common in anonymised data). Absent attributes are added empty (a
    valid Type 2 encoding) to a copy; the caller's datasets are not modified.

    Raises
    ------
    ValueError
        If ``datasets`` is empty.
    """
    if not datasets:
        raise ValueError("no source datasets")
    first = datasets[0]
    missing = [keyword for keyword in TYPE2_PATIENT_STUDY if keyword not in first]
    if not missing:
        return list(datasets)
    first = copy.deepcopy(first)
    for keyword in missing:
        setattr(first, keyword, "")
    return [first, *datasets[1:]]


def _text_values(dataset: pydicom.Dataset) -> Iterator[str]:
    """Every value of ``dataset`` (nested sequences included) that the character set encodes."""
    for element in dataset.iterall():
        if element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            yield from (str(value) for value in values)


def settle_character_set(dataset: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Set the Specific Character Set of the output ``dataset`` built from ``source``.

    Parameters
    ----------
    dataset : pydicom.Dataset
        A complete output instance; its text values are Python strings.
    source : pydicom.Dataset
        The source instance whose Patient and Study modules it carries.

    Notes
    -----
    The source's Specific Character Set is kept when it is one repertoire
    without code extensions and encodes every text value of ``dataset``
    (the default repertoire as ASCII); otherwise the output is UTF-8
    (``ISO_IR 192``). PS3.3 C.12.1.1.2; PS3.5 6.1.
    """
    value = source.get("SpecificCharacterSet") or ""
    terms = [value] if isinstance(value, str) else [str(term) for term in value]
    codec = _KEEPABLE_CHARACTER_SETS.get(terms[0]) if len(terms) == 1 else None
    if codec is not None:
        try:
            for text in _text_values(dataset):
                text.encode(codec)
        except UnicodeEncodeError:
            codec = None
    if codec is None:
        dataset.SpecificCharacterSet = UTF8
    elif terms[0]:
        dataset.SpecificCharacterSet = terms[0]
    elif "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet


def copy_optional_identity(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    """Copy the :data:`OPTIONAL_IDENTITY` attributes that ``source`` has into ``target``.

    Attributes already present in ``target`` are kept. Values are deep-copied.
    """
    for keyword in OPTIONAL_IDENTITY:
        if keyword in source and keyword not in target:
            setattr(target, keyword, copy.deepcopy(source[keyword].value))


__all__ = ["UTF8", "settle_character_set", "TYPE2_PATIENT_STUDY", "OPTIONAL_IDENTITY", "coded", "equipment_attributes",
           "series_number", "source_datasets", "with_type2_defaults", "copy_optional_identity"]
