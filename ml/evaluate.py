"""Evaluate a weights file on a Parasitized/Uninfected folder with the worker's own predictor.

python -m ml.evaluate --data DIR [--weights FILE] [--json] [--bootstrap N] [--against OTHER_FILE]

Next to each figure it prints a 95 % interval from resampling whole patient groups: what the figure
could have been with other patients like these, the yardstick for "model A beats model B".
``--against`` scores a second model on the same cells and gives the interval of the difference,
resampling the same patients for both.
"""

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ml.data import PATIENT_MARK, list_samples, open_sample, patient, patient_groups
from ml.metrics import borderline_figures, paired_patient_bootstrap, patient_bootstrap, screening_metrics
from ml.model import CLASS_NAMES, PARASITIZED
from ml.predictor import Predictor
from ml.weights import deployed_weights

CHUNK = 256  # images decoded at a time, to bound memory on large folders


def evaluate_folder(
    data_dir: str,
    weights: str,
    *,
    overlays_dir: str | None = None,
    overlays: int = 0,
    bootstrap: int = 0,
    against: str | None = None,
) -> dict:
    samples = list_samples(data_dir)
    if not samples:
        raise SystemExit(f"no images found under {data_dir}")
    unnamed = sum(PATIENT_MARK not in s.path.name for s in samples)
    if unnamed and bootstrap:
        print(
            f"ml.evaluate: {unnamed} of {len(samples)} file names do not name their patient group (the part "
            f"before {PATIENT_MARK}): each such cell is resampled alone, so the intervals are too narrow "
            "where one patient has several",
            file=sys.stderr,
        )
    labels = {s.label for s in samples}
    if len(labels) < 2:  # a lab's first few reviews, say: said once here, not as numpy's warnings
        only = CLASS_NAMES[labels.pop()]
        print(
            f"ml.evaluate: every cell here is {only}: the AUC, and the share of the other class found, need "
            "cells of both and are printed as nan",
            file=sys.stderr,
        )
    groups = resampling_units(samples)
    if bootstrap and len(set(groups)) < 2:
        print("ml.evaluate: the intervals need two patient groups or more; this folder has one", file=sys.stderr)
        bootstrap = 0
    predictor = Predictor(weights)
    started = time.perf_counter()
    scores = score_samples(predictor, samples, overlays_dir=overlays_dir, overlays=overlays)
    elapsed = time.perf_counter() - started
    positives = np.array([s.label == PARASITIZED for s in samples])
    metrics = screening_metrics(scores, positives, predictor.info.threshold)
    metrics.update(
        borderline=borderline_figures(scores, positives, predictor.info.threshold),
        model_version=predictor.version,
        images_per_second=len(samples) / elapsed,
        patient_groups=len(patient_groups(samples)),
        parasitized=int(positives.sum()),
        uninfected=int((~positives).sum()),
    )
    if bootstrap:
        with warnings.catch_warnings():  # a figure one class leaves undefined is nan in every resample
            warnings.simplefilter("ignore", RuntimeWarning)
            intervals = patient_bootstrap(scores, positives, groups, metrics["threshold"], resamples=bootstrap)
        metrics["ci95"] = {name: list(bounds) for name, bounds in intervals.items()}
    if against:
        other = Predictor(against)
        other_scores = score_samples(other, samples)
        compared = screening_metrics(other_scores, positives, other.info.threshold)
        compared["model_version"] = other.version
        if bootstrap:
            thresholds = (metrics["threshold"], compared["threshold"])
            difference = paired_patient_bootstrap(
                scores, other_scores, positives, groups, thresholds, resamples=bootstrap
            )
            compared["difference_ci95"] = {name: list(bounds) for name, bounds in difference.items()}
        metrics["against"] = compared
    return metrics


def resampling_units(samples) -> np.ndarray:
    """The patient of each sample, not its file-name prefix: one patient photographed on two
    microscopes is one unit of the bootstrap, as they are one unit of the split."""
    return np.array([patient(s.patient_group) for s in samples])


def score_samples(predictor: Predictor, samples, *, overlays_dir: str | None = None, overlays: int = 0) -> np.ndarray:
    """Probability of Parasitized for every sample, decoding a chunk at a time."""
    scores = []
    saved_per_class: dict[int, int] = {}
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start : start + CHUNK]
        images = [open_sample(s.path) for s in chunk]
        predictions = predictor.predict(images)
        scores.extend(p.probability_parasitized for p in predictions)
        if overlays_dir:
            save_examples(chunk, images, predictions, Path(overlays_dir), overlays, saved_per_class)
    return np.array(scores)


def save_examples(samples, images, predictions, folder: Path, count: int, per_class: dict[int, int]) -> None:
    """Side-by-side original | overlay PNGs for the first ``count`` cells of each class, named by
    truth and call; ``per_class`` carries the counts across chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    for sample, image, prediction in zip(samples, images, predictions, strict=True):
        if per_class.get(sample.label, 0) >= count:
            continue
        per_class[sample.label] = per_class.get(sample.label, 0) + 1
        side_by_side = np.concatenate([np.asarray(image), prediction.overlay(image)], axis=1)
        name = (
            f"{CLASS_NAMES[sample.label].lower()}-called-{prediction.label.lower()}-"
            f"p{prediction.probability_parasitized:.2f}-{sample.path.stem}.png"
        )
        Image.fromarray(side_by_side).save(folder / name)


def describe(m: dict) -> str:
    c = m["confusion"]
    ci = m.get("ci95", {})

    def interval(name: str) -> str:
        return f"  (95% CI over patient groups {ci[name][0]:.4f}-{ci[name][1]:.4f})" if name in ci else ""

    return "\n".join(
        [
            f"model            {m['model_version']}",
            f"images           {m['n']} ({m['parasitized']} parasitized, {m['uninfected']} uninfected, "
            f"{m['patient_groups']} patient groups)",
            f"threshold        {m['threshold']:.2f} (probability of Parasitized, chosen on validation data)",
            f"accuracy         {m['accuracy']:.4f}{interval('accuracy')}",
            f"sensitivity      {m['sensitivity']:.4f}{interval('sensitivity')}  (recall of Parasitized)",
            f"specificity      {m['specificity']:.4f}{interval('specificity')}",
            f"precision        {m['precision']:.4f}",
            f"F1               {m['f1']:.4f}",
            f"ROC AUC          {m['auc']:.4f}{interval('auc')}",
            f"calibration ECE  {m['ece']:.4f}",
            describe_borderline(m["borderline"], errors=c["fp"] + c["fn"]),
            "confusion        predicted Parasitized / Uninfected",
            f"  Parasitized    {c['tp']:>6} / {c['fn']:<6}",
            f"  Uninfected     {c['fp']:>6} / {c['tn']:<6}",
            f"throughput       {m['images_per_second']:.1f} images/s (decode, classify, heatmap)",
            *(describe_comparison(m) if "against" in m else []),
        ]
    )


def describe_borderline(b: dict, *, errors: int) -> str:
    low, high = b["band"]
    return (
        f"borderline       {b['cells']} cells ({b['share_of_cells']:.1%}) scored {low:.3f}-{high:.3f}, holding "
        f"{b['errors']} of the {errors} errors; {b['error_rate_inside']:.1%} of them wrong, "
        f"{b['error_rate_outside']:.1%} of the rest"
    )


def describe_comparison(m: dict) -> list[str]:
    other = m["against"]
    difference = other.get("difference_ci95", {})
    lines = [f"against          {other['model_version']} at its threshold {other['threshold']:.2f}"]
    for name, label in (("auc", "ROC AUC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity")):
        line = f"  {label:<15}{other[name]:.4f}, this model {m[name] - other[name]:+.4f}"
        if name in difference:
            line += f"  (95% CI of the difference {difference[name][0]:+.4f} to {difference[name][1]:+.4f})"
        lines.append(line)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/")
    parser.add_argument(
        "--weights", default=str(deployed_weights()), help="default: $MODEL_WEIGHTS, else the shipped model"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save-overlays", metavar="DIR", help="write example original|overlay PNGs here")
    parser.add_argument("--overlays-per-class", type=int, default=3)
    parser.add_argument("--against", metavar="FILE", help="a second model file to compare on the same patients")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="patient-group resamples for the intervals; 0: none"
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap {args.bootstrap}: give a number of resamples, or 0 for no intervals")
    try:
        metrics = evaluate_folder(
            args.data,
            args.weights,
            overlays_dir=args.save_overlays,
            overlays=args.overlays_per_class,
            bootstrap=args.bootstrap,
            against=args.against,
        )
    # A cell that cannot be decoded (figures without it would not be the folder's), a folder or
    # weights file that is missing or not of the shape asked for: said in a line, not a traceback.
    except (OSError, ValueError) as error:
        parser.exit(1, f"ml.evaluate: {error}\n")
    report = json.dumps(without_nan(metrics), allow_nan=False) if args.json else describe(metrics)
    sys.stdout.write(report + "\n")


def without_nan(value):
    """NaN (e.g. the AUC of a folder with one class) as null: bare NaN is not JSON to strict parsers."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


if __name__ == "__main__":
    main()
