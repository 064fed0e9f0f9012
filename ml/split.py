"""Hold out whole patient groups as a test folder, as symlinks (the data is never copied).

    python -m ml.split --data ../shared/datasets/nih-malaria-cells --out /tmp/malaria-split

writes OUT/train/{Parasitized,Uninfected} and OUT/test/{Parasitized,Uninfected}.

    python -m ml.split --data ../shared/datasets/nih-malaria-cells --out /tmp/malaria-validation \
        --validation-of ml/weights/malaria_vgg19.safetensors

writes OUT/validation/{Parasitized,Uninfected}: the patients a weights file was validated on.
"""

import argparse
from pathlib import Path

from ml.data import fraction, list_samples, patient_groups, split_by_patient
from ml.model import CLASS_NAMES
from ml.weights import read_info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--test-fraction", type=fraction, default=0.15, help="of the patient groups")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--validation-of",
        metavar="WEIGHTS",
        help="instead, write OUT/validation: the cells of the patient groups WEIGHTS was validated on",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):  # links left from another seed would mix two splits
        parser.error(f"{out} is not empty; give a new folder")

    try:
        parts = chosen_parts(parser, args)
    except (OSError, ValueError) as error:  # a folder not of the shape asked for, unnamed patients
        parser.exit(1, f"ml.split: {error}\n")
    for part, samples in parts.items():
        for name in CLASS_NAMES:
            (out / part / name).mkdir(parents=True, exist_ok=True)
        for sample in samples:
            (out / part / CLASS_NAMES[sample.label] / sample.path.name).symlink_to(sample.path.resolve())
        groups = len(patient_groups(samples))
        print(f"{part}: {len(samples)} images from {groups} patient groups")


def chosen_parts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, list]:
    samples = list_samples(args.data)
    if not samples:  # no patient to draw, which is not for another --seed to mend
        raise ValueError(f"no images found under {args.data}")
    if args.validation_of:
        return {"validation": validation_cells(parser, samples, args.validation_of)}
    train, test = split_by_patient(samples, holdout_fraction=args.test_fraction, seed=args.seed)
    if not test:  # every drawn group belongs to a patient with another group kept
        parser.error("no patient is wholly among the groups drawn for the test side; try another --seed")
    return {"train": train, "test": test}


def validation_cells(parser: argparse.ArgumentParser, samples: list, weights: str) -> list:
    """The cells of the patient groups ml.train held out to validate these weights (and to choose
    their threshold): where figures about the operating point may be read, unlike the test side."""
    metrics = read_info(weights).metrics
    if metrics.get("refit_of"):  # it keeps that run's validation groups, but was trained on them
        parser.error(
            f"{weights} is a --refit of {metrics['refit_of']}, trained on the patients that run was validated "
            "on: give --validation-of that run's file"
        )
    groups = set(metrics.get("validation_groups", []))
    chosen = [sample for sample in samples if sample.patient_group in groups]
    if not chosen:
        parser.error(f"no cell of --data is of the patient groups {weights} was validated on")
    return chosen


if __name__ == "__main__":
    main()
