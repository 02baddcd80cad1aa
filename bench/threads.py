"""The built-in segmentation of the 512 x 512 x 300 grid in one thread and in its threads, same process.

``threaded`` is :func:`osteonode.segment.backends.builtin` as the pipeline runs
it (the femurs in a thread beside the spine, the bodies on
``osteonode.segment.SEGMENTATION_THREADS`` threads); ``one thread`` is the same
code with ``SEGMENTATION_THREADS`` set to 1 and the femurs segmented after the
spine. After one warm-up run, the two alternate ``--repeats`` times; the script
prints the median seconds of each, their ratio, and whether the label maps are
identical.

Usage: python bench/threads.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.robustness import grid_512_volume  # noqa: E402
from osteonode.segment import SpineSegmentation, backends, spine  # noqa: E402
from osteonode.volume import Volume  # noqa: E402


def one_thread(volume: Volume) -> SpineSegmentation:
    """``builtin`` without threads: the spine's bodies one at a time, then the femurs."""
    threads, spine.SEGMENTATION_THREADS = spine.SEGMENTATION_THREADS, 1
    try:
        view = backends.canonical_view(volume)
        segmentation = backends.segment_spine(volume, view)
        segmentation.femurs = backends.segment_proximal_femurs(volume, view)
    finally:
        spine.SEGMENTATION_THREADS = threads
    return segmentation


def identical(a: SpineSegmentation, b: SpineSegmentation) -> bool:
    """Same bodies, ROIs, whole vertebrae, confidences and femur labels."""
    return (all(np.array_equal(getattr(a, name), getattr(b, name)) for name in ("bodies", "trabecular", "whole"))
            and a.confidence == b.confidence and a.femurs is not None and b.femurs is not None
            and np.array_equal(a.femurs.labels, b.femurs.labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    volume = grid_512_volume()
    same = identical(backends.builtin(volume), one_thread(volume))
    runs: dict[str, list[float]] = {"one thread": [], "threaded": []}
    for _ in range(args.repeats):
        for name, segment in (("one thread", one_thread), ("threaded", backends.builtin)):
            start = time.perf_counter()
            segment(volume)
            runs[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(seconds) for name, seconds in runs.items()}
    for name, seconds in runs.items():
        print(f"{name:10s} median {medians[name]:.2f} s of {len(seconds)} ({', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"ratio threaded / one thread: {medians['threaded'] / medians['one thread']:.2f}; "
          f"label maps identical: {same}; threads: {spine.SEGMENTATION_THREADS}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
