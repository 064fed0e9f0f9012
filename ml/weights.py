"""Saving and loading model files as safetensors (no pickle), with metadata alongside."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ml.model import MalariaVGG, ModelConfig

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "malaria_vgg19.safetensors"


def deployed_weights() -> Path:
    """The file MODEL_WEIGHTS names in the environment (as compose gives it to the worker), else the
    shipped one: the command-line tools measure the model the site runs. Unlike the settings, this
    does not read .env."""
    return Path(os.environ.get("MODEL_WEIGHTS") or DEFAULT_WEIGHTS)


class WeightsNotFound(FileNotFoundError):
    pass


class WeightsUnreadable(ValueError):
    """The file is there but is not a whole malaria-vgg19 safetensors file (truncated, an LFS pointer)."""


@dataclass(frozen=True)
class ModelInfo:
    config: ModelConfig
    version: str
    # Probability of Parasitized at or above which a cell is labelled Parasitized.
    threshold: float = 0.5
    metrics: dict = field(default_factory=dict)


def save_model(model: MalariaVGG, path: str | Path, *, info: ModelInfo, half: bool = True) -> None:
    tensors = {
        name: (t.detach().half() if half and t.is_floating_point() else t.detach()).cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    metadata = {
        "config": json.dumps(info.config.to_dict()),
        "version": info.version,
        "threshold": repr(info.threshold),
        "metrics": json.dumps(info.metrics),
        "format": "malaria-vgg19/1",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed, so a run stopped mid-write leaves the previous file whole.
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def read_info(path: str | Path) -> ModelInfo:
    with _opened(path) as handle:
        return _info_from_metadata(handle.metadata())


def load_model(path: str | Path) -> tuple[MalariaVGG, ModelInfo]:
    """Build the network described by the file and load its weights in fp32, eval mode."""
    with _opened(path) as handle:
        info = _info_from_metadata(handle.metadata())
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    # NaN weights give NaN probabilities, which no threshold is below: every cell would be Uninfected.
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise ValueError(
            f"{path} holds weights that are not finite numbers (NaN or infinite, in {len(broken)} tensors such "
            f"as {broken[0]}): a run that diverged or overflowed fp16, or a damaged copy"
        )
    model = MalariaVGG(info.config)
    _check_fits(path, state, model.state_dict(), info.config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval(), info


def _check_fits(path, state: dict, expected: dict, config: ModelConfig) -> None:
    """Tensors that are not the network the config describes (another arch, one missing) are a bad
    file, said in a line. Checked here, not by catching load_state_dict's RuntimeError: that is also
    what a worker short of memory raises, and its text lists every key."""
    wrong = tensors_that_differ(state, expected)
    if wrong:
        raise ValueError(
            f"{path}: its tensors do not fit its config (arch {config.arch}): "
            f"{len(wrong)} missing, extra or of another shape, such as {wrong[0]}"
        )


def tensors_that_differ(state: dict, expected: dict) -> list[str]:
    """The names missing from one state dict or the other, else those whose shapes differ."""
    return sorted(expected.keys() ^ state.keys()) or sorted(
        name for name in expected if expected[name].shape != state[name].shape
    )


@contextmanager
def _opened(path: str | Path) -> Iterator:
    """safe_open, with every way a damaged file can fail turned into one WeightsUnreadable."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    # OSError: safetensors reports a file it may not read (its mode, a mount) as missing.
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError, OSError) as error:
        raise WeightsUnreadable(
            f"{path} is not a usable weights file ({error}). If it is a Git LFS pointer or was cut short "
            "while copying, fetch the whole file again."
        ) from error


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(
            f"model weights not found at {path}. Use the file shipped in ml/weights/ "
            "(git checkout it, or set MODEL_WEIGHTS to its path) or train one with "
            "'python -m ml.train --data DIR --out FILE'."
        )
    return path


MAX_VERSION_LENGTH = 100  # what a result can record of the model that produced it


def _info_from_metadata(metadata: dict[str, str] | None) -> ModelInfo:
    if not metadata or metadata.get("format") != "malaria-vgg19/1":
        raise ValueError("not a malaria-vgg19 weights file (missing or unknown metadata)")
    threshold = float(metadata["threshold"])
    if not 0 <= threshold <= 1:  # NaN too: no probability is >= NaN, so every cell would be Uninfected
        raise ValueError(f"the operating threshold must lie between 0 and 1, not {metadata['threshold']!r}")
    version = metadata["version"]
    if not 1 <= len(version) <= MAX_VERSION_LENGTH or not version.isprintable():
        raise ValueError(
            f"the model version must be 1 to {MAX_VERSION_LENGTH} printable characters, not {version!r:.120}"
        )
    return ModelInfo(
        config=ModelConfig.from_dict(json.loads(metadata["config"])),
        version=version,
        threshold=threshold,
        metrics=json.loads(metadata.get("metrics", "{}")),
    )
