"""Training-time augmentation on uint8 NCHW batches: symmetries and mild stain variation.

A cell has no canonical orientation, so all eight flips/rotations are equally valid; stain and
illumination differ between smears, so channel gains, brightness and gamma are jittered, and
optionally the hue (for models that standardise stain, which undoes gains). Black stays black, so
the background is unchanged.
"""

import torch


def augment_batch(batch: torch.Tensor, generator: torch.Generator, *, mix_channels: bool = False) -> torch.Tensor:
    """Return a float batch in [0, 255] with random symmetries and colour jitter applied per image.

    The random draws come from ``generator`` on the CPU whatever the batch's device, so a seed gives
    the same augmentations on a GPU as on the CPU.
    """
    n = batch.shape[0]
    rotations = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    images = []
    for image, k, flip in zip(batch, rotations.tolist(), flips.tolist(), strict=True):
        image = torch.rot90(image, k, dims=(1, 2))
        images.append(torch.flip(image, dims=(2,)) if flip else image)
    out = torch.stack(images).float() / 255.0
    gains = (1.0 + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.2).to(out.device)
    brightness = (1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3).to(out.device)
    gamma = (1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3).to(out.device)
    out = (out * gains * brightness).clamp(0.0, 1.0) ** gamma
    if mix_channels:
        out = _mix_channels(out, generator).clamp(0.0, 1.0)
    return out * 255.0


def _mix_channels(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift hue and saturation a little with a random near-identity colour matrix per image.

    Gains alone cannot turn a pink smear lavender; leaking a few per cent of each channel into the
    others can, and a linear map keeps black at black.
    """
    n = images.shape[0]
    mixing = (torch.eye(3) + (torch.rand(n, 3, 3, generator=generator) - 0.5) * 0.16).to(images.device)
    return torch.einsum("nij,njhw->nihw", mixing, images)
