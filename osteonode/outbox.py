"""The outbox: one folder per source study holding the outputs made for it and their delivery records.

Layout: ``<outbox>/<StudyInstanceUID of the source CT>/`` with ``result.json``,
the DICOM outputs (``*.dcm``) and one ``delivery-<destination>.json`` per
destination. The delivery records are the source of truth for what was
delivered (used by ``osteonode send`` and by retention, :mod:`osteonode.retention`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from osteonode.atomic import write_atomic

DeliveryState = Literal["pending", "delivered", "failed"]
_RECORD = "delivery-{destination}.json"


def outbox_entry(outbox_dir: Path, study_uid: str) -> Path:
    """The outbox folder holding the one set of outputs made for a source study."""
    return outbox_dir / study_uid


def record_delivery(entry: Path, destination: str, state: DeliveryState, attempts: int, detail: str = "") -> None:
    """Write ``entry/delivery-<destination>.json``: state (pending/delivered/failed), attempts, last error."""
    write_atomic(entry / _RECORD.format(destination=destination),
                 json.dumps({"destination": destination, "state": state, "attempts": attempts,
                             "detail": detail}, indent=2).encode())


def delivery_state(entry: Path, destination: str) -> dict[str, Any] | None:
    """The recorded delivery state of ``entry`` for ``destination``, or None."""
    path = entry / _RECORD.format(destination=destination)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def delivery_states(entry: Path) -> dict[str, dict[str, Any]]:
    """Every delivery record of ``entry``, by destination name (unreadable records are skipped)."""
    states = {}
    for path in entry.glob(_RECORD.format(destination="*")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        states[str(record.get("destination", path.stem.removeprefix("delivery-")))] = record
    return states
