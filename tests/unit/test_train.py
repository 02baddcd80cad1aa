"""Tests of training, evaluation, DeLong intervals and hash-checked model loading.

Training runs on synthetic feature tables written in the format the analysis
writes (one CSV per study, one row per level). Synthetic models exist only in
the tests' temporary folders and their cards say "NOT clinically valid".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from osteonode.classify.artifact import ModelArtifactError, load_model, save_model, sha256_file
from osteonode.classify.dataset import TASKS, load_dataset, who_category
from osteonode.classify.evaluate import evaluate
from osteonode.classify.metrics import binary_metrics, delong_auc
from osteonode.classify.selectors import L2StabilitySelector, MRMRLassoSelector, mrmr_order
from osteonode.classify.train import NOT_CLINICALLY_VALID, RESEARCH_ONLY, train
from osteonode.feature_table import FEATURE_TABLE_NAME, read_feature_table, write_feature_table

LEVELS = ("L1", "L2", "L3", "L4")
SIGNAL = [f"original_firstorder_Signal{j}" for j in range(3)]
FINGERPRINT = "5" * 64


def _write_studies(root: Path, n_studies: int, n_noise: int, effect: float, seed: int,
                   fingerprint: str = FINGERPRINT) -> Path:
    """Feature tables of ``n_studies`` studies (alternating osteoporosis / normal T-scores) and the label table.

    Three "signal" features per level are shifted by ``effect`` standard deviations
    in the osteoporosis studies; ``n_noise`` further features are pure noise.
    """
    rng = np.random.default_rng(seed)
    table = []
    for i in range(n_studies):
        positive = i % 2
        rows = []
        for k, level in enumerate(LEVELS):
            values = rng.normal(size=len(SIGNAL) + n_noise)
            values[:len(SIGNAL)] += effect * positive
            names = SIGNAL + [f"wavelet-LLH_glcm_Noise{j}" for j in range(n_noise)]
            rows.append({"level": level, "vertebra_id": 20 + k, "preset": "seed000", "preset_sha256": fingerprint,
                         "roi": "bodies", "roi_voxel_count": 50000, **dict(zip(names, map(float, values)))})
        study = f"study{i:03d}"
        write_feature_table(rows, root / study / FEATURE_TABLE_NAME)
        table.append({"study_id": study, "t_score": -3.1 if positive else 0.4})
    path = root / "studies.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["study_id", "t_score"])
        writer.writeheader()
        writer.writerows(table)
    return path


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    root = tmp_path_factory.mktemp("separable")
    table = _write_studies(root, n_studies=60, n_noise=60, effect=2.0, seed=11)
    report = train(table, root, root / "model", provenance="synthetic test data", pipeline="lr_stability",
                   classifier="rf", validation="cv", seed=0, synthetic=True)
    return root, table, report


# ---------------------------------------------------------------- training

def test_separable_signal_reaches_high_cv_auc(separable):
    _, _, report = separable
    assert report.metrics["auc"] > 0.95
    assert report.metrics["n"] == 60 and report.metrics["n_positive"] == 30
    assert report.metrics["sensitivity"] > 0.8 and report.metrics["specificity"] > 0.8
    cm = report.metrics["confusion_matrix"]
    assert cm["tp"] + cm["fn"] == 30 and cm["tn"] + cm["fp"] == 30
    # the selection finds the signal at every level, in every fold
    for level in LEVELS:
        for name in SIGNAL:
            assert f"{level}:{name}" in report.selected_features
            assert report.fold_selection_counts[f"{level}:{name}"] == 5


def test_training_writes_card_artifact_roc_and_predictions(separable):
    root, _, report = separable
    card = json.loads(report.model_card_json.read_text())
    assert card["clinical_validity"] == NOT_CLINICALLY_VALID
    assert NOT_CLINICALLY_VALID in report.model_card_md.read_text()
    assert card["sha256"] == report.sha256 == sha256_file(report.model_path)
    assert card["training_data"]["synthetic"] is True and card["training_data"]["n_studies"] == 60
    assert card["features"]["radiomics_preset"] == "seed000" and card["features"]["levels"] == list(LEVELS)
    assert card["features"]["selected"] == report.selected_features
    sidecar = report.model_path.with_name(report.model_path.name + ".sha256").read_text().split()
    assert sidecar == [report.sha256, report.model_path.name]
    assert report.roc_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with report.predictions_csv.open() as fh:
        predictions = list(csv.DictReader(fh))
    assert len(predictions) == 60 and {p["fold"] for p in predictions} == {"0", "1", "2", "3", "4"}
    assert "study" not in report.predictions_csv.read_text()  # row numbers, never the study identifiers


def test_pure_noise_stays_near_chance(tmp_path):
    table = _write_studies(tmp_path, n_studies=60, n_noise=60, effect=0.0, seed=12)
    report = train(table, tmp_path, tmp_path / "model", provenance="synthetic noise", pipeline="lr_stability",
                   classifier="rf", validation="cv", seed=0, synthetic=True)
    assert 0.35 <= report.metrics["auc"] <= 0.65
    assert report.metrics["auc_ci95"][0] < 0.5 < report.metrics["auc_ci95"][1]


def test_mrmr_lasso_per_vertebra_holdout(tmp_path):
    table = _write_studies(tmp_path, n_studies=40, n_noise=40, effect=1.5, seed=13)
    report = train(table, tmp_path, tmp_path / "model", provenance="synthetic", pipeline="mrmr_lasso",
                   classifier="logistic", unit="vertebra", validation="holdout", seed=1, synthetic=True)
    assert report.metrics["n"] == 4 * 12  # 30 % of 40 studies, all their vertebrae
    assert report.metrics["auc"] > 0.9
    assert set(SIGNAL) <= set(report.selected_features)
    card = json.loads(report.model_card_json.read_text())
    assert card["features"]["unit"] == "vertebra" and card["validation"]["train_metrics"]["n"] == 4 * 28


def test_real_data_card_is_research_only(tmp_path):
    table = _write_studies(tmp_path, n_studies=20, n_noise=10, effect=2.0, seed=14)
    report = train(table, tmp_path, tmp_path / "model", provenance="site A, 2024, DXA within 30 days",
                   classifier="logistic", validation="holdout", seed=0)
    assert json.loads(report.model_card_json.read_text())["clinical_validity"] == RESEARCH_ONLY


def test_too_few_studies_of_a_class_is_rejected(tmp_path):
    table = _write_studies(tmp_path, n_studies=8, n_noise=5, effect=1.0, seed=15)
    with pytest.raises(ValueError, match="need at least 5"):
        train(table, tmp_path, tmp_path / "model", provenance="x", synthetic=True)


def test_mrmr_orders_relevant_then_non_redundant():
    """A duplicate of the best feature is redundant: mRMR prefers the independent second signal."""
    rng = np.random.default_rng(5)
    y = np.arange(200) % 2
    strong = y * 2.0 + rng.normal(size=200)
    weak = y * 1.0 + rng.normal(size=200)
    X = np.column_stack([rng.normal(size=200), strong, strong + 0.05 * rng.normal(size=200), weak])
    assert list(mrmr_order(X, y, 3)[:2]) == [1, 3]


def test_lasso_one_se_rule_picks_a_sparser_model_than_lambda_min():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(150, 30))
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(size=150) > 0).astype(int)
    selector = MRMRLassoSelector(random_state=0).fit((X - X.mean(0)) / X.std(0), y)
    assert selector.lambda_1se_ >= selector.lambda_min_
    assert selector.support_[0] and selector.support_[1]
    assert selector.support_.sum() < 25


# ---------------------------------------------------------------- labels

@pytest.mark.parametrize("t_score, category", [(0.0, "normal"), (-1.0, "normal"), (-1.01, "osteopenia"),
                                               (-2.49, "osteopenia"), (-2.5, "osteoporosis"), (-4.0, "osteoporosis")])
def test_who_categories(t_score, category):
    assert who_category(t_score) == category


def test_label_table_rules(tmp_path):
    _write_studies(tmp_path, n_studies=4, n_noise=2, effect=0.0, seed=16)
    table = tmp_path / "labels.csv"
    table.write_text("study_id,t_score,who_category\nstudy000,-1.7,\nstudy001,-2.6,\nstudy002,0.1,normal\n"
                     "study003,,osteoporosis\nmissing,-3.0,\n")
    data = load_dataset(table, tmp_path, task="osteoporosis_vs_normal", unit="study")
    assert list(data.y) == [1, 0, 1] and data.table_rows == [2, 3, 4]
    assert data.excluded == {"label not in task or missing": 1, "no feature table": 1}
    assert len(data.feature_names) == 4 * (3 + 2) and data.levels == LEVELS
    vertebrae = load_dataset(table, tmp_path, task="low_bmd_vs_normal", unit="vertebra")
    assert len(vertebrae.y) == 16 and list(vertebrae.groups[:5]) == [0, 0, 0, 0, 1]
    table.write_text("study_id,t_score,who_category\nstudy000,-1.7,osteoporosis\n")
    with pytest.raises(ValueError, match="row 1: who_category osteoporosis contradicts"):
        load_dataset(table, tmp_path, task="osteoporosis_vs_normal", unit="study")
    assert set(TASKS) >= {"osteoporosis_vs_normal", "osteoporosis_vs_osteopenia", "osteopenia_vs_normal", "ovcf"}


def test_feature_tables_of_different_presets_are_refused(tmp_path):
    table = _write_studies(tmp_path, n_studies=4, n_noise=2, effect=0.0, seed=17)
    other = tmp_path / "study003" / FEATURE_TABLE_NAME
    write_feature_table([{**r, "preset_sha256": "6" * 64} for r in read_feature_table(other)], other)
    with pytest.raises(ValueError, match="2 different radiomics presets"):
        load_dataset(table, tmp_path, task="osteoporosis_vs_normal", unit="study")


# ---------------------------------------------------------------- DeLong

#: Hanley JA, McNeil BJ, Radiology 1982;143:29-36, Table I: CT ratings 1 (definitely
#: normal) .. 5 (definitely abnormal) of 58 normal and 51 abnormal patients.
HANLEY_MCNEIL_NORMAL = (33, 6, 6, 11, 2)
HANLEY_MCNEIL_ABNORMAL = (3, 2, 2, 11, 33)


def test_delong_matches_proc_on_hanley_mcneil_ratings():
    """Reference: pROC 1.18.0 (R 4.2.2), ``r <- roc(y, s, levels = c(0, 1), direction = "<")``;
    ``auc(r)`` 0.8931711, ``sqrt(var(r))`` 0.0307244084, ``ci.auc(r)`` 0.832952327658-0.953389795398.
    (The same pROC prints 0.6301-0.8326 for its documented aSAH s100b example.)"""
    y = np.repeat([0, 1], [58, 51])
    s = np.concatenate([np.repeat(np.arange(1, 6), HANLEY_MCNEIL_NORMAL),
                        np.repeat(np.arange(1, 6), HANLEY_MCNEIL_ABNORMAL)])
    result = delong_auc(y, s)
    assert result.auc == pytest.approx(0.8931710615, abs=1e-9)
    assert result.se == pytest.approx(0.0307244083794, abs=1e-11)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.832952327658, 0.953389795398), abs=1e-10)


def test_delong_interval_is_clipped_like_proc():
    """pROC 1.18.0 ``ci.auc`` on these 10 scores: 0.849127694052, 0.96, 1 (upper bound clipped)."""
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.5, 0.7, 0.8, 0.9, 0.95])
    result = delong_auc(y, s)
    assert result.auc == pytest.approx(0.96)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.849127694052, 1.0), abs=1e-10)


def test_fast_delong_equals_the_definition_with_ties():
    """DeLong 1988 written out: placement values from the m x n comparison matrix (ties count 1/2)."""
    rng = np.random.default_rng(7)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 8, 300).astype(float) + y  # few distinct values: many ties
    psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / y.sum() + v01.var(ddof=1) / (~y).sum()
    result = delong_auc(y, s)
    assert result.auc == pytest.approx(psi.mean(), abs=1e-12)
    assert result.se ** 2 == pytest.approx(variance, rel=1e-10)


def test_binary_metrics_at_threshold():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.5, 0.9, 0.2, 0.7])
    m = binary_metrics(y, p)
    assert m["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 3}
    assert (m["sensitivity"], m["specificity"]) == (0.75, pytest.approx(2 / 3))


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="at least 2 positives and 2 negatives"):
        delong_auc(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]))


# ---------------------------------------------------------------- artifact and hash

def test_load_model_checks_the_hash_and_predicts(separable):
    root, _, report = separable
    model = load_model(report.model_path, report.sha256.upper())
    assert model.metadata["synthetic"] is True and model.metadata["unit"] == "study"
    rows = read_feature_table(root / "study001" / FEATURE_TABLE_NAME)  # an osteoporosis study
    [(level, probability)] = model.predict(rows)
    assert level is None and probability > 0.5
    assert model.predict(read_feature_table(root / "study000" / FEATURE_TABLE_NAME))[0][1] < 0.5


def test_tampered_artifact_is_rejected_before_unpickling(separable, tmp_path):
    _, _, report = separable
    tampered = tmp_path / report.model_path.name
    data = bytearray(report.model_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="does not match the expected"):
        load_model(tampered, report.sha256)
    with pytest.raises(ModelArtifactError, match="does not exist"):
        load_model(tmp_path / "absent.joblib", report.sha256)


def test_model_refuses_features_of_another_preset(separable):
    root, _, report = separable
    model = load_model(report.model_path, report.sha256)
    rows = [{**r, "preset_sha256": "7" * 64} for r in read_feature_table(root / "study001" / FEATURE_TABLE_NAME)]
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        model.predict(rows)


def test_evaluate_on_a_new_table(separable, tmp_path):
    _, _, report = separable
    fresh = tmp_path / "fresh"
    table = _write_studies(fresh, n_studies=30, n_noise=60, effect=2.0, seed=21)
    result = evaluate(report.model_path, table, fresh, tmp_path / "eval")
    assert result.metrics["n"] == 30 and result.metrics["auc"] > 0.95
    saved = json.loads(result.report_json.read_text())
    assert saved["model_sha256"] == report.sha256 and saved["synthetic_training_data"] is True
    assert result.roc_png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ModelArtifactError):
        evaluate(report.model_path, table, fresh, tmp_path / "eval2", expected_sha256="0" * 64)


# ---------------------------------------------------------------- use in the pipeline

def _levels(hu: float):
    from osteonode.result import LevelResult
    return {"L1": LevelResult(label_confidence=0.9, trabecular_hu_mean=hu, trabecular_hu_median=hu,
                              trabecular_hu_sd=20, trabecular_voxel_count=400, trabecular_roi_volume_mm3=1e4)}


def test_configured_model_classifies_and_says_it_is_synthetic(separable):
    from osteonode.classify import classify_bone_status
    from osteonode.config import AnalysisSettings, ModelSettings

    root, _, report = separable
    settings = AnalysisSettings(model=ModelSettings(path=report.model_path, sha256=report.sha256))
    status = classify_bone_status(_levels(135), read_feature_table(root / "study001" / FEATURE_TABLE_NAME),
                                  settings)
    assert status.category == "osteoporosis"
    assert "NOT clinically valid" in status.basis and "Pickhardt" in status.basis
    normal = classify_bone_status(_levels(135), read_feature_table(root / "study000" / FEATURE_TABLE_NAME),
                                  settings)
    assert normal.category == "normal"


def test_model_with_wrong_hash_falls_back_to_the_rule_and_says_so(separable):
    from osteonode.classify import classify_bone_status
    from osteonode.config import AnalysisSettings, ModelSettings

    root, _, report = separable
    settings = AnalysisSettings(model=ModelSettings(path=report.model_path, sha256="0" * 64))
    status = classify_bone_status(_levels(100), read_feature_table(root / "study000" / FEATURE_TABLE_NAME),
                                  settings)
    assert status.category == "osteoporosis"  # Pickhardt: 100 HU <= 110
    assert "configured model not used" in status.basis and "SHA-256" in status.basis.upper()


def test_train_and_evaluate_commands(separable, tmp_path):
    from typer.testing import CliRunner

    from osteonode.cli import app

    root, table, _ = separable
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(table), str(root), "--out", str(tmp_path / "m"),
                                  "--provenance", "synthetic test data", "--synthetic", "--classifier", "logistic"])
    assert trained.exit_code == 0, trained.output
    assert "AUC" in trained.output and "DeLong" in trained.output
    artifact = next((tmp_path / "m").glob("*.joblib"))
    evaluated = runner.invoke(app, ["evaluate", str(artifact), str(table), str(root), "--out", str(tmp_path / "e")])
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "e").is_dir() and any((tmp_path / "e").glob("*.png"))


def test_artifact_naming_the_selectors_in_their_old_module_still_loads(tmp_path, monkeypatch):
    """Format 1 artifacts written before the split pickle ``osteonode.classify.model.L2StabilitySelector``."""
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 6)) + y[:, None] * np.array([2.0, 0, 0, 0, 0, 0])
    pipeline = Pipeline([("select", L2StabilitySelector(random_state=0)), ("classify", LogisticRegression())])
    pipeline.fit(X, y)
    path = tmp_path / "old.joblib"
    with monkeypatch.context() as patch:
        patch.setattr(L2StabilitySelector, "__module__", "osteonode.classify.model")
        digest = save_model(pipeline, [f"f{i}" for i in range(6)], {"model_id": "old"}, path)
    assert b"osteonode.classify.model" in path.read_bytes()
    model = load_model(path, digest)
    assert type(model.pipeline.named_steps["select"]) is L2StabilitySelector
    np.testing.assert_array_equal(model.pipeline.predict_proba(X), pipeline.predict_proba(X))
