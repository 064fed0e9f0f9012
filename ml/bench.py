"""Latency and throughput of the shipped predictor (classification + heatmap + overlay) on this CPU.

python -m ml.bench [--weights FILE] [--images N] [--batch-size B]
"""

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from ml.data import at_least_one
from ml.predictor import Predictor
from ml.weights import deployed_weights


def synthetic_cells(count: int, seed: int = 0) -> list[Image.Image]:
    """Cell-sized RGB images (about the NIH mean of 133 px) so the benchmark needs no data set."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (133, 133, 3), dtype=np.uint8)) for _ in range(count)]


def time_per_image(predictor: Predictor, images: list[Image.Image], repeats: int) -> list[float]:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for prediction, image in zip(predictor.predict(images), images, strict=True):
            prediction.overlay(image)
        timings.append((time.perf_counter() - started) * 1000 / len(images))
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights", default=str(deployed_weights()), help="default: $MODEL_WEIGHTS, else the shipped model"
    )
    parser.add_argument("--images", type=at_least_one, default=64)
    parser.add_argument("--batch-size", type=at_least_one, default=16)
    parser.add_argument("--threads", type=at_least_one, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        predictor = Predictor(args.weights, batch_size=args.batch_size)
    except (OSError, ValueError) as error:  # a weights file missing or not of the shape asked for
        parser.exit(1, f"ml.bench: {error}\n")
    images = synthetic_cells(args.images)
    time_per_image(predictor, images[:2], repeats=1)  # warm-up
    single = time_per_image(predictor, images[:1], repeats=20)
    batched = time_per_image(predictor, images, repeats=3)
    config = predictor.info.config
    print(
        f"model {predictor.version}: {config.arch}, {config.input_size}px input, "
        f"{config.heatmap_size}x{config.heatmap_size} heatmap, bf16={predictor.bf16}, threads={args.threads}"
    )
    print(f"single image: median {statistics.median(single):.1f} ms (classification + heatmap + overlay)")
    print(
        f"batched ({args.batch_size}/batch): {statistics.median(batched):.1f} ms/image, "
        f"{1000 / statistics.median(batched):.1f} images/s"
    )


if __name__ == "__main__":
    main()
