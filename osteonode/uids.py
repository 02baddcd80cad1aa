"""Deterministic UIDs for everything osteonode writes.

A job that is delivered twice must yield the same instances, so every output
UID is derived from the source series UID plus the algorithm version
(``2.25.<uuid>`` form, PS3.5 B.2), never from a clock or a random source.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

from osteonode import __version__


def derived_uid(source_series_uid: str, role: str, version: str = __version__) -> UID:
    """Return a UID that depends only on the source series, the output role and the version.

    Parameters
    ----------
    source_series_uid : str
        Series Instance UID (0020,000E) of the analysed CT series.
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
    name = "\\".join(("osteonode", version, source_series_uid, role))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


#: Fixed namespace of osteonode's name-based UUIDs (itself a UUID5 of the project name).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:osteonode")
