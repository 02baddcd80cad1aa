"""Shared benchmark input: the example CT on a 512 x 512 x 300 grid, as a CT Image Storage series."""

from __future__ import annotations

import statistics
from pathlib import Path

import SimpleITK as sitk

from osteonode.ctseries import read_image, write_ct_series

EXAMPLE_CT = Path(__file__).resolve().parents[1].parent / "shared/data/ct/totalseg-example-abdomen/example_ct.nii.gz"
GRID = (512, 512, 300)  # x, y, z


def spacing_512(image: sitk.Image) -> tuple[float, float, float]:
    """Spacing (x, y, z mm) that puts ``GRID`` voxels over ``image``'s extent."""
    return tuple(n * s / m for n, s, m in zip(image.GetSize(), image.GetSpacing(), GRID))


def series_512(out_dir: Path) -> list[Path]:
    """Resample the example CT (linear) onto 512 x 512 x 300 voxels over the same extent and write it."""
    image = read_image(EXAMPLE_CT)
    resampled = sitk.Resample(image, GRID, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_512(image),
                              image.GetDirection(), -1024.0, sitk.sitkInt16)
    return write_ct_series(resampled, out_dir)


def median(values: list[float]) -> float:
    return statistics.median(values)
