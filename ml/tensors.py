"""Decoded cells (ml.preprocessing) to the network's input tensors, as training and the predictor share them."""

import numpy as np
import torch

# Mean colour of a cell across the NIH training smears (RGB, 0-255); every cell is scaled to it.
REFERENCE_CELL_COLOUR = (178.0, 146.0, 156.0)
# A pixel whose channels sum to at most this is background (cells are cut out onto black).
BACKGROUND_LEVEL = 30.0


def standardise_stain(batch: torch.Tensor) -> torch.Tensor:
    """Scale each image's channels so its cell has the reference mean colour; black stays black.

    Stain colour varies from smear to smear (pink to lavender) far more than within one, and a
    per-channel gain removes most of that variation while keeping the parasite's dark chromatin
    dark relative to its own cell.
    """
    batch = batch.float()
    foreground = (batch.sum(dim=1, keepdim=True) > BACKGROUND_LEVEL).float()
    area = foreground.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    cell_mean = (batch * foreground).sum(dim=(2, 3), keepdim=True) / area
    reference = torch.tensor(REFERENCE_CELL_COLOUR, device=batch.device).view(1, 3, 1, 1)
    return (batch * (reference / cell_mean.clamp(min=1.0))).clamp(0.0, 255.0)


def model_inputs(batch: torch.Tensor, config) -> torch.Tensor:
    """A uint8 (or 0-255 float) NCHW batch as the network of ``config`` expects it."""
    if config.stain_standardise:
        batch = standardise_stain(batch)
    return normalize(batch, config.mean, config.std).contiguous(memory_format=torch.channels_last)


def normalize(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """An NCHW batch of 0-255 values (uint8, or float once stain-standardised) to normalised float NCHW."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean_t) / std_t


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack HxWx3 uint8 arrays into an NCHW uint8 tensor."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
