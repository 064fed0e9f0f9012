"""Listing a class-folder dataset, splitting it by patient group, and loading it into memory."""

import argparse
import random
import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ml.model import CLASS_NAMES
from ml.preprocessing import ImageDecodeError, open_rgb, square_resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASS_NAMES

    @property
    def patient_group(self) -> str:
        return patient_group(self.path.name)


PATIENT_MARK = "_IMG_"


def patient_group(file_name: str) -> str:
    """The NIH file-name prefix before ``_IMG_`` names the patient (smear) group."""
    return file_name.split(PATIENT_MARK, 1)[0]


def patient(group: str) -> str:
    """The patient behind a group: its ``C<n>P<m>`` code where the prefix has one, else the group.

    One patient's smear was photographed on two microscopes and filed under two prefixes
    (``C47P8thinOriginalOlympusCX21`` and ``C47P8thin_Original_Motic``); a split must keep them together.
    """
    code = re.match(r"C\d+P\d+", group, re.IGNORECASE)
    return code.group(0).upper() if code else group


def list_samples(data_dir: str | Path) -> list[Sample]:
    """The cells directly in DIR/Parasitized and DIR/Uninfected. Cells filed in sub-folders of those
    are refused, not left out: figures without them would not be the folder's."""
    root = Path(data_dir)
    missing = [name for name in CLASS_NAMES if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} must contain the folders {', '.join(CLASS_NAMES)}; missing {missing}")
    nested = sorted({path.parent for name in CLASS_NAMES for path in _images(root / name, "*/**/*")})
    if nested:
        raise ValueError(
            f"{nested[0]} holds cells in a sub-folder of its class folder ({len(nested)} such folders): "
            "put each cell directly in Parasitized/ or Uninfected/"
        )
    return [Sample(path, label) for label, name in enumerate(CLASS_NAMES) for path in _images(root / name, "*")]


def _images(folder: Path, pattern: str) -> list[Path]:
    # Hidden names are not cells: macOS writes "._<name>.png" twins onto exFAT and network drives.
    return sorted(
        path
        for path in folder.glob(pattern)
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def fraction(text: str) -> float:
    """An argparse type: a share of patient groups, strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a fraction between 0 and 1, e.g. 0.15")
    return value


def at_least_one(text: str) -> int:
    """An argparse type: a count of epochs, images or cells per batch, 1 or more."""
    value = int(text)
    if value < 1:  # 0 epochs or images ran nothing and exited 0; a batch of 0 divided by zero
        raise argparse.ArgumentTypeError(f"{text}: give 1 or more")
    return value


def patient_groups(samples: Iterable[Sample]) -> set[str]:
    return {s.patient_group for s in samples}


def split_by_patient(
    samples: Iterable[Sample], *, holdout_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Put whole patient groups on one side or the other, about ``holdout_fraction`` of groups held out.

    Groups are drawn as they always were (so a seed gives the same split as before this rule); a
    patient filed under several groups is held out only if all of them were drawn, else all are kept.
    """
    if not 0 < holdout_fraction < 1:  # 0 would still hold out one group (at least one is drawn)
        raise ValueError(f"the fraction of patient groups held out must lie between 0 and 1, not {holdout_fraction}")
    samples = list(samples)
    # Such a name is a group of its own: a split by image, one patient's cells on both sides.
    unnamed = [s.path.name for s in samples if PATIENT_MARK not in s.path.name]
    if unnamed:
        raise ValueError(
            f"{len(unnamed)} file names do not name their patient group (the part before {PATIENT_MARK}, as in "
            f"C100P61ThinF_IMG_20150918_144104_cell_162.png), e.g. {unnamed[0]}: rename them so that each "
            "patient's cells share a prefix"
        )
    groups = sorted(patient_groups(samples))
    random.Random(seed).shuffle(groups)
    drawn = set(groups[: max(1, round(len(groups) * holdout_fraction))])
    partly_kept = {patient(g) for g in groups if g not in drawn}
    held_out = {g for g in drawn if patient(g) not in partly_kept}
    kept = [s for s in samples if s.patient_group not in held_out]
    holdout = [s for s in samples if s.patient_group in held_out]
    return kept, holdout


# Fewer cells than this decode faster here than decoder processes start (and none is forked).
DECODED_IN_PROCESS = 64


def load_arrays(samples: list[Sample], size: int, *, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every sample: N x size x size x 3 uint8 images and N labels."""
    paths = [str(s.path) for s in samples]
    if not paths:  # a refit has no validation side
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    if workers <= 1 or len(paths) <= DECODED_IN_PROCESS:
        images = [load_resized(path, size) for path in paths]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            images = list(pool.map(load_resized, paths, [size] * len(paths), chunksize=64))
    return np.stack(images), np.array([s.label for s in samples], dtype=np.int64)


def load_resized(path: str, size: int) -> np.ndarray:
    """One image as the network sees it before normalisation: padded square, ``size`` pixels, uint8."""
    return square_resize(open_sample(path), size)


def open_sample(path: str | Path) -> Image.Image:
    """A data set's image as RGB; one that cannot be decoded stops the run naming its file, which
    a run over thousands of files must say."""
    try:
        return open_rgb(path)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"{path}: {error}") from error
