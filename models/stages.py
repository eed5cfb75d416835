"""The three served graphs of the ``hybridcn_nas`` ensemble, each a module with named tensors.

``SegmentationStage`` takes the gateway's uint8 field: the float conversion and the per-image z-score
(the last step of phase 1) happen here, inside the first ONNX graph, so the wire carries uint8.
Training uses these same modules, so what is trained is what is served.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models._registry import create_model
from models.attention_unet import AttentionUNet
from models.hybrid_features import HybridFeatures


def zscore_image(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image, per-channel z-score of an ``(N, 3, H, W)`` float tensor (see preprocessing.normalize)."""
    mean = image.mean(dim=(2, 3), keepdim=True)
    std = image.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (image - mean) / torch.clamp(std, min=eps)


def uint8_to_normalized(image: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> z-scored ``(N, 3, H, W)`` float32."""
    return zscore_image(image.permute(0, 3, 1, 2).to(torch.float32))


def segmented_input(normalized: torch.Tensor, mask_probability: torch.Tensor, *, hard: bool = False) -> torch.Tensor:
    """The backbones' input: the normalised field with everything but the cells faded to zero.

    ``hard`` zeroes the non-cell pixels outright (mask probability below 0.5) instead of weighting
    every pixel by its probability; see ``SegmentationConfig.hard_gate``.
    """
    if hard:
        return normalized * (mask_probability >= 0.5).to(normalized.dtype)
    return normalized * mask_probability


def smooth_mask(probability: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` mask probability under a 3 x 3 binomial filter ([1, 2, 1] / 4 each way, edges replicated).

    The U-Net's stride-2 transposed convolutions leave a period-2 pattern in its output (Odena et al.,
    "Deconvolution and checkerboard artifacts", Distill 2016): the shipped one alternates neighbouring
    columns of the background by about 38 of 255. This filter's response at period 2 is exactly zero, and
    it moves an edge by less than a pixel. It applies to the served ``mask`` only (what people see and
    the watershed counts); the backbones keep the probability they were trained with.
    """
    taps = torch.tensor([0.25, 0.5, 0.25], dtype=probability.dtype, device=probability.device)
    kernel = (taps[:, None] * taps[None, :]).view(1, 1, 3, 3)
    return F.conv2d(F.pad(probability, (1, 1, 1, 1), mode="replicate"), kernel)


def to_uint8_map(probability: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.clamp(probability, 0, 1) * 255.0).to(torch.uint8)


class SegmentationStage(nn.Module):
    """``image (N,H,W,3) uint8`` -> ``mask (N,H,W) uint8, attention (N,H,W) uint8, segmented (N,3,H,W) f32``.

    ``attention`` is the finest attention gate's coefficient map, upsampled to the field. With
    ``input_scale`` > 1 the U-Net runs on the field average-pooled by that factor (see
    ``SegmentationConfig``); the mask logits are upsampled to the field before the sigmoid.
    """

    def __init__(self, unet: AttentionUNet, *, use_mask: bool = True, input_scale: int = 1,
                 hard_gate: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.use_mask = use_mask
        self.input_scale = input_scale
        self.hard_gate = hard_gate

    def mask_logits(self, normalized: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """U-Net mask logits at the field's size, and its gate maps; what phase 2 trains."""
        if self.input_scale == 1:
            return self.unet(normalized)
        logits, gates = self.unet(F.avg_pool2d(normalized, self.input_scale))
        return F.interpolate(logits, size=normalized.shape[-2:], mode="bilinear", align_corners=False), gates

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normalized = uint8_to_normalized(image)
        logits, gates = self.mask_logits(normalized)
        probability = torch.sigmoid(logits)
        attention = F.interpolate(gates[-1], size=normalized.shape[-2:], mode="bilinear", align_corners=False)
        segmented = segmented_input(normalized, probability, hard=self.hard_gate) if self.use_mask else normalized
        return to_uint8_map(smooth_mask(probability)[:, 0]), to_uint8_map(attention[:, 0]), segmented


def segmentation_stage(profile, *, use_mask: bool = True) -> SegmentationStage:
    """The profile's Attention U-Net wrapped as the served first stage."""
    return SegmentationStage(create_model("attention_unet", profile), use_mask=use_mask,
                             input_scale=profile.segmentation.input_scale,
                             hard_gate=profile.segmentation.hard_gate)


class FeatureStage(nn.Module):
    """``segmented_image (N,3,H,W) f32`` -> ``features (N,F) f32``."""

    def __init__(self, features: HybridFeatures) -> None:
        super().__init__()
        self.features = features

    def forward(self, segmented: torch.Tensor) -> torch.Tensor:
        return self.features(segmented)


class HeadStage(nn.Module):
    """``features (N,F) f32`` -> ``probabilities (N,C) f32, feature_attention (N,T) f32``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.head(features)
        return torch.softmax(logits, dim=-1), attention
