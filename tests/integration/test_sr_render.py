"""The SR renders in a viewer: dcmtk ``dsr2html`` to HTML, headless Chromium to PNG.

Runs the pipeline on the real example CT (converted to a CT Image Storage
series by the ``abdomen_series`` fixture), renders ``sr.dcm`` with
``/usr/bin/dsr2html`` and screenshots the HTML with ``/usr/bin/chromium``.
The HTML must show every measured level, its mean HU as encoded in the SR,
and the bone status with its basis; the PNG must hold the whole page with
visible text. ``sr.html`` and ``sr.png`` are kept under
``test-artifacts/sr-render/`` at the repository root for a human to look at.

Debian packages: dcmtk (dsr2html), chromium. A missing tool fails the test.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from services import require_tool, run_tool

import dicom_templates
from osteonode.pipeline import analyze_files

pytestmark = pytest.mark.integration

DSR2HTML = "/usr/bin/dsr2html"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "sr-render"
#: Flags for Chromium as root in a container without network or display.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
PAGE_WIDTH_PX = 1280
CHROMIUM_TIMEOUT_S = 120


def _text(markup: str) -> str:
    """Visible text of an HTML page: tags dropped, entities decoded, whitespace collapsed."""
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", markup)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", markup))).strip()


def _mean_hu_by_level(sr: pydicom.Dataset) -> dict[str, str]:
    """``{"L1 vertebra": "128.3", ...}``: the encoded mean attenuation of each level's TID 1411 groups.

    The level is the vertebra named by the group's Finding or Finding Site (the
    mean HU is in the trabecular ROI group, whose Finding is "Bone").
    """
    found: dict[str, str] = {}

    def walk(items) -> None:
        for item in items:
            if str(item.get("ValueType", "")) == "CONTAINER":
                children = list(item.get("ContentSequence", []))
                finding = next((str(c.ConceptCodeSequence[0].CodeMeaning) for c in children
                                if c.get("ValueType") == "CODE"
                                and str(c.ConceptNameCodeSequence[0].CodeMeaning) in ("Finding", "Finding Site")
                                and "vertebra" in str(c.ConceptCodeSequence[0].CodeMeaning)), None)
                for child in children:
                    if finding and child.get("ValueType") == "NUM" and str(
                            child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue) == "[hnsf'U]" \
                            and any(
                            m.get("ValueType") == "CODE" and str(m.ConceptCodeSequence[0].CodeMeaning) == "Mean"
                            for m in child.get("ContentSequence", [])):
                        found[finding] = str(child.MeasuredValueSequence[0].NumericValue)
                walk(children)

    walk(sr.ContentSequence)
    return found


def _screenshot(html_path: Path, png_path: Path, height_px: int, profile: Path) -> None:
    """Headless Chromium screenshot of ``html_path`` at PAGE_WIDTH_PX x ``height_px``."""
    profile.mkdir(parents=True, exist_ok=False)  # a new, empty profile for every run
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={PAGE_WIDTH_PX},{height_px}",
           f"--screenshot={png_path}", html_path.resolve().as_uri()]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True,
                            env={**os.environ, "HOME": str(profile)})
    try:
        output, _ = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Chromium's helper processes too
        output, _ = proc.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s:\n{output[-3000:]}")
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{output[-3000:]}"
    assert png_path.is_file(), f"chromium wrote no screenshot:\n{output[-3000:]}"


def test_sr_renders_with_dsr2html_and_chromium(tmp_path, abdomen_series):
    require_tool(DSR2HTML)
    require_tool(CHROMIUM)
    out = tmp_path / "analysis"
    result = analyze_files(abdomen_series, out)
    assert result.status == "ok", result.reason
    assert set(result.levels) >= {"L1", "L2", "L3", "L4"}

    # dcmtk renders the SR as HTML
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    html_path = ARTIFACTS / "sr.html"
    run_tool([DSR2HTML, str(out / "sr.dcm"), str(html_path)])
    text = _text(html_path.read_text(encoding="utf-8", errors="replace"))
    assert "Imaging Measurement Report" in text

    # every measured level, with its mean HU exactly as encoded in the SR
    sr = pydicom.dcmread(out / "sr.dcm")
    mean_hu = _mean_hu_by_level(sr)
    segments = dicom_templates.load("segments")["segments"]
    for level in result.levels:
        finding = segments[level]["type"]["meaning"]  # e.g. "L1 vertebra"
        assert finding in text, f"{level}: {finding!r} not rendered"
        assert f'Tracking Identifier = "{segments[level]["description"]}"' in text
        assert finding in mean_hu, f"{level}: no mean attenuation in the SR"
        assert f"{mean_hu[finding]} [hnsf'U]" in text, f"{level}: mean {mean_hu[finding]} HU not rendered"

    # the bone status (coded finding) and its basis, in the Qualitative Evaluations section
    status_meaning = dicom_templates.load("sr_codes")["bone_status_values"][result.bone_status.category]["meaning"]
    qualitative = text.split("Qualitative Evaluations", 1)
    assert len(qualitative) == 2, "no Qualitative Evaluations section rendered"
    assert status_meaning in qualitative[1]
    assert re.sub(r"\s+", " ", result.bone_status.basis) in qualitative[1]

    # headless Chromium screenshots the page; grow the window until the whole page fits
    png_path = ARTIFACTS / "sr.png"
    png_path.unlink(missing_ok=True)
    height = 4000  # the example report is about 3000 px high at this width
    for attempt in range(4):
        _screenshot(html_path, png_path, height, tmp_path / f"chromium-profile-{attempt}")
        with Image.open(png_path) as image:
            assert image.format == "PNG"
            assert image.size == (PAGE_WIDTH_PX, height)
            grey = np.asarray(image.convert("L"))
        inked_rows = np.flatnonzero((grey < 128).any(axis=1))
        if inked_rows.size and inked_rows[-1] < height - 40:
            break  # blank margin at the bottom: the page ended inside the window
        height *= 2
    else:
        pytest.fail(f"the rendered SR does not fit in {PAGE_WIDTH_PX}x{height // 2} px")

    assert png_path.stat().st_size > 20_000, "screenshot suspiciously small"
    dark = float((grey < 128).mean())
    assert 0.002 < dark < 0.5, f"{dark:.2%} dark pixels: blank or black page"
    assert inked_rows[0] < 200, "no text at the top of the page"
    text_lines = int(np.count_nonzero(np.diff(inked_rows) > 1)) + 1  # bands of inked rows
    assert text_lines > 50, f"only {text_lines} line(s) of text rendered"
