"""Per-stage time of `analyze`, and the wall time of the `osteonode analyze` command.

Writes the example CT on a grid -- ``thin``: 0.8 x 0.8 x 1.25 mm, 458 x 379 x
269 voxels (issue 13's series); ``512``: 512 x 512 x 300 -- then, REPEATS
times in turn:

* ``reference``: reading the series' files with pydicom (the I/O floor every
  stage sits on), in this process;
* ``pipeline``: :func:`osteonode.pipeline.analyze_files` in this process (warm:
  modules imported), with the default settings (no radiomics);
* ``cli``: ``python -m osteonode analyze DIR --out OUT`` as a new process, the
  wall time an operator sees, start-up included.

Prints the median seconds per pipeline stage and of each whole, each also as a
ratio to the reference, and the peak RSS of this process and of the largest
``analyze`` child.

Usage: python bench/analyze.py [--repeats 3] [--grid thin|512] [--radiomics-export]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GRIDS, median, series_512  # noqa: E402

from osteonode.config import AnalysisSettings  # noqa: E402
from osteonode.pipeline import analyze_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="thin")
    parser.add_argument("--radiomics-export", action="store_true", help="[analysis] radiomics_export = true")
    args = parser.parse_args()
    settings = AnalysisSettings(radiomics_export=args.radiomics_export)
    work = Path(tempfile.mkdtemp(prefix="osteonode-bench-"))
    try:
        files = series_512(work / "ct", args.grid)
        config = work / "osteonode.toml"
        config.write_text(f"[analysis]\nradiomics_export = {str(args.radiomics_export).lower()}\n")
        reference, stages, totals, cli = [], {}, [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            for f in files:
                _ = pydicom.dcmread(f).pixel_array  # decode, as load_series does
            reference.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = analyze_files(files, work / f"out{i}", settings)
            totals.append(time.perf_counter() - start)
            for stage, seconds in result.timings_s.items():
                stages.setdefault(stage, []).append(seconds)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "osteonode", "analyze", str(work / "ct"), "--out",
                            str(work / f"cli{i}"), "--config", str(config)], check=True, capture_output=True)
            cli.append(time.perf_counter() - start)
        ref = median(reference)
        shape = pydicom.dcmread(files[0], stop_before_pixels=True)
        print(f"series: {shape.Columns}x{shape.Rows}x{len(files)}; status {result.status}; "
              f"radiomics_export {args.radiomics_export}; {args.repeats} runs, medians")
        print(f"{'stage':12} {'seconds':>8} {'x read':>8}")
        print(f"{'(read)':12} {ref:8.2f} {1.0:8.2f}")
        for stage, values in stages.items():
            print(f"{stage:12} {median(values):8.2f} {median(values) / ref:8.2f}")
        print(f"{'pipeline':12} {median(totals):8.2f} {median(totals) / ref:8.2f}")
        print(f"{'cli wall':12} {median(cli):8.2f} {median(cli) / ref:8.2f}   (osteonode analyze, start-up included)")
        print(f"peak RSS: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
              f"analyze child {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
