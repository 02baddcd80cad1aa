"""DIMSE status codes the node answers or reads, and their categories.

The category of a code (Success, Warning, Failure, Cancel, Pending) comes from
:func:`pynetdicom.status.code_to_category` (PS3.7 C.4.2.3 and Annex C), not
from a hand-written list; the codes the node answers itself as a Storage SCP
are those of PS3.4 B.2.3.
"""

from __future__ import annotations

#: Success (PS3.7 C.1.1).
SUCCESS = 0x0000
#: C-STORE Refused: Out of Resources (PS3.4 B.2.3): the spool cannot be written or the disk is below the watermark.
OUT_OF_RESOURCES = 0xA700
#: C-STORE Error: Data Set does not match SOP Class (PS3.4 B.2.3).
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: C-STORE Error: Cannot understand (PS3.4 B.2.3; pynetdicom's code for a data set that does not decode).
CANNOT_UNDERSTAND = 0xC210

#: pynetdicom's category names (PS3.7 C.4.2.3).
CATEGORY_SUCCESS, CATEGORY_WARNING = "Success", "Warning"


def category(code: int) -> str:
    """The category of a DIMSE status code: ``Success``, ``Warning``, ``Failure``, ``Cancel``, ``Pending``
    or ``Unknown`` (:func:`pynetdicom.status.code_to_category`)."""
    from pynetdicom.status import code_to_category  # not at import: ``analyze`` needs no pynetdicom

    return code_to_category(code)


def is_stored(code: int) -> bool:
    """True when a C-STORE status means the instance was stored: Success or Warning.

    Warnings include 0x0001 (PS3.7 C), 0x0107 (attribute list error), 0x0116
    (attribute value out of range) and 0xBxxx (coercion, elements discarded,
    SOP class mismatch, PS3.4 B.2.3).
    """
    return category(code) in (CATEGORY_SUCCESS, CATEGORY_WARNING)
