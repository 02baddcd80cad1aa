"""The redaction filter of third-party log records (osteonode/logs.py)."""

from __future__ import annotations

import logging
import sys

from osteonode.logs import RedactValues


def _record(exc_info) -> logging.LogRecord:
    return logging.LogRecord("kombu", logging.ERROR, __file__, 1, "lost '%s' of 1.2.840.10008.1", ("DOE^JANE",),
                             exc_info)


def test_a_traceback_is_replaced_by_its_exception_class():
    try:
        raise KeyError("DOE^JANE")
    except KeyError:
        record = _record(sys.exc_info())
    assert RedactValues().filter(record)
    assert record.getMessage() == "lost '<value>' of <uid> (KeyError)"
    assert record.exc_info is None


def test_exc_info_outside_an_except_block_does_not_break_logging():
    """``log.exception`` with no active exception records (None, None, None); the filter must not raise."""
    record = _record((None, None, None))
    assert RedactValues().filter(record)
    assert record.getMessage() == "lost '<value>' of <uid>"
