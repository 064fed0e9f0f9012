"""Screening metrics: AUC, the validation threshold rule and patient-group intervals."""

import itertools
import json

import numpy as np

from ml.evaluate import without_nan
from ml.metrics import choose_threshold, paired_patient_bootstrap, patient_bootstrap, roc_auc, screening_metrics


def pairwise_auc(scores, positives):
    """AUC by definition: how often a positive outranks a negative, ties counting half."""
    pairs = list(itertools.product(scores[positives], scores[~positives]))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_rank_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=60) / 5  # few distinct values: many ties
    positives = rng.random(60) < 0.4
    assert roc_auc(scores, positives) == pairwise_auc(scores, positives)
    assert np.isnan(roc_auc(scores, np.zeros(60, dtype=bool)))
    assert roc_auc(list(scores), positives.astype(int).tolist()) == roc_auc(scores, positives)  # 0/1 labels too


def test_nan_scores_have_no_auc():
    """NaN never equals NaN, so each NaN got a rank of its own: a model that outputs NaN scored an
    AUC of 0.0 or 1.0 by the order of the cells alone."""
    positives = np.array([True, True, False, False])
    assert np.isnan(roc_auc(np.full(4, np.nan), positives))
    assert np.isnan(roc_auc(np.full(4, np.nan), positives[::-1].copy()))
    assert np.isnan(roc_auc(np.array([0.9, np.nan, 0.1, 0.2]), positives))  # one is enough


def test_threshold_is_the_most_accurate_one_that_keeps_the_sensitivity():
    positives = np.array([True] * 10 + [False] * 10)
    scores = np.array([0.05] + [0.9] * 9 + [0.5] * 3 + [0.02] * 7)
    # 0.5 < t <= 0.9 misses one of ten positives (sensitivity 0.9) but is the most accurate.
    assert 0.5 < choose_threshold(scores, positives, min_sensitivity=0.9) <= 0.9
    # Keeping all ten positives forces the threshold down to the lowest positive's score.
    assert choose_threshold(scores, positives, min_sensitivity=1.0) <= 0.05


def test_when_no_threshold_keeps_the_sensitivity_the_most_sensitive_one_is_chosen():
    positives = np.array([True] * 10 + [False] * 10)
    scores = np.array([0.001] + [0.3] * 2 + [0.9] * 7 + [0.4] * 10)  # one positive below every candidate
    # 9 of 10 found at 0.30 or lower; the most accurate threshold (0.41, accuracy 0.85) would miss 3.
    assert choose_threshold(scores, positives, min_sensitivity=0.97) <= 0.30


def test_figures_a_folder_of_one_class_cannot_have_are_undefined_not_zero():
    """All uninfected, all called so: no sensitivity, precision or F1 to speak of, and no AUC."""
    metrics = screening_metrics(np.array([0.1, 0.2, 0.05]), np.zeros(3, dtype=bool), 0.5)
    assert (metrics["accuracy"], metrics["specificity"]) == (1.0, 1.0)
    assert all(np.isnan(metrics[name]) for name in ("sensitivity", "precision", "f1", "auc"))
    one_missed = screening_metrics(np.array([0.1, 0.9]), np.array([True, True]), 0.5)
    assert (one_missed["sensitivity"], one_missed["precision"], one_missed["f1"]) == (0.5, 1.0, 2 / 3)
    assert np.isnan(one_missed["specificity"])


def test_the_figures_of_no_cells_are_all_undefined():
    """The ECE of an empty set read 0.0, a perfectly calibrated model, beside NaN for everything else."""
    metrics = screening_metrics(np.array([]), np.array([], dtype=bool), 0.5)
    undefined = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "ece")
    assert all(np.isnan(metrics[name]) for name in undefined)
    assert without_nan(metrics)["ece"] is None


def test_json_reports_write_an_undefined_figure_as_null():
    report = without_nan({"auc": float("nan"), "ci95": {"auc": (float("nan"), 0.9)}, "n": 3})
    assert json.loads(json.dumps(report, allow_nan=False)) == {"auc": None, "ci95": {"auc": [None, 0.9]}, "n": 3}


def test_intervals_resample_whole_patient_groups():
    rng = np.random.default_rng(0)
    positives = rng.random(400) < 0.5
    scores = np.where(positives, 0.7, 0.3) + rng.normal(0, 0.25, 400)
    one_patient = np.array(["C1P1"] * 400)
    # With a single group every resample is the same cells, however noisy they are one by one.
    same = patient_bootstrap(scores, positives, one_patient, 0.5, resamples=50)
    assert same["accuracy"][0] == same["accuracy"][1] == float(((scores >= 0.5) == positives).mean())

    # Half the patients perfectly read, half all wrong: the interval must span most of [0, 1].
    groups = np.repeat([f"C{i}P{i}" for i in range(20)], 20)
    read_wrong = np.isin(groups, [f"C{i}P{i}" for i in range(10)])
    perfect = np.where(positives, 0.9, 0.1)
    scores = np.where(read_wrong, 1 - perfect, perfect)
    spread = patient_bootstrap(scores, positives, groups, 0.5, resamples=500, seed=1)
    low, high = spread["accuracy"]
    assert low < 0.35 and high > 0.65
    assert spread["auc"][0] <= 0.5 <= spread["auc"][1]


def test_paired_intervals_of_a_difference():
    rng = np.random.default_rng(2)
    groups = np.repeat([f"C{i}P{i}" for i in range(12)], 30)
    positives = rng.random(len(groups)) < 0.5
    noisy = np.where(positives, 0.6, 0.4) + rng.normal(0, 0.2, len(groups))
    same = paired_patient_bootstrap(noisy, noisy, positives, groups, (0.5, 0.5), resamples=200)
    assert all(interval == (0.0, 0.0) for interval in same.values())

    # A model that reads every cell right beats the noisy one on every resample of patients.
    right = np.where(positives, 0.9, 0.1)
    better = paired_patient_bootstrap(right, noisy, positives, groups, (0.5, 0.5), resamples=200)
    assert better["accuracy"][0] > 0 and better["auc"][0] > 0
    worse = paired_patient_bootstrap(noisy, right, positives, groups, (0.5, 0.5), resamples=200)
    assert worse["accuracy"][1] < 0
