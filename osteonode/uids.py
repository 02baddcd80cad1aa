"""Deterministic UIDs for everything osteonode writes.

Every output UID is derived from the algorithm version and the exact set of
input instances (:func:`input_key`: the Series Instance UID and the sorted SOP
Instance UIDs of the analysed series), never from a clock or a random source
(``2.25.<uuid>`` form, PS3.5 B.2). So:

* identical inputs give identical objects: a job delivered twice, or a study
  re-sent unchanged, yields the same instances, which the PACS stores once;
* different inputs (instances added to or missing from the series, another
  series of the study analysed) or a new version give new Series and SOP
  Instance UIDs: the new objects supersede the earlier ones instead of
  colliding with them (:mod:`osteonode.lineage`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

import pydicom
from pydicom.uid import UID

from osteonode import __version__


def input_key(source: Sequence[pydicom.Dataset]) -> str:
    """Identify the exact set of input instances: SHA-256 of the series and its sorted SOP Instance UIDs.

    Parameters
    ----------
    source : sequence of pydicom.Dataset
        The analysed instances (headers suffice), in any order.

    Returns
    -------
    str
        64 hex digits; the same for the same instances in any order.

    Raises
    ------
    ValueError
        If ``source`` is empty.
    """
    if not source:
        raise ValueError("no source instance")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in source})
    instances = sorted(str(ds.get("SOPInstanceUID", "")) for ds in source)
    return hashlib.sha256("\n".join([*series, "", *instances]).encode()).hexdigest()


def derived_uid(key: str, role: str, version: str = __version__) -> UID:
    """Return a UID that depends only on the input instances, the output role and the version.

    Parameters
    ----------
    key : str
        :func:`input_key` of the analysed instances.
    role : str
        What the UID identifies, e.g. ``"seg-series"``, ``"sr-instance"``.
    version : str
        Algorithm version; a new version yields new instances.

    Returns
    -------
    pydicom.uid.UID
        A ``2.25.`` UID (PS3.5 B.2) of at most 64 characters, from a name-based
        (SHA-1, RFC 4122 version 5) UUID.
    """
    name = "\\".join(("osteonode", version, key, role))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


#: Fixed namespace of osteonode's name-based UUIDs (itself a UUID5 of the project name).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:osteonode")
