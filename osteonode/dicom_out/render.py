"""Matplotlib drawing shared by the key images and the PDF report.

Figures are :class:`matplotlib.figure.Figure` objects drawn with the Agg or
PDF canvas directly: no pyplot, no global figure registry, no change of
``rcParams``, so rendering is safe in worker processes and threads.

Text uses DejaVu Sans (shipped with matplotlib: Latin, Greek, Cyrillic);
a text with characters that DejaVu Sans lacks (e.g. a CJK patient name) falls
back to the installed :data:`FALLBACK_FONTS` (e.g. Debian's
``fonts-noto-cjk``). A character that no installed font has is drawn as
:data:`REPLACEMENT`: no empty boxes, and no matplotlib warning that would
quote a character of a patient's name into the logs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import cache

import numpy as np
from matplotlib import font_manager, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import FigureCanvasPdf
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

#: Font of every text (shipped with matplotlib).
PRIMARY_FONT = "DejaVu Sans"
#: Fonts tried after :data:`PRIMARY_FONT` for characters it lacks, in this order, when installed.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Droid Sans Fallback")
#: Drawn instead of a character that no installed font has.
REPLACEMENT = "?"
#: Background of the banner ("research use ..."), white text on it.
BANNER_COLOR = "#b00020"
#: Background of table header cells.
HEADER_COLOR = "#d9d9d9"


@cache
def _characters(family: str) -> frozenset[int]:
    """Code points that the installed font ``family`` has a glyph for."""
    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    return frozenset(FT2Font(path).get_charmap())


@cache
def _installed_fallbacks() -> tuple[str, ...]:
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    return tuple(name for name in FALLBACK_FONTS if name in installed)


def drawable(text: str) -> tuple[str, list[str]]:
    """``text`` ready to draw, and the font family list to draw it with.

    Returns
    -------
    tuple of (str, list of str)
        ``text`` with every character that no installed font has replaced by
        :data:`REPLACEMENT`; ``[PRIMARY_FONT]`` when it covers the text, else
        ``[PRIMARY_FONT, *installed fallbacks]``.
    """
    primary = _characters(PRIMARY_FONT)
    if all(char.isspace() or ord(char) in primary for char in text):
        return text, [PRIMARY_FONT]
    fallbacks = _installed_fallbacks()
    known = primary.union(*map(_characters, fallbacks))
    return ("".join(char if char.isspace() or ord(char) in known else REPLACEMENT for char in text),
            [PRIMARY_FONT, *fallbacks])


def new_figure(width_in: float, height_in: float, dpi: int) -> Figure:
    """A white figure of ``width_in`` x ``height_in`` inches at ``dpi`` (pixels = inches x dpi)."""
    return Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")


def add_text(target: Figure | Axes, x: float, y: float, text: str, *, outline: bool = False, **kwargs) -> None:
    """Draw ``text`` at ``(x, y)`` (figure, axes or data coordinates), made :func:`drawable`.

    ``outline`` draws a black outline around the glyphs, for text on images.
    Other ``kwargs`` are :class:`matplotlib.text.Text` properties (size, weight, ha, va, ...).
    """
    if outline:
        kwargs["path_effects"] = [patheffects.withStroke(linewidth=3, foreground="black")]
    text, families = drawable(text)
    target.text(x, y, text, fontfamily=families, **kwargs)


def draw_banner(fig: Figure, text: str, rect: Sequence[float], fontsize: float) -> None:
    """Draw ``text`` centred in white on a :data:`BANNER_COLOR` band; nothing if ``text`` is empty.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        Target figure.
    text : str
        Banner text, e.g. "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE".
    rect : sequence of float
        ``(left, bottom, width, height)`` of the band in figure coordinates (0..1).
    fontsize : float
        Font size in points.
    """
    if not text:
        return
    left, bottom, width, height = rect
    ax = fig.add_axes((left, bottom, width, height))
    ax.set_axis_off()
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, color=BANNER_COLOR))
    add_text(ax, 0.5, 0.5, text, color="white", fontsize=fontsize, weight="bold", ha="center", va="center")


def draw_table(ax: Axes, columns: Sequence[str], rows: Sequence[Sequence[str]], fontsize: float,
               row_height: float, widths: Sequence[float] | None = None) -> None:
    """Draw a table of strings filling the width of ``ax`` from its top.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Target axes; its frame is hidden.
    columns : sequence of str
        Header texts (grey, bold).
    rows : sequence of sequence of str
        One sequence of ``len(columns)`` strings per row.
    fontsize : float
        Font size in points.
    row_height : float
        Height of one row as a fraction of the axes height.
    widths : sequence of float, optional
        Relative column widths (equal when omitted).

    Raises
    ------
    ValueError
        If a row or ``widths`` does not have one entry per column.
    """
    if any(len(row) != len(columns) for row in rows) or (widths is not None and len(widths) != len(columns)):
        raise ValueError("every table row and the widths need one entry per column")
    fractions = None if widths is None else [w / sum(widths) for w in widths]
    ax.set_axis_off()
    height = (len(rows) + 1) * row_height
    table = ax.table(cellText=[list(row) for row in rows] or None, colLabels=list(columns),
                     colWidths=fractions, cellLoc="center", bbox=Bbox.from_bounds(0.0, 1.0 - height, 1.0, height))
    table.auto_set_font_size(False)
    table.set_fontsize(fontsize)
    for (row, _), cell in table.get_celld().items():
        text, families = drawable(cell.get_text().get_text())
        cell.get_text().set_text(text)
        cell.get_text().set_fontfamily(families)
        if row == 0:
            cell.set_facecolor(HEADER_COLOR)
            cell.get_text().set_fontweight("bold")


def to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg; return a ``(rows, columns, 3)`` uint8 RGB array (rows top to bottom)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def to_pdf(fig: Figure, title: str) -> bytes:
    """Render ``fig`` as a one-page PDF; return its bytes.

    The PDF has the document title ``title``, osteonode as creator and no
    creation date, so the same figure gives the same bytes. Fonts are embedded
    as subsets.
    """
    buffer = io.BytesIO()
    FigureCanvasPdf(fig).print_pdf(buffer, metadata={"Title": title, "Creator": "osteonode",
                                                     "Producer": "osteonode (matplotlib)", "CreationDate": None})
    return buffer.getvalue()


__all__ = ["PRIMARY_FONT", "FALLBACK_FONTS", "REPLACEMENT", "drawable", "new_figure", "add_text", "draw_banner",
           "draw_table", "to_rgb", "to_pdf"]
