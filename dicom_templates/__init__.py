"""DICOM coding templates shipped as package data (JSON).

* ``segments.json``: SEG segment labels, SNOMED CT segmented property
  category/type codes (PS3.16 CID 7150 / CID 7151) and display colours.
* ``sr_codes.json``: concept codes of the TID 1500 Measurement Report and the
  private coding scheme that the SR declares (PS3.3 C.12.1.1.2).
* ``algorithm.json``: algorithm identification (PS3.3 C.8.20.2, PS3.16 TID 4019);
  the version is ``osteonode.__version__`` at run time, not stored here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=None)
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
