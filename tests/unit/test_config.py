"""Config validation: every error an admin can make gets a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from osteonode import config
from osteonode.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch):
    for var in ("OSTEONODE_CONFIG", "OSTEONODE_PORT", "OSTEONODE_AE_TITLE"):
        monkeypatch.delenv(var, raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    for sub in ("spool", "outbox", "queue"):
        (tmp_path / sub).mkdir(exist_ok=True)
    path = tmp_path / "node.toml"
    path.write_text(f'spool_dir = "{tmp_path}/spool"\noutbox_dir = "{tmp_path}/outbox"\n'
                    f'queue_dir = "{tmp_path}/queue"\n' + text, encoding="utf-8")
    return path


def test_valid_file_gives_typed_settings(tmp_path):
    path = _write(tmp_path, 'ae_title = "BONE"\nport = 4242\nallowed_calling_ae_titles = ["PACS"]\n'
                            'study_quiet_period_s = 3.5\nbroker_url = "redis://localhost:6379/0"\n'
                            '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "10.0.0.5"\nport = 4242\n')
    s = load_settings(path)
    assert (s.ae_title, s.port, s.study_quiet_period_s) == ("BONE", 4242, 3.5)
    assert s.allowed_calling_ae_titles == ["PACS"]
    assert s.destinations[0].ae_title == "ORTHANC" and not s.embedded_broker


@pytest.mark.parametrize("line, expected", [
    ('ae_title = "ABCDEFGHIJKLMNOPQ"',
     "ae_title: Value error, invalid AE title 'ABCDEFGHIJKLMNOPQ': must not exceed 16"),
    ('ae_title = "BAD\\\\AE"', "must not contain control characters or backslashes"),
    ('ae_title = "   "', "must not be empty"),
    ('ae_title = "TAB\\tAE"', "must not contain control characters"),
    ('ae_title = "KNOCHEN\u00c4"', "printable ASCII only"),
    ("port = 70000", "port: Input should be less than or equal to 65535"),
    ("port = 0", "port: Input should be greater than or equal to 1"),
    ("colour = 1", "colour: Extra inputs are not permitted"),
    ('broker_url = "amqp://x"', "broker_url must be redis://"),
    ('[analysis]\nsegmentation = "totalsegmentator"', "needs segmentation_dir"),
    ('[analysis]\nbone_status_rule = "coin_toss"', "analysis.bone_status_rule"),
    ("[analysis]\nradiomics_processes = 0", "analysis.radiomics_processes"),
    ('[[destinations]]\nname = "p"\nae_title = "X"\nhost = "h"\nport = 99999', "destinations.0.port"),
    ("quiet_period_s = 10", "quiet_period_s was replaced by study_quiet_period_s"),
    ("study_quiet_period_s = 0", "study_quiet_period_s: Input should be greater than 0"),
    ("analysis_concurrency = 0", "analysis_concurrency: Input should be greater than or equal to 1"),
    ('[selection]\nkernel_order = ["soft", "bone"]', "kernel_order must list each of soft, unknown, bone"),
    ('[selection]\nkernel_order = ["soft", "soft", "unknown", "bone", "lung"]', "exactly once"),
    ('[selection]\nphase_order = ["venous"]', "selection.phase_order.0"),
    ("[selection]\npreferred_thickness_mm = [3.0, 1.0]", "preferred_thickness_mm must be [low, high]"),
    ("[selection]\naxial_tolerance_deg = 60", "selection.axial_tolerance_deg"),
    ('[selection]\nphase_keywords = {arterial = [""]}', "phase_keywords must not contain empty words"),
    ('[selection]\nkernel_table = "/nonexistent/kernels.json"', "cannot read kernel table"),
])
def test_invalid_values_are_named_in_the_error(tmp_path, line, expected):
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, line + "\n"))
    assert expected in str(err.value)


def test_missing_directory_is_an_error(tmp_path):
    path = _write(tmp_path, "")
    (tmp_path / "outbox").rmdir()
    with pytest.raises(ConfigError, match="outbox_dir: directory does not exist"):
        load_settings(path)


def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(_write(tmp_path, "port = \n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_environment_overrides_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "port = 4242\n")
    monkeypatch.setenv("OSTEONODE_PORT", "5555")
    assert load_settings(path).port == 5555


def test_example_config_is_valid(tmp_path, monkeypatch):
    example = Path(__file__).resolve().parents[2] / "deploy" / "osteonode.example.toml"
    monkeypatch.chdir(tmp_path)
    s = load_settings(example, require_dirs=False)
    assert s.destinations and s.ae_title


def test_selection_rules_and_kernel_table_from_the_file(tmp_path):
    table = tmp_path / "kernels.json"
    table.write_text('{"rules": [{"pattern": "SITE[0-9]+", "class": "soft"}]}', encoding="utf-8")
    path = _write(tmp_path, f'[selection]\nmax_slice_thickness_mm = 3.0\nkernel_table = "{table}"\n'
                            'phase_order = ["portal_venous", "non_contrast", "unknown", "delayed", "arterial"]\n')
    s = load_settings(path)
    assert s.selection.max_slice_thickness_mm == 3.0 and s.selection.phase_order[0] == "portal_venous"
    assert s.study_quiet_period_s == 30.0 and s.accept_all_storage

    from osteonode.series import kernel_class
    assert kernel_class("site7", s.selection.kernel_table) == "soft"
    assert kernel_class("B30f", s.selection.kernel_table) == "unknown"
    table.write_text('{"rules": [{"pattern": "(", "class": "soft"}]}', encoding="utf-8")
    other = tmp_path / "bad.json"
    other.write_text('{"rules": [{"pattern": "B", "class": "medium"}]}', encoding="utf-8")
    with pytest.raises(ConfigError, match="class must be one of soft, bone, sharp, lung"):
        load_settings(_write(tmp_path, f'[selection]\nkernel_table = "{other}"\n'))


def test_tls_configuration_errors_are_named(tmp_path, tls_pki):
    with pytest.raises(ConfigError, match="tls = true needs the \\[tls\\] section"):
        load_settings(_write(tmp_path, '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\n'
                                       "tls = true\n"))
    with pytest.raises(ConfigError, match="tls: Value error, cannot load the TLS certificate"):
        load_settings(_write(tmp_path, f'[tls]\ncertificate = "{tls_pki.node_cert}"\n'
                                       f'private_key = "{tls_pki.peer_key}"\n'))
    settings = load_settings(_write(tmp_path, f'[tls]\ncertificate = "{tls_pki.node_cert}"\n'
                                              f'private_key = "{tls_pki.node_key}"\nca_bundle = "{tls_pki.ca}"\n'))
    assert settings.tls.require_peer_certificate and settings.tls.scp


def test_analysis_concurrency_is_set_or_one_per_core_bounded_by_memory(tmp_path, monkeypatch):
    assert load_settings(_write(tmp_path, "analysis_concurrency = 3\n")).analysis_processes == 3
    default = load_settings(_write(tmp_path, ""))
    assert default.analysis_processes >= 1  # the real machine
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for available_gib, expected in ((64, 4), (9, 2), (3, 1)):
        monkeypatch.setattr(config, "available_memory_bytes", lambda gib=available_gib: gib * 1024**3)
        assert default.analysis_processes == expected
