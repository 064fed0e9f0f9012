"""Batched prediction with heatmaps: the one code path used by the worker, evaluation and bench."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ml.gradcam import cam_from_features, render_overlay
from ml.model import PARASITIZED
from ml.preprocessing import square_resize
from ml.tensors import model_inputs, to_batch
from ml.weights import load_model


@dataclass(frozen=True)
class Prediction:
    label: str
    probability_parasitized: float
    heatmap: np.ndarray  # h x w float32 in [0, 1], the grid before upsampling

    def overlay(self, original: Image.Image) -> np.ndarray:
        return render_overlay(np.asarray(original.convert("RGB")), self.heatmap)


class Predictor:
    def __init__(self, weights_path: str | Path, *, batch_size: int = 16, bf16: bool | None = None):
        self.model, self.info = load_model(weights_path)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        # bf16 autocast is a large win on CPUs with native bf16 and a loss elsewhere.
        self.bf16 = cpu_has_bf16() if bf16 is None else bf16

    @property
    def version(self) -> str:
        return self.info.version

    @torch.inference_mode()
    def predict(self, images: list[Image.Image]) -> list[Prediction]:
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self._predict_batch(images[start : start + self.batch_size]))
        return results

    def _predict_batch(self, images: list[Image.Image]) -> list[Prediction]:
        config = self.info.config
        batch = to_batch([square_resize(image, config.input_size) for image in images])
        inputs = model_inputs(batch, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            feature_maps = self.model.forward_features(inputs)
            logits = self.model.head(feature_maps)
        probabilities = logits.float().softmax(dim=1)[:, PARASITIZED]
        heatmaps = cam_from_features(self.model, feature_maps.float(), PARASITIZED)
        threshold = self.info.threshold
        names = config.class_names
        uninfected = names[1 - PARASITIZED]
        return [
            Prediction(
                label=names[PARASITIZED] if p >= threshold else uninfected,
                probability_parasitized=float(p),
                heatmap=h.numpy().astype(np.float32),
            )
            for p, h in zip(probabilities.tolist(), heatmaps, strict=True)
        ]


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
