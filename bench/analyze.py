"""Per-stage time of `analyze` on a ~512 x 512 x 300 CT series.

Runs the pipeline REPEATS times on the example CT resampled to 512 x 512 x
300 and prints the median seconds per stage, each also as a ratio to a
reference measured in the same process: reading the series' files with
pydicom (the I/O floor every stage sits on).

Usage: python bench/analyze.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, series_512  # noqa: E402

from osteonode.pipeline import analyze_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="osteonode-bench-"))
    try:
        files = series_512(work / "ct")
        reference, stages, totals = [], {}, []
        for i in range(args.repeats):
            start = time.perf_counter()
            for f in files:
                pydicom.dcmread(f).pixel_array
            reference.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = analyze_files(files, work / f"out{i}")
            totals.append(time.perf_counter() - start)
            for stage, seconds in result.timings_s.items():
                stages.setdefault(stage, []).append(seconds)
        ref = median(reference)
        print(f"series: {len(files)} slices 512x512; status {result.status}; {args.repeats} runs, medians")
        print(f"{'stage':10} {'seconds':>8} {'x read':>8}")
        print(f"{'(read)':10} {ref:8.2f} {1.0:8.2f}")
        for stage, values in stages.items():
            print(f"{stage:10} {median(values):8.2f} {median(values) / ref:8.2f}")
        print(f"{'total':10} {median(totals):8.2f} {median(totals) / ref:8.2f}")
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
