"""Binary screening metrics, Parasitized being the positive class."""

import math

import numpy as np


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic (ties get average ranks)."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    # NaN never equals NaN, so NaN scores would each get a rank of their own and the AUC would
    # be 0 or 1 by the order of the cells: a model that outputs NaN has no AUC.
    if not n_pos or not n_neg or np.isnan(scores).any():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(scores: np.ndarray, positives: np.ndarray, bins: int = 10) -> float:
    """ECE of the Parasitized probability over equal-width bins; NaN for no cells, as every other figure."""
    if not len(scores):  # 0.0 would read as a perfectly calibrated model
        return math.nan
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(scores[in_bin].mean() - positives[in_bin].mean())
    return float(total)


def ratio(part: int, whole: int) -> float:
    """NaN where a figure is undefined (the sensitivity of a folder without parasitized cells), not 0.0."""
    return part / whole if whole else math.nan


def screening_metrics(scores: np.ndarray, positives: np.ndarray, threshold: float) -> dict:
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    predicted = scores >= threshold
    tp = int((predicted & positives).sum())
    tn = int((~predicted & ~positives).sum())
    fp = int((predicted & ~positives).sum())
    fn = int((~predicted & positives).sum())
    precision = ratio(tp, tp + fp)
    sensitivity = ratio(tp, tp + fn)
    return {
        "n": len(scores),
        "threshold": threshold,
        "accuracy": ratio(tp + tn, len(scores)),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(scores, positives),
        "ece": expected_calibration_error(scores, positives),
        "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
    }


# Calls within this share of the room between the threshold and either end of the scale are
# borderline, to be confirmed first: half way, a round figure rather than one fitted to any data.
BORDERLINE_CONFIDENCE = 0.5


def borderline_band(*, threshold: float, confidence: float = BORDERLINE_CONFIDENCE) -> tuple[float, float]:
    """The scores [low, high) whose call is borderline at this threshold."""
    return threshold * (1 - confidence), threshold + (1 - threshold) * confidence


def borderline_figures(
    scores: np.ndarray, positives: np.ndarray, threshold: float, confidence: float = BORDERLINE_CONFIDENCE
) -> dict:
    """How many cells the band marks, and how many of the errors it holds: what marking them is worth."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    low, high = borderline_band(threshold=threshold, confidence=confidence)
    inside = (scores >= low) & (scores < high)
    wrong = (scores >= threshold) != positives
    return {
        "band": [low, high],
        "cells": int(inside.sum()),
        "errors": int(wrong[inside].sum()),
        "share_of_cells": ratio(int(inside.sum()), len(scores)),
        "share_of_errors": ratio(int(wrong[inside].sum()), int(wrong.sum())),
        "error_rate_inside": ratio(int(wrong[inside].sum()), int(inside.sum())),
        "error_rate_outside": ratio(int(wrong[~inside].sum()), int((~inside).sum())),
    }


def choose_threshold(scores: np.ndarray, positives: np.ndarray, *, min_sensitivity: float = 0.97) -> float:
    """Most accurate threshold whose sensitivity stays at or above ``min_sensitivity`` (on validation).

    When no candidate reaches that sensitivity (a positive scored below 0.01), the most accurate of
    the most sensitive candidates: a screening threshold gives up specificity before sensitivity.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    candidates = np.linspace(0.01, 0.99, 99)
    predicted = scores[None, :] >= candidates[:, None]
    accuracy = (predicted == positives[None, :]).mean(axis=1)
    sensitivity = (predicted & positives[None, :]).sum(axis=1) / max(int(positives.sum()), 1)
    allowed = sensitivity >= min(min_sensitivity, sensitivity.max())
    pool = np.where(allowed, accuracy, -1.0)
    return round(float(candidates[int(np.argmax(pool))]), 2)


def patient_bootstrap(
    scores: np.ndarray,
    positives: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """95 % intervals of AUC, accuracy, sensitivity and specificity, resampling whole patient groups.

    Cells of one smear are not independent, so resampling cells would give intervals far too narrow.
    """
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    draws = [_figures(scores[picked], positives[picked], threshold) for picked in _resamples(groups, resamples, seed)]
    return _intervals(draws)


def paired_patient_bootstrap(
    scores: np.ndarray,
    other_scores: np.ndarray,
    positives: np.ndarray,
    groups: np.ndarray,
    thresholds: tuple[float, float],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """95 % intervals of (model - other model) on the same resampled patients: an interval that
    excludes 0 is a difference these patients support; one that straddles 0 is not."""
    scores, other_scores = np.asarray(scores, dtype=np.float64), np.asarray(other_scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    draws = []
    for picked in _resamples(groups, resamples, seed):
        mine = _figures(scores[picked], positives[picked], thresholds[0])
        theirs = _figures(other_scores[picked], positives[picked], thresholds[1])
        draws.append({name: mine[name] - theirs[name] for name in mine})
    return _intervals(draws)


def _resamples(groups: np.ndarray, resamples: int, seed: int):
    """Cell indices of ``resamples`` draws of as many patient groups as there are, with replacement."""
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(group_of == g) for g in range(group_of.max() + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.concatenate([members[g] for g in rng.integers(len(members), size=len(members))])


def _figures(scores: np.ndarray, positives: np.ndarray, threshold: float) -> dict[str, float]:
    called = scores >= threshold
    return {
        "auc": roc_auc(scores, positives),
        "accuracy": float((called == positives).mean()),
        "sensitivity": float(called[positives].mean()) if positives.any() else float("nan"),
        "specificity": float((~called[~positives]).mean()) if (~positives).any() else float("nan"),
    }


def _intervals(draws: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {name: tuple(float(v) for v in np.nanpercentile([d[name] for d in draws], [2.5, 97.5])) for name in draws[0]}
