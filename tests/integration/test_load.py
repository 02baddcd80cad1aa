"""Issue 12 item 5, load: 10 senders x 20 studies at once into a real ``osteonode serve`` (embedded mode, no Redis).

Every study is 3 slices of 32 x 32 (fewer than ``min_slices``, so it is analysed quickly as "not evaluable"
and answered with exactly one SR and one PDF). At the receiving PACS (dcmtk storescp) nothing may be lost or
duplicated: exactly one SR and one PDF per study and no SOP Instance UID received twice; the job store shows
every study in a final state, and ``serve`` still analyses a study sent after the burst. The phase times are
printed (``pytest -s``) for docs/admin.md.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from node import write_config
from pydicom.uid import EncapsulatedPDFStorage, generate_uid
from services import ServiceError, storescu, wait_for

from osteonode.ctseries import write_ct_series
from osteonode.jobstore import open_store

pytestmark = pytest.mark.integration
SENDERS, STUDIES_PER_SENDER, SLICES = 10, 20, 3
QUIET_PERIOD_S = 2.0
#: what a "not evaluable" study gets back with the default settings: one SR and one Encapsulated PDF
OBJECTS_PER_STUDY = 2
FINAL_STATES = {"ok", "not_evaluable", "failed"}


def _tiny_studies(folder: Path, count: int) -> dict[str, list[Path]]:
    """``count`` studies of one 3-slice 32 x 32 CT series each, by Study Instance UID."""
    image = sitk.Image([32, 32, SLICES], sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 3.0))
    studies = {}
    for i in range(count):
        uid = generate_uid()
        studies[uid] = write_ct_series(image, folder / f"study-{i:03d}", study_instance_uid=uid,
                                       patient_id=f"LOAD-{i:03d}", patient_name="LOAD^TEST")
    return studies


def _send_retrying_transient(port: int, files: list[Path], calling_aet: str, rejected: list[str]) -> None:
    """storescu ``files``; an association rejected *transient, local limit exceeded* is tried again.

    With as many senders as ``max_associations`` (10), a sender's next association can arrive while the
    node still counts its previous one (released, its thread not yet ended): rejected transient, which a
    PACS retries. A failure of any other kind fails the test.
    """
    for _ in range(20):
        try:
            storescu("127.0.0.1", port, "OSTEONODE", files, calling_aet=calling_aet)
            return
        except ServiceError as exc:
            if "Local Limit Exceeded" not in str(exc):
                raise
            rejected.append(calling_aet)
            time.sleep(0.2)
    raise AssertionError(f"{calling_aet}: association rejected 20 times")


def _received(storescp) -> tuple[dict[str, Counter[str]], Counter[str]]:
    """Objects received: the kinds per study, and how often each SOP Instance UID arrived (storescp runs with
    unique file names, so an object received twice is two files)."""
    by_study: dict[str, Counter[str]] = {}
    arrivals: Counter[str] = Counter()
    for path in storescp.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPClassUID",
                                                                           "SOPInstanceUID", "Modality"])
        kind = "PDF" if ds.SOPClassUID == EncapsulatedPDFStorage else str(ds.Modality)
        by_study.setdefault(str(ds.StudyInstanceUID), Counter())[kind] += 1
        arrivals[str(ds.SOPInstanceUID)] += 1
    return by_study, arrivals


@pytest.mark.parametrize("storescp", [["+uf"]], indirect=True)
def test_ten_senders_times_twenty_studies_are_each_answered_exactly_once(tmp_path, start_node, storescp):
    """200 studies from 10 concurrent storescu senders: no object lost, none duplicated, every job final,
    and a study sent afterwards is still analysed."""
    config, port = write_config(tmp_path / "node", broker_url=None, quiet_period_s=QUIET_PERIOD_S,
                                destinations=[(storescp.aet, storescp.host, storescp.port)])
    studies = _tiny_studies(tmp_path / "ct", SENDERS * STUDIES_PER_SENDER + 1)
    after = list(studies)[-1]  # sent once the burst is answered
    burst = list(studies)[:-1]
    node = start_node(config, "serve", port=port)

    rejected: list[str] = []  # transient rejections (retried, as a PACS router does)

    def sender(index: int) -> None:
        for uid in burst[index::SENDERS]:  # one association per study, as a PACS router sends
            _send_retrying_transient(port, studies[uid], f"SENDER{index}", rejected)

    start = time.monotonic()
    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(sender, range(SENDERS)))
    sent_s = time.monotonic() - start
    expected = len(burst) * OBJECTS_PER_STUDY
    wait_for(lambda: len(storescp.files()) >= expected, timeout_s=240, what=f"{expected} result objects")
    answered_s = time.monotonic() - start
    store = open_store(tmp_path / "node" / "jobs.sqlite3")
    wait_for(lambda: all((row := store.study(uid)) and row["status"] in FINAL_STATES for uid in burst), timeout_s=60,
             what="every study's job in a final state")
    time.sleep(QUIET_PERIOD_S + 2)  # a late duplicate would arrive here

    by_study, arrivals = _received(storescp)
    assert len(storescp.files()) == expected, f"{len(storescp.files())} objects received for {expected}"
    assert [uid for uid, n in arrivals.items() if n > 1] == [], "SOP Instance UIDs received twice"
    assert len(arrivals) == expected
    assert {uid: dict(kinds) for uid, kinds in by_study.items() if kinds != Counter(SR=1, PDF=1)} == {}
    assert sorted(by_study) == sorted(burst)
    for uid in burst:
        study = store.study(uid)
        assert study["status"] == "not_evaluable", (study["status"], study["job"])
        assert [job["state"] for job in study["jobs"]] == ["not_evaluable"]  # one job per study, none repeated
        assert study["deliveries"] == {"dest0": "delivered"}

    storescu("127.0.0.1", port, "OSTEONODE", studies[after], calling_aet="AFTER")
    wait_for(lambda: _received(storescp)[0].get(after) == Counter(SR=1, PDF=1), timeout_s=60,
             what="the result of the study sent after the burst")
    assert node.proc.poll() is None
    assert "Traceback" not in node.log_path.read_text()
    print(f"\nload: {len(burst)} studies x {SLICES} slices from {SENDERS} senders: sent in {sent_s:.1f} s, "
          f"all {expected} result objects received {answered_s:.1f} s after the first send; "
          f"{len(rejected)} association(s) rejected transient (local limit exceeded) and retried")
