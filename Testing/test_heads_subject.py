"""Subject heads (classification, kNN, regression, survival incl. multi-modal fusion) on generated cohorts.

Encoder: the tiny fixture (random weights) at 112 px on every slice; 3-mm cases with mild nuisance (heads_helpers). Each
head is fitted on the training cases of a manifest and scored on disjoint held-out test cases; the
thresholds sit below the figures measured with these exact settings (in each test's comment).

Measured (held-out test cases): sequence classification (4 classes, 24 train / 12 test) accuracy 0.75,
macro-AUC 0.84 (attention pooling: 0.50, 0.76); kNN accuracy 0.50 (chance 0.25); atrophy regression
(16 / 8) Pearson r 0.86, R^2 0.72, MAE 0.078 vs 0.178 for the mean; multi-modal T1 + FLAIR survival
(20 / 12) C-index 0.83, log-rank p 0.011.
"""
from __future__ import annotations

import numpy as np
import pytest

from BrainDINOLib import BrainDINOError, FeatureCache
from BrainDINOLib.heads import (FeatureSource, FitConfig, HeadTrainingConfig, Manifest, evaluate, fit_head, load_head,
                                predict_subject, save_head, write_report)
from BrainDINOLib.heads.storage import module_state_equal
from BrainDINOLib.synthetic import SEQUENCES
from BrainDINOLib.threads import torch_threads
from heads_helpers import heads_session, make_cohort


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    return {"sequence": make_cohort(root, "sequence", 24, 12), "atrophy": make_cohort(root, "atrophy", 16, 8),
            "survival": make_cohort(root, "survival", 20, 12, sequences=("T1", "FLAIR"))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return FeatureCache(tmp_path_factory.mktemp("features"))


def fit_and_test(manifest, encoder, cache, **options):
    """Fit on the training rows and evaluate on the test rows. With two dozen subjects, holding out a
    validation part for early stopping costs more than it saves: train all of them for 60 epochs."""
    options = {"val_fraction": 0.0, **options}
    config = FitConfig(training=HeadTrainingConfig(max_epochs=60), **options)
    session = heads_session(encoder, cache)
    with torch_threads(1):
        result = fit_head(Manifest.read(manifest), session, config)
        evaluation = evaluate(result.head, Manifest.read(manifest), session, columns=config)
    print(config.task, config.pooling, {k: round(v, 3) for k, v in evaluation.metrics.items() if isinstance(v, float)})
    return result, evaluation


def test_sequence_classification_above_chance_and_reload(cohorts, fixture_encoder, cache, tmp_path):
    result, evaluation = fit_and_test(cohorts["sequence"], fixture_encoder, cache, task="classification",
                                      label_column="sequence")
    metrics = evaluation.metrics
    # 4 balanced classes, 12 test subjects: chance accuracy 0.25, AUC 0.5.
    assert metrics["subjects"] == 12 and metrics["chance_accuracy"] == 0.25
    assert metrics["accuracy"] >= 0.5 and metrics["macro_auc"] >= 0.75, metrics  # measured 0.75, 0.84

    written = {p.name for p in write_report(tmp_path / "report", evaluation, result.head, result.history)}
    assert {"roc.png", "confusion_matrix.png", "learning_curves.png", "predictions.csv"} <= written
    path = save_head(result.head, tmp_path / "sequence.safetensors")
    reloaded = load_head(path)
    assert module_state_equal(result.head.module, reloaded.module)
    assert reloaded.card.class_names == sorted(SEQUENCES) and reloaded.card.pooling == "mean"
    features = FeatureSource.for_head(reloaded, heads_session(fixture_encoder, cache))
    test_image = Manifest.read(cohorts["sequence"]).resolve(Manifest.read(cohorts["sequence"]).rows[-1]["image"])
    with torch_threads(1):
        one = features(test_image)
        assert predict_subject(reloaded, one) == predict_subject(result.head, one)
    prediction = reloaded.predict(one)
    assert set(prediction["probabilities"]) == set(SEQUENCES)
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-6


def test_knn_probe_above_chance(cohorts, fixture_encoder, cache):
    result, evaluation = fit_and_test(cohorts["sequence"], fixture_encoder, cache, task="knn",
                                      label_column="sequence", val_fraction=0.25)
    assert result.head.card.extra["k_sweep"], "the k sweep is recorded"
    assert evaluation.metrics["accuracy"] >= 0.4, evaluation.metrics  # measured 0.50; chance 0.25


def test_cross_validation_and_label_fraction(cohorts, fixture_encoder, cache):
    result, _ = fit_and_test(cohorts["sequence"], fixture_encoder, cache, task="classification",
                             label_column="sequence", folds=3, label_fraction=0.5)
    assert result.metrics["training_subjects"] == 12  # half of the 24 labelled training cases, stratified
    assert result.metrics["cross_validation"]["folds"] == 3
    assert 0 <= result.metrics["cross_validation"]["accuracy"]["mean"] <= 1


def test_attention_pooling_classification_learns(cohorts, fixture_encoder, cache):
    result, evaluation = fit_and_test(cohorts["sequence"], fixture_encoder, cache, task="classification",
                                      label_column="sequence", pooling="attention")
    assert result.head.card.pooling == "attention"
    assert evaluation.metrics["macro_auc"] >= 0.68, evaluation.metrics  # measured 0.76


def test_atrophy_regression_correlates_on_held_out_cases(cohorts, fixture_encoder, cache, tmp_path):
    result, evaluation = fit_and_test(cohorts["atrophy"], fixture_encoder, cache, task="regression",
                                      target_column="atrophy")
    metrics = evaluation.metrics
    assert metrics["pearson_r"] >= 0.6 and metrics["r2"] > 0.3, metrics  # measured 0.86, 0.72
    written = write_report(tmp_path, evaluation, result.head)
    assert {p.name for p in written} == {"metrics.json", "metrics.csv", "predictions.csv", "predicted_vs_true.png"}
    assert metrics["mae"] < metrics["mae_of_mean_predictor"], metrics


def test_multimodal_survival_orders_risk_above_chance(cohorts, fixture_encoder, cache, tmp_path):
    result, evaluation = fit_and_test(cohorts["survival"], fixture_encoder, cache, task="survival")
    assert result.head.card.modalities == ("image_t1", "image_flair")
    assert evaluation.metrics["c_index"] >= 0.65, evaluation.metrics  # measured 0.83; chance 0.5
    assert "median_risk" in result.head.card.extra and np.isfinite(evaluation.metrics["logrank_statistic"])
    assert (write_report(tmp_path, evaluation, result.head)[-1]).name == "kaplan_meier.png"
    one = Manifest.read(cohorts["survival"]).rows[-1]
    with pytest.raises(BrainDINOError, match="needs 2 volume"):
        features = FeatureSource.for_head(result.head, heads_session(fixture_encoder, cache))
        predict_subject(result.head, features(cohorts["survival"].parent / one["image_t1"]))


def test_bad_manifests_are_named(cohorts, fixture_encoder, cache, tmp_path):
    with pytest.raises(BrainDINOError, match="missing column"):
        fit_and_test(cohorts["atrophy"], fixture_encoder, cache, task="regression", target_column="age")
    missing = tmp_path / "none.csv"
    with pytest.raises(BrainDINOError, match="no such manifest"):
        Manifest.read(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,target\nnowhere.nii.gz,3\nelsewhere.nii.gz,4\n")
    with pytest.raises(BrainDINOError, match="nowhere.nii.gz"):
        fit_and_test(bad, fixture_encoder, cache, task="regression")
