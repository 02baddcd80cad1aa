"""The web console and REST API (FastAPI TestClient on a real job store; queueing recorded, not run)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from osteonode.config import Settings, WebSettings
from osteonode.jobstore import JobStore
from osteonode.web import create_app, hash_password

PASSWORD = "correct horse battery"


def _settings(tmp_path, **web) -> Settings:
    for name in ("spool", "outbox", "queue/messages"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return Settings(spool_dir=tmp_path / "spool", outbox_dir=tmp_path / "outbox", queue_dir=tmp_path / "queue",
                    destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
                    web=web)


@pytest.fixture
def node(tmp_path):
    settings = _settings(tmp_path, users=[{"name": "admin", "password_hash": hash_password(PASSWORD)}],
                         metrics_token="t" * 20)
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.record_arrival("1.2", "1.2.3")
    store.close_study("1.2", float("inf"), {"patient_id": "PAT-7", "accession": "ACC-9", "study_date": "20260102"})
    job = store.job_started("1.2", "f" * 64, {"study_instance_uid": "1.2", "fingerprint": "f" * 64}, worker="w:1")
    store.job_finished(job, "ok", category="osteoporosis", timings_s={"segment": 3.0, "measure": 0.5})
    (settings.spool_dir / "1.2").mkdir()
    (settings.outbox_dir / "1.2").mkdir()
    (settings.outbox_dir / "1.2" / "sr.dcm").write_bytes(b"x")
    queued = {"jobs": [], "deliveries": []}
    app = create_app(settings, store, enqueue_job=queued["jobs"].append,
                     queue_delivery=lambda *a: queued["deliveries"].append(a))
    return TestClient(app), store, queued


def _login(client, password=PASSWORD, next="/"):
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    response = client.post("/login", data={"username": "admin", "password": password, "csrf": csrf, "next": next},
                           follow_redirects=False)
    return response, csrf


def test_pages_and_apis_need_a_login_and_patient_ids_appear_only_after_it(node):
    client, store, _ = node
    assert client.get("/api/studies").status_code == 401
    assert client.get("/studies", follow_redirects=False).headers["location"].startswith("/login")
    response, _ = _login(client, "wrong")
    assert response.headers["location"] == "/login?error=1"
    response, _ = _login(client, next="//evil.example/")
    assert response.status_code == 303 and response.headers["location"] == "/"  # no open redirect
    (row,) = client.get("/api/studies", params={"accession": "ACC-9"}).json()
    assert row["patient_id"] == "PAT-7" and row["status"] == "ok" and row["job"]["category"] == "osteoporosis"
    detail = client.get("/studies/1.2")
    assert "PAT-7" in detail.text and "segment" in detail.text and "Re-send to pacs" in detail.text
    assert [a["outcome"] for a in store.actions()] == ["success", "failure"]  # newest first


def test_actions_need_the_csrf_token_and_are_recorded(node):
    client, store, queued = node
    _, _ = _login(client)
    csrf = re.search(r'const CSRF = "([^"]+)"', client.get("/").text).group(1)
    assert client.post("/api/studies/1.2/resend/pacs").status_code == 403  # no token
    assert client.post("/api/studies/1.2/resend/pacs", headers={"X-CSRF-Token": csrf}).json() == {"queued": True}
    assert queued["deliveries"][0][1:] == ("pacs", None)
    assert client.post("/api/studies/1.2/reanalyse", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert queued["jobs"][0]["study_instance_uid"] == "1.2" and store.jobs_by_state()["queued"] == 1
    assert client.delete("/api/studies/1.2", headers={"X-CSRF-Token": csrf}).status_code == 409  # job queued
    assert client.post("/api/studies/1.2/resend/nowhere", headers={"X-CSRF-Token": csrf}).status_code == 404
    echo = client.post("/api/destinations/pacs/echo", headers={"X-CSRF-Token": csrf}).json()
    assert echo["result"] != "Success"  # nothing listens on port 1
    actions = [(a["action"], a["outcome"]) for a in store.actions()][::-1]
    assert actions[1:4] == [("resend", "success"), ("reanalyse", "success"),
                            ("delete", "refused: a job of the study is running")]
    kinds = [e["kind"] for e in store.study("1.2")["events"]]
    assert {"action resend", "action reanalyse", "delivery pending"} <= set(kinds)


def test_delete_removes_the_study_data_and_keeps_its_history(node, tmp_path):
    client, store, _ = node
    _login(client)
    csrf = re.search(r'const CSRF = "([^"]+)"', client.get("/").text).group(1)
    assert client.delete("/api/studies/1.2", headers={"X-CSRF-Token": csrf}).json() == {"deleted": True}
    assert not (tmp_path / "spool" / "1.2").exists() and not (tmp_path / "outbox" / "1.2").exists()
    assert store.studies() == [] and "deleted" in [e["kind"] for e in store.study("1.2")["events"]]


def test_health_reports_each_check_and_503_without_a_worker(node):
    client, store, _ = node
    response = client.get("/api/health")  # no login needed, no patient data
    checks = response.json()["checks"]
    assert response.status_code == 503 and set(checks) == {"spool_writable", "disk_space", "broker",
                                                           "worker_heartbeat", "completion_watcher"}
    assert checks["spool_writable"]["ok"] and not checks["worker_heartbeat"]["ok"]
    store.beat()
    store.beat("completion-watcher")
    assert client.get("/api/health").status_code == 200


def test_metrics_with_the_token_come_from_the_store(node):
    client, _, _ = node
    assert client.get("/metrics").status_code == 401
    text = client.get("/metrics", headers={"Authorization": "Bearer " + "t" * 20}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in families["osteonode_jobs"].samples}
    assert jobs["ok"] == 1 and jobs["failed"] == 0
    stages = {(s.labels["stage"], s.labels.get("le")): s.value
              for s in families["osteonode_stage_duration_seconds"].samples}
    assert stages[("segment", "5.0")] == 1 and stages[("segment", "2.0")] == 0
    assert families["osteonode_instances_received"].samples[0].value == 1
    assert families["osteonode_studies_completed"].samples[0].value == 1


def test_without_users_the_console_is_read_only_without_patient_ids_and_loopback_only(tmp_path):
    settings = _settings(tmp_path)
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.record_arrival("1.2", "1.2.3")
    store.close_study("1.2", float("inf"), {"patient_id": "PAT-7"})
    client = TestClient(create_app(settings, store, enqueue_job=print, queue_delivery=print))
    (row,) = client.get("/api/studies").json()
    assert row["patient_id"] is None and "PAT-7" not in client.get("/studies/1.2").text
    assert client.get("/api/studies", params={"patient_id": "PAT-7"}).status_code == 403
    assert client.post("/api/studies/1.2/reanalyse").status_code == 403
    assert client.get("/studies/1.2/images/key_1.dcm").status_code == 403  # key images name the patient
    with pytest.raises(ValueError, match="not a loopback address"):
        WebSettings(bind="0.0.0.0")
    WebSettings(bind="0.0.0.0", users=[{"name": "a", "password_hash": hash_password("x")}])


def test_openapi_lists_the_api_and_the_cli_hashes_passwords(node):
    from argon2 import PasswordHasher
    from typer.testing import CliRunner

    from osteonode.cli import app

    client, _, _ = node
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/health", "/api/studies", "/api/studies/{study_uid}/resend/{destination}"} <= set(paths)
    result = CliRunner().invoke(app, ["web", "hash-password"], input="s3cret\ns3cret\n")
    assert result.exit_code == 0
    assert PasswordHasher().verify(result.stdout.strip().splitlines()[-1], "s3cret")


def test_config_page_masks_secrets(node):
    client, _, _ = node
    _login(client)
    web = client.get("/api/config").json()["web"]
    assert web["users"] == ["admin"] and web["metrics_token"] == "****" and "$argon2" not in client.get("/config").text
