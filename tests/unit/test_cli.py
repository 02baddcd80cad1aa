"""The console script's commands and `config check`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from osteonode.cli import app

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "osteonode.example.toml"


def test_console_script_has_the_commands():
    out = subprocess.run([sys.executable, "-m", "osteonode", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("serve", "worker", "analyze", "send", "config", "demo"):
        assert command in out


def test_config_check_prints_effective_config(tmp_path, monkeypatch):
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    for sub in ("spool", "outbox", "queue"):
        (tmp_path / sub).mkdir()
    config = tmp_path / "node.toml"
    text = EXAMPLE.read_text().replace("/var/lib/osteonode", str(tmp_path))
    config.write_text(text)
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0, result.output
    effective = json.loads(result.stdout)  # stderr may carry a logged warning
    assert effective["ae_title"] == "OSTEONODE" and effective["destinations"][0]["port"] == 4242
    assert effective["spool_dir"] == str(tmp_path / "spool")


def test_config_check_reports_every_value_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    config = tmp_path / "bad.toml"
    config.write_text('ae_title = "WAY_TOO_LONG_AE_TITLE"\nport = 0\nunknown_key = 1\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2
    for fragment in ("ae_title: Value error", "port: Input should be greater than or equal to 1",
                     "unknown_key: Extra inputs are not permitted"):
        assert fragment in result.output


def test_config_check_masks_the_broker_password(tmp_path, monkeypatch):
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    for sub in ("spool", "outbox"):
        (tmp_path / sub).mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'spool_dir = "{tmp_path}/spool"\noutbox_dir = "{tmp_path}/outbox"\n'
                      'broker_url = "redis://osteo:s3cret@10.1.2.3:6379/0"\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert json.loads(result.stdout)["broker_url"] == "redis://osteo:****@10.1.2.3:6379/0"


def test_config_check_validates_the_series_selection_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    config = tmp_path / "rules.toml"
    config.write_text('[selection]\nbogus = 1\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2 and "selection.bogus: Extra inputs are not permitted" in result.output
    config.write_text('[selection]\nkernel_order = ["lung", "soft"]\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2 and "kernel_order must list each of soft, unknown, bone, sharp, lung" in result.output


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the console script as an admin would (a real process; PYTHONPATH inherited)."""
    return subprocess.run([sys.executable, "-m", "osteonode", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_version_prints_and_exits_0():
    from osteonode import __version__

    run = _cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == __version__


def test_demo_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    (tmp_path / "thesis.txt").write_text("five years of work")
    run = _cli("demo", "--workdir", str(tmp_path))
    assert run.returncode == 2 and "was not made by `osteonode demo`" in run.stderr
    assert (tmp_path / "thesis.txt").read_text() == "five years of work"


def test_send_without_destination_or_port_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    (tmp_path / "x.dcm").write_bytes(b"")
    no_destination = _cli("send", str(tmp_path))
    assert no_destination.returncode == 2 and "no destination" in no_destination.stderr
    no_port = _cli("send", str(tmp_path), "--host", "127.0.0.1")
    assert no_port.returncode == 2 and "--host and --port go together" in no_port.stderr


def test_a_missing_config_file_is_one_line_without_traceback(tmp_path):
    for command in (["send", str(tmp_path), "--to", "pacs"], ["analyze", str(tmp_path), "-o", str(tmp_path / "o")]):
        run = _cli(*command, "--config", str(tmp_path / "missing.toml"))
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.strip() == f"config file not found: {tmp_path / 'missing.toml'}"


@pytest.mark.integration
def test_analyze_skips_non_dicom_fills_empty_uids_and_writes_private_files(tmp_path, monkeypatch):
    """The real JPEG 2000 series has empty UIDs; a readme.txt beside it is skipped with a count."""
    from tests.conftest import J2K_DIR, require_data

    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    series = tmp_path / "in"
    shutil.copytree(require_data(J2K_DIR), series)
    (series / "readme.txt").write_text("not DICOM")
    out = tmp_path / "out"
    run = _cli("analyze", str(series), "-o", str(out))
    assert run.returncode in (0, 3), run.stderr  # 3: not evaluable (this crop shows T11-T12 only)
    assert "skipped 1 file(s) that are not DICOM" in run.stderr
    assert "note: 20 file(s) had empty UIDs" in run.stderr and "Traceback" not in run.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["study_instance_uid"] and result["series_instance_uid"]
    assert (out / "sr.dcm").is_file()
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}


def test_config_check_loads_the_radiomics_preset_and_the_model_as_a_job_would(tmp_path, monkeypatch):
    """A mistyped preset or a missing/mismatched model fails `config check` (exit 2), not every job."""
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    for sub in ("spool", "outbox"):
        (tmp_path / sub).mkdir()
    dirs = (f'spool_dir = "{tmp_path}/spool"\noutbox_dir = "{tmp_path}/outbox"\n'
            'broker_url = "redis://127.0.0.1:6379/0"\n')  # no queue folder needed
    config = tmp_path / "node.toml"
    config.write_text(dirs + '[analysis]\nradiomics_preset = "seed00O"\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2 and "analysis.radiomics_preset" in result.output and "seed00O" in result.output
    config.write_text(dirs + f'[analysis.model]\npath = "{tmp_path}/missing.joblib"\nsha256 = "{"0" * 64}"\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2 and "analysis.model" in result.output and "does not exist" in result.output
    config.write_text(dirs + '[analysis]\nradiomics_preset = "seed003"\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0, result.output
