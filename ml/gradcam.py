"""Class activation maps for the Parasitized class on the last convolutional block.

``grad_cam`` is the gradient-based method (Selvaraju et al. 2017). Because the head is global
average pooling followed by a linear layer, the gradient of a class logit with respect to each
feature map is that class's weight divided by the map's area, so Grad-CAM reduces to the closed
form ``cam_from_features`` (Zhou et al. 2016): the same map up to a positive scale, from a single
forward pass with no autograd. The worker uses the closed form; tests prove the two agree.
"""

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ml.model import MalariaVGG


def grad_cam(model: MalariaVGG, inputs: torch.Tensor, class_index: int) -> torch.Tensor:
    """Gradient-weighted CAM, N x h x w, each map scaled to [0, 1]."""
    with torch.enable_grad():
        feature_maps = model.forward_features(inputs).detach().requires_grad_(True)
        logits = model.head(feature_maps)
        (gradients,) = torch.autograd.grad(logits[:, class_index].sum(), feature_maps)
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((channel_weights * feature_maps).sum(dim=1))
    return _scale_to_unit(cam.detach())


def cam_from_features(model: MalariaVGG, feature_maps: torch.Tensor, class_index: int) -> torch.Tensor:
    """Closed-form CAM from last-block activations, N x h x w in [0, 1]."""
    weights = model.classifier.weight[class_index].to(feature_maps.dtype)
    cam = F.relu(torch.einsum("nchw,c->nhw", feature_maps, weights))
    return _scale_to_unit(cam.float())


def _scale_to_unit(cam: torch.Tensor) -> torch.Tensor:
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak


def render_overlay(original_rgb: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a JET-coloured heatmap over the original image at the original's size (RGB uint8)."""
    height, width = original_rgb.shape[:2]
    # The model saw a centred square; map the heatmap back onto that square, then crop it.
    side = max(height, width)
    upsampled = cv2.resize(heatmap.astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    top, left = (side - height) // 2, (side - width) // 2
    cropped = np.clip(upsampled[top : top + height, left : left + width], 0.0, 1.0)
    coloured_bgr = cv2.applyColorMap((cropped * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured_bgr, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(original_rgb, 1.0 - opacity, coloured, opacity, 0.0)
