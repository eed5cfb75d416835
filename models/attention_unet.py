"""Attention U-Net for cell segmentation (phase 2).

Oktay O et al. "Attention U-Net: Learning where to look for the pancreas". MIDL 2018,
arXiv:1804.03999. Additive attention gates on every skip connection; the gate coefficients are
returned with the mask so the web page can show where the network looked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models._registry import register_model


class ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive gate: ``alpha = sigmoid(psi(relu(W_x x + W_g g)))``, skip features scaled by ``alpha``."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.theta_x = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.phi_g = nn.Conv2d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv2d(inter_channels, 1, 1, bias=True)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = F.interpolate(self.phi_g(gate), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta_x(skip) + gate)))
        return skip * alpha, alpha


class AttentionUNet(nn.Module):
    """Returns ``(mask_logits (N,1,H,W), [gate maps (N,1,h,w) from coarse to fine])``."""

    def __init__(self, in_channels: int = 3, base_width: int = 8, depth: int = 4) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        widths = [base_width * 2**level for level in range(depth)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(ConvBlock(previous, width))
            previous = width
        self.upsamples = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(depth - 1, 0, -1):
            coarse, fine = widths[level], widths[level - 1]
            self.upsamples.append(nn.ConvTranspose2d(coarse, fine, 2, stride=2))
            self.gates.append(AttentionGate(fine, coarse, max(fine // 2, 1)))
            self.decoders.append(ConvBlock(2 * fine, fine))
        self.output = nn.Conv2d(widths[0], 1, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        x = image
        for index, encoder in enumerate(self.encoders):
            if index:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        attention_maps = []
        for upsample, gate, decoder, skip in zip(
            self.upsamples, self.gates, self.decoders, reversed(skips[:-1]), strict=True
        ):
            gated, alpha = gate(skip, x)
            attention_maps.append(alpha)
            x = upsample(x)
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = decoder(torch.cat([gated, x], dim=1))
        return self.output(x), attention_maps


@register_model
def attention_unet(profile, **kwargs) -> AttentionUNet:
    return AttentionUNet(base_width=profile.segmentation.base_width, depth=profile.segmentation.depth, **kwargs)
