"""Trained radiomics models: feature selectors, the versioned artifact, hash-checked loading.

A model artifact is a joblib file holding a fitted scikit-learn
:class:`~sklearn.pipeline.Pipeline` (z-score standardisation, feature
selection, classifier) and the metadata needed to apply it: the ordered feature
names, the radiomics preset and its fingerprint, the unit of analysis and the
task. Its SHA-256 is recorded in the model card when it is trained;
:func:`load_model` recomputes it *before* unpickling (a pickle runs code when it
is loaded) and refuses a file that does not match.

The two feature selectors reproduce the seed papers:

* :class:`L2StabilitySelector` -- Xue Z et al., BMC Musculoskelet Disord
  2022;23:336: L2-penalised logistic regression, features whose absolute
  coefficient exceeds the mean (at most 150), kept only when selected in all
  five cross-validation folds, then one of each pair with Pearson |r| > 0.95
  removed.
* :class:`MRMRLassoSelector` -- seed 001 (QCT radiomics of L3, BMC Med Imaging
  2022, doi:10.1186/s12880-022-00868-5: mRMR 851 -> 20 features -> LASSO) and
  seed 002 (Yu Q et al., Front Aging 2025;6:1472060: mRMR -> 25 -> LASSO,
  10-fold CV, one-standard-error rule): minimum-redundancy maximum-relevance
  ranking, then an L1-penalised logistic regression whose penalty is chosen by
  10-fold cross-validated deviance and the 1-SE rule.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import joblib
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectFromModel, SelectorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline

from osteonode.errors import OsteonodeError
from osteonode.feature_table import META_COLUMNS

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "osteonode-radiomics-model"
ARTIFACT_FORMAT_VERSION = 1
Unit = Literal["study", "vertebra"]
#: Separator of level and feature name in the study-level (wide) feature vector.
LEVEL_SEPARATOR = ":"


class ModelArtifactError(OsteonodeError):
    """A model artifact that must not be used: wrong hash, unreadable, or not an osteonode model.

    The worker catches it, falls back to the rule-based classification and says so.
    """


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : pathlib.Path
        The file.

    Returns
    -------
    str
        64 lower-case hex digits.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- feature vectors

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
        row = by_level.get(level)
        if row is None:
            if unit == "study":
                raise ValueError(f"level {level} missing from the feature table")
            continue
        features = {k: float(v) for k, v in row.items() if k not in META_COLUMNS}
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


# --------------------------------------------------------------------------- selectors

class L2StabilitySelector(SelectorMixin, BaseEstimator):
    """Feature selection of Xue et al. 2022 (seed 000).

    In each of ``n_splits`` stratified folds, an L2-penalised logistic
    regression is fitted on the training part; features whose absolute
    coefficient exceeds the mean absolute coefficient are selected, at most
    ``max_features`` of them (scikit-learn's ``SelectFromModel(threshold="mean")``).
    Features selected in every fold are kept; if no feature is selected in
    every fold (pure noise), those selected in the most folds are kept. Then,
    going down the kept features by mean absolute coefficient, a feature is
    dropped when its Pearson |r| with an already kept one exceeds
    ``corr_threshold`` (the paper's correlation-matrix step).

    Parameters
    ----------
    n_splits : int
        Folds of the stability check (5 in the paper).
    max_features : int
        Cap per fold (150 in the paper).
    corr_threshold : float
        Redundancy cut-off on |r| (0.95 in the paper).
    C : float
        Inverse L2 penalty strength of the logistic regression (scikit-learn default 1).
    random_state : int or None
        Seed of the fold shuffling.

    Attributes
    ----------
    support_ : numpy.ndarray
        ``(n_features,)`` bool mask of the selected features.
    selection_counts_ : numpy.ndarray
        ``(n_features,)`` number of folds that selected each feature.
    """

    def __init__(self, n_splits: int = 5, max_features: int = 150, corr_threshold: float = 0.95,
                 C: float = 1.0, random_state: int | None = None) -> None:
        self.n_splits = n_splits
        self.max_features = max_features
        self.corr_threshold = corr_threshold
        self.C = C
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> "L2StabilitySelector":
        """Select features on ``X`` ``(n_samples, n_features)`` (z-scores) and binary ``y``."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        folds = StratifiedKFold(self.n_splits, shuffle=True, random_state=self.random_state)
        counts = np.zeros(X.shape[1], dtype=int)
        importance = np.zeros(X.shape[1])
        for train, _ in folds.split(X, y):
            model = SelectFromModel(LogisticRegression(C=self.C, l1_ratio=0.0, max_iter=5000),
                                    threshold="mean", max_features=min(self.max_features, X.shape[1]))
            model.fit(X[train], y[train])
            counts += model.get_support()
            importance += np.abs(model.estimator_.coef_[0]) / self.n_splits
        stable = np.flatnonzero(counts == counts.max())
        kept: list[int] = []
        for j in stable[np.argsort(-importance[stable], kind="stable")]:
            if all(abs(_pearson(X[:, j], X[:, k])) <= self.corr_threshold for k in kept):
                kept.append(int(j))
        self.selection_counts_ = counts
        self.support_ = np.zeros(X.shape[1], dtype=bool)
        self.support_[kept] = True
        self.n_features_in_ = X.shape[1]
        return self

    def _get_support_mask(self) -> np.ndarray:
        return self.support_


class MRMRLassoSelector(SelectorMixin, BaseEstimator):
    """mRMR ranking, then LASSO logistic regression with the 1-SE rule (seeds 001, 002).

    1. **mRMR** (Ding C, Peng H, J Bioinform Comput Biol 2005;3:185-205), the
       "MID" criterion: the first feature maximises relevance ``I(x; y)``, each
       next one ``I(x; y) - mean_s I(x; x_s)`` over those already chosen. Mutual
       information is estimated from the Pearson correlation,
       ``I = -0.5 ln(1 - r^2)``, as the mRMRe R package (De Jay N et al.,
       Bioinformatics 2013;29:2365-2368) does for continuous variables; the
       target is coded 0/1. The top ``n_mrmr`` are kept (25 in seed 002).
    2. **LASSO**: L1-penalised logistic regression on those features over a
       glmnet-style grid of ``n_lambdas`` penalties (lambda_max, where every
       coefficient is 0, down to lambda_max x 1e-4 if n > p else x 1e-2),
       ``C = 1 / (n lambda)``. The mean cross-validated deviance (log loss) over
       ``cv`` stratified folds and its standard error give lambda_min; the
       chosen lambda is the largest whose mean deviance is within one standard
       error of the minimum (Hastie, Tibshirani, Friedman, *The Elements of
       Statistical Learning*, 2nd ed., sec. 7.10). The features with non-zero
       coefficients at that lambda are selected; if none is (no signal), the
       penalty is relaxed along the grid until one is.

    As in the seeds, mRMR ranks on the same data that the LASSO is then
    cross-validated on, so the inner CV deviance is optimistic (on pure noise
    it still favours a handful of features); the outer validation of
    :func:`osteonode.classify.train.train` refits everything per fold and is
    not affected. The L1 fits use liblinear with ``intercept_scaling=100`` so
    that its penalty on the intercept is negligible.

    Parameters
    ----------
    n_mrmr : int
        Features kept by mRMR.
    cv : int
        Folds of the LASSO cross-validation (10 in seed 002).
    n_lambdas : int
        Penalties on the grid (glmnet's default 100).
    random_state : int or None
        Seed of the fold shuffling.

    Attributes
    ----------
    support_ : numpy.ndarray
        ``(n_features,)`` bool mask of the selected features.
    mrmr_order_ : numpy.ndarray
        Indices of the ``n_mrmr`` features in mRMR order.
    lambda_min_, lambda_1se_ : float
        The penalty with the least CV deviance and the 1-SE choice (glmnet scale).
    coef_ : numpy.ndarray
        ``(n_features,)`` LASSO coefficients at the chosen lambda (0 for features not kept).
    """

    def __init__(self, n_mrmr: int = 25, cv: int = 10, n_lambdas: int = 100,
                 random_state: int | None = None) -> None:
        self.n_mrmr = n_mrmr
        self.cv = cv
        self.n_lambdas = n_lambdas
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> "MRMRLassoSelector":
        """Select features on ``X`` ``(n_samples, n_features)`` (z-scores) and binary ``y``."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(int)
        order = mrmr_order(X, y, min(self.n_mrmr, X.shape[1]))
        Xs = X[:, order]
        n, p = Xs.shape
        lambda_max = float(np.max(np.abs(Xs.T @ (y - y.mean()))) / n)
        lambdas = lambda_max * np.logspace(0.0, np.log10(1e-4 if n > p else 1e-2), self.n_lambdas)
        folds = list(StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state).split(Xs, y))
        deviance = np.empty((len(folds), lambdas.size))
        for f, (train, test) in enumerate(folds):
            for i, lam in enumerate(lambdas):
                model = _lasso(Xs[train], y[train], lam)
                prob = np.clip(model.predict_proba(Xs[test])[:, 1], 1e-15, 1 - 1e-15)
                deviance[f, i] = -np.mean(y[test] * np.log(prob) + (1 - y[test]) * np.log(1 - prob))
        mean = deviance.mean(axis=0)
        se = deviance.std(axis=0, ddof=1) / np.sqrt(len(folds))
        best = int(np.argmin(mean))
        chosen = int(np.flatnonzero(mean <= mean[best] + se[best])[0])  # lambdas decrease: first = largest
        for chosen in range(chosen, lambdas.size):
            coef = _lasso(Xs, y, lambdas[chosen]).coef_[0]
            if np.any(coef != 0):
                break
        else:
            raise ValueError("the LASSO kept no feature at any penalty of the grid")
        self.mrmr_order_ = order
        self.lambda_min_ = float(lambdas[best])
        self.lambda_1se_ = float(lambdas[chosen])
        self.coef_ = np.zeros(X.shape[1])
        self.coef_[order] = coef
        self.support_ = self.coef_ != 0
        self.n_features_in_ = X.shape[1]
        return self

    def _get_support_mask(self) -> np.ndarray:
        return self.support_


def _lasso(X: np.ndarray, y: np.ndarray, lam: float) -> LogisticRegression:
    """L1 logistic regression at glmnet penalty ``lam`` (objective mean log loss + lam * |w|_1)."""
    model = LogisticRegression(C=1.0 / (len(y) * lam), l1_ratio=1.0, solver="liblinear",
                               intercept_scaling=100.0, max_iter=10000)
    with warnings.catch_warnings():
        # at the weakest penalties of the grid liblinear may stop at max_iter on separable folds;
        # those penalties are never the 1-SE choice, which lies at the strong end.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def mrmr_order(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` features in mRMR (MID) order, correlation-based mutual information.

    Parameters
    ----------
    X : numpy.ndarray
        ``(n_samples, n_features)`` features.
    y : numpy.ndarray
        ``(n_samples,)`` 0/1 target.
    k : int
        Number of features to rank.

    Returns
    -------
    numpy.ndarray
        ``(k,)`` int indices, most relevant first.
    """
    z = _standardise(X)
    n = X.shape[0]
    relevance = _mutual_information(z.T @ _standardise(y.astype(float)[:, None])[:, 0] / n)
    chosen = [int(np.argmax(relevance))]
    redundancy = np.zeros(X.shape[1])
    while len(chosen) < k:
        redundancy += _mutual_information(z.T @ z[:, chosen[-1]] / n)
        score = relevance - redundancy / len(chosen)
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return np.array(chosen)


def _standardise(X: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit population SD; constant columns become 0."""
    sd = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _mutual_information(r: np.ndarray) -> np.ndarray:
    """Mutual information (nats) of bivariate normal variables with correlation ``r``."""
    return -0.5 * np.log1p(-np.minimum(np.square(r), 1.0 - 1e-12))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


# --------------------------------------------------------------------------- artifact

@dataclass(frozen=True)
class Model:
    """A loaded, hash-checked radiomics model.

    Attributes
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Fitted pipeline; ``predict_proba`` column 1 is the positive class.
    feature_names : tuple of str
        Input features in column order.
    metadata : dict
        What the artifact says about itself: ``task``, ``positive_class``,
        ``negative_class``, ``unit``, ``levels``, ``preset``, ``preset_sha256``,
        ``threshold``, ``model_id``, ``synthetic``, ``provenance``.
    sha256 : str
        Hex SHA-256 of the artifact file, as checked.
    """

    pipeline: Pipeline
    feature_names: tuple[str, ...]
    metadata: dict[str, Any]
    sha256: str

    def predict(self, rows: Sequence[dict[str, Any]]) -> list[tuple[str | None, float]]:
        """Positive-class probability for one study's feature-table rows.

        Parameters
        ----------
        rows : sequence of dict
            One study's rows (:func:`osteonode.feature_table.read_feature_table`).

        Returns
        -------
        list of (level, probability)
            One entry (level None) for a study-level model, one per level for a
            vertebra-level model.

        Raises
        ------
        ValueError
            If the rows were extracted with another radiomics preset (fingerprint
            mismatch), or a level or feature the model needs is missing.
        """
        fingerprints = {str(r["preset_sha256"]) for r in rows}
        if fingerprints != {self.metadata["preset_sha256"]}:
            raise ValueError(f"features were not extracted with the model's radiomics preset "
                             f"{self.metadata['preset']!r} (fingerprint mismatch)")
        samples = feature_vectors(rows, self.metadata["unit"], self.metadata["levels"])
        probability = self.pipeline.predict_proba(to_matrix([s for _, s in samples], self.feature_names))[:, 1]
        return [(level, float(p)) for (level, _), p in zip(samples, probability)]


def save_model(pipeline: Pipeline, feature_names: Sequence[str], metadata: dict[str, Any], path: Path) -> str:
    """Write a model artifact and return its hex SHA-256.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Fitted pipeline.
    feature_names : sequence of str
        Input features in column order.
    metadata : dict
        See :class:`Model`.
    path : pathlib.Path
        Output file (joblib).

    Returns
    -------
    str
        Hex SHA-256 of the written file.
    """
    joblib.dump({"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION, "pipeline": pipeline,
                 "feature_names": list(feature_names), "metadata": metadata}, path)
    return sha256_file(path)


def load_model(path: Path, expected_sha256: str) -> Model:
    """Load a model artifact after checking its SHA-256.

    The hash is checked before the file is unpickled, so a tampered or
    corrupted file never runs.

    Parameters
    ----------
    path : pathlib.Path
        The ``.joblib`` artifact.
    expected_sha256 : str
        Hex SHA-256 from the model card or configuration (case-insensitive).

    Returns
    -------
    Model
        The model.

    Raises
    ------
    ModelArtifactError
        If the file is missing, its SHA-256 differs from ``expected_sha256``,
        or it is not an osteonode model artifact of a supported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model artifact {path} does not exist")
    actual = sha256_file(path)
    if not hmac.compare_digest(actual, expected_sha256.strip().lower()):
        raise ModelArtifactError(f"model artifact {path.name}: SHA-256 {actual} does not match the expected "
                                 f"{expected_sha256.strip().lower()}; refusing to load it (corrupted or replaced)")
    content = joblib.load(path)
    if not isinstance(content, dict) or content.get("format") != ARTIFACT_FORMAT:
        raise ModelArtifactError(f"{path.name} is not an osteonode radiomics model artifact")
    if content.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ModelArtifactError(f"{path.name}: artifact format version {content.get('format_version')} "
                                 f"is not supported (expected {ARTIFACT_FORMAT_VERSION})")
    log.info("loaded model %s (sha256 %s...)", content["metadata"].get("model_id"), actual[:12])
    return Model(pipeline=content["pipeline"], feature_names=tuple(content["feature_names"]),
                 metadata=dict(content["metadata"]), sha256=actual)
