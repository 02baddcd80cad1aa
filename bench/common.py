"""Shared benchmark input: the example CT on a 512 x 512 x 300 (or 458 x 379 x 269) grid, as a CT series."""

from __future__ import annotations

import os
import statistics
import threading
from pathlib import Path

import SimpleITK as sitk

from osteonode.ctseries import read_image, write_ct_series

EXAMPLE_CT = Path(__file__).resolve().parents[1].parent / "shared/data/ct/totalseg-example-abdomen/example_ct.nii.gz"
#: The 1.5 mm thoracic CTA with its reference T12 mask (``ct_cropped.nii.gz``, ``ref_vertebrae_T12.nii.gz``).
THORACIC_CTA = EXAMPLE_CT.parents[1] / "totalseg-thoracic-cta-crop"
GRID = (512, 512, 300)  # x, y, z


def spacing_512(image: sitk.Image) -> tuple[float, float, float]:
    """Spacing (x, y, z mm) that puts ``GRID`` voxels over ``image``'s extent."""
    return tuple(n * s / m for n, s, m in zip(image.GetSize(), image.GetSpacing(), GRID))


#: Spacing (x, y, z mm) of the ``thin`` grid: 458 x 379 x 269 voxels over the example CT (issue 13's series).
THIN_MM = (0.8, 0.8, 1.25)
#: The benchmark grids: name -> function of the example CT giving (size, spacing), both (x, y, z).
GRIDS = {"thin": lambda image: ([round(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), THIN_MM)],
                                THIN_MM),
         "512": lambda image: (GRID, spacing_512(image))}


def example_on_grid(grid: str = "512") -> sitk.Image:
    """The example CT resampled (linear, int16 HU) onto ``grid`` (a key of :data:`GRIDS`) over the same extent."""
    image = read_image(EXAMPLE_CT)
    size, spacing = GRIDS[grid](image)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), -1024.0, sitk.sitkInt16)


def series_512(out_dir: Path, grid: str = "512") -> list[Path]:
    """Write the example CT on ``grid`` (default 512 x 512 x 300 voxels) as a CT series; its files."""
    return write_ct_series(example_on_grid(grid), out_dir)


def median(values: list[float]) -> float:
    return statistics.median(values)


class TreePeak:
    """Peak resident memory of this process and its descendants together, in MiB (Linux /proc).

    A thread polls every ``interval_s`` seconds and sums the peak resident size
    (``VmHWM``) of this process and of every descendant alive at that moment
    (e.g. radiomics workers and their forkserver); :attr:`mib` is the largest
    such sum. Peaks of different processes need not coincide, so this is an
    upper bound of the memory the tree held at once.

    Use as a context manager: ``with TreePeak() as peak: ...; peak.mib``.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            self.mib = max(self.mib, sum(_hwm_mib(pid) for pid in [os.getpid(), *descendants(os.getpid())]))
            if self._stop.wait(self.interval_s):
                return


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has exited
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
