"""Ingest throughput: `osteonode serve` versus dcmtk `storescp`, same series, same sender, one run.

Sends the example CT resampled to 512 x 512 x 300 (300 slices, uncompressed)
with dcmtk `storescu` (TCP_NODELAY=1) to each receiver, alternating, REPEATS
times, and prints the median slices per second of each and their ratio.
The node runs on the embedded queue with a long quiet period, so no analysis
competes with the receive path during the measurement.

Usage: python bench/ingest.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, series_512  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def send(port: int, aet: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["/usr/bin/storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                   env=ENV, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="osteonode-bench-"))
    procs = []
    try:
        files = series_512(work / "ct")
        node_dir = work / "node"
        for sub in ("spool", "outbox", "queue"):
            (node_dir / sub).mkdir(parents=True)
        node_port, scp_port = free_port(), free_port()
        config = work / "node.toml"
        config.write_text(f'bind_address = "127.0.0.1"\nport = {node_port}\nstudy_quiet_period_s = 3600\n'
                          f'spool_dir = "{node_dir}/spool"\noutbox_dir = "{node_dir}/outbox"\n'
                          f'queue_dir = "{node_dir}/queue"\n')
        (work / "storescp").mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "osteonode", "--log-level", "WARNING", "serve",
                                       "--config", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(work / "storescp"),
                                       str(scp_port)], env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_listening(node_port)
        wait_listening(scp_port)
        node_s, scp_s = [], []
        for _ in range(args.repeats):
            node_s.append(send(node_port, "OSTEONODE", files))
            scp_s.append(send(scp_port, "STORESCP", files))
        n = len(files)
        node_rate, scp_rate = n / median(node_s), n / median(scp_s)
        print(f"series: {n} slices of 512x512 int16, uncompressed; {args.repeats} sends each, medians")
        print(f"osteonode serve : {node_rate:7.1f} slices/s  (median {median(node_s):.2f} s)")
        print(f"dcmtk storescp  : {scp_rate:7.1f} slices/s  (median {median(scp_s):.2f} s)")
        print(f"ratio osteonode/storescp: {node_rate / scp_rate:.2f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
