"""DICOM coding templates shipped as package data (JSON).

* ``segments.json``: SEG segment labels, SNOMED CT segmented property
  category/type codes (PS3.16 CID 7150 / CID 7151) and display colours.
* ``sr_codes.json``: concept codes of the TID 1500 Measurement Report, from
  standard coding schemes only (DCM, SCT, LN, UCUM, UMLS; PS3.16 Section 8).
* ``algorithm.json``: algorithm identification (PS3.3 C.8.20.2, PS3.16 TID 4019),
  General Equipment values and the Series Number of each output; the version
  is ``osteonode.__version__`` at run time, not stored here.
* ``report.json``: texts of the key images and of the PDF report (title,
  method, caveats) and the document title and concept (PS3.16 CID 7000).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def _load_text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """Return the parsed JSON template ``name``.

    Parameters
    ----------
    name : str
        File name inside this package, with or without ``.json``
        (e.g. ``"segments"`` or ``"segments.json"``).

    Returns
    -------
    dict
        A fresh copy of the parsed document (callers may modify it).

    Raises
    ------
    FileNotFoundError
        If no such template is shipped.
    json.JSONDecodeError
        If the file is not valid JSON.
    """
    if not name.endswith(".json"):
        name = f"{name}.json"
    return json.loads(_load_text(name))
