"""Training radiomics classifiers that replicate the seed papers, with honest validation.

Input: a study table with labels and the per-study radiomics feature tables
(:func:`osteonode.classify.dataset.load_dataset`). Pipelines (scikit-learn):

1. drop features that are constant in the training data, z-score
   standardisation (Xue 2022; "preProcess" centring and scaling in seed 001;
   z-score in seed 002);
2. feature selection, either

   * ``"lr_stability"`` -- seed 000 (Xue Z et al., BMC Musculoskelet Disord
     2022;23:336): L2 logistic regression, mean-coefficient threshold, at most
     150 features, stable over 5 folds, |r| > 0.95 redundancy removed
     (:class:`~osteonode.classify.selectors.L2StabilitySelector`), or
   * ``"mrmr_lasso"`` -- seeds 001 and 002: mRMR top 25, then LASSO logistic
     regression with 10-fold CV and the 1-SE rule
     (:class:`~osteonode.classify.selectors.MRMRLassoSelector`);

3. a classifier: ``"rf"`` random forest, ``"svm"`` (RBF, Platt-scaled
   probabilities), ``"knn"`` (k = 5) -- the three of seed 000 -- or
   ``"logistic"`` (L2 logistic regression on the selected features, the
   "radiomics score" of seeds 001 and 002). The papers give no
   hyper-parameters; scikit-learn's defaults are used.

Validation: ``"cv"`` -- stratified 5-fold cross-validation (seed 000) -- or
``"holdout"`` -- a stratified 70/30 split (seeds 001, 002) or the table's
``split`` column. Unlike seed 000, which selected features on the whole data
set before cross-validating, the whole pipeline including feature selection is
refitted inside every fold, so the reported AUC is not inflated by selection.
Folds and splits are drawn by study, so the vertebrae of one patient never sit
on both sides (seed 002 split vertebrae). The inner folds of the selectors
are not grouped; with ``unit="vertebra"`` they may share patients, which only
affects the choice of features. For ``unit="vertebra"`` the DeLong interval
treats vertebrae as independent and is therefore too narrow.

Output (``out_dir``): the model artifact ``<model_id>.joblib`` and its
``.sha256``, ``model_card.json`` and ``model_card.md`` (provenance of the
training data; synthetic data -> "NOT clinically valid"),
``training_report.json``, ``predictions.csv`` (by table row number, no
identifiers) and ``roc.png``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from osteonode import __version__
from osteonode.classify.artifact import save_model
from osteonode.classify.dataset import TASKS, Dataset, Unit, load_dataset, to_matrix
from osteonode.classify.evaluate import write_predictions
from osteonode.classify.metrics import DEFAULT_THRESHOLD, binary_metrics, plot_roc
from osteonode.classify.selectors import L2StabilitySelector, MRMRLassoSelector

log = logging.getLogger(__name__)

#: The installed distribution of pyradiomics (pyproject), whose version the model card records.
PYRADIOMICS_DISTRIBUTION = "pyradiomics-bhklab"

PIPELINES = {
    "lr_stability": "z-score; L2 logistic regression selection (mean |coef| threshold, <= 150 features, stable "
                    "in 5/5 folds, |r| > 0.95 removed); Xue Z et al., BMC Musculoskelet Disord 2022;23:336",
    "mrmr_lasso": "z-score; mRMR (MID, top 25); LASSO logistic regression, 10-fold CV deviance, 1-SE rule; "
                  "seed 001 (BMC Med Imaging 2022) and Yu Q et al., Front Aging 2025;6:1472060",
}
CLASSIFIERS = ("rf", "svm", "knn", "logistic")
VALIDATIONS = ("cv", "holdout")
CV_FOLDS = 5
HOLDOUT_TEST_FRACTION = 0.3
NOT_CLINICALLY_VALID = ("NOT clinically valid: trained on synthetic data. It demonstrates the training code "
                        "only and must never be used to classify patients.")
RESEARCH_ONLY = ("Research use only: not validated for clinical use. Its performance was measured on the "
                 "training institution's data only; external validation is required before any use.")


@dataclass(frozen=True)
class TrainReport:
    """Result of :func:`train`.

    Attributes
    ----------
    model_id : str
        ``<task>-<pipeline>-<classifier>-<UTC timestamp>``.
    model_path : pathlib.Path
        The artifact (joblib).
    sha256 : str
        Hex SHA-256 of the artifact (pass it to :func:`~osteonode.classify.artifact.load_model`).
    validation : str
        ``"cv"`` or ``"holdout"``.
    metrics : dict
        :func:`~osteonode.classify.metrics.binary_metrics` of the out-of-fold
        predictions (``cv``) or of the test split (``holdout``).
    train_metrics : dict or None
        Apparent performance on the training split (``holdout`` only).
    selected_features : list of str
        Features the final model uses.
    fold_selection_counts : dict
        Feature -> number of outer folds that selected it (``cv`` only; stability).
    excluded : dict
        Reason -> number of studies left out.
    model_card_json, model_card_md, report_json, predictions_csv, roc_png : pathlib.Path
        Files written.
    """

    model_id: str
    model_path: Path
    sha256: str
    validation: str
    metrics: dict[str, Any]
    train_metrics: dict[str, Any] | None
    selected_features: list[str]
    fold_selection_counts: dict[str, int]
    excluded: dict[str, int]
    model_card_json: Path
    model_card_md: Path
    report_json: Path
    predictions_csv: Path
    roc_png: Path


def build_pipeline(pipeline: str, classifier: str, seed: int) -> Pipeline:
    """The unfitted scikit-learn pipeline: constant-feature removal, z-score, selection, classifier.

    Parameters
    ----------
    pipeline : {"lr_stability", "mrmr_lasso"}
        Feature selection.
    classifier : {"rf", "svm", "knn", "logistic"}
        Classifier.
    seed : int
        Seed of the selector's folds and of the random forest.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``constant``, ``zscore``, ``select``, ``classify``.

    Raises
    ------
    ValueError
        If ``pipeline`` or ``classifier`` is unknown.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    selectors = {"lr_stability": L2StabilitySelector(random_state=seed),
                 "mrmr_lasso": MRMRLassoSelector(random_state=seed)}
    classifiers = {"rf": RandomForestClassifier(random_state=seed),
                   "svm": CalibratedClassifierCV(SVC(), ensemble=False),
                   "knn": KNeighborsClassifier(),
                   "logistic": LogisticRegression(max_iter=5000)}
    if classifier not in classifiers:
        raise ValueError(f"unknown classifier {classifier!r}; choose one of {', '.join(CLASSIFIERS)}")
    return Pipeline([("constant", VarianceThreshold()), ("zscore", StandardScaler()),
                     ("select", selectors[pipeline]), ("classify", classifiers[classifier])])


def train(table_csv: Path, features_dir: Path, out_dir: Path, *, provenance: str,
          task: str = "osteoporosis_vs_normal", pipeline: str = "lr_stability", classifier: str = "rf",
          unit: Unit = "study", validation: str = "cv", seed: int = 0, synthetic: bool = False) -> TrainReport:
    """Train, validate and save a radiomics classifier with its model card.

    Parameters
    ----------
    table_csv : pathlib.Path
        Study table with labels (:func:`~osteonode.classify.dataset.load_dataset`).
    features_dir : pathlib.Path
        Base folder of the per-study feature tables.
    out_dir : pathlib.Path
        Output folder (created).
    provenance : str
        Where the training data come from, in words, for the model card
        (institution, period, scanner, label source); must not be empty.
    task : str
        A key of :data:`osteonode.classify.dataset.TASKS`.
    pipeline : {"lr_stability", "mrmr_lasso"}
        Feature selection (module docstring).
    classifier : {"rf", "svm", "knn", "logistic"}
        Classifier.
    unit : {"study", "vertebra"}
        One sample per study (L1-L4 side by side, seed 000) or per vertebra (seed 002).
    validation : {"cv", "holdout"}
        Stratified 5-fold CV by study, or a 70/30 (or the table's) split.
    seed : int
        Seed of every random step (folds, splits, forests).
    synthetic : bool
        The training data are synthetic: the card then says "NOT clinically valid".

    Returns
    -------
    TrainReport
        Metrics, selected features and the paths written.

    Raises
    ------
    ValueError
        Unknown option, empty ``provenance``, too few studies of a class for
        the validation, or any reason of :func:`~osteonode.classify.dataset.load_dataset`.
    """
    if not provenance.strip():
        raise ValueError("describe the training data's provenance for the model card")
    if validation not in VALIDATIONS:
        raise ValueError(f"unknown validation {validation!r}; choose one of {', '.join(VALIDATIONS)}")
    estimator = build_pipeline(pipeline, classifier, seed)
    data = load_dataset(table_csv, features_dir, task=task, unit=unit)
    X = to_matrix(data.samples, data.feature_names)
    study_label = np.zeros(data.groups.max() + 1, dtype=int)
    study_label[data.groups] = data.y
    studies = np.unique(data.groups)
    for cls, name in ((1, TASKS[task].positive_name), (0, TASKS[task].negative_name)):
        count = int(np.sum(study_label[studies] == cls))
        if count < CV_FOLDS:
            raise ValueError(f"only {count} stud{'y' if count == 1 else 'ies'} of class {name!r}; "
                             f"need at least {CV_FOLDS}")
    log.info("training %s/%s/%s on %d sample(s) from %d studies, %d features, %s validation",
             task, pipeline, classifier, len(data.y), studies.size, X.shape[1], validation)

    fold_counts: dict[str, int] = {}
    train_metrics = None
    if validation == "cv":
        probability = np.empty(len(data.y))
        folds = np.empty(len(data.y), dtype=int)
        splitter = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed)
        for k, (_, test_studies) in enumerate(splitter.split(studies, study_label[studies])):
            test = np.isin(data.groups, studies[test_studies])
            fitted = clone(estimator).fit(X[~test], data.y[~test])
            probability[test] = fitted.predict_proba(X[test])[:, 1]
            folds[test] = k
            for name in _selected(fitted, data.feature_names):
                fold_counts[name] = fold_counts.get(name, 0) + 1
        model = clone(estimator).fit(X, data.y)
        evaluated = np.ones(len(data.y), dtype=bool)
        fold_list: list[int] | None = folds.tolist()
        title = f"{task}: {CV_FOLDS}-fold cross-validation"
    else:
        evaluated = _test_mask(data, study_label, studies, seed)
        model = clone(estimator).fit(X[~evaluated], data.y[~evaluated])
        probability = model.predict_proba(X)[:, 1]
        train_metrics = binary_metrics(data.y[~evaluated], probability[~evaluated])
        fold_list = None
        title = f"{task}: hold-out test split"
    metrics = binary_metrics(data.y[evaluated], probability[evaluated])
    selected = _selected(model, data.feature_names)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    model_id = f"{task}-{pipeline}-{classifier}-{created:%Y%m%dT%H%M%SZ}"
    metadata = {"model_id": model_id, "task": task, "positive_class": TASKS[task].positive_name,
                "negative_class": TASKS[task].negative_name, "unit": unit, "levels": list(data.levels),
                "preset": data.preset, "preset_sha256": data.preset_sha256, "threshold": DEFAULT_THRESHOLD,
                "synthetic": synthetic, "provenance": provenance}
    model_path = out_dir / f"{model_id}.joblib"
    sha256 = save_model(model, data.feature_names, metadata, model_path)
    model_path.with_name(model_path.name + ".sha256").write_text(f"{sha256}  {model_path.name}\n", encoding="utf-8")
    roc_png = out_dir / "roc.png"
    plot_roc(data.y[evaluated], probability[evaluated], metrics, title, roc_png)
    predictions_csv = out_dir / "predictions.csv"
    write_predictions(predictions_csv, [r for r, e in zip(data.table_rows, evaluated) if e],
                      [lv for lv, e in zip(data.sample_levels, evaluated) if e], data.y[evaluated],
                      probability[evaluated], fold_list)
    card = _model_card(metadata, model_path, sha256, created, data, pipeline, classifier, validation, seed,
                       metrics, train_metrics, selected, X.shape[1], table_csv)
    card_json, card_md = out_dir / "model_card.json", out_dir / "model_card.md"
    card_json.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    card_md.write_text(_card_markdown(card), encoding="utf-8")
    report = TrainReport(model_id=model_id, model_path=model_path, sha256=sha256, validation=validation,
                         metrics=metrics, train_metrics=train_metrics, selected_features=selected,
                         fold_selection_counts=fold_counts, excluded=data.excluded, model_card_json=card_json,
                         model_card_md=card_md, report_json=out_dir / "training_report.json",
                         predictions_csv=predictions_csv, roc_png=roc_png)
    report.report_json.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n", encoding="utf-8")
    log.info("model %s: %s AUC %.3f (95 %% CI %.3f-%.3f), %d feature(s) selected", model_id, validation,
             metrics["auc"], *metrics["auc_ci95"], len(selected))
    return report


def _test_mask(data: Dataset, study_label: np.ndarray, studies: np.ndarray, seed: int) -> np.ndarray:
    """Samples of the test split: the table's ``split`` column, else a stratified 30 % of the studies."""
    if data.split is not None:
        test = np.array([s == "test" for s in data.split])
        if test.all() or not test.any():
            raise ValueError("the split column must name both train and test studies")
        return test
    splitter = StratifiedShuffleSplit(1, test_size=HOLDOUT_TEST_FRACTION, random_state=seed)
    _, test_studies = next(splitter.split(studies, study_label[studies]))
    return np.isin(data.groups, studies[test_studies])


def _selected(fitted: Pipeline, feature_names: list[str]) -> list[str]:
    """Names of the features that reach the classifier of a fitted pipeline."""
    return [str(name) for name in fitted[:-1].get_feature_names_out(np.asarray(feature_names, dtype=object))]


def _model_card(metadata: dict[str, Any], model_path: Path, sha256: str, created: datetime, data: Dataset,
                pipeline: str, classifier: str, validation: str, seed: int, metrics: dict[str, Any],
                train_metrics: dict[str, Any] | None, selected: list[str], n_features: int,
                table_csv: Path) -> dict[str, Any]:
    """The model card as a JSON-able dict (no patient data: counts and metrics only)."""
    task = TASKS[metadata["task"]]
    return {
        "model_id": metadata["model_id"],
        "artifact": model_path.name,
        "sha256": sha256,
        "created_utc": created.isoformat(timespec="seconds"),
        "clinical_validity": NOT_CLINICALLY_VALID if metadata["synthetic"] else RESEARCH_ONLY,
        "intended_use": "Research replication of published CT radiomics models of bone status; not a medical "
                        "device. The node's default classification stays the rule-based one.",
        "task": {"name": metadata["task"], "positive_class": task.positive_name,
                 "negative_class": task.negative_name, "source": task.source,
                 "labels": "DXA T-score in WHO categories (>= -1 normal, <= -2.5 osteoporosis)"
                           if task.label_column == "who_category" else "OVCF yes/no"},
        "training_data": {"provenance": metadata["provenance"], "synthetic": metadata["synthetic"],
                          "table": Path(table_csv).name, "n_studies": int(np.unique(data.groups).size),
                          "n_samples": int(data.y.size), "n_positive": int(data.y.sum()),
                          "n_negative": int((data.y == 0).sum()), "excluded": data.excluded},
        "features": {"radiomics_preset": data.preset, "preset_sha256": data.preset_sha256,
                     "unit": metadata["unit"], "levels": metadata["levels"], "n_input_features": n_features,
                     "selected": selected},
        "method": {"pipeline": pipeline, "description": PIPELINES[pipeline], "classifier": classifier,
                   "seed": seed, "threshold": metadata["threshold"]},
        "validation": {"method": (f"stratified {CV_FOLDS}-fold cross-validation by study, whole pipeline "
                                  "refitted per fold; final model fitted on all studies")
                       if validation == "cv" else
                       ("hold-out by study (" + ("table split column" if data.split is not None else
                                                 f"stratified {HOLDOUT_TEST_FRACTION:.0%} test") + ")"),
                       "metrics": metrics, "train_metrics": train_metrics},
        "software": {"osteonode": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
                     "pyradiomics": importlib.metadata.version(PYRADIOMICS_DISTRIBUTION),
                     "python": platform.python_version()},
    }


def _card_markdown(card: dict[str, Any]) -> str:
    """Human-readable rendering of the model card."""
    m = card["validation"]["metrics"]
    cm = m["confusion_matrix"]
    td = card["training_data"]
    lines = [
        f"# Model card: {card['model_id']}", "",
        f"**{card['clinical_validity']}**", "",
        f"- Intended use: {card['intended_use']}",
        f"- Artifact: `{card['artifact']}`, SHA-256 `{card['sha256']}`",
        f"- Created: {card['created_utc']}", "",
        "## Task", "",
        f"{card['task']['positive_class']} (positive) vs {card['task']['negative_class']}; labels: "
        f"{card['task']['labels']}; after {card['task']['source']}.", "",
        "## Training data", "",
        f"- Provenance: {td['provenance']}",
        f"- Synthetic: {'yes' if td['synthetic'] else 'no'}",
        f"- {td['n_studies']} studies, {td['n_samples']} samples ({td['n_positive']} positive, "
        f"{td['n_negative']} negative); left out: {td['excluded'] or 'none'}", "",
        "## Method", "",
        f"- Radiomics preset `{card['features']['radiomics_preset']}` (fingerprint "
        f"`{card['features']['preset_sha256'][:16]}...`), unit: {card['features']['unit']}, levels "
        f"{', '.join(card['features']['levels'])}, {card['features']['n_input_features']} input features",
        f"- Pipeline `{card['method']['pipeline']}`: {card['method']['description']}",
        f"- Classifier `{card['method']['classifier']}`, seed {card['method']['seed']}, positive at p >= "
        f"{card['method']['threshold']}",
        f"- Selected features ({len(card['features']['selected'])}): "
        + ", ".join(f"`{f}`" for f in card["features"]["selected"]), "",
        "## Validation", "",
        f"{card['validation']['method']}.", "",
        f"- AUC {m['auc']:.3f} (95 % CI {m['auc_ci95'][0]:.3f}-{m['auc_ci95'][1]:.3f}, DeLong)",
        f"- Sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}, accuracy {m['accuracy']:.3f}",
        f"- Confusion matrix: TN {cm['tn']}, FP {cm['fp']}, FN {cm['fn']}, TP {cm['tp']}", "",
        "## Software", "",
        ", ".join(f"{k} {v}" for k, v in card["software"].items()), "",
    ]
    return "\n".join(lines)
