"""The embedded-defaults demo: a real node, a real C-STORE round trip, no services to install.

1. converts a CT (NIfTI, or a DICOM folder as is) into a CT Image Storage series,
2. starts a small receiving SCP that plays the PACS,
3. starts ``osteonode serve`` as a child process on the embedded on-disk queue,
4. sends the CT to the node by C-STORE,
5. waits until the node records the delivery (SEG, SR, key images, PDF report)
   and prints a summary.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import, unseen by mypy

from osteonode.config import Destination
from osteonode.ctseries import read_image, write_ct_series
from osteonode.dicom_out import summary
from osteonode.dispatch import send_files
from osteonode.outbox import delivery_state
from osteonode.result import AnalysisResult

log = logging.getLogger(__name__)

#: The shared example CT, relative to a checkout of the repository (run from its root).
DEFAULT_CT = Path("../shared/data/ct/totalseg-example-abdomen/example_ct.nii.gz")
PACS_AE = "DEMO_PACS"
NODE_AE = "OSTEONODE"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(ct: Path, workdir: Path, timeout_s: float = 600.0) -> AnalysisResult:
    """Run the round trip and return the node's result (also printed).

    Parameters
    ----------
    ct : pathlib.Path
        A NIfTI CT in HU, or a folder holding one DICOM CT series.
    workdir : pathlib.Path
        Scratch folder (replaced): ``ct/``, ``node/``, ``pacs/``, ``osteonode.toml``, ``node.log``.
    timeout_s : float
        Seconds to wait for the results at the PACS.

    Raises
    ------
    TimeoutError
        If the SEG/SR do not arrive in time (the node log path is in the message).
    RuntimeError
        If the node does not start.
    """
    if workdir.exists():
        shutil.rmtree(workdir)
    ct_dir, pacs_dir, node_dir = workdir / "ct", workdir / "pacs", workdir / "node"
    for d in (ct_dir, pacs_dir, node_dir / "spool", node_dir / "outbox", node_dir / "queue"):
        d.mkdir(parents=True)
    if ct.is_dir():
        ct_files = sorted(p for p in ct.rglob("*") if p.is_file())
    else:
        print(f"converting {ct.name} to a CT Image Storage series ...")
        ct_files = write_ct_series(read_image(ct), ct_dir)
    pacs_port, node_port = free_port(), free_port()
    config = workdir / "osteonode.toml"
    config.write_text(
        f'ae_title = "{NODE_AE}"\nbind_address = "127.0.0.1"\nport = {node_port}\n'
        f'spool_dir = "{node_dir / "spool"}"\noutbox_dir = "{node_dir / "outbox"}"\n'
        f'queue_dir = "{node_dir / "queue"}"\nstudy_quiet_period_s = 2.0\n\n'
        f'[[destinations]]\nname = "demo-pacs"\nae_title = "{PACS_AE}"\nhost = "127.0.0.1"\nport = {pacs_port}\n',
        encoding="utf-8")
    pacs = _start_pacs(pacs_dir, pacs_port)
    log_file = open(workdir / "node.log", "wb")
    node = subprocess.Popen([sys.executable, "-m", "osteonode", "serve", "--config", str(config)],
                            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_echo(node_port, node, timeout_s=60)
        print(f"node up ({NODE_AE} on port {node_port}); sending {len(ct_files)} slices by C-STORE ...")
        start = time.monotonic()
        send_files(ct_files, Destination(name="node", ae_title=NODE_AE, host="127.0.0.1", port=node_port),
                   calling_ae_title=PACS_AE)
        received = _wait_for_results(pacs_dir, node_dir / "outbox", timeout_s, workdir / "node.log")
        elapsed = time.monotonic() - start
    finally:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        log_file.close()
        pacs.shutdown()
    result_files = list((node_dir / "outbox").glob("*/result.json"))
    result = AnalysisResult.model_validate_json(result_files[0].read_text(encoding="utf-8"))
    _print_summary(result, received, elapsed, pacs_dir)
    return result


def _start_pacs(folder: Path, port: int):
    ae = AE(ae_title=PACS_AE)
    for sop_class in (SegmentationStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
                      EncapsulatedPDFStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _wait_for_echo(port: int, node: subprocess.Popen, timeout_s: float) -> None:
    ae = AE(ae_title=PACS_AE)
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with code {node.returncode}; see node.log")
        with socket.socket() as probe:
            listening = probe.connect_ex(("127.0.0.1", port)) == 0
        if not listening:
            time.sleep(0.5)
            continue
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the node did not answer C-ECHO in time")


def _wait_for_results(pacs_dir: Path, outbox: Path, timeout_s: float, node_log: Path) -> list[Path]:
    """Wait until the node records the delivery to the demo PACS, then list what arrived."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [delivery_state(entry, "demo-pacs") for entry in outbox.iterdir() if entry.is_dir()]
        if states and all(state and state["state"] != "pending" for state in states):
            return sorted(pacs_dir.glob("*.dcm"))
        time.sleep(0.5)
    raise TimeoutError(f"the results were not delivered to the PACS within {timeout_s:.0f} s; see {node_log}")


def _print_summary(result: AnalysisResult, received: list[Path], elapsed_s: float, pacs_dir: Path) -> None:
    print(f"\nreceived at {PACS_AE} ({pacs_dir}) {elapsed_s:.1f} s after the first slice was sent:")
    for path in received:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        print(f"  {ds.Modality:3} {ds.SeriesDescription!s:28} same study: "
              f"{'yes' if ds.StudyInstanceUID == result.study_instance_uid else 'NO'}")
    print(f"\nstatus: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    if result.levels:
        print(f"{'level':6} {'mean HU':>8} {'median HU':>10} {'vBMD mg/cm3':>12} {'Genant':>7} {'confidence':>11}")
        for name, lv in result.levels.items():
            print(f"{name:6} {lv.trabecular_hu_mean:8.1f} {lv.trabecular_hu_median:10.1f} "
                  f"{summary.number(lv.vbmd_mg_cm3, 1):>12} {summary.number(lv.genant_grade):>7} "
                  f"{lv.label_confidence:11.2f}")
    for side, femur in result.proximal_femur.items():
        print(f"proximal femur, {side}: {femur.status}" + (f" ({femur.reason})" if femur.reason else ""))
    print(f"bone status: {result.bone_status.category} - {result.bone_status.basis}")
    print(f"levels identified by: {result.labelling_method or '-'}")
    print("stage timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings_s.items()))
    print("research software: not validated for diagnosis.")
