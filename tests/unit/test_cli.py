"""The console script's commands and `config check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    effective = json.loads(result.output)
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
    assert json.loads(result.output)["broker_url"] == "redis://osteo:****@10.1.2.3:6379/0"


def test_config_check_validates_the_series_selection_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("OSTEONODE_CONFIG", raising=False)
    config = tmp_path / "rules.toml"
    config.write_text('[selection]\nbogus = 1\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2 and "selection.bogus: Extra inputs are not permitted" in result.output
    config.write_text('[selection]\nkernel_order = ["lung", "soft"]\n')
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2 and "kernel_order must list each of soft, unknown, bone, sharp, lung" in result.output
