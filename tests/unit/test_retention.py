"""Retention of delivered studies and the free-space watermark of the SCP."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from osteonode import audit
from osteonode.config import AuditSettings, Destination, Settings
from osteonode.dispatch import echo, send_files
from osteonode.errors import DeliveryFailed
from osteonode.ingest.completion import JOBS_DIR
from osteonode.ingest.scp import start_scp
from osteonode.outbox import outbox_entry, record_delivery
from osteonode.retention import DAY_S, Watermark, prune_delivered, retention_loop

NOW = time.time()


def _settings(tmp_path, **keys) -> Settings:
    for sub in ("spool", "outbox", "queue"):
        (tmp_path / sub).mkdir(exist_ok=True)
    destinations = [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104),
                    Destination(name="archive", ae_title="ARCH", host="127.0.0.1", port=105)]
    return Settings(spool_dir=tmp_path / "spool", outbox_dir=tmp_path / "outbox", queue_dir=tmp_path / "queue",
                    destinations=destinations, **keys)


def _age(path, days: float) -> None:
    stamp = NOW - days * DAY_S
    os.utime(path, (stamp, stamp))


def _study(settings, uid, tiny_ct, states: dict[str, tuple[str, float]], arrived_days_ago: float = 30):
    """A spooled study (one instance), its .jobs marker and an outbox entry with delivery records aged as given."""
    series = settings.spool_dir / uid / f"{uid}.1"
    series.mkdir(parents=True)
    tiny_ct(series / "1.dcm", study_uid=uid)
    (settings.spool_dir / JOBS_DIR).mkdir(exist_ok=True)
    (settings.spool_dir / JOBS_DIR / f"{uid}.json").write_text("{}")
    entry = outbox_entry(settings.outbox_dir, uid)
    entry.mkdir()
    tiny_ct(entry / "sr.dcm", study_uid=uid, patient_id=f"P-{uid}")
    for name, (state, days) in states.items():
        record_delivery(entry, name, state, 1)
        _age(entry / f"delivery-{name}.json", days)
    for folder in (series, series.parent):
        _age(folder, arrived_days_ago)
    return entry


@pytest.fixture
def audit_file(tmp_path):
    path = tmp_path / "audit.log"
    audit.configure_audit(Settings(spool_dir=tmp_path, outbox_dir=tmp_path, queue_dir=tmp_path,
                                   audit=AuditSettings(file=path)))
    yield path
    audit._trail = None


def test_only_studies_delivered_everywhere_before_the_retention_period_are_removed(tmp_path, tiny_ct, audit_file):
    settings = _settings(tmp_path, retention_days=7)
    old = _study(settings, "1.1", tiny_ct, {"pacs": ("delivered", 10), "archive": ("delivered", 8)})
    failed = _study(settings, "1.2", tiny_ct, {"pacs": ("delivered", 10), "archive": ("failed", 10)})
    recent = _study(settings, "1.3", tiny_ct, {"pacs": ("delivered", 10), "archive": ("delivered", 1)})
    partial = _study(settings, "1.4", tiny_ct, {"pacs": ("delivered", 10)})
    late = _study(settings, "1.5", tiny_ct, {"pacs": ("delivered", 10), "archive": ("delivered", 10)},
                  arrived_days_ago=2)  # a late series arrived after the delivery
    assert prune_delivered(_settings(tmp_path), now_s=NOW) == (0, 0)  # no retention_days: keep everything
    pruned = prune_delivered(settings, now_s=NOW)
    assert pruned.studies == 1 and pruned.bytes_freed > 0
    assert not old.exists() and not (settings.spool_dir / "1.1").exists()
    assert not (settings.spool_dir / JOBS_DIR / "1.1.json").exists()
    for kept in (failed, recent, partial, late):
        assert kept.is_dir() and (settings.spool_dir / kept.name).is_dir()
        assert (settings.spool_dir / JOBS_DIR / f"{kept.name}.json").is_file()
    message = ET.fromstring(audit_file.read_text().strip())
    assert message.find("EventIdentification/EventID").get("csd-code") == "110105"
    assert {o.get("ParticipantObjectID") for o in message.findall("ParticipantObjectIdentification")} == {
        "1.1", "P-1.1"}


def test_the_retention_loop_prunes_at_once_and_stops(tmp_path, tiny_ct):
    settings = _settings(tmp_path, retention_days=7, retention_interval_s=3600)
    old = _study(settings, "1.1", tiny_ct, {"pacs": ("delivered", 10), "archive": ("delivered", 10)})
    stop = threading.Event()
    thread = threading.Thread(target=retention_loop, args=(settings, stop))
    thread.start()
    deadline = time.monotonic() + 10
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)
    assert not old.exists() and not thread.is_alive()


def test_watermark_compares_free_space_with_both_limits(tmp_path, caplog):
    available, size = Watermark(tmp_path, 0, 0).free()
    assert 0 < available <= size
    assert Watermark(tmp_path, 0, 0).ok()
    assert Watermark(tmp_path / "spool" / "not-yet", 1, 0).ok()  # measured at the nearest existing parent
    assert Watermark(tmp_path, 0, available // 2).ok()
    low = Watermark(tmp_path, 0, available + size)  # more than the disk holds
    with caplog.at_level(logging.INFO, logger="osteonode.retention"):
        assert not low.ok() and not low.ok()
    assert caplog.text.count("disk below the watermark") == 1  # logged once, not per check
    free_percent = 100 * available / size
    assert Watermark(tmp_path, free_percent / 2, 0).ok()
    assert not Watermark(tmp_path, min(free_percent + 1, 99.99), 0).ok()


def test_scp_answers_out_of_resources_below_the_watermark(tmp_path, tiny_ct):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    available, size = Watermark(tmp_path, 0, 0).free()
    settings = _settings(tmp_path, min_free_bytes=available + size).model_copy(
        update={"bind_address": "127.0.0.1", "port": port})
    server = start_scp(settings)
    node = Destination(name="node", ae_title="OSTEONODE", host="127.0.0.1", port=port)
    try:
        with pytest.raises(DeliveryFailed, match="0xA700"):
            send_files([tiny_ct(tmp_path / "ct.dcm")], node, calling_ae_title="PACS", timeout_s=5)
        assert echo(node, calling_ae_title="PACS", timeout_s=5) == 0x0000  # verification still answered
    finally:
        server.shutdown()
    assert not list(settings.spool_dir.rglob("*.dcm"))
