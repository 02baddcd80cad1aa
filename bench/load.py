"""Drain time of a burst: 20 studies from 10 senders at once, and the node's memory before and after.

Each study is one CT series of the example CT (3 mm, its own Study, Series and
SOP Instance UIDs). Ten dcmtk ``storescu`` processes (TCP_NODELAY=1) send two
studies each, all at once, to one ``osteonode serve`` on the embedded queue
(quiet period 2 s, no destination: the results stay in the outbox). The drain
time runs from the first send until the analysing processes have logged every
study's task as ended (``result.json`` is written twice: after the SR and at
the end), each study with a ``result.json``. The PSS
(proportional set size, /proc/<pid>/smaps_rollup) of the node's process tree
is read after start-up (listening, workers up) and again once idle after the
burst; the peak is the largest PSS sum seen while draining.

With ``--broker redis`` the node runs ``serve`` (listener, no analyses) with a
Redis broker and ``--workers`` separate ``osteonode worker --concurrency C``
processes (C from ``--concurrency``, per worker). Every configuration
(each value of ``--concurrency`` with, for Redis, each value of ``--workers``;
comma-separated lists) runs ``--repeats`` times, alternating, and the medians
are printed.

Usage: python bench/load.py [--concurrency 1,2] [--repeats 3] [--studies 20] [--senders 10]
                            [--broker embedded|redis] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from common import EXAMPLE_CT, descendants, median  # noqa: E402
from node import NodeProcess, write_config  # noqa: E402
from services import RedisServer  # noqa: E402

from osteonode.ctseries import read_image, write_ct_series  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
POLL_S = 0.2
IDLE_WAIT_S = 10.0


class WorkerProcess(NodeProcess):
    """``osteonode worker --config FILE --concurrency N``."""

    def __init__(self, workdir: Path, config: Path, concurrency: int) -> None:
        self.concurrency = concurrency
        super().__init__(workdir, config, "worker")

    def _command(self) -> list[str]:
        return [*super()._command(), "--concurrency", str(self.concurrency)]


def pss_mib(root: int) -> float:
    """PSS of ``root`` and all its descendants, MiB."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:  # exited meanwhile
            pass
    return total / 1024


def make_studies(out: Path, n: int) -> list[list[Path]]:
    image = read_image(EXAMPLE_CT)
    return [write_ct_series(image, out / f"study{i:02d}", patient_id=f"LOAD-{i:02d}") for i in range(n)]


def run_once(work: Path, studies: list[list[Path]], senders: int, concurrency: int, broker: str,
             workers: int) -> dict[str, float]:
    """One burst against a fresh node; seconds and MiB."""
    node_dir = work / f"node-{time.monotonic_ns()}"
    node_dir.mkdir()
    services = []
    try:
        redis_url = None
        if broker == "redis":
            redis = RedisServer(node_dir).start()
            services.append(redis)
            redis_url = redis.url
        config, port = write_config(node_dir, broker_url=redis_url, destinations=[], quiet_period_s=2.0,
                                    extra=f"analysis_concurrency = {concurrency}")
        serve = NodeProcess(node_dir, config, "serve", port).start()
        services.append(serve)
        roots = [serve.proc.pid]
        for i in range(workers if broker == "redis" else 0):
            (node_dir / f"w{i}").mkdir()
            worker = WorkerProcess(node_dir / f"w{i}", config, concurrency).start()
            services.append(worker)
            roots.append(worker.proc.pid)
        time.sleep(3)  # pool children forked and settled
        start_pss = sum(pss_mib(r) for r in roots)
        outbox = node_dir / "outbox"
        start = time.monotonic()
        per_sender = [studies[i::senders] for i in range(senders)]
        procs = [subprocess.Popen(["/usr/bin/storescu", "-aec", "OSTEONODE", "127.0.0.1", str(port),
                                   *[str(f) for study in mine for f in study]], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for mine in per_sender if mine]
        peak = start_pss
        analysing = services[-workers:] if broker == "redis" else [serve]
        while sum(s.log_path.read_text(errors="replace").count("] succeeded in ") for s in analysing) < len(studies):
            for s in services:
                s.check_alive()
            peak = max(peak, sum(pss_mib(r) for r in roots))
            time.sleep(POLL_S)
        drain = time.monotonic() - start
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-300:]}")
        statuses = [json.loads(p.read_text())["status"] for p in outbox.glob("*/result.json")]
        time.sleep(IDLE_WAIT_S)
        idle_pss = sum(pss_mib(r) for r in roots)
        return {"drain_s": drain, "start_pss": start_pss, "peak_pss": peak, "idle_pss": idle_pss,
                "ok": statuses.count("ok")}
    finally:
        for s in reversed(services):
            s.stop(timeout_s=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,2", help="comma-separated analysis_concurrency values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--broker", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--workers", default="1", help="comma-separated osteonode worker process counts (Redis)")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")] if args.broker == "redis" else [0]
    levels = [(int(c), w) for c in args.concurrency.split(",") for w in worker_counts]
    work = Path(tempfile.mkdtemp(prefix="osteonode-load-"))
    try:
        studies = make_studies(work / "ct", args.studies)
        runs: dict[tuple[int, int], list[dict[str, float]]] = {level: [] for level in levels}
        for repeat in range(args.repeats):
            for c, w in levels:
                r = run_once(work, studies, args.senders, c, args.broker, w)
                runs[c, w].append(r)
                print(f"run {repeat + 1} concurrency {c}, workers {w}: drain {r['drain_s']:.1f} s, ok {r['ok']:.0f}/"
                      f"{args.studies}, PSS start {r['start_pss']:.0f} / peak {r['peak_pss']:.0f} / idle "
                      f"{r['idle_pss']:.0f} MiB", flush=True)
        where = "osteonode worker processes, Redis" if args.broker == "redis" else "serve, embedded queue"
        print(f"\n{args.studies} studies of {len(studies[0])} slices from {args.senders} senders, {where}, "
              f"medians of {args.repeats}:")
        print("| concurrency | workers | drain | PSS after start-up | peak PSS | idle PSS after | idle / start-up |")
        print("|---|---|---|---|---|---|---|")
        for c, w in levels:
            m = {k: median([r[k] for r in runs[c, w]]) for k in runs[c, w][0]}
            print(f"| {c} | {w or '-'} | {m['drain_s']:.1f} s | {m['start_pss']:.0f} MiB | {m['peak_pss']:.0f} MiB | "
                  f"{m['idle_pss']:.0f} MiB | {m['idle_pss'] / m['start_pss']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
