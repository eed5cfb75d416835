"""Batch augmentations on uint8 field tensors that mimic real acquisition variation.

Flips and 90-degree rotations (smears have no orientation), stain/colour jitter (staining and
white-balance drift between sessions) and scale (magnification and cell-size variation). Masks go
through the same geometric transform as their images. :func:`replace_background` is the optional
one: a new background tint and texture, so the class has to come from the cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _geometric(x: torch.Tensor, flips: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for i in range(x.shape[0]):
        item = out[i]
        if flips[i, 0]:
            item = item.flip(-1)
        if flips[i, 1]:
            item = item.flip(-2)
        out[i] = torch.rot90(item, int(rotations[i]), dims=(-2, -1))
    return out


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    colour: float = 0.08,
    scale: tuple[float, float] = (0.75, 1.0),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment ``images (N,H,W,3) uint8`` (and ``masks (N,H,W)``); returns tensors of the same dtypes."""
    n, height, width, _ = images.shape
    device = images.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device="cpu").to(device)  # noqa: E731
    x = images.permute(0, 3, 1, 2).float()
    m = masks[:, None].float() if masks is not None else None
    flips = rand(n, 2) < 0.5
    rotations = (rand(n) * 4).floor().long()
    x = _geometric(x, flips, rotations)
    if m is not None:
        m = _geometric(m, flips, rotations)
    # scale: zoom into a random square crop and resize back
    crop = (scale[0] + (scale[1] - scale[0]) * rand(n)) if scale[0] < 1 else torch.ones(n, device=device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = crop
    theta[:, 1, 1] = crop
    theta[:, :, 2] = (rand(n, 2) * 2 - 1) * (1 - crop[:, None])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if m is not None:
        m = F.grid_sample(m, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    # stain / colour jitter: per-image brightness, contrast and per-channel gain
    brightness = 1 + colour * (rand(n, 1, 1, 1) * 2 - 1)
    contrast = 1 + colour * (rand(n, 1, 1, 1) * 2 - 1)
    gain = 1 + 0.5 * colour * (rand(n, 3, 1, 1) * 2 - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness * gain
    x = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x, (m[:, 0].round().to(masks.dtype) if m is not None else None)


def replace_background(
    images: torch.Tensor,
    keep: torch.Tensor,
    *,
    probability: float,
    generator: torch.Generator | None = None,
    lightness: tuple[float, float] = (195.0, 250.0),
    tint: float = 12.0,
    max_noise: float = 8.0,
) -> torch.Tensor:
    """Repaint the background of a random ``probability`` share of ``images (N,H,W,3) uint8``.

    ``keep (N,H,W) bool`` marks what stays (the stained cells). The new
    background is one near-white colour (``lightness`` grey level, each channel moved by up to
    ``tint``) with Gaussian grain of a random strength up to ``max_noise``, so that flat and textured
    backgrounds of any tint are seen in training. A model without it loses 11 points when the
    background is painted flat (MODEL_CARD.md, "Shortcut audit").
    """
    if probability <= 0:
        return images
    n, height, width, _ = images.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    chosen = (rand(n) < probability).to(images.device)
    grey = lightness[0] + (lightness[1] - lightness[0]) * rand(n, 1, 1, 1)
    colour = grey + tint * (rand(n, 1, 1, 3) * 2 - 1)
    grain = max_noise * rand(n, 1, 1, 1) * torch.randn(n, height, width, 1, generator=generator)
    painted = (colour + grain).clamp(0, 255).round().to(torch.uint8).to(images.device)
    repaint = (chosen[:, None, None] & ~keep.to(images.device))[..., None]
    return torch.where(repaint, painted, images)
