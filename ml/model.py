"""VGG19 trunk with a global-average-pooling + linear head (two classes).

The head is GAP + linear rather than the seed's dense layers so that the class activation map can
be computed in closed form from one forward pass (see ``ml.gradcam``), and so the model is a small
fraction of torchvision's 143M parameters. Trailing max-pools are replaced by ``nn.Identity`` (not
removed) so layer indices, and therefore ImageNet state-dict keys, still match torchvision's.
"""

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision.models import vgg19, vgg19_bn

CLASS_NAMES = ("Parasitized", "Uninfected")
PARASITIZED = CLASS_NAMES.index("Parasitized")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_CHANNELS = 512


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
    # Scale each cell to a reference mean colour before normalising (see ml.preprocessing).
    stain_standardise: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("vgg19", "vgg19_bn"):
            raise ValueError(f"unknown arch {self.arch!r}; expected vgg19 or vgg19_bn")
        if self.trunk_stride not in (8, 16, 32):
            raise ValueError("trunk_stride must be 8, 16 or 32")
        if self.input_size % self.trunk_stride:
            raise ValueError("input_size must be a multiple of trunk_stride")
        if self.class_names != CLASS_NAMES:  # the probability and heatmap are read at index PARASITIZED
            raise ValueError(f"class_names must be {CLASS_NAMES}, not {self.class_names}")

    @property
    def heatmap_size(self) -> int:
        return self.input_size // self.trunk_stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "class_names"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class MalariaVGG(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        builder = vgg19_bn if config.arch == "vgg19_bn" else vgg19
        self.features = builder(weights=None).features
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
