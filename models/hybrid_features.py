"""HybridCN-NAS feature extractor (phase 3): ConvNeXt and NASNet-A side by side.

Liu Z et al. "A ConvNet for the 2020s", CVPR 2022 (ConvNeXt); Zoph B et al. "Learning Transferable
Architectures for Scalable Image Recognition", CVPR 2018 (NASNet-A). Both come from timm's
definitions; their globally pooled features are concatenated. No ImageNet weights are loaded unless
``pretrained=True`` (which needs a machine that can fetch them).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models._registry import register_model


class HybridFeatures(nn.Module):
    """``image (N,3,H,W) float`` -> ``(N, convnext_dim + nasnet_dim)`` pooled features.

    The image is resized to ``input_size`` inside the module (the paper runs NASNet-Large at 331 px),
    so the served graph takes the segmentation stage's output as it is.
    """

    def __init__(
        self,
        *,
        convnext: str,
        nasnet_stem: int,
        nasnet_num_features: int,
        input_size: int,
        use_convnext: bool = True,
        use_nasnet: bool = True,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if not (use_convnext or use_nasnet):
            raise ValueError("at least one backbone must be enabled")
        self.input_size = input_size
        self.convnext = timm.create_model(convnext, pretrained=pretrained, num_classes=0) if use_convnext else None
        self.nasnet = (
            timm.create_model(
                "nasnetalarge",
                pretrained=pretrained and nasnet_stem == 96 and nasnet_num_features == 4032,
                num_classes=0,
                stem_size=nasnet_stem,
                num_features=nasnet_num_features,
            )
            if use_nasnet
            else None
        )
        self.convnext_dim = self.convnext.num_features if self.convnext is not None else 0
        self.nasnet_dim = self.nasnet.num_features if self.nasnet is not None else 0

    @property
    def num_features(self) -> int:
        return self.convnext_dim + self.nasnet_dim

    def forward_parts(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.shape[-1] != self.input_size or image.shape[-2] != self.input_size:
            image = F.interpolate(image, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        parts = []
        if self.convnext is not None:
            parts.append(self.convnext(image))
        if self.nasnet is not None:
            parts.append(self.nasnet(image))
        return parts

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.forward_parts(image), dim=1)


@register_model
def hybrid_features(profile, **kwargs) -> HybridFeatures:
    config = profile.features
    return HybridFeatures(
        convnext=config.convnext,
        nasnet_stem=config.nasnet_stem,
        nasnet_num_features=config.nasnet_num_features,
        input_size=config.input_size,
        **kwargs,
    )
