"""Labelled study tables and the samples a radiomics model reads.

Labels (:func:`load_dataset`): a CSV table with one row per study, a
``study_id`` column and the label of the task: ``t_score`` (DXA T-score,
mapped to the WHO categories: >= -1 normal, between -2.5 and -1 osteopenia,
<= -2.5 osteoporosis; Kanis JA, Lancet 2002;359:1929-1936) or
``who_category``, or ``ovcf`` (osteoporotic vertebral compression fracture,
yes/no). Each study's radiomics feature table (written by the analysis) is
``<features_dir>/<study_id>/radiomics.csv``, or the path in an optional
``features_csv`` column, relative to ``features_dir``. An optional ``split``
column (``train``/``test``) fixes a hold-out split.

Samples (:func:`feature_vectors`, :func:`to_matrix`): one per study (the
levels' features side by side) or one per vertebra, as a model is trained and
applied.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from osteonode.anatomy import VERTEBRA_IDS
from osteonode.feature_table import FEATURE_TABLE_NAME, META_COLUMNS, read_feature_table

log = logging.getLogger(__name__)

Unit = Literal["study", "vertebra"]
#: Separator of level and feature name in the study-level (wide) feature vector.
LEVEL_SEPARATOR = ":"


def feature_vectors(rows: Sequence[dict[str, Any]], unit: Unit,
                    levels: Sequence[str]) -> list[tuple[str | None, dict[str, float]]]:
    """Turn one study's feature-table rows into the model's samples.

    Parameters
    ----------
    rows : sequence of dict
        Rows of :func:`osteonode.feature_table.read_feature_table`, one per level.
    unit : {"study", "vertebra"}
        ``"study"``: one sample per study, the features of every level in
        ``levels`` side by side, named ``"<level>:<feature>"`` (Xue 2022 used
        L1-L4, 4 x 1,197 features per patient). ``"vertebra"``: one sample per
        level in ``levels`` (seed 002 analysed each vertebra).
    levels : sequence of str
        Levels to use, e.g. ``("L1", "L2", "L3", "L4")``.

    Returns
    -------
    list of (level, features)
        ``level`` is None for the study unit.

    Raises
    ------
    ValueError
        If, for the study unit, a level is missing or duplicated; or a feature
        value is not finite.
    """
    by_level: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["level"] in by_level:
            raise ValueError(f"level {row['level']} appears twice in the feature table")
        by_level[str(row["level"])] = row
    samples: list[tuple[str | None, dict[str, float]]] = []
    wide: dict[str, float] = {}
    for level in levels:
        level_row = by_level.get(level)
        if level_row is None:
            if unit == "study":
                raise ValueError(f"level {level} missing from the feature table")
            continue
        features = {k: float(v) for k, v in level_row.items() if k not in META_COLUMNS}
        bad = [k for k, v in features.items() if not np.isfinite(v)]
        if bad:
            raise ValueError(f"level {level}: {len(bad)} non-finite feature value(s), e.g. {bad[0]}")
        if unit == "vertebra":
            samples.append((level, features))
        else:
            wide.update((f"{level}{LEVEL_SEPARATOR}{k}", v) for k, v in features.items())
    if unit == "study":
        samples.append((None, wide))
    return samples


def to_matrix(samples: Sequence[dict[str, float]], feature_names: Sequence[str]) -> np.ndarray:
    """Stack feature dicts into a matrix in ``feature_names`` order.

    Parameters
    ----------
    samples : sequence of dict
        Feature name -> value, one dict per sample.
    feature_names : sequence of str
        Column order.

    Returns
    -------
    numpy.ndarray
        ``(n_samples, n_features)`` float64.

    Raises
    ------
    ValueError
        If a sample lacks one of ``feature_names``.
    """
    matrix = np.empty((len(samples), len(feature_names)), dtype=np.float64)
    for i, sample in enumerate(samples):
        try:
            matrix[i] = [sample[name] for name in feature_names]
        except KeyError as exc:
            raise ValueError(f"feature {exc.args[0]} missing (another radiomics preset or pyradiomics version?)") \
                from exc
    return matrix


WHO_CATEGORIES = ("normal", "osteopenia", "osteoporosis")


@dataclass(frozen=True)
class Task:
    """A binary classification task on the study table.

    Attributes
    ----------
    label_column : {"who_category", "ovcf"}
        The label the task reads (``who_category`` also comes from ``t_score``).
    positive, negative : tuple of str
        Label values of the positive and the negative class; others are left out.
    positive_name, negative_name : str
        Class names for reports.
    source : str
        Where the task comes from.
    """

    label_column: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_name: str
    negative_name: str
    source: str


TASKS: dict[str, Task] = {
    "osteoporosis_vs_normal": Task("who_category", ("osteoporosis",), ("normal",), "osteoporosis", "normal",
                                   "Xue 2022 (seed 000), normal BMD vs osteoporosis"),
    "osteoporosis_vs_osteopenia": Task("who_category", ("osteoporosis",), ("osteopenia",), "osteoporosis",
                                       "osteopenia", "Xue 2022 (seed 000), osteopenia vs osteoporosis"),
    "osteopenia_vs_normal": Task("who_category", ("osteopenia",), ("normal",), "osteopenia", "normal",
                                 "Xue 2022 (seed 000), normal BMD vs osteopenia"),
    "low_bmd_vs_normal": Task("who_category", ("osteopenia", "osteoporosis"), ("normal",), "low BMD", "normal",
                              "seed 001, osteopenia or osteoporosis vs normal"),
    "ovcf": Task("ovcf", ("yes",), ("no",), "OVCF", "no OVCF", "Yu 2025 (seed 002), OVCF vs no fracture"),
}
_YES, _NO = {"1", "yes", "y", "true"}, {"0", "no", "n", "false"}


def who_category(t_score: float) -> str:
    """WHO category of a DXA T-score (Kanis JA, Lancet 2002;359:1929-1936).

    Parameters
    ----------
    t_score : float
        DXA T-score, standard deviations from the young-adult mean.

    Returns
    -------
    str
        ``"normal"`` at >= -1, ``"osteoporosis"`` at <= -2.5, else ``"osteopenia"``.
    """
    if t_score >= -1.0:
        return "normal"
    if t_score <= -2.5:
        return "osteoporosis"
    return "osteopenia"


@dataclass
class Dataset:
    """Samples of a labelled table, ready for scikit-learn.

    Attributes
    ----------
    samples : list of dict
        Feature dict per sample (one per study, or per vertebra).
    feature_names : list of str
        Feature names common to every sample, in the first sample's order.
    y : numpy.ndarray
        ``(n_samples,)`` 1 = positive class.
    groups : numpy.ndarray
        ``(n_samples,)`` index of the sample's study (vertebrae of one study share it).
    table_rows : list of int
        1-based data-row number of each sample's study in the table.
    sample_levels : list of str or None
        Level of each sample (None for study-level samples).
    split : list of str or None
        ``"train"``/``"test"`` per sample from the table's ``split`` column, or None.
    levels : tuple of str
        Levels used, cranio-caudal.
    preset, preset_sha256 : str
        Radiomics preset of the feature tables and its fingerprint.
    excluded : dict
        Reason -> number of studies left out.
    """

    samples: list[dict[str, float]]
    feature_names: list[str]
    y: np.ndarray
    groups: np.ndarray
    table_rows: list[int]
    sample_levels: list[str | None]
    split: list[str] | None
    levels: tuple[str, ...]
    preset: str
    preset_sha256: str
    excluded: dict[str, int]


def load_dataset(table_csv: Path, features_dir: Path, *, task: str, unit: Unit,
                 levels: Sequence[str] | None = None, ignore_split: bool = False) -> Dataset:
    """Read the study table and the studies' feature tables into samples and labels.

    Studies are left out, and counted by reason in :attr:`Dataset.excluded`,
    when their label is not part of the task or missing, their feature table
    is missing, or (study unit) it lacks a level or holds non-finite values.

    Parameters
    ----------
    table_csv : pathlib.Path
        Study table (module docstring).
    features_dir : pathlib.Path
        Base folder of the feature tables.
    task : str
        A key of :data:`TASKS`.
    unit : {"study", "vertebra"}
        One sample per study (levels side by side) or per vertebra.
    levels : sequence of str, optional
        Levels to use; default: every level found in the feature tables.
    ignore_split : bool
        Ignore a ``split`` column (evaluation uses every row).

    Returns
    -------
    Dataset
        The samples.

    Raises
    ------
    ValueError
        Unknown task, a table without ``study_id`` or the task's label column,
        an invalid label, feature tables of different radiomics presets or with
        different features, or no usable study.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[task]
    with Path(table_csv).open(newline="", encoding="utf-8-sig") as fh:
        table = list(csv.DictReader(fh))
    columns = set(table[0]) if table else set()
    label_columns = {"t_score", "who_category"} if spec.label_column == "who_category" else {"ovcf"}
    if "study_id" not in columns or not columns & label_columns:
        raise ValueError(f"{Path(table_csv).name}: needs a study_id column and one of {sorted(label_columns)}")
    excluded: Counter[str] = Counter()
    # (table row, label, split, feature rows)
    studies: list[tuple[int, int, str | None, list[dict[str, float | int | str]]]] = []
    for number, record in enumerate(table, start=1):
        label = _label(record, spec, number)
        if label is None:
            excluded["label not in task or missing"] += 1
            continue
        path = Path(features_dir) / (record.get("features_csv") or Path(record["study_id"]) / FEATURE_TABLE_NAME)
        if not path.is_file():
            excluded["no feature table"] += 1
            continue
        split = None if ignore_split else (record.get("split") or "").strip().lower() or None
        if split not in (None, "train", "test"):
            raise ValueError(f"table row {number}: split must be train or test, got {split!r}")
        studies.append((number, label, split, read_feature_table(path)))
    if not studies:
        raise ValueError(f"{Path(table_csv).name}: no study with a label of task {task!r} and a feature table")
    presets = {(str(r["preset"]), str(r["preset_sha256"])) for *_, rows in studies for r in rows}
    if len(presets) != 1:
        raise ValueError(f"the feature tables come from {len(presets)} different radiomics presets "
                         f"({sorted(name for name, _ in presets)}); extract all studies with one")
    (preset, fingerprint), = presets
    if levels is None:
        levels = sorted({str(r["level"]) for *_, rows in studies for r in rows}, key=VERTEBRA_IDS.__getitem__)
    samples: list[dict[str, float]] = []
    sample_levels: list[str | None] = []
    table_rows, labels, groups, splits = [], [], [], []
    for index, (number, label, split, rows) in enumerate(studies):
        try:
            vectors = feature_vectors(rows, unit, levels)
        except ValueError as exc:
            excluded[f"unusable feature table ({exc})"] += 1
            continue
        for level, features in vectors:
            samples.append(features)
            sample_levels.append(level)
            table_rows.append(number)
            labels.append(label)
            groups.append(index)
            splits.append(split)
    if not samples:
        raise ValueError("no usable sample (see the excluded reasons in the log)")
    names = set(samples[0])
    if any(set(s) != names for s in samples):
        raise ValueError("the feature tables do not all hold the same features")
    if len(set(splits)) > 1 and None in splits:
        raise ValueError("the split column must be filled for every study, or for none")
    for reason, count in excluded.items():
        log.warning("%d stud%s left out: %s", count, "y" if count == 1 else "ies", reason)
    return Dataset(samples=samples, feature_names=list(samples[0]), y=np.array(labels, dtype=int),
                   groups=np.array(groups, dtype=int), table_rows=table_rows, sample_levels=sample_levels,
                   split=None if None in splits else [str(s) for s in splits], levels=tuple(levels), preset=preset,
                   preset_sha256=fingerprint, excluded=dict(excluded))


def _label(record: dict[str, str], spec: Task, number: int) -> int | None:
    """1 (positive), 0 (negative) or None (not part of the task / missing) for one table row."""
    if spec.label_column == "ovcf":
        value = (record.get("ovcf") or "").strip().lower()
        if not value:
            return None
        if value not in _YES | _NO:
            raise ValueError(f"table row {number}: ovcf must be yes/no/1/0, got {value!r}")
        category = "yes" if value in _YES else "no"
    else:
        t_score = (record.get("t_score") or "").strip()
        named = (record.get("who_category") or "").strip().lower() or None
        if named is not None and named not in WHO_CATEGORIES:
            raise ValueError(f"table row {number}: who_category must be one of {WHO_CATEGORIES}, got {named!r}")
        if t_score:
            try:
                category = who_category(float(t_score))
            except ValueError as exc:
                raise ValueError(f"table row {number}: t_score {t_score!r} is not a number") from exc
            if named is not None and named != category:
                raise ValueError(f"table row {number}: who_category {named} contradicts T-score {t_score}")
        elif named is not None:
            category = named
        else:
            return None
    if category in spec.positive:
        return 1
    if category in spec.negative:
        return 0
    return None
