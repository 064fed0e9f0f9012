"""Find the cells that several independently trained models all get wrong: labels worth re-checking.

python -m ml.audit --data DIR --weights A.safetensors B.safetensors [--sheets OUT_DIR] [--json]

A mistake that models with different preprocessing and seeds share is usually not a model quirk:
either the cell is genuinely ambiguous or its label is wrong, and a microscopist should look at it.
The shared mistakes also bound what any similar model can score against these labels.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ml.data import Sample, list_samples, open_sample
from ml.evaluate import CHUNK
from ml.model import CLASS_NAMES, PARASITIZED
from ml.predictor import Predictor
from ml.preprocessing import open_rgb, square_resize

TILE = 96  # pixels per cell on a contact sheet
SHEET_COLUMNS = 8


def scores_for(weights: str, samples: list[Sample]) -> np.ndarray:
    predictor = Predictor(weights)
    scores: list[float] = []
    for start in range(0, len(samples), CHUNK):
        images = [open_sample(s.path) for s in samples[start : start + CHUNK]]
        scores.extend(p.probability_parasitized for p in predictor.predict(images))
    return np.array(scores)


def shared_mistakes(scores: list[np.ndarray], positives: np.ndarray, *, cut: float) -> np.ndarray:
    """Indices every model calls the wrong class at ``cut``, most confidently wrong first."""
    wrong = np.all([(s >= cut) != positives for s in scores], axis=0)
    mean = np.mean(scores, axis=0)
    confidence = np.where(positives, 1.0 - mean, mean)
    return np.flatnonzero(wrong)[np.argsort(-confidence[wrong], kind="stable")]


def contact_sheet(paths: list[Path], out: Path) -> None:
    rows = max(1, -(-len(paths) // SHEET_COLUMNS))
    sheet = Image.new("RGB", (TILE * SHEET_COLUMNS, TILE * rows))
    for k, path in enumerate(paths):
        tile = Image.fromarray(square_resize(open_rgb(path), TILE))
        sheet.paste(tile, ((k % SHEET_COLUMNS) * TILE, (k // SHEET_COLUMNS) * TILE))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def audit(data_dir: str, weights: list[str], *, cut: float = 0.5, sheets: str | None = None) -> dict:
    samples = list_samples(data_dir)
    if not samples:  # a report of 0 shared mistakes would read as clean labels
        raise ValueError(f"no images found under {data_dir}")
    positives = np.array([s.label == PARASITIZED for s in samples])
    scores = [scores_for(w, samples) for w in weights]
    shared = shared_mistakes(scores, positives, cut=cut)
    report = {
        "n": len(samples),
        "cut": cut,
        "errors_per_model": [int(((s >= cut) != positives).sum()) for s in scores],
        "shared_errors": len(shared),
        "cells": [
            {
                "file": samples[i].path.name,
                "label": CLASS_NAMES[samples[i].label],
                "scores": [float(s[i]) for s in scores],
            }
            for i in shared
        ],
    }
    if sheets:
        for label, name in enumerate(CLASS_NAMES):
            paths = [samples[i].path for i in shared if samples[i].label == label]
            if paths:
                contact_sheet(paths, Path(sheets) / f"labelled-{name.lower()}.png")
    return report


def describe(report: dict) -> str:
    by_label = {name: sum(c["label"] == name for c in report["cells"]) for name in CLASS_NAMES}
    lines = [
        f"{report['n']} cells; errors at {report['cut']:.2f} per model: {report['errors_per_model']}",
        f"made by every model: {report['shared_errors']} "
        + "("
        + ", ".join(f"{count} labelled {name}" for name, count in by_label.items())
        + ")",
    ]
    lines += [f"  {c['label']:<12} {c['file']}  " + " ".join(f"{s:.2f}" for s in c["scores"]) for c in report["cells"]]
    return "\n".join(lines)


def probability(text: str) -> float:
    """An argparse type: a cut between 0 and 1 (NaN or 2 called every cell one class, saying nothing)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: give a probability between 0 and 1, e.g. 0.5")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/")
    parser.add_argument("--weights", nargs="+", required=True, help="two or more model files")
    parser.add_argument(
        "--cut",
        type=probability,
        default=0.5,
        help="probability at or above which a model says Parasitized (0.5: the labels are checked "
        "against the model's even call, not its screening threshold)",
    )
    parser.add_argument("--sheets", metavar="DIR", help="write a contact sheet of the shared mistakes per label")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if len(args.weights) < 2:
        parser.error("--weights needs at least two model files to compare")
    try:
        report = audit(args.data, args.weights, cut=args.cut, sheets=args.sheets)
    # As ml.evaluate: a folder or weights file missing or not of the shape asked for, a cell that
    # cannot be decoded, in a line.
    except (OSError, ValueError) as error:
        parser.exit(1, f"ml.audit: {error}\n")
    sys.stdout.write(json.dumps(report) + "\n" if args.json else describe(report) + "\n")


if __name__ == "__main__":
    main()
