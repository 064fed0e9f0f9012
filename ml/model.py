"""VGG19 trunk with a global-average-pooling + linear head (two classes).

The head is GAP + linear rather than the seed's dense layers so that the class activation map can
be computed in closed form from one forward pass (see ``ml.gradcam``), and so the model is a small
fraction of torchvision's 143M parameters. The trunk is built here, layer for layer as torchvision's
``vgg19``/``vgg19_bn`` ``features`` and initialised from the same distributions (not the same
draws for a seed: torchvision draws its dense head's too), without building and throwing away
torchvision's 124M-parameter dense head: half a gigabyte and a second per model built.
Trailing max-pools are replaced by ``nn.Identity`` (not removed) so layer indices, and therefore
ImageNet state-dict keys, still match torchvision's.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

CLASS_NAMES = ("Parasitized", "Uninfected")
PARASITIZED = CLASS_NAMES.index("Parasitized")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_CHANNELS = 512
# VGG19's convolution widths, "M" a 2x2 max-pool (configuration E of Simonyan & Zisserman).
VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

# The coarsest Grad-CAM grid (before upsampling) ml.train will make: finer than the seed's 7x7 at
# 224 px, whose every square covered a seventh of the cell's width.
MIN_HEATMAP_GRID = 8


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network and feed it; stored beside the weights."""

    arch: str = "vgg19_bn"
    input_size: int = 64
    # Total down-sampling of the trunk: 32 is torchvision's, 16 drops the last pool, 8 the last two.
    trunk_stride: int = 8
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)
    # Scale each cell to a reference mean colour before normalising (see ml.tensors.standardise_stain).
    stain_standardise: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("vgg19", "vgg19_bn"):
            raise ValueError(f"unknown arch {self.arch!r}; expected vgg19 or vgg19_bn")
        if self.trunk_stride not in (8, 16, 32):
            raise ValueError("trunk_stride must be 8, 16 or 32")
        if not isinstance(self.input_size, int) or self.input_size <= 0 or self.input_size % self.trunk_stride:
            raise ValueError(f"input_size must be a positive multiple of trunk_stride, not {self.input_size!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be three finite numbers (R, G, B), not {values!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be above 0, not {self.std!r}")
        if self.class_names != CLASS_NAMES:  # the probability and heatmap are read at index PARASITIZED
            raise ValueError(f"class_names must be {CLASS_NAMES}, not {self.class_names}")

    @property
    def heatmap_size(self) -> int:
        return self.input_size // self.trunk_stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a model config is a JSON object, not {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "class_names"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class MalariaVGG(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.features = vgg19_trunk(batch_norm=config.arch == "vgg19_bn")
        pools = [i for i, layer in enumerate(self.features) if isinstance(layer, nn.MaxPool2d)]
        pools_to_drop = {32: 0, 16: 1, 8: 2}[config.trunk_stride]
        for index in pools[len(pools) - pools_to_drop :]:
            self.features[index] = nn.Identity()
        self.classifier = nn.Linear(TRUNK_CHANNELS, len(config.class_names))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the last convolutional block (the Grad-CAM target layer)."""
        return self.features(x)

    def head(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature_maps.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def freeze_trunk(self) -> None:
        for parameter in self.features.parameters():
            parameter.requires_grad_(False)


def vgg19_trunk(*, batch_norm: bool) -> nn.Sequential:
    """torchvision's VGG19 ``features``: the same layers at the same indices, initialised alike."""
    layers: list[nn.Module] = []
    channels = 3
    for width in VGG19_LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        convolution = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(convolution.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(convolution.bias)
        layers += (
            [convolution, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if batch_norm
            else [convolution, nn.ReLU(inplace=True)]
        )
        channels = width
    return nn.Sequential(*layers)
