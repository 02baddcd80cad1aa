"""The deformities of ``bench/variants.py`` on a phantom spine of known geometry, and Genant's heights on them.

The phantom: six elliptical bodies (T12-L5, 28 mm tall, 34 x 44 mm across,
a 1.2 mm cortical shell of 550 HU around 150 HU marrow, 10 mm discs of
40 HU), built on a 0.25 mm grid and averaged into 3 mm slices as a scanner
would (0.8 mm pixels). Its label map is exact. The deformity must shorten
the body where it says and keep the endplates sharp, and
:func:`osteonode.measure.genant.grade_levels` must measure the applied
height loss on the deformed image with the deformed label map.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from bench.variants import Anatomy, BodyHeights, _pull_labels, _shortening, baseline, deform
from osteonode.anatomy import VERTEBRA_IDS
from osteonode.measure.genant import grade_levels, height_loss
from osteonode.segment import SpineSegmentation
from osteonode.volume import Volume
from tests.ctdata import References

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
SLICE_MM, PIXEL_MM, FINE = 3.0, 0.8, 12  # 12 sub-slices of 0.25 mm per slice


def _phantom() -> tuple[Volume, np.ndarray]:
    """``(z, y, x)`` HU volume and its VerSe label map; z runs superior (slice 0 is caudal)."""
    ny = nx = 90
    nz = 88 * FINE
    z = (np.arange(nz) * SLICE_MM / FINE)[:, None, None]
    y = (np.arange(ny) * PIXEL_MM - 36.0)[None, :, None]
    x = (np.arange(nx) * PIXEL_MM - 36.0)[None, None, :]
    radius = np.hypot(y / 17.0, x / 22.0)
    fine = np.full((nz, ny, nx), 40.0, np.float32)
    fine_labels = np.zeros((nz, ny, nx), np.uint8)
    for k, name in enumerate(LEVELS):
        centre = 30.0 + 38.37 * k  # not aligned with the slices
        dz = np.abs(z - centre)
        body = (dz <= 14.0) & (radius <= 1.0)
        shell = body & ((dz > 12.8) | (radius > 1.0 - 1.2 / 17.0))
        fine[body], fine[shell] = 150.0, 550.0
        fine_labels[np.broadcast_to(body, fine.shape)] = VERTEBRA_IDS[name]
    hu = ndi.gaussian_filter(fine.reshape(-1, FINE, ny, nx).mean(axis=1), (0.3, 0.8, 0.8)).astype(np.float32)
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0
    return Volume(hu=hu, affine=affine), fine_labels[FINE // 2::FINE]


@pytest.fixture(scope="module")
def phantom():
    volume, labels = _phantom()
    refs = References(volume.to_sitk(labels), labels.copy(), (labels > 0).astype(np.uint8),
                      np.zeros(labels.shape, bool))
    measured = grade_levels(volume, SpineSegmentation(bodies=labels, trabecular=np.zeros_like(labels)))
    return volume, labels, refs, Anatomy(bodies=labels, cores={}, heights=BodyHeights.measured(measured)), measured


def _labels_on_image(variant) -> np.ndarray:
    moved = sitk.GetImageFromArray(variant.refs.vertebrae)
    moved.CopyInformation(variant.refs.image)
    grid = variant.volume.to_sitk(np.zeros(variant.volume.shape, np.uint8))
    return sitk.GetArrayFromImage(sitk.Resample(moved, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def test_phantom_heights_agree_between_levels(phantom):
    """Identical bodies at different positions relative to the slices measure alike (the edge is not
    quantised to the slices)."""
    *_, anatomy, measured = phantom
    posterior = [anatomy.heights[n].posterior_mm for n in ("L1", "L2", "L3", "L4")]
    assert max(posterior) - min(posterior) <= 0.6
    assert all(measured[n].genant_grade == 0 for n in ("L1", "L2", "L3", "L4"))


@pytest.mark.parametrize("kind", ["wedge", "biconcave", "crush"])
@pytest.mark.parametrize("loss", [0.2, 0.3, 0.45])
def test_deformity_is_measured(phantom, kind, loss):
    volume, _, refs, anatomy, _ = phantom
    variant = deform(baseline(volume, refs), anatomy, "L2", kind, loss)
    labels = _labels_on_image(variant)
    measured = grade_levels(variant.volume, SpineSegmentation(bodies=labels, trabecular=np.zeros_like(labels)))
    assert measured["L2"].height_loss == pytest.approx(loss, abs=0.05)
    assert all(measured[n].genant_grade == 0 for n in ("L1", "L3", "L4"))
    # the heights the deformity was sized for have the loss asked, and the deformed body measures them to
    # within 2 mm (1.3-1.6 mm off for the 30 % and 45 % wedges and the 45 % biconcave: the window fractions
    # are taken on the unmodified body, whose margins the deformity moves); the loss itself within 0.05, above
    sized, body = variant.truth["deformity"]["sized_for"], measured["L2"]
    assert sized.loss() == pytest.approx(loss, abs=1e-6)
    assert [body.height_anterior_mm, body.height_middle_mm, body.height_posterior_mm] == \
        pytest.approx([sized.anterior_mm, sized.middle_mm, sized.posterior_mm], abs=2.0)


def _stored(ha: float, hm: float, hp: float, reference: float) -> Anatomy:
    return Anatomy(bodies=np.zeros((1, 1, 1), np.uint8), cores={}, heights={"L2": BodyHeights(ha, hm, hp, reference)})


@pytest.mark.parametrize("loss", [0.2, 0.3, 0.45])
def test_shortening_brings_genants_loss_where_genant_measures(loss):
    """The shortening is the smallest at which the stored heights, each shortened by the fraction of it that
    its window receives, have Genant's loss ``loss``. A wedge whose windows receive 92 % in front and 6 %
    behind needs more than the old ``Ha - (1 - loss) Hp`` (the whole shortening in front, none behind), which
    that formula still gives for such fractions."""
    wedge = {"anterior": 0.92, "middle": 0.5, "posterior": 0.06}
    shortening = _shortening(_stored(30.0, 28.0, 31.0, 30.5), "L2", loss, 100.0, wedge)
    ha, hm, hp = 30.0 - 0.92 * shortening, 28.0 - 0.5 * shortening, 31.0 - 0.06 * shortening
    assert height_loss(ha, hm, hp, 30.5) == pytest.approx(loss, abs=1e-6)
    assert ha / hp == pytest.approx(1.0 - loss, abs=1e-6)  # the anterior height reaches it: a wedge
    whole = _shortening(_stored(30.0, 28.0, 31.0, 30.5), "L2", loss, 100.0,
                        {"anterior": 1.0, "middle": 0.0, "posterior": 0.0})
    assert whole == pytest.approx(30.0 - (1.0 - loss) * 31.0, abs=1e-6) and shortening > whole
    assert _shortening(_stored(30.0, 28.0, 31.0, 30.5), "L2", loss, 2.0, wedge) == 2.0  # clipped to the limit


def test_shortening_stops_where_the_first_height_reaches_the_loss():
    """A body whose middle height is short reaches a 20 % loss by its middle height first (a wedge lowers it by
    half its anterior shortening): the shortening stops there; a body already at the loss is not shortened."""
    wedge = {"anterior": 0.92, "middle": 0.5, "posterior": 0.06}
    shortening = _shortening(_stored(30.0, 25.5, 31.0, 30.5), "L2", 0.2, 100.0, wedge)
    assert (25.5 - 0.5 * shortening) / (31.0 - 0.06 * shortening) == pytest.approx(0.8, abs=1e-6)
    assert shortening < _shortening(_stored(30.0, 28.0, 31.0, 30.5), "L2", 0.2, 100.0, wedge)
    assert _shortening(_stored(24.0, 28.0, 31.0, 30.5), "L2", 0.2, 100.0, wedge) == 0.0


def _superior_edge_mm(profile: np.ndarray, near: int) -> float:
    """Where ``profile`` (HU along z, 3 mm slices) crosses midway from the endplate peak near slice
    ``near`` to the disc above, mm from slice 0."""
    peak = near - 2 + int(np.argmax(profile[near - 2:near + 3]))
    level = 0.5 * (profile[peak] + 40.0)
    k = peak
    while profile[k + 1] > level:
        k += 1
    return (k + (profile[k] - level) / (profile[k] - profile[k + 1])) * SLICE_MM


def test_crush_lowers_the_endplate_by_the_shortening(phantom):
    """The superior endplate's edge moves down by exactly the shortening (it moves rigidly: no stretch
    or compression of the slices across it widens its blur), the inferior one stays."""
    volume, labels, refs, anatomy, _ = phantom
    variant = deform(baseline(volume, refs), anatomy, "L2", "crush", 0.3)
    shortening = variant.truth["deformity"]["shortening_mm"]
    column = (slice(None), 45, 45)
    body = np.nonzero(labels[column] == VERTEBRA_IDS["L2"])[0]
    before, after = volume.hu[column], variant.volume.hu[column]
    assert np.allclose(variant.volume.affine, volume.affine)  # only slices at the top cropped
    moved = _superior_edge_mm(before, body.max()) - _superior_edge_mm(after, body.max() - round(shortening / SLICE_MM))
    assert moved == pytest.approx(shortening, abs=0.5)
    below = _superior_edge_mm(before, body.min() - 3) - _superior_edge_mm(after, body.min() - 3)
    assert below == pytest.approx(0.0, abs=0.2)


def test_reference_voxel_takes_the_label_of_most_of_its_sub_points():
    """A warped reference voxel is labelled by what most of its 27 sub-points come from, not by its centre
    alone (``bench.variants._pull_labels``); the identity keeps every label, background included."""
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[5:] = 7
    labels[8:, :2] = 9
    grid = Volume(hu=np.zeros(labels.shape, np.float32), affine=np.diag([3.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]])
    (same,) = _pull_labels([labels], grid, lambda points, spacing: points)
    assert np.array_equal(same, labels)

    def off_centre_from_two_slices_up(points, spacing):
        # the sub-points off the voxel centres in x come from 2 slices (6 mm) higher; the centres stay
        index = grid.lps_to_index(points)
        off_centre = np.abs(index[..., 2] - np.round(index[..., 2])) > 0.2
        return points + np.where(off_centre, 6.0, 0.0)[..., None] * np.array([0.0, 0.0, 1.0])

    (moved,) = _pull_labels([labels], grid, off_centre_from_two_slices_up)
    assert (moved[3] == 7).all()  # 2 of 3 sub-points per row come from slice 5: the label, not its centre's
    assert (moved[2] == 0).all()  # slices 2 and 4: background
