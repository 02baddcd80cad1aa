"""The audit trail of a running ``osteonode serve``: start, transfers from dcmtk, a rejected caller, stop."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pydicom
import pytest
from node import write_config
from services import ECHOSCU, run_tool, storescu, wait_for

pytestmark = pytest.mark.integration


def _events(path) -> list[tuple[str, str, str]]:
    """(EventID, EventActionCode, EventTypeCode or "") of each line of the audit file."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = ET.fromstring(line).find("EventIdentification")
        type_code = event.find("EventTypeCode")
        out.append((event.find("EventID").get("csd-code"), event.get("EventActionCode"),
                    type_code.get("csd-code") if type_code is not None else ""))
    return out


def test_serve_writes_ps3_15_audit_messages(tmp_path, start_node, tiny_ct):
    audit_file = tmp_path / "audit.log"
    config, port = write_config(tmp_path / "node", broker_url=None, destinations=[], quiet_period_s=600,
                                extra=f'allowed_calling_ae_titles = ["STORESCU"]\n[audit]\nfile = "{audit_file}"\n')
    node = start_node(config, "serve", port=port)
    ct = tiny_ct(tmp_path / "ct.dcm", patient_id="AUDIT-1")
    storescu("127.0.0.1", port, "OSTEONODE", [ct])
    refused = run_tool([ECHOSCU, "-aet", "INTRUDER", "-aec", "OSTEONODE", "127.0.0.1", str(port)], check=False)
    assert refused.returncode != 0
    wait_for(lambda: len(_events(audit_file)) >= 4, timeout_s=10, what="four audit messages")
    # SIGTERM before the embedded worker has installed its signal handlers would kill serve outright
    wait_for(lambda: "ready." in node.log_tail(200), timeout_s=30, what="the embedded worker ready")
    node.stop(timeout_s=30)
    events = _events(audit_file)
    assert events[0] == ("110100", "E", "110120") and events[-1] == ("110100", "E", "110121")
    assert sorted(events[1:-1]) == [("110102", "E", ""), ("110104", "C", ""), ("110113", "E", "110126")]
    text = audit_file.read_text(encoding="utf-8")
    assert pydicom.dcmread(ct).StudyInstanceUID in text and "AUDIT-1" in text and "INTRUDER" in text
