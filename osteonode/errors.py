"""The one small error hierarchy of osteonode.

Each class maps to one reaction of the node:

* :class:`InputRejected` -> a C-STORE failure status (PS3.4 Annex B.2.3),
* :class:`NotEvaluable` -> an SR that says "not evaluable" with the reason,
* :class:`DeliveryFailed` -> a retry with back-off, then the result stays in the outbox.
"""

from __future__ import annotations

import re

from osteonode.dimse_status import CANNOT_UNDERSTAND

#: Longest message kept by :func:`describe` (characters).
MAX_REASON_CHARS = 200
_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")
_PATH_LIKE = re.compile(r"(?:/[^\s/'\"]+){2,}/?")


def describe(exc: BaseException) -> str:
    """``"<Class>: <message>"`` of ``exc`` for logs, ``result.json`` and the SR, free of UIDs and paths.

    Exception messages may quote file names (UIDs in the spool and outbox) or
    element values: UID-like strings become ``<uid>``, absolute paths
    ``<path>``, and the message is cut at ``MAX_REASON_CHARS`` characters.
    An :class:`OSError` is described by its ``strerror`` only (its file name
    is a UID).
    """
    if isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror
    else:
        message = _UID_LIKE.sub("<uid>", _PATH_LIKE.sub("<path>", str(exc)))
    if len(message) > MAX_REASON_CHARS:
        message = message[:MAX_REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class OsteonodeError(Exception):
    """Base class of every error osteonode raises on purpose."""


class InputRejected(OsteonodeError):
    """An instance or series we refuse.

    Parameters
    ----------
    message : str
        Human-readable reason, free of patient identifiers.
    status : int
        The C-STORE status to answer with (PS3.4 B.2.3), e.g. ``0xA900``
        (data set does not match SOP class) or ``0xC210`` (cannot understand).
    """

    def __init__(self, message: str, status: int = CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


class NotEvaluable(OsteonodeError):
    """A series that cannot be analysed; the message is the reason reported in the SR."""


class DeliveryFailed(OsteonodeError):
    """A result could not be delivered to a destination (association or C-STORE status).

    Parameters
    ----------
    message : str
        What failed, without patient identifiers.
    permanent : bool
        True when retrying cannot help (e.g. the destination does not accept a
        SOP class); the result then stays in the outbox without further retries.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
