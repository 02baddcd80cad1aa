"""Time and memory of the seed000 radiomics (1,210 pyradiomics features) per vertebra.

For each grid -- the example CT as given (3 mm), resampled (linear) to
0.8 x 0.8 x 1.25 mm, and resampled to 512 x 512 x 300 voxels over the same extent
(0.71 x 0.59 x 1.12 mm) -- the CT is segmented once with the built-in backend, then
the L1-L4 features are extracted REPEATS times in three ways, in turn:

* ``2 processes``: :func:`osteonode.measure.radiomics.extract_features` as
  ``analyze`` runs it by default (``radiomics_processes = 2``: levels in two
  worker processes);
* ``1 process``: the same in this process (``radiomics_processes = 1``);
* ``reference``: one process with pyradiomics' own ``getBinEdges`` put back
  (the reference, in the same process: what the node cost before it passed
  pyradiomics only the minimum and maximum of each ROI, and before the
  worker processes).

Prints the median wall-clock seconds per vertebra of each, the ratios to the
reference, and the peak memory of the process tree during one more run with 2
processes (this process, which holds the CT and its segmentation, plus the
forkserver and the workers; the sum of the peaks of the processes alive
together, an upper bound: ``TreePeak``).

Ends with a check of the regression bounds (formerly a test in the unit suite;
generous, for a shared 2-core machine): the 1-process median at most
``MAX_S_PER_VERTEBRA`` s per vertebra and the peak at most ``MAX_PEAK_MIB``;
exits 1 when a bound is exceeded.

Usage: python bench/features.py [--repeats 5] [--grids native thin grid512]
(the file is not called radiomics.py: run as a script, bench/ comes first on
``sys.path`` and would hide the pyradiomics package).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TreePeak, median, spacing_512  # noqa: E402
from radiomics import imageoperations  # noqa: E402
from segmentation import example_image, thin  # noqa: E402

from osteonode.measure import radiomics as node_radiomics  # noqa: E402
from osteonode.segment.spine import segment_spine  # noqa: E402
from osteonode.volume import Volume  # noqa: E402

GRIDS = ("native", "thin", "grid512")
#: Regression bounds, 1 process, s per vertebra (the 512 grid has none).
MAX_S_PER_VERTEBRA = {"native": 3.0, "thin": 8.0}
MAX_PEAK_MIB = 2048


def load(grid: str) -> Volume:
    """The example CT on ``grid`` (``(z, y, x)`` HU)."""
    image = example_image()
    if grid == "native":
        return Volume.from_sitk(image)
    if grid == "thin":
        return thin(image)
    return thin(image, spacing_512(image))


def _per_vertebra(volume: Volume, segmentation, processes: int = 1) -> float:
    start = time.perf_counter()
    rows = node_radiomics.extract_features(volume, segmentation, "seed000", processes=processes)
    return (time.perf_counter() - start) / len(rows)


def run_grid(grid: str, repeats: int, queue) -> None:
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    volume = load(grid)
    segmentation = segment_spine(volume)
    parallel, serial, reference = [], [], []
    for _ in range(repeats):
        parallel.append(_per_vertebra(volume, segmentation, processes=2))
        serial.append(_per_vertebra(volume, segmentation))
        imageoperations.getBinEdges = node_radiomics._PYRADIOMICS_BIN_EDGES
        try:
            reference.append(_per_vertebra(volume, segmentation))
        finally:
            imageoperations.getBinEdges = node_radiomics._bin_edges
    with TreePeak() as peak:  # a separate run: polling /proc would slow the timed ones
        _per_vertebra(volume, segmentation, processes=2)
    queue.put((grid, volume.shape, median(parallel), median(serial), median(reference), peak.mib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grids", nargs="+", choices=GRIDS, default=list(GRIDS))
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    print(f"seed000, L1-L4, {args.repeats} runs each, medians (s per vertebra; ratio to the reference)")
    print(f"{'grid':8} {'shape':>14} {'2 processes':>16} {'1 process':>16} {'reference':>10} {'peak MiB':>9}")
    exceeded = []
    for grid in args.grids:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_grid, args=(grid, args.repeats, queue))
        proc.start()
        name, shape, parallel, serial, ref, peak = queue.get()
        proc.join()
        print(f"{name:8} {'x'.join(map(str, shape)):>14} {parallel:8.2f} ({parallel / ref:4.2f}) "
              f"{serial:8.2f} ({serial / ref:4.2f}) {ref:10.2f} {peak:9.0f}")
        if serial > MAX_S_PER_VERTEBRA.get(name, float("inf")):
            exceeded.append(f"{name}: {serial:.2f} s per vertebra > {MAX_S_PER_VERTEBRA[name]} s")
        if peak > MAX_PEAK_MIB:
            exceeded.append(f"{name}: peak {peak:.0f} MiB > {MAX_PEAK_MIB} MiB")
    print("bounds: " + ("; ".join(exceeded) if exceeded else "PASS"))
    sys.exit(1 if exceeded else 0)


if __name__ == "__main__":
    main()
