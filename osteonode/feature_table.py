"""The radiomics feature table (``radiomics.csv``): one row per vertebral level.

The table is written by :mod:`osteonode.measure.radiomics` and read by
:mod:`osteonode.classify` (training, evaluation, prediction). It lives in this
neutral module so that reading a table does not import pyradiomics or its
worker pool.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from osteonode.atomic import write_atomic

#: File name of the table in an analysis output folder.
FEATURE_TABLE_NAME = "radiomics.csv"
#: Columns that describe a row (level, preset, ROI) rather than hold a feature value.
META_COLUMNS = ("level", "vertebra_id", "preset", "preset_sha256", "roi", "roi_voxel_count")


def write_feature_table(rows: list[dict[str, float | int | str]], path: Path) -> None:
    """Write feature rows as CSV (one row per level), atomically (:func:`osteonode.atomic.write_atomic`).

    Parameters
    ----------
    rows : list of dict
        Rows of :func:`extract_features`; all rows must have the same columns.
    path : pathlib.Path
        Output file; replaced if it exists. Floats are written with full
        precision (``repr``), so reading gives back the same values.

    Raises
    ------
    ValueError
        If ``rows`` is empty or the rows' columns differ.
    """
    if not rows:
        raise ValueError("no feature rows to write")
    columns = list(rows[0])
    for row in rows[1:]:
        if list(row) != columns:
            raise ValueError(f"level {row.get('level')!r} has different columns from level {rows[0].get('level')!r}")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.getvalue().encode("utf-8"))


def read_feature_table(path: Path) -> list[dict[str, float | int | str]]:
    """Read a table written by :func:`write_feature_table`.

    Parameters
    ----------
    path : pathlib.Path
        The CSV file.

    Returns
    -------
    list of dict
        One row per level: ``vertebra_id`` and ``roi_voxel_count`` as int, the
        other :data:`META_COLUMNS` as str, every other column as float.

    Raises
    ------
    ValueError
        If a meta column is missing or a feature value is not a number.
    """
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in META_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path.name}: not a radiomics feature table (missing columns {missing})")
        rows = []
        for raw in reader:
            row: dict[str, float | int | str] = {}
            for key, value in raw.items():
                if key in ("vertebra_id", "roi_voxel_count"):
                    row[key] = int(value)
                elif key in META_COLUMNS:
                    row[key] = value
                else:
                    row[key] = float(value)
            rows.append(row)
    return rows
