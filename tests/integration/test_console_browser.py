"""The web console in a real browser against a real node and PACS.

Debian's chromium driven by Selenium (chromium-driver) logs in to the console
of ``osteonode serve`` (embedded queue), watches a study sent by ``storescu``
move from receiving to delivered on the studies page, opens its detail page
and presses "Re-send": Orthanc, whose copies of the results were deleted
after the first delivery, must then hold them again. The API (health,
metrics) is checked against the same node. Screenshots of the dashboard, the
studies page and the study page go to ``test-artifacts/console/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
import pydicom
import pytest
from node import write_config
from services import require_tool, storescu, wait_for

from osteonode.config import load_settings
from osteonode.web import hash_password

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
PASSWORD = "console test password"
RESULT_TIMEOUT_S = 300


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(require_tool("/usr/bin/chromedriver")), options=options)


def _results_in_orthanc(orthanc, study_uid: str) -> dict[str, int]:
    study = orthanc.find_study(study_uid)
    counts: dict[str, int] = {}
    for series in orthanc.series_of_study(study) if study else []:
        modality = series["MainDicomTags"]["Modality"]
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    counts.pop("CT", None)
    return counts


def test_console_in_chromium_shows_a_study_delivered_and_resends_it(tmp_path, orthanc, start_node,
                                                                      abdomen_series):
    from selenium.webdriver.common.by import By

    config, port = write_config(
        tmp_path / "node", broker_url=None, destinations=[(orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
        web=f'metrics_token = "{"m" * 24}"\n[[web.users]]\nname = "admin"\n'
            f'password_hash = "{hash_password(PASSWORD)}"')
    settings = load_settings(config)
    base = f"http://127.0.0.1:{settings.web.port}"
    start_node(config, "serve", port=port)
    header = pydicom.dcmread(abdomen_series[0], stop_before_pixels=True)
    study_uid, patient_id = str(header.StudyInstanceUID), str(header.PatientID)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    browser = _browser()
    try:
        browser.get(f"{base}/studies")  # redirected to the login
        browser.find_element(By.ID, "username").send_keys("admin")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login").click()
        wait_for(lambda: browser.current_url.endswith("/studies"), timeout_s=10, what="studies page after login")

        storescu("127.0.0.1", port, "OSTEONODE", abdomen_series)
        seen = []

        def delivered() -> bool:
            rows = browser.find_elements(By.CSS_SELECTOR, "tr.study")
            if rows:
                seen.append(rows[0].get_attribute("data-status"))
                return rows[0].find_element(By.CSS_SELECTOR, "td.delivery").text == "dest0: delivered"
            return False

        wait_for(delivered, timeout_s=RESULT_TIMEOUT_S, interval_s=1.0, what="study delivered on the studies page")
        assert seen[0] in ("receiving", "queued", "analysing") and seen[-1] in ("ok", "not_evaluable"), seen
        assert patient_id and patient_id in browser.find_element(By.ID, "rows").text  # shown after login
        browser.save_screenshot(str(ARTIFACTS / "studies.png"))
        first = _results_in_orthanc(orthanc, study_uid)
        assert first.get("SR") == 1 and first.get("SEG") == 1, first

        # the PACS loses the results; re-send them from the study page
        for series in orthanc.series_of_study(orthanc.find_study(study_uid)):
            if series["MainDicomTags"]["Modality"] != "CT":
                orthanc.delete(f"/series/{series['ID']}")
        assert _results_in_orthanc(orthanc, study_uid) == {}
        browser.get(f"{base}/studies/{study_uid}")
        timeline = browser.find_element(By.ID, "timeline").text
        for event in ("received", "complete", "queued", "analysing", "delivery delivered"):
            assert event in timeline
        images = browser.find_elements(By.CSS_SELECTOR, "img.key")
        assert images and all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
        browser.set_window_size(1400, 2400)  # the whole page: timeline and key images below the fold
        browser.save_screenshot(str(ARTIFACTS / "study.png"))
        browser.set_window_size(1400, 1000)
        browser.find_element(By.CSS_SELECTOR, "button.resend").click()
        wait_for(lambda: "queued" in browser.find_element(By.ID, "action").text, timeout_s=10, what="re-send queued")
        assert wait_for(lambda: _results_in_orthanc(orthanc, study_uid) == first, timeout_s=120,
                        what="re-sent results in Orthanc")
        browser.get(f"{base}/")
        browser.find_element(By.CSS_SELECTOR, "button.echo").click()
        wait_for(lambda: "Success" in browser.find_element(By.ID, "echo-1").text, timeout_s=30,
                 what="C-ECHO of the PACS from the dashboard")
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    finally:
        browser.quit()

    health = httpx2.get(f"{base}/api/health", timeout=10)
    assert health.status_code == 200, health.text
    metrics = httpx2.get(f"{base}/metrics", headers={"Authorization": f"Bearer {'m' * 24}"}, timeout=10).text
    assert re.search(rf'osteonode_cstore_responses_total{{status="0x0000"}} {len(abdomen_series)}\.0', metrics)
    assert 'osteonode_associations_total{outcome="accepted"}' in metrics
    assert re.search(r'osteonode_delivery_attempts_total{destination="dest0"} [1-9]', metrics)
    assert 'osteonode_stage_duration_seconds_bucket{le="+Inf",stage="segment"} 1.0' in metrics
