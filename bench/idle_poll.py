"""Idle cost of series completion: the old whole-spool scan vs the job store's index of open studies.

Builds a spool of N finished studies (one series folder and a ``.jobs``
marker each, as a handled study leaves them) and times one poll of each::

    python bench/idle_poll.py 1000 5000 20000
"""

from __future__ import annotations

import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from osteonode.config import SelectionSettings
from osteonode.ingest.completion import JOBS_DIR, _Marker, _poll, find_due_studies
from osteonode.jobstore import JobStore

RULES = SelectionSettings()


def _median_s(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(counts: list[int]) -> None:
    print("| finished studies | whole-spool scan, ms | store index poll, ms |")
    print("| ---: | ---: | ---: |")
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            spool = Path(tmp) / "spool"
            (spool / JOBS_DIR).mkdir(parents=True)
            store = JobStore(Path(tmp) / "jobs.sqlite3")
            for i in range(n):
                study = f"2.{i}"
                (spool / study / f"{study}.1").mkdir(parents=True)
                (spool / JOBS_DIR / f"{study}.json").write_text(
                    _Marker(last_arrival_ns=2**62, fingerprint="0").model_dump_json())
                store.record_arrival(study, f"{study}.1", at=float(i))
                store.close_study(study, float(n))
            scan = _median_s(partial(find_due_studies, spool, 5, RULES))
            poll = _median_s(partial(_poll, spool, 5, RULES, lambda job: None, store, (OSError,), {}))
            print(f"| {n} | {scan * 1e3:.1f} | {poll * 1e3:.3f} |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 5000])
