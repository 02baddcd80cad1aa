"""``osteonode serve`` prunes delivered studies after retention_days and refuses C-STORE below the disk watermark."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from node import write_config
from services import STORESCU, free_port, run_tool, wait_for

from osteonode.outbox import record_delivery
from osteonode.retention import DAY_S, Watermark

pytestmark = pytest.mark.integration


def test_serve_removes_a_study_delivered_before_the_retention_period(tmp_path, start_node, tiny_ct):
    config, port = write_config(tmp_path / "node", broker_url=None, destinations=[("PACS", "127.0.0.1", free_port())],
                                quiet_period_s=600, extra="retention_days = 7\n")
    spool, outbox = tmp_path / "node" / "spool", tmp_path / "node" / "outbox"
    for uid, days in (("1.2.3", 10), ("1.2.4", 1)):
        (spool / uid / f"{uid}.1").mkdir(parents=True)
        tiny_ct(spool / uid / f"{uid}.1" / "1.dcm", study_uid=uid)
        (outbox / uid).mkdir()
        shutil.copy(spool / uid / f"{uid}.1" / "1.dcm", outbox / uid / "sr.dcm")
        record_delivery(outbox / uid, "dest0", "delivered", 1)
        stamp = time.time() - days * DAY_S
        for path in (outbox / uid / "delivery-dest0.json", spool / uid / f"{uid}.1", spool / uid):
            os.utime(path, (stamp, stamp))
    node = start_node(config, "serve", port=port)
    # the summary line is logged once the pass is over (waiting for the folder to go raced it)
    wait_for(lambda: "retention: removed 1 delivered study(ies) older than 7 days" in node.log_tail(200),
             timeout_s=20, what="the old study pruned")
    assert not (outbox / "1.2.3").exists() and not (spool / "1.2.3").exists()
    assert (outbox / "1.2.4").is_dir() and (spool / "1.2.4").is_dir()


def test_serve_refuses_instances_below_the_disk_watermark(tmp_path, start_node, tiny_ct):
    available, size = Watermark(tmp_path, 0, 0).free()
    config, port = write_config(tmp_path / "node", broker_url=None, destinations=[], quiet_period_s=600,
                                extra=f"min_free_bytes = {available + size}\n")
    node = start_node(config, "serve", port=port)
    sent = run_tool([STORESCU, "-v", "-aec", "OSTEONODE", "127.0.0.1", str(port), str(tiny_ct(tmp_path / "ct.dcm"))],
                    check=False)
    assert sent.returncode != 0 and "Refused: OutOfResources" in sent.stderr, sent.stderr
    assert not list((tmp_path / "node" / "spool").rglob("*.dcm"))
    assert "disk below the watermark" in node.log_tail(200)
