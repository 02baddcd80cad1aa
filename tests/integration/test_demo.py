"""`osteonode demo`: the README's main job on embedded defaults, end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ABDOMEN_NIFTI, require_data

pytestmark = pytest.mark.integration


def test_demo_round_trip_prints_summary(tmp_path):
    run = subprocess.run([sys.executable, "-m", "osteonode", "demo", "--ct", str(require_data(ABDOMEN_NIFTI)),
                          "--workdir", str(tmp_path / "demo"), "--timeout-s", "300"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "SEG osteonode SEG" in out and "SR  osteonode Bone Health SR" in out
    assert "OT  osteonode Key Images" in out and "DOC osteonode Report" in out
    assert out.count("same study: yes") == 5
    assert "status: ok" in out and "bone status:" in out and "vBMD mg/cm3" in out
    assert "proximal femur, left: excluded (metal" in out
    for level in ("L1", "L2", "L3", "L4"):
        assert f"\n{level} " in out
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "demo" / "pacs").iterdir()) == \
        ["DOC", "OT", "OT", "SEG", "SR"]
