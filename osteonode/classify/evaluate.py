"""External evaluation of a trained radiomics model on a labelled table of studies (``osteonode evaluate``).

The table and the feature tables are read as for training
(:func:`osteonode.classify.dataset.load_dataset`); the metrics are those of
:mod:`osteonode.classify.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osteonode.classify.artifact import load_model, read_sha256_file
from osteonode.classify.dataset import load_dataset, to_matrix
from osteonode.classify.metrics import binary_metrics, plot_roc

log = logging.getLogger(__name__)


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
