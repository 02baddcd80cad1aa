"""Run osteonode itself as real processes (``osteonode serve`` / ``osteonode worker``) for tests."""

from __future__ import annotations

import sys
from pathlib import Path

from services import ManagedProcess, free_port, process_listens_on


def write_config(workdir: Path, *, broker_url: str | None, destinations: list[tuple[str, str, int]],
                 quiet_period_s: float = 1.5, extra: str = "", web: str = "") -> tuple[Path, int]:
    """Write a node config into ``workdir`` and create its directories; return (path, port).

    ``extra``: top-level lines; ``web``: lines of the ``[web]`` section (its port is a free one).
    """
    port = free_port()
    for sub in ("spool", "outbox", "queue"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    text = (f'ae_title = "OSTEONODE"\nbind_address = "127.0.0.1"\nport = {port}\n'
            f'spool_dir = "{workdir / "spool"}"\noutbox_dir = "{workdir / "outbox"}"\n'
            f'queue_dir = "{workdir / "queue"}"\nstudy_quiet_period_s = {quiet_period_s}\n'
            + (f'broker_url = "{broker_url}"\n' if broker_url else "") + extra + "\n"
            + f"[web]\nport = {free_port()}\n{web}\n")  # one console port per node: tests run nodes side by side
    for i, (aet, host, dport) in enumerate(destinations):
        text += f'[[destinations]]\nname = "dest{i}"\nae_title = "{aet}"\nhost = "{host}"\nport = {dport}\n'
    path = workdir / "osteonode.toml"
    path.write_text(text, encoding="utf-8")
    return path, port


class NodeProcess(ManagedProcess):
    """``osteonode <command> --config FILE`` as a child process, logged to a file."""

    def __init__(self, workdir: Path, config: Path, command: str, port: int | None = None) -> None:
        self.name = f"osteonode {command}"
        self._config, self._cmd, self.port = config, command, port
        super().__init__(workdir, startup_timeout_s=60.0)

    def _pick_ports(self) -> None:
        pass

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "osteonode", "--log-level", "INFO", self._cmd, "--config", str(self._config)]

    def _is_ready(self) -> bool:
        if self.port is None:  # a worker: ready when its log says so
            return "ready." in self.log_tail(200)
        return process_listens_on(self.proc.pid, self.port)
