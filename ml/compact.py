"""Write a compact copy of a cell folder: every image padded, resized to one size, as WebP.

    python -m ml.compact --data /tmp/malaria-split/train --out /tmp/cells-128 --size 128

For training on a machine that the full-size PNGs cannot be copied to in time (a lent GPU takes a
few tens of megabytes: 13,691 cells at 128 px take 19 MiB at quality 85, under half of JPEG's
size at the same quality). Images go through the same ``square_resize`` that ``ml.train`` applies,
so training on the copy at ``--size`` sees the same pixels up to the lossy coding. File names keep
their stem, and so their patient group; only the suffix becomes ``.webp``.
"""

import argparse
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from PIL import Image

from ml.data import at_least_one, list_samples, load_resized
from ml.model import CLASS_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/")
    parser.add_argument("--out", required=True, help="folder to write the copy to (same layout)")
    parser.add_argument("--size", type=at_least_one, required=True, help="side in pixels: the --input-size to train at")
    parser.add_argument("--quality", type=webp_quality, default=85, help="WebP quality, 0-100")
    parser.add_argument("--workers", type=at_least_one, default=2, help="decoding processes; 1: none, all in this one")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):  # an earlier copy's cells (another split's) would stay among the new
        parser.error(f"{out} is not empty; give a new folder")
    return args


def webp_quality(text: str) -> int:
    """An argparse type: a WebP quality, 0 to 100 (libwebp refused any other in every worker, cell by cell)."""
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text}: give a quality from 0 to 100, e.g. 85")
    return value


def compact_one(source: str, target: str, size: int, quality: int) -> int:
    """Write one resized WebP; returns its size in bytes."""
    Image.fromarray(load_resized(source, size)).save(target, format="WEBP", quality=quality)
    return Path(target).stat().st_size


def main(argv=None) -> None:
    args = parse_args(argv)
    samples = list_samples(args.data)
    out = Path(args.out)
    for name in CLASS_NAMES:
        (out / name).mkdir(parents=True, exist_ok=True)
    sources = [str(s.path) for s in samples]
    targets = [str(out / CLASS_NAMES[s.label] / f"{s.path.stem}.webp") for s in samples]
    n = len(samples)
    with ProcessPoolExecutor(max_workers=args.workers) if args.workers > 1 else nullcontext() as pool:
        each = partial(pool.map, chunksize=64) if pool else map
        written = sum(each(compact_one, sources, targets, [args.size] * n, [args.quality] * n))
    print(f"wrote {n} images at {args.size}px to {out}: {written / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
