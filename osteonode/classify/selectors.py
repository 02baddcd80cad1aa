"""Feature selectors of the seed papers, as scikit-learn transformers.

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

import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectFromModel, SelectorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold


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

    def fit(self, X: np.ndarray, y: np.ndarray) -> L2StabilitySelector:
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
        return np.asarray(self.support_, dtype=bool)


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

    def fit(self, X: np.ndarray, y: np.ndarray) -> MRMRLassoSelector:
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
        one_se = int(np.flatnonzero(mean <= mean[best] + se[best])[0])  # lambdas decrease: first = largest
        for chosen in range(one_se, lambdas.size):
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
        return np.asarray(self.support_, dtype=bool)


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
    return np.asarray((X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0))


def _mutual_information(r: np.ndarray) -> np.ndarray:
    """Mutual information (nats) of bivariate normal variables with correlation ``r``."""
    return np.asarray(-0.5 * np.log1p(-np.minimum(np.square(r), 1.0 - 1e-12)))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
