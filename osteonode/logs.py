"""Logging set-up of every osteonode process: quiet third-party loggers, no patient data in the log.

osteonode's own messages never contain UIDs or patient data (jobs are named
by :func:`osteonode.ingest.completion.log_id`). Third-party libraries are not
so careful: highdicom logs source SOP Instance UIDs at INFO, and pydicom's
warnings about malformed input quote element values, patient name and ID
included. So, unless DEBUG is asked for:

* the loggers in :data:`QUIET_LOGGERS` are raised to WARNING (Celery's stay at INFO);
* Python warnings are captured into logging (``py.warnings``);
* every record of a logger outside osteonode passes :class:`RedactValues`,
  which masks quoted values and UID-like strings.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

#: Third-party loggers that log UIDs or element values at INFO (or are just chatty). Celery stays at
#: INFO (its "ready." and task lines carry task ids and statuses, our payloads are not logged), redacted.
QUIET_LOGGERS = ("highdicom", "pydicom", "pynetdicom", "kombu", "radiomics", "pykwalify", "py.warnings")
#: Our own loggers, whose messages are written without patient data and are left as they are.
OWN_LOGGERS = ("osteonode", "worker", "__main__")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")


class RedactValues(logging.Filter):
    """Mask quoted values and UID-like strings in records of loggers outside osteonode."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record``'s message in place when it comes from a third-party logger; always keep it."""
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        message = _UID_LIKE.sub("<uid>", _QUOTED.sub("'<value>'", record.getMessage()))
        record.msg, record.args = message, None
        if record.exc_info:  # a traceback may quote values too; keep the class only
            # exc_info=True outside an except block gives (None, None, None)
            if record.exc_info[0] is not None:
                record.msg = f"{message} ({record.exc_info[0].__name__})"
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send the log to ``stream`` (default stderr) at ``level``, with third-party output redacted.

    Parameters
    ----------
    level : str
        DEBUG, INFO, WARNING or ERROR. With DEBUG third-party loggers are left
        as they are (and may log patient data: for troubleshooting only).
    stream : file-like, optional
        Where to write; default :data:`sys.stderr`.

    Returns
    -------
    logging.Handler
        The handler installed on the root logger (replacing one installed before).
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_osteonode", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._osteonode = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if root.level > logging.DEBUG:
        handler.addFilter(RedactValues())
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    return handler
