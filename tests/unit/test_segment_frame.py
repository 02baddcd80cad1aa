"""Unit tests of the shared helpers of the built-in segmenters (osteonode.segment.frame)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from osteonode.segment.frame import IN_PLANE, fill_holes


@pytest.mark.parametrize("structure", [None, IN_PLANE, ndi.generate_binary_structure(3, 3)])
@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_fill_holes_is_scipy_s_fill_on_random_masks(structure, fraction):
    rng = np.random.default_rng(int(fraction * 10))
    mask = ndi.gaussian_filter(rng.random((30, 40, 50)), 1.5) > 0.5 - (0.5 - fraction) * 0.1
    expected = ndi.binary_fill_holes(mask, structure=structure)
    assert (expected & ~mask).any()  # the masks have holes to fill
    np.testing.assert_array_equal(fill_holes(mask, structure), expected)


def test_fill_holes_in_plane_fills_a_ring_on_the_first_slice_and_not_a_notch_open_to_the_side():
    mask = np.zeros((3, 9, 9), bool)
    mask[0, 2:7, 2:7] = True
    mask[0, 3:6, 3:6] = False  # a ring on the first slice: its inside is a hole in that plane
    mask[2, 2:7, 0:7] = True
    mask[2, 3:6, 0:6] = False  # a notch open to the array's side: not a hole
    filled = fill_holes(mask, IN_PLANE)
    assert filled[0, 3:6, 3:6].all()
    assert not filled[2, 3:6, 0:6].any()
    np.testing.assert_array_equal(filled, ndi.binary_fill_holes(mask, structure=IN_PLANE))


@pytest.mark.parametrize("mask", [np.zeros((4, 5), bool), np.ones((4, 5), bool), np.ones((2, 3, 4), bool)])
def test_fill_holes_of_an_empty_and_a_full_mask(mask):
    np.testing.assert_array_equal(fill_holes(mask), mask)
