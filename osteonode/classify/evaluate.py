"""Labelled study tables, and the performance of radiomics models on them.

Labels (:func:`load_dataset`): a CSV table with one row per study, a
``study_id`` column and the label of the task: ``t_score`` (DXA T-score,
mapped to the WHO categories: >= -1 normal, between -2.5 and -1 osteopenia,
<= -2.5 osteoporosis; Kanis JA, Lancet 2002;359:1929-1936) or
``who_category``, or ``ovcf`` (osteoporotic vertebral compression fracture,
yes/no). Each study's radiomics feature table (written by the analysis) is
``<features_dir>/<study_id>/radiomics.csv``, or the path in an optional
``features_csv`` column, relative to ``features_dir``. An optional ``split``
column (``train``/``test``) fixes a hold-out split.

Performance: AUC with DeLong CI, sensitivity, specificity, confusion matrix, ROC curve.

The AUC's confidence interval uses DeLong's variance (DeLong ER, DeLong DM,
Clarke-Pearson DL, Biometrics 1988;44:837-845), computed with the fast
midrank algorithm of Sun X, Xu W, "Fast implementation of DeLong's algorithm
for comparing the areas under correlated receiver operating characteristic
curves", IEEE Signal Process Lett 2014;21(11):1389-1393: O(N log N) instead of
the O(m n) comparison matrix. The interval is the normal one, ``AUC +- z sqrt(V)``,
clipped to [0, 1] as pROC does; it matches pROC 1.18 (``ci.auc``, method
"delong"), see ``tests/unit/test_train.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import norm, rankdata
from sklearn.metrics import confusion_matrix, roc_curve

from osteonode.anatomy import VERTEBRA_IDS
from osteonode.classify.model import ModelArtifactError, Unit, feature_vectors, load_model, to_matrix
from osteonode.feature_table import FEATURE_TABLE_NAME, read_feature_table

log = logging.getLogger(__name__)

#: Operating point of every model: positive when the predicted probability is at least this.
DEFAULT_THRESHOLD = 0.5


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
    studies: list[tuple[int, int, str | None, list[dict]]] = []  # (table row, label, split, feature rows)
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
                   split=None if splits[0] is None else splits, levels=tuple(levels), preset=preset,
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


@dataclass(frozen=True)
class AucInterval:
    """AUC with its DeLong standard error and confidence interval.

    Attributes
    ----------
    auc : float
        Area under the ROC curve (Mann-Whitney estimate, ties count 1/2).
    se : float
        DeLong standard error.
    ci_low, ci_high : float
        Confidence interval, clipped to [0, 1].
    level : float
        Confidence level, e.g. 0.95.
    """

    auc: float
    se: float
    ci_low: float
    ci_high: float
    level: float


def delong_auc(y_true: np.ndarray, scores: np.ndarray, level: float = 0.95) -> AucInterval:
    """AUC and DeLong confidence interval by the fast midrank algorithm (Sun & Xu 2014).

    With ``m`` positives ``X`` and ``n`` negatives ``Y``, midranks in the pooled
    sample (``T_Z``), among the positives (``T_X``) and among the negatives
    (``T_Y``) give the structural components ``V10 = (T_Z(X) - T_X) / n`` and
    ``V01 = 1 - (T_Z(Y) - T_Y) / m``; the AUC is the mean of ``V10`` and its
    variance ``var(V10) / m + var(V01) / n`` (sample variances).

    Parameters
    ----------
    y_true : numpy.ndarray
        ``(N,)`` binary labels (1 or True = positive).
    scores : numpy.ndarray
        ``(N,)`` scores, higher = more likely positive.
    level : float
        Confidence level in (0, 1).

    Returns
    -------
    AucInterval
        AUC, standard error and interval.

    Raises
    ------
    ValueError
        If the inputs differ in length, or there are fewer than two positives
        or two negatives (the variance is undefined).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of equal length")
    x_pos, y_neg = s[y], s[~y]
    m, n = x_pos.size, y_neg.size
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least 2 positives and 2 negatives (got {m} and {n})")
    pooled = rankdata(np.concatenate([x_pos, y_neg]))  # midranks
    v10 = (pooled[:m] - rankdata(x_pos)) / n
    v01 = 1.0 - (pooled[m:] - rankdata(y_neg)) / m
    auc = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    z = float(norm.ppf(0.5 + level / 2.0))
    return AucInterval(auc=auc, se=se, ci_low=max(0.0, auc - z * se), ci_high=min(1.0, auc + z * se), level=level)


def binary_metrics(y_true: np.ndarray, probability: np.ndarray,
                   threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """AUC with DeLong 95 % CI, sensitivity, specificity and confusion matrix at ``threshold``.

    Parameters
    ----------
    y_true : numpy.ndarray
        ``(N,)`` 0/1 labels.
    probability : numpy.ndarray
        ``(N,)`` predicted probability of the positive class.
    threshold : float
        Predicted positive when ``probability >= threshold``.

    Returns
    -------
    dict
        ``n``, ``n_positive``, ``n_negative``, ``auc``, ``auc_se``,
        ``auc_ci95`` ``[low, high]``, ``threshold``, ``sensitivity``,
        ``specificity``, ``accuracy``, ``confusion_matrix``
        ``{"tn", "fp", "fn", "tp"}``.

    Raises
    ------
    ValueError
        See :func:`delong_auc`.
    """
    y = np.asarray(y_true).astype(int)
    interval = delong_auc(y, probability)
    predicted = (np.asarray(probability) >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    return {"n": int(y.size), "n_positive": tp + fn, "n_negative": tn + fp,
            "auc": interval.auc, "auc_se": interval.se, "auc_ci95": [interval.ci_low, interval.ci_high],
            "threshold": threshold, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "accuracy": (tp + tn) / y.size, "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}}


def plot_roc(y_true: np.ndarray, probability: np.ndarray, metrics: dict[str, Any], title: str, path: Path) -> None:
    """Draw the ROC curve with its AUC and DeLong CI and write it as PNG.

    Parameters
    ----------
    y_true : numpy.ndarray
        ``(N,)`` 0/1 labels.
    probability : numpy.ndarray
        ``(N,)`` positive-class probabilities.
    metrics : dict
        Output of :func:`binary_metrics` for the same data (AUC, CI, operating point).
    title : str
        Plot title (task and validation; no patient data).
    path : pathlib.Path
        Output PNG.
    """
    fpr, tpr, _ = roc_curve(y_true, probability)
    fig = Figure(figsize=(5, 5), dpi=100)  # no pyplot: no global backend state in the worker
    ax = fig.add_subplot()
    low, high = metrics["auc_ci95"]
    ax.plot(fpr, tpr, lw=2, label=f"AUC {metrics['auc']:.3f} (95 % CI {low:.3f}-{high:.3f}, DeLong)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    operating_point = (f"p >= {metrics['threshold']:g}: sens {metrics['sensitivity']:.2f}, "
                       f"spec {metrics['specificity']:.2f}")
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "o", color="black", label=operating_point)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


@dataclass(frozen=True)
class EvalReport:
    """Result of :func:`evaluate`.

    Attributes
    ----------
    model_id : str
        The evaluated model.
    metrics : dict
        :func:`binary_metrics` on every usable sample of the table.
    excluded : dict
        Reason -> number of studies left out.
    report_json, predictions_csv, roc_png : pathlib.Path
        Files written to ``out_dir``.
    """

    model_id: str
    metrics: dict[str, Any]
    excluded: dict[str, int]
    report_json: Path
    predictions_csv: Path
    roc_png: Path


def evaluate(model_path: Path, table_csv: Path, features_dir: Path, out_dir: Path, *,
             expected_sha256: str | None = None) -> EvalReport:
    """Apply a trained model to a labelled table of studies and report its performance.

    Parameters
    ----------
    model_path : pathlib.Path
        Model artifact written by :func:`osteonode.classify.train.train`.
    table_csv : pathlib.Path
        Studies and labels, same format as for training (a ``split`` column is
        ignored: every row is evaluated).
    features_dir : pathlib.Path
        Where the studies' feature tables are (see :func:`load_dataset`).
    out_dir : pathlib.Path
        Output folder: ``evaluation.json``, ``predictions.csv``, ``roc.png``.
    expected_sha256 : str, optional
        Expected SHA-256 of the artifact; default: the ``<artifact>.sha256`` file
        that training wrote beside it.

    Returns
    -------
    EvalReport
        Metrics and output paths.

    Raises
    ------
    ModelArtifactError
        If the artifact fails its hash check.
    ValueError
        If the table has no usable study of both classes, or the feature tables
        were extracted with another radiomics preset.
    """
    model_path = Path(model_path)
    if expected_sha256 is None:
        expected_sha256 = read_sha256_file(model_path)
    model = load_model(model_path, expected_sha256)
    meta = model.metadata
    data = load_dataset(table_csv, features_dir, task=meta["task"], unit=meta["unit"], levels=meta["levels"],
                        ignore_split=True)
    if data.preset_sha256 != meta["preset_sha256"]:
        raise ValueError(f"the feature tables were not extracted with the model's radiomics preset {meta['preset']!r}")
    probability = model.pipeline.predict_proba(to_matrix(data.samples, model.feature_names))[:, 1]
    metrics = binary_metrics(data.y, probability, meta["threshold"])
    out_dir.mkdir(parents=True, exist_ok=True)
    roc_png = out_dir / "roc.png"
    plot_roc(data.y, probability, metrics, f"{meta['task']} (external evaluation)", roc_png)
    predictions_csv = out_dir / "predictions.csv"
    write_predictions(predictions_csv, data.table_rows, data.sample_levels, data.y, probability)
    report_json = out_dir / "evaluation.json"
    report = EvalReport(model_id=meta["model_id"], metrics=metrics, excluded=data.excluded, report_json=report_json,
                        predictions_csv=predictions_csv, roc_png=roc_png)
    report_json.write_text(json.dumps({**asdict(report), "model_sha256": model.sha256, "synthetic_training_data":
                                       meta["synthetic"]}, indent=2, default=str) + "\n", encoding="utf-8")
    log.info("evaluated %s on %d sample(s): AUC %.3f", meta["model_id"], metrics["n"], metrics["auc"])
    return report


def write_predictions(path: Path, table_rows: list[int], levels: list[str | None], y: np.ndarray,
                      probability: np.ndarray, folds: list[int] | None = None) -> None:
    """Write per-sample predictions as CSV.

    Parameters
    ----------
    path : pathlib.Path
        Output CSV: ``table_row``, ``level``, ``label``, ``probability`` (and ``fold``).
    table_rows : list of int
        1-based row number of each sample's study in the study table (never its identifiers).
    levels : list of str or None
        Level of each sample (None for study-level samples).
    y : numpy.ndarray
        ``(n_samples,)`` 0/1 labels.
    probability : numpy.ndarray
        ``(n_samples,)`` predicted positive-class probability.
    folds : list of int, optional
        Cross-validation fold of each sample.
    """
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["table_row", "level", "label", "probability"] + (["fold"] if folds is not None else []))
        for i, (row, level, label, p) in enumerate(zip(table_rows, levels, y, probability)):
            writer.writerow([row, level or "", int(label), repr(float(p))] + ([folds[i]] if folds is not None else []))


def read_sha256_file(model_path: Path) -> str:
    """The hash recorded in ``<artifact>.sha256`` (``sha256sum`` format) beside a model artifact.

    Parameters
    ----------
    model_path : pathlib.Path
        The artifact.

    Returns
    -------
    str
        The recorded hex SHA-256.

    Raises
    ------
    ModelArtifactError
        If the file is missing or does not name the artifact.
    """
    sidecar = model_path.with_name(model_path.name + ".sha256")
    try:
        digest, name = sidecar.read_text(encoding="utf-8").split()
    except (FileNotFoundError, ValueError) as exc:
        raise ModelArtifactError(f"no valid {sidecar.name} beside the model; pass the expected SHA-256") from exc
    if name != model_path.name:
        raise ModelArtifactError(f"{sidecar.name} names {name}, not {model_path.name}")
    return digest
