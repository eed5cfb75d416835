"""Batch augmentations on uint8 field tensors that mimic real acquisition variation.

Flips and 90-degree rotations (smears have no orientation), stain/colour jitter (staining and
white-balance drift between sessions) and scale (magnification and cell-size variation). Masks go
through the same geometric transform as their images. Two are optional: :func:`replace_background`
(a new background tint and texture, so the class has to come from the cells) and the acquisition
look in :func:`augment_batch` (focus and saturation, which follow the session in this data).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
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


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N,C,H,W)`` float images, reflected at the borders."""
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def vary_look(x: torch.Tensor, chosen: torch.Tensor, rand, *, sigma: float, sharpness: float = 1.0,
              saturation: float = 0.5) -> torch.Tensor:
    """Re-focus and re-saturate the ``chosen`` fields of ``x (N,3,H,W)`` float 0-255.

    Unsharp masking ``x + a (x - blur(x))`` with ``a`` uniform in ``[-sharpness, sharpness]`` blurs
    (``a < 0``; ``a = -1`` is the blur itself) or sharpens; then the distance from grey is scaled by a
    factor uniform in ``1 +- saturation``. In the Taleqani data, focus and saturation follow the
    acquisition session, and so the class: Pro-B fields and the yellowish-background Pre-B fields are
    blurrier and paler than the bluish Pre-B ones (MODEL_CARD.md, "Metrics").
    """
    n = x.shape[0]
    amount = sharpness * (rand(n, 1, 1, 1) * 2 - 1)
    factor = 1 + saturation * (rand(n, 1, 1, 1) * 2 - 1)
    y = x + amount * (x - gaussian_blur(x, sigma))
    grey = y.mean(dim=1, keepdim=True)
    y = grey + (y - grey) * factor
    return torch.where(chosen.view(n, 1, 1, 1), y, x)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    colour: float = 0.08,
    scale: tuple[float, float] = (0.75, 1.0),
    look: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment ``images (N,H,W,3) uint8`` (and ``masks (N,H,W)``); returns tensors of the same dtypes.

    ``look`` is the share of fields whose focus and saturation are varied (:func:`vary_look`, with a
    blur of 1 px per 112 px of field); at 0 the random stream is the same as without it.
    """
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
    if look > 0:
        x = vary_look(x, rand(n) < look, rand, sigma=max(width, height) / 112)
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


#: Ruifrok and Johnston's haematoxylin, eosin and DAB optical-density vectors (rows), the matrix that
#: colour deconvolution inverts (Ruifrok AC, Johnston DA. Anal Quant Cytol Histol 23(4):291-299, 2001).
_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB)


def acquisition_shift(rgb: np.ndarray, rng: np.random.Generator, *, stain: float = 0.12) -> np.ndarray:
    """One random stain and camera change of a raw field ``(H,W,3) uint8``, before phase 1 sees it.

    A smear from another lab differs in stain uptake and in the camera: each stain's amount is scaled
    and offset in HED optical density (Tellez D et al., IEEE Trans Med Imaging 37(9):2126-2136, 2018,
    with ``stain`` as their sigma), then the camera's white balance (a gain per RGB channel, clipped
    at white as a real sensor clips), contrast, gamma and exposure, and, for some fields, defocus blur
    and JPEG compression. Reinhard's transfer undoes a global colour change of the cells but not the
    clipped background it leaves behind, so the networks have to learn that part.
    """
    x = rgb.astype(np.float64)
    density = -np.log10(np.maximum(x, 1.0) / 255.0) @ _HED_FROM_RGB
    density = density * rng.uniform(1 - stain, 1 + stain, 3) + rng.uniform(-stain, stain, 3) * 0.1
    x = 255.0 * 10.0 ** (-(density @ _RGB_FROM_HED))
    x = x * rng.uniform(0.88, 1.12, 3)
    mean = x.reshape(-1, 3).mean(axis=0)
    x = mean + (x - mean) * rng.uniform(0.65, 1.1)
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(0.75, 1.35) + rng.uniform(-15, 15)
    out = np.clip(x, 0, 255).round().astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.3:
        ok, encoded = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 91))])
        if ok:
            out = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])
    return out


def acquisition_views(raw: np.ndarray, *, views: int, seed: int) -> list[np.ndarray]:
    """``views`` shifted copies of every raw field ``(N,H,W,3) uint8`` (:func:`acquisition_shift`),
    each field's change drawn from ``default_rng([seed, view, field])`` so a run is reproducible."""
    return [np.stack([acquisition_shift(field, np.random.default_rng([seed, view, i])) for i, field in enumerate(raw)])
            for view in range(views)]
