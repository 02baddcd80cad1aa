"""Key images: annotated reformats of the source CT as Secondary Capture images.

Two SC Image Storage instances (PS3.3 A.8.1) in one series "osteonode Key
Images" of the source study:

1. a mid-sagittal reformat through the spine (the mean left-right position of
   the labelled vertebral bodies), anterior to the left, head up;
2. an axial reformat through the centre of the L1 body (or another level),
   patient right on the left of the image, anterior up.

Each shows the outline (contour) of every vertebral body in its level colour
and the outline of each level's trabecular ROI, as cut by the plane, in the
level's ROI tint (:mod:`osteonode.dicom_out.palette`, the SEG's colours), so
the bone stays visible; the level name (with its table mark) and mean
trabecular HU beside each body; a side panel with the overall result, the
statistic it rests on and its uncertainty note, HU, vBMD and Genant grade per
level (``n/a`` when not available), the quality notes of each level, the
patient and study identity of the source, and an optional banner (e.g.
research use).

Reformats sample the volume in patient space (LPS) through its affine, so the
views are the same whatever the orientation and slice order of the source.
The pixels carry burned-in identifying text: Burned In Annotation is YES.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

import dicom_templates
from osteonode.anatomy import VERTEBRA_IDS, VERTEBRA_NAMES
from osteonode.dicom_out import palette, render, summary
from osteonode.dicom_out.common import (
    UTF8,
    copy_optional_identity,
    equipment_attributes,
    series_number,
    settle_character_set,
    with_type2_defaults,
)
from osteonode.result import AnalysisResult
from osteonode.segment import SpineSegmentation
from osteonode.uids import derived_uid, input_key
from osteonode.volume import Series, Volume

log = logging.getLogger(__name__)

KEY_IMAGES_SERIES_DESCRIPTION = "osteonode Key Images"
#: Display window (centre, width) of the CT in HU.
WINDOW_HU = (300.0, 1500.0)
#: Pixels along the longer side of a reformatted plane.
PLANE_PIXELS = 640
#: Size of a key image: inches and dots per inch (1024 x 640 pixels; text sizes are in points of these inches).
FIGURE_IN, DPI = (16.0, 10.0), 64
#: Line widths (points) of the body and trabecular ROI outlines: at :data:`DPI` the body line is
#: over 2 pixels wide, so its colour is drawn unblended along it.
BODY_LINE_PT, ROI_LINE_PT = 2.5, 2.0
#: In-plane unit vectors (LPS) along a row and down a column of each view.
VIEWS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # anterior -> posterior, head -> feet
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),      # right -> left, anterior -> posterior
}


@dataclass(frozen=True)
class Plane:
    """A rectangular grid of points in patient space.

    Attributes
    ----------
    origin : numpy.ndarray
        ``(3,)`` LPS position in mm of the centre of pixel ``(0, 0)``.
    row_direction : numpy.ndarray
        ``(3,)`` unit LPS vector from one column to the next.
    column_direction : numpy.ndarray
        ``(3,)`` unit LPS vector from one row to the next.
    spacing_mm : float
        Distance between neighbouring pixels in mm (square pixels).
    shape : tuple of int
        ``(rows, columns)``.
    """

    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    spacing_mm: float
    shape: tuple[int, int]

    def points(self) -> np.ndarray:
        """``(rows, columns, 3)`` LPS positions in mm of the pixel centres."""
        rows, columns = np.indices(self.shape, dtype=float) * self.spacing_mm
        return (self.origin + rows[..., None] * self.column_direction
                + columns[..., None] * self.row_direction)


def plane_through(volume: Volume, centre_lps: np.ndarray, row_direction: tuple[float, float, float],
                  column_direction: tuple[float, float, float], pixels: int = PLANE_PIXELS) -> Plane:
    """The plane through ``centre_lps`` spanned by the two directions, covering the whole volume.

    Parameters
    ----------
    volume : Volume
        Source volume; its ``(z, y, x)`` grid and affine give the extent.
    centre_lps : numpy.ndarray
        ``(3,)`` LPS point in mm that the plane contains.
    row_direction, column_direction : tuple of float
        Orthogonal unit LPS vectors along a row and down a column.
    pixels : int
        Pixels along the longer side; the spacing follows from the extent.

    Returns
    -------
    Plane
        Covers the projection of the volume's bounding box (voxel edges) onto the plane.

    Raises
    ------
    ValueError
        If the directions are not orthogonal unit vectors.
    """
    u, v = np.asarray(row_direction, dtype=float), np.asarray(column_direction, dtype=float)
    if not (np.isclose(u @ u, 1.0) and np.isclose(v @ v, 1.0) and np.isclose(u @ v, 0.0)):
        raise ValueError("plane directions must be orthogonal unit vectors")
    normal = np.cross(u, v)
    edges = [(-0.5, n - 0.5) for n in volume.shape]
    corners_lps = volume.index_to_lps([[z, y, x] for z in edges[0] for y in edges[1] for x in edges[2]])
    u_range = (corners_lps @ u).min(), (corners_lps @ u).max()
    v_range = (corners_lps @ v).min(), (corners_lps @ v).max()
    spacing = max(u_range[1] - u_range[0], v_range[1] - v_range[0]) / pixels
    shape = (int(np.ceil((v_range[1] - v_range[0]) / spacing)), int(np.ceil((u_range[1] - u_range[0]) / spacing)))
    origin = (np.asarray(centre_lps, dtype=float) @ normal) * normal + (u_range[0] + spacing / 2) * u \
        + (v_range[0] + spacing / 2) * v
    return Plane(origin=origin, row_direction=u, column_direction=v, spacing_mm=float(spacing), shape=shape)


def plane_index(volume: Volume, plane: Plane) -> np.ndarray:
    """``(3, rows x columns)`` float ``(z, y, x)`` voxel indices of ``volume`` at the pixel centres of ``plane``."""
    return volume.lps_to_index(plane.points().reshape(-1, 3)).T


def reformat(volume: Volume, array: np.ndarray, plane: Plane, *, order: int, fill: float,
             index: np.ndarray | None = None) -> np.ndarray:
    """Sample ``array`` on ``plane``.

    Parameters
    ----------
    volume : Volume
        Gives the affine of ``array``.
    array : numpy.ndarray
        ``(z, y, x)`` array on the grid of ``volume`` (HU or a label map).
    plane : Plane
        Where to sample.
    order : int
        Spline order: 1 (linear) for HU, 0 (nearest) for labels.
    fill : float
        Value outside the volume (e.g. -1024 HU, label 0).
    index : numpy.ndarray, optional
        :func:`plane_index` of ``volume`` and ``plane``, when already computed for another array.

    Returns
    -------
    numpy.ndarray
        ``(rows, columns)`` array of ``array``'s dtype.

    Raises
    ------
    ValueError
        If ``array`` does not have the volume's shape.
    """
    volume.require_grid(array)
    index = plane_index(volume, plane) if index is None else index
    sampled = ndimage.map_coordinates(array, index, order=order, mode="constant", cval=fill)
    return sampled.reshape(plane.shape).astype(array.dtype, copy=False)


def orientation_letter(direction: np.ndarray) -> str:
    """Patient orientation letter (PS3.3 C.7.6.1.1.1) of the dominant axis of an LPS ``direction``."""
    axis = int(np.argmax(np.abs(direction)))
    return ("RL", "AP", "FH")[axis][int(direction[axis] > 0)]


def body_centre_lps(volume: Volume, bodies: np.ndarray, label: int | None = None) -> np.ndarray:
    """LPS centroid in mm of the voxels of ``label``, or of every vertebra (VerSe ID) when ``None``.

    Parameters
    ----------
    volume : Volume
        Gives the affine of ``bodies``.
    bodies : numpy.ndarray
        ``(z, y, x)`` label map on the grid of ``volume``.
    label : int, optional
        One VerSe ID; other labels (e.g. femurs) never count.

    Raises
    ------
    ValueError
        If there is no such voxel.
    """
    if label is None:
        lowest, highest = min(VERTEBRA_NAMES), max(VERTEBRA_NAMES)  # the VerSe IDs are consecutive
        mask = (bodies >= lowest) & (bodies <= highest)
    else:
        mask = bodies == label
    flat = np.flatnonzero(mask)
    if not len(flat):
        raise ValueError("no vertebra in the segmentation" if label is None else
                         f"{VERTEBRA_NAMES.get(label, label)} is not in the segmentation")
    centre = [index.mean() for index in np.unravel_index(flat, mask.shape)]
    return volume.index_to_lps(np.array(centre))


def _draw_plane(ax: Axes, hu: np.ndarray, bodies: np.ndarray, trabecular: np.ndarray, plane: Plane,
                result: AnalysisResult, view: str) -> None:
    """CT in :data:`WINDOW_HU`, body and ROI outlines in the palette colours, level names, orientation letters."""
    centre, width = WINDOW_HU
    ax.imshow(hu, cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2, interpolation="bilinear")
    for label in np.unique(bodies[bodies > 0]):
        name = VERTEBRA_NAMES.get(int(label))
        if name is None:
            continue
        colour = palette.unit_rgb(palette.level_rgb(name))
        rows, columns = np.nonzero(bodies == label)
        # Contours of the nearest-neighbour reformats: the real cut of body and ROI, bone visible inside;
        # traced in the bounding box of body and ROI and one pixel around it.
        either_rows, either_columns = np.nonzero((bodies == label) | (trabecular == label))
        box = (slice(max(either_rows.min() - 1, 0), either_rows.max() + 2),
               slice(max(either_columns.min() - 1, 0), either_columns.max() + 2))
        grid = np.arange(box[1].start, box[1].stop), np.arange(box[0].start, box[0].stop)
        ax.contour(*grid, bodies[box] == label, levels=[0.5], colors=[colour], linewidths=BODY_LINE_PT,
                   antialiased=True)
        if (trabecular[box] == label).any():
            ax.contour(*grid, trabecular[box] == label, levels=[0.5],
                       colors=[palette.unit_rgb(palette.roi_rgb(name))], linewidths=ROI_LINE_PT)
        level = result.levels.get(name)
        text = name if level is None else f"{summary.marked_name(name, level)}  {level.trabecular_hu_mean:.0f} HU"
        if view == "sagittal":  # beside the anterior edge of the body
            (x, y), (ha, va) = (columns.min() - 10, rows.mean()), ("right", "center")
        else:  # above the anterior edge
            (x, y), (ha, va) = (columns.mean(), rows.min() - 10), ("center", "bottom")
        render.add_text(ax, x, y, text, outline=True, color=colour, fontsize=14, weight="bold", ha=ha, va=va)
    edges = ((0.5, 0.99, "center", "top", -plane.column_direction),
             (0.5, 0.01, "center", "bottom", plane.column_direction),
             (0.01, 0.5, "left", "center", -plane.row_direction),
             (0.99, 0.5, "right", "center", plane.row_direction))
    for x, y, ha, va, direction in edges:
        render.add_text(ax, x, y, orientation_letter(direction), outline=True, transform=ax.transAxes,
                        color="yellow", fontsize=17, weight="bold", ha=ha, va=va)
    ax.set_xlim(-0.5, hu.shape[1] - 0.5)
    ax.set_ylim(hu.shape[0] - 0.5, -0.5)
    ax.set_axis_off()


class _Column:
    """A top-down text cursor in an axes (axes fraction, 1 = top)."""

    def __init__(self, ax: Axes, fig: Figure) -> None:
        self.ax = ax
        self.height_in = ax.get_position().height * fig.get_figheight()
        self.y = 1.0

    def skip(self, points: float) -> None:
        self.y -= points / 72.0 / self.height_in

    def write(self, text: str, size: float, width: int, **kwargs) -> None:
        """Write ``text`` wrapped at ``width`` characters (each paragraph of it) and move below it."""
        if not text:
            return
        lines = "\n".join(textwrap.fill(paragraph, width) for paragraph in text.split("\n"))
        render.add_text(self.ax, 0.0, self.y, lines, fontsize=size, va="top", linespacing=1.25, **kwargs)
        self.skip(size * 1.25 * (lines.count("\n") + 1) + size * 0.5)


def _draw_side_panel(fig: Figure, ax: Axes, result: AnalysisResult) -> None:
    """Title, overall result with its statistic and uncertainty, its basis, the level table, notes, legend."""
    ax.set_axis_off()
    column = _Column(ax, fig)
    column.write(summary.title(), 16, 60, weight="bold")
    column.write(f"Bone status: {summary.status_line(result)}", 19, 40, weight="bold")
    column.write("\n".join(summary.status_details(result)), 13, 50, weight="bold", color=render.BANNER_COLOR)
    column.write("\n".join(summary.status_comments(result)), 12, 60)
    rows = [(row.level, row.hu_mean, row.vbmd_mg_cm3, row.genant) for row in summary.level_rows(result)]
    row_in = 0.36
    height = row_in * (len(rows) + 1) / column.height_in
    column.skip(4)
    table_ax = ax.inset_axes((0.0, column.y - height, 1.0, height))
    render.draw_table(table_ax, ("Level", "HU", "vBMD mg/cm³", "Genant"), rows, fontsize=14,
                      row_height=1.0 / (len(rows) + 1), widths=(0.8, 0.7, 1.3, 1.2))
    column.y -= height
    column.skip(8)
    column.write(summary.marks_legend(result), 12, 60)
    column.write("\n".join(summary.level_note_lines(result)), 12, 60)
    legend = ("Lines: vertebral body outline in the level's colour; lighter inner line: trabecular ROI (as in "
              "the SEG). HU: mean trabecular attenuation. vBMD: volumetric bone mineral density. "
              f"Levels: {result.labelling_method or summary.NA}.")
    column.write(legend, 11, 68, color="#333333")


def render_view(series: Series, segmentation: SpineSegmentation, result: AnalysisResult, view: str,
                centre_lps: np.ndarray, view_title: str, banner: str) -> np.ndarray:
    """Render one key image.

    Parameters
    ----------
    series : Series
        Source CT (volume ``(z, y, x)`` in HU, header of the first instance).
    segmentation : SpineSegmentation
        ``bodies`` and ``trabecular`` ``(z, y, x)`` VerSe label maps on the grid of ``series.volume``.
    result : AnalysisResult
        The evaluable result of the series.
    view : str
        Key of :data:`VIEWS`.
    centre_lps : numpy.ndarray
        ``(3,)`` LPS point in mm that the plane contains.
    view_title : str
        Caption above the image.
    banner : str
        Banner text; empty for none.

    Returns
    -------
    numpy.ndarray
        ``(640, 1024, 3)`` uint8 RGB (:data:`FIGURE_IN` x :data:`DPI`).
    """
    row_direction, column_direction = VIEWS[view]
    plane = plane_through(series.volume, centre_lps, row_direction, column_direction)
    index = plane_index(series.volume, plane)
    hu = reformat(series.volume, series.volume.hu, plane, order=1, fill=-1024.0, index=index)
    bodies = reformat(series.volume, np.asarray(segmentation.bodies, dtype=np.uint8), plane, order=0, fill=0,
                      index=index)
    trabecular = reformat(series.volume, np.asarray(segmentation.trabecular, dtype=np.uint8), plane,
                          order=0, fill=0, index=index)

    fig = render.new_figure(*FIGURE_IN, dpi=DPI)
    top = 0.95 if banner else 1.0
    render.draw_banner(fig, banner, (0.0, 0.95, 1.0, 0.05), fontsize=22)
    for n, line in enumerate(summary.identity_lines(series.datasets[0])):
        render.add_text(fig, 0.01, top - 0.012 - 0.03 * n, line, fontsize=13, va="top")
    render.add_text(fig, 0.01, top - 0.08, view_title, fontsize=13, weight="bold", va="top")
    _draw_plane(fig.add_axes((0.01, 0.01, 0.58, top - 0.11)), hu, bodies, trabecular, plane, result, view)
    _draw_side_panel(fig, fig.add_axes((0.62, 0.03, 0.36, top - 0.13)), result)
    return render.to_rgb(fig)


def build_key_images(series: Series, segmentation: SpineSegmentation, result: AnalysisResult, *,
                     banner: str, axial_level: str = "L1") -> list[hd.sc.SCImage]:
    """Build the key images of an evaluated series: mid-sagittal and axial through ``axial_level``.

    Parameters
    ----------
    series : Series
        The loaded source CT: volume ``(z, y, x)`` in HU with its LPS affine, and
        the headers whose patient and study identity the images carry.
    segmentation : SpineSegmentation
        ``bodies`` and ``trabecular``: ``(z, y, x)`` uint8 VerSe label maps on
        the grid of ``series.volume``.
    result : AnalysisResult
        The evaluable result of this series (``status == "ok"``).
    banner : str
        Text of the band across the top of each image, e.g. "RESEARCH USE ONLY -
        NOT FOR DIAGNOSTIC USE"; an empty string draws no band.
    axial_level : str
        Level whose body centre the axial image passes through.

    Returns
    -------
    list of highdicom.sc.SCImage
        Two Secondary Capture Image Storage instances (PS3.3 A.8.1), 640 x
        1024 RGB, sagittal (Instance Number 1) then axial (2), Series
        Description "osteonode Key Images", Series Number from
        ``algorithm.json``, UIDs from :func:`osteonode.uids.derived_uid` (roles
        ``"key-images-series"``, ``"key-image-sagittal"``,
        ``"key-image-axial"``), patient and study from the source (same Study
        Instance UID), Conversion Type WSD, Burned In Annotation YES, Patient
        Orientation of the image panel.

    Raises
    ------
    ValueError
        If the result is not evaluable or belongs to another series, a label
        map does not match the volume, or ``axial_level`` is not segmented.
    """
    if result.status != "ok":
        raise ValueError("key images need an evaluable result")
    if result.series_instance_uid != series.series_instance_uid:
        raise ValueError("the result does not belong to the given series")
    for name in ("bodies", "trabecular"):
        series.volume.require_grid(getattr(segmentation, name), f"segmentation.{name}")
    if axial_level not in VERTEBRA_IDS:
        raise ValueError(f"unknown vertebral level {axial_level!r}")
    bodies = np.asarray(segmentation.bodies)
    centres = {"sagittal": body_centre_lps(series.volume, bodies),
               "axial": body_centre_lps(series.volume, bodies, VERTEBRA_IDS[axial_level])}
    texts = dicom_templates.load("report")["key_images"]
    source = with_type2_defaults(series.datasets)[0]
    inputs = input_key(series.datasets)
    images = []
    for number, view in enumerate(VIEWS, start=1):
        derivation = texts[view]["derivation"].format(level=axial_level)
        title = texts[view]["title"].format(level=axial_level)
        pixels = render_view(series, segmentation, result, view, centres[view], title, banner)
        row_direction, column_direction = (np.asarray(d) for d in VIEWS[view])
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=derived_uid(inputs, "key-images-series"),
            series_number=series_number("key_images"),
            sop_instance_uid=derived_uid(inputs, f"key-image-{view}"),
            instance_number=number,
            patient_orientation=(orientation_letter(row_direction), orientation_letter(column_direction)),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=KEY_IMAGES_SERIES_DESCRIPTION,
            specific_character_set=UTF8,
            **equipment_attributes(),
        )
        image.ConversionType = "WSD"  # rendered on a workstation (PS3.3 C.8.6.1)
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.BurnedInAnnotation = "YES"
        image.ImageLaterality = "U"  # the spine is unpaired (PS3.3 C.7.6.1.1.4)
        image.DerivationDescription = derivation
        copy_optional_identity(series.datasets[0], image)
        settle_character_set(image, series.datasets[0])
        images.append(image)
    log.info("built %d key image(s)", len(images))
    return images


__all__ = ["build_key_images", "render_view", "plane_through", "plane_index", "reformat", "orientation_letter",
           "body_centre_lps", "Plane", "VIEWS", "KEY_IMAGES_SERIES_DESCRIPTION"]
