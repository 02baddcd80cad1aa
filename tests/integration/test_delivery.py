"""Delivery: a destination that is down is retried; what cannot be delivered stays in the outbox."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from node import write_config
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from services import free_port, storescu, wait_for

from osteonode.config import Destination
from osteonode.dispatch import send_files
from osteonode.errors import DeliveryFailed

pytestmark = pytest.mark.integration


ALL_OUTPUTS = (SegmentationStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage, EncapsulatedPDFStorage)


def _receiver(folder, port, sop_classes=ALL_OUTPUTS):
    ae = AE(ae_title="LATEPACS")
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _delivery_state(outbox):
    states = [json.loads(p.read_text()) for p in outbox.glob("*/delivery-dest0.json")]
    return states[0] if states else None


def test_destination_down_then_up_is_retried_with_backoff(tmp_path, start_node, abdomen_series):
    late_port = free_port()
    config, port = write_config(tmp_path / "node", broker_url=None,
                                destinations=[("LATEPACS", "127.0.0.1", late_port)],
                                extra="[dispatch]\nretry_backoff_s = 1.0\nmax_retries = 20\ntimeout_s = 5.0\n")
    start_node(config, "serve", port=port)
    storescu("127.0.0.1", port, "OSTEONODE", abdomen_series)
    outbox = tmp_path / "node" / "outbox"
    state = wait_for(lambda: (s := _delivery_state(outbox)) and s["attempts"] >= 1 and s, timeout_s=300,
                     what="a failed first delivery attempt")
    assert state["state"] == "pending" and "not established" in state["detail"]
    received = tmp_path / "received"
    received.mkdir()
    server = _receiver(received, late_port)
    try:
        wait_for(lambda: (s := _delivery_state(outbox)) and s["state"] == "delivered", timeout_s=120,
                 what="delivery after the destination came up")
    finally:
        server.shutdown()
    assert sorted(pydicom.dcmread(p).Modality for p in received.iterdir()) == ["DOC", "OT", "OT", "SEG", "SR"]


def _file(folder, sop_class, uid):
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sop_classes_a_destination_refuses_are_a_permanent_failure_after_the_rest_is_sent(tmp_path):
    files = [_file(tmp_path, sop_class, f"1.2.3.{i}") for i, sop_class in enumerate(ALL_OUTPUTS)]
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    server = _receiver(received, port, sop_classes=(SegmentationStorage, Comprehensive3DSRStorage))
    try:
        with pytest.raises(DeliveryFailed) as err:
            send_files(files, Destination(name="pacs", ae_title="LATEPACS", host="127.0.0.1", port=port),
                       calling_ae_title="OSTEONODE")
    finally:
        server.shutdown()
    assert err.value.permanent
    assert "does not accept Encapsulated PDF Storage, Secondary Capture Image Storage" in str(err.value)
    assert sorted(p.name for p in received.iterdir()) == ["1.2.3.0.dcm", "1.2.3.1.dcm"]


def test_undeliverable_result_stays_in_outbox_with_reason(tmp_path, monkeypatch, caplog):
    from worker.tasks import deliver

    config, _port = write_config(tmp_path, broker_url=None, destinations=[("GONE", "127.0.0.1", free_port())],
                                 extra="[dispatch]\nmax_retries = 0\ntimeout_s = 2.0\n")
    monkeypatch.setenv("OSTEONODE_CONFIG", str(config))
    entry = tmp_path / "outbox" / "1.2.3"
    entry.mkdir(parents=True)
    sr = pydicom.Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = Comprehensive3DSRStorage, "1.2.3.4"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.save_as(entry / "sr.dcm", enforce_file_format=True)
    with caplog.at_level("ERROR"):
        assert deliver("" + str(entry), "dest0") == "failed"  # the task function, called directly
    state = json.loads((entry / "delivery-dest0.json").read_text())
    assert state["state"] == "failed" and state["attempts"] == 1 and "not established" in state["detail"]
    assert (entry / "sr.dcm").exists()
    assert "NOT (fully) delivered" in caplog.text
    # the admin re-sends the entry by hand once the destination is back: the state follows
    received = tmp_path / "received"
    received.mkdir()
    port = int(config.read_text().split("port = ")[-1].split()[0])
    server = _receiver(received, port)
    try:
        run = subprocess.run([sys.executable, "-m", "osteonode", "send", str(entry), "--to", "dest0",
                              "--config", str(config)], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr
    assert [p.name for p in received.iterdir()] == ["1.2.3.4.dcm"]
    assert json.loads((entry / "delivery-dest0.json").read_text())["state"] == "delivered"


def test_phased_delivery_sends_each_batch_and_records_a_refused_sop_class_as_failed(tmp_path):
    """The analysis task's first attempt: batch by batch, the refused SOP class is permanent, the rest arrives."""
    from osteonode.config import load_settings
    from osteonode.result import AnalysisResult
    from worker.tasks import PhasedDelivery

    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    config, _ = write_config(tmp_path / "node", broker_url=None, destinations=[("LATEPACS", "127.0.0.1", port)])
    entry = tmp_path / "node" / "outbox" / "1.2.3"
    entry.mkdir(parents=True)
    sr, seg, key, pdf = (_file(entry, sop_class, f"1.2.3.{i}") for i, sop_class in enumerate(
        (Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage, EncapsulatedPDFStorage)))
    result = AnalysisResult.not_evaluable("test", "1.2.3", "1.2.3.9")
    delivery = PhasedDelivery(entry, load_settings(config), "job")
    server = _receiver(received, port, sop_classes=(SegmentationStorage, Comprehensive3DSRStorage,
                                                    SecondaryCaptureImageStorage))
    try:
        delivery.publish(result, [sr])
        assert [p.name for p in received.iterdir()] == ["1.2.3.0.dcm"]  # the SR is there before the rest is sent
        assert json.loads((entry / "delivery-dest0.json").read_text())["state"] == "pending"
        delivery.publish(result, [seg])
        delivery.publish(result, [key, pdf])
        delivery.finish()
    finally:
        server.shutdown()
    assert sorted(p.name for p in received.iterdir()) == ["1.2.3.0.dcm", "1.2.3.1.dcm", "1.2.3.2.dcm"]
    state = json.loads((entry / "delivery-dest0.json").read_text())
    assert state["state"] == "failed" and "does not accept Encapsulated PDF Storage" in state["detail"]
