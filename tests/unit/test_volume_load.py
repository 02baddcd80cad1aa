"""Loading a CT slice stack: :func:`osteonode.volume.load_series` against highdicom's own assembly."""

from __future__ import annotations

import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from osteonode.ctseries import write_ct_series
from osteonode.errors import NotEvaluable
from osteonode.volume import _slice_stack_volume, load_series


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> list[pydicom.Dataset]:
    """Eight oblique 12 x 10 slices of random HU, shuffled."""
    rng = np.random.default_rng(13)
    image = sitk.GetImageFromArray(rng.integers(-1024, 2000, size=(8, 10, 12)).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 1.25))
    image.SetOrigin((-10.0, 20.0, 300.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c))
    datasets = [pydicom.dcmread(p) for p in write_ct_series(image, tmp_path_factory.mktemp("stack"))]
    random.Random(13).shuffle(datasets)
    return datasets


@pytest.mark.parametrize("rescale", [None, ("1", "-1024"), ("1.3", "-1000.7"), ("", ""), ("0.5", "0")])
def test_slice_stack_equals_highdicoms_volume_to_the_bit(stack, rescale):
    datasets = [pydicom.Dataset(ds) for ds in stack]
    for ds in datasets:
        ds.file_meta = stack[0].file_meta
        if rescale is None:
            del ds.RescaleSlope, ds.RescaleIntercept
        else:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
    ours, theirs = _slice_stack_volume(datasets), hd.get_volume_from_series(datasets, dtype=np.float32)
    assert ours.array.dtype == np.float32
    np.testing.assert_array_equal(ours.array, theirs.array)
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    assert ours.frame_of_reference_uid == theirs.frame_of_reference_uid


def test_other_pixel_transforms_go_to_highdicom(stack):
    datasets = [pydicom.Dataset(ds) for ds in stack]
    for ds in datasets:
        ds.file_meta = stack[0].file_meta
        ds.PhotometricInterpretation = "MONOCHROME1"  # highdicom inverts the values
    np.testing.assert_array_equal(_slice_stack_volume(datasets).array,
                                  hd.get_volume_from_series(datasets, dtype=np.float32).array)


def test_a_missing_slice_is_not_evaluable(stack, tmp_path):
    paths = []
    for i, ds in enumerate(sorted(stack, key=lambda d: d.InstanceNumber)):
        if i != 4:
            paths.append(tmp_path / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    with pytest.raises(NotEvaluable, match="regularly-spaced"):
        load_series(paths)
