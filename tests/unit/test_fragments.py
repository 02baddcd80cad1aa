"""Series of an association that did not end normally are held back (osteonode.ingest.associations)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from pynetdicom.pdu_primitives import A_ABORT, A_RELEASE
from test_completion import RULES, _age_study, _spool_series

from osteonode.ingest.associations import ASSOCIATIONS_DIR, AssociationTracker, held_series
from osteonode.ingest.completion import find_due_studies


def _event(assoc, primitive=None):
    return SimpleNamespace(assoc=assoc, primitive=primitive)


def _release_request(assoc):
    """EVT_ACSE_RECV of the peer's A-RELEASE request (``result`` None; a response has a result)."""
    return _event(assoc, A_RELEASE())


def _association():
    return SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY"))


def _receive(tracker, spool, assoc, series_uid, n=10):
    """Spool ``n`` instances of a series as the SCP does: each one on disk, then ``tracker.stored``."""
    _spool_series(spool, series_uid, 2, n=n)
    for _ in range(n):
        tracker.stored(_event(assoc), "1.2", series_uid)


def test_an_aborted_series_holds_its_study_until_re_sent(tmp_path, caplog):
    tracker, aborted = AssociationTracker(tmp_path), _association()
    _receive(tracker, tmp_path, aborted, "1.2.3", n=4)
    assert [p.name for p in (tmp_path / ASSOCIATIONS_DIR / "1.2" / "1.2.3").iterdir()] != []
    with caplog.at_level(logging.WARNING):
        tracker.closed(_event(aborted))  # connection closed without A-RELEASE
    assert "ended abnormally" in caplog.text
    _age_study(tmp_path, 60)
    assert find_due_studies(tmp_path, 5, RULES, incomplete_timeout_s=600) == []  # quiet, but a fragment
    resent = _association()
    _receive(tracker, tmp_path, resent, "1.2.3")
    tracker.release_requested(_release_request(resent))
    tracker.closed(_event(resent))  # after a release: nothing to say
    assert not (tmp_path / ASSOCIATIONS_DIR / "1.2").exists()
    _age_study(tmp_path, 60)
    (job,) = find_due_studies(tmp_path, 5, RULES, incomplete_timeout_s=600)
    assert job.ranking.candidates[0].instance_count == 10


def test_the_records_survive_a_restart_and_expire_after_incomplete_timeout(tmp_path, caplog):
    """``serve`` killed mid-series: no event at all, only the records on disk; a new tracker (restart) sees them."""
    _receive(AssociationTracker(tmp_path), tmp_path, _association(), "1.2.3", n=8)
    _spool_series(tmp_path, "1.2.5", 3)  # another, complete series of the study: the study waits as a whole
    _age_study(tmp_path, 60)
    assert held_series(tmp_path, "1.2", time.time_ns(), 600) == ["1.2.3"]
    assert find_due_studies(tmp_path, 5, RULES, incomplete_timeout_s=600) == []
    _age_study(tmp_path, 600)
    with caplog.at_level(logging.WARNING):
        (job,) = find_due_studies(tmp_path, 5, RULES, incomplete_timeout_s=600)
    assert "analysed as received" in caplog.text
    assert {s.series_instance_uid for s in job.ranking.candidates} == {"1.2.3", "1.2.5"}
    assert not (tmp_path / ASSOCIATIONS_DIR / "1.2").exists()


def test_a_normally_released_association_leaves_no_record_and_the_study_is_due_after_the_quiet_period(tmp_path):
    tracker, assoc = AssociationTracker(tmp_path), _association()
    _receive(tracker, tmp_path, assoc, "1.2.3")
    assert find_due_studies(tmp_path, 5, RULES) == []  # still arriving
    tracker.release_requested(_release_request(assoc))
    _age_study(tmp_path, 10)
    assert len(find_due_studies(tmp_path, 5, RULES)) == 1


def test_the_connection_close_racing_ahead_of_evt_released_is_not_an_abnormal_end(tmp_path, caplog):
    """The peer closes as soon as it has the A-RELEASE response; pynetdicom may report that close before EVT_RELEASED.

    The records go with the request (received before the response is sent),
    so the close that follows finds nothing open and says nothing.
    """
    tracker, assoc = AssociationTracker(tmp_path), _association()
    _receive(tracker, tmp_path, assoc, "1.2.3")
    response = A_RELEASE()
    response.result = "affirmative"
    tracker.release_requested(_event(assoc, response))  # our own response, or an abort: not the peer's request
    tracker.release_requested(_event(assoc, A_ABORT()))
    assert (tmp_path / ASSOCIATIONS_DIR / "1.2" / "1.2.3").exists()
    tracker.release_requested(_release_request(assoc))
    with caplog.at_level(logging.WARNING):
        tracker.closed(_event(assoc))
    assert "ended abnormally" not in caplog.text
    assert not (tmp_path / ASSOCIATIONS_DIR / "1.2").exists()
    _age_study(tmp_path, 10)
    assert len(find_due_studies(tmp_path, 5, RULES)) == 1
