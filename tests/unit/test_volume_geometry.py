"""The volume type: validation, index <-> LPS mapping, grid check, bounding boxes and crops (no data files)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from osteonode.volume import Volume, bounding_box, grow_box

SHAPE = (6, 8, 10)


def _oblique() -> Volume:
    """A (z, y, x) volume whose axes are rotated in patient space, anisotropic, values = flat index."""
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, -2.5]  # z: feet-ward
    affine[:3, 1] = [-s * 0.8, c * 0.8, 0.0]  # y: rows
    affine[:3, 2] = [c * 0.7, s * 0.7, 0.0]  # x: columns
    affine[:3, 3] = [-120.0, 35.0, 400.0]
    return Volume(hu=np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), affine=affine)


def test_construction_validates_the_grid():
    with pytest.raises(ValueError, match="3-D"):
        Volume(hu=np.zeros((4, 4), np.float32), affine=np.eye(4))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="invalid volume affine"):
        Volume(hu=np.zeros(SHAPE, np.float32), affine=sheared)
    given = np.diag([2.0, 1.0, 1.0, 1.0])
    volume = Volume(hu=np.zeros(SHAPE, np.float32), affine=given)
    given[0, 0] = 5.0  # the volume keeps its own copy
    assert volume.spacing == (2.0, 1.0, 1.0) and volume.shape == SHAPE


def test_index_and_lps_map_both_ways():
    volume = _oblique()
    index = np.array([[0, 0, 0], [5, 7, 9], [1.5, 2.25, 3.0]])
    lps = volume.index_to_lps(index)
    expected = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    np.testing.assert_allclose(lps, expected, atol=1e-9)
    np.testing.assert_allclose(volume.lps_to_index(lps), index, atol=1e-9)
    assert volume.index_to_lps(index[1]).shape == (3,)  # one point in, one point out
    np.testing.assert_allclose(np.linalg.norm(volume.index_direction(1)), 1.0)
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.7))


def test_require_grid_names_the_array():
    volume = _oblique()
    volume.require_grid(np.zeros(SHAPE, np.uint8))
    with pytest.raises(ValueError, match=r"body label map shape \(6, 8, 9\) != volume shape \(6, 8, 10\)"):
        volume.require_grid(np.zeros((6, 8, 9), np.uint8), "body label map")


def test_crop_keeps_every_voxel_at_its_patient_position():
    volume = _oblique()
    box = (slice(1, 4), slice(2, 8), slice(0, 5))
    cropped = volume.crop(box)
    assert cropped.hu.flags.c_contiguous and np.array_equal(cropped.hu, volume.hu[box])
    np.testing.assert_allclose(cropped.index_to_lps([0, 0, 0]), volume.index_to_lps([1, 2, 0]), atol=1e-9)
    np.testing.assert_allclose(cropped.index_to_lps([2, 5, 4]), volume.index_to_lps([3, 7, 4]), atol=1e-9)
    flipped = volume.crop((slice(None, None, -1), slice(None), slice(None, None, -1)))
    np.testing.assert_allclose(flipped.index_to_lps([0, 3, 0]), volume.index_to_lps([5, 3, 9]), atol=1e-9)
    assert flipped.hu[0, 3, 0] == volume.hu[5, 3, 9]


def test_bounding_box_grows_and_clips():
    mask = np.zeros(SHAPE, bool)
    mask[2:4, 1, 5:7] = True
    assert bounding_box(mask) == (slice(2, 4), slice(1, 2), slice(5, 7))
    assert bounding_box(mask, 2) == (slice(0, 6), slice(0, 4), slice(3, 9))
    assert bounding_box(mask, (0, 1, 4)) == (slice(2, 4), slice(0, 3), slice(1, 10))
    assert grow_box((slice(2, 4), slice(1, 2), slice(5, 7)), SHAPE, 9) == (slice(0, 6), slice(0, 8), slice(0, 10))
    assert _oblique().margin_voxels(2.0).tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="empty"):
        bounding_box(np.zeros(SHAPE, bool))


def test_simpleitk_image_is_x_y_z_on_the_same_positions():
    volume = _oblique()
    image = volume.to_sitk()
    assert image.GetSize() == SHAPE[::-1]
    for z, y, x in [(0, 0, 0), (5, 1, 9), (2, 7, 3)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((x, y, z)), volume.index_to_lps([z, y, x]),
                                   atol=1e-6)
        assert image[x, y, z] == volume.hu[z, y, x]
    back = Volume.from_sitk(image)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    assert np.array_equal(back.hu, volume.hu)
    labels = volume.to_sitk(np.ones(SHAPE, np.uint8))
    assert labels.GetPixelID() == sitk.sitkUInt8 and labels.GetOrigin() == image.GetOrigin()
    with pytest.raises(ValueError, match="volume shape"):
        volume.to_sitk(np.ones((2, 2, 2), np.uint8))
