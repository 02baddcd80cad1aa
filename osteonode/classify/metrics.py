"""Performance of a binary classifier: AUC with DeLong CI, sensitivity, specificity, ROC curve.

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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import norm, rankdata
from sklearn.metrics import confusion_matrix, roc_curve

#: Operating point of every model: positive when the predicted probability is at least this.
DEFAULT_THRESHOLD = 0.5


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
