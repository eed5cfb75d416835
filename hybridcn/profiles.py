"""Model profiles: the one place that says how big each network is and how fields are prepared.

Everything that needs a size, a class list or a preprocessing constant (training, export, the gateway,
the Triton ``preprocess`` step) reads it from a :class:`Profile`, never from a literal of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from preprocessing.pipeline import PreprocessConfig

#: Class order everywhere: logit columns, label indices, reports and the served outputs all follow it, so
#: reordering it silently relabels every stored model.
CLASS_NAMES: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro")


@dataclass(frozen=True)
class SegmentationConfig:
    """Attention U-Net size (Oktay et al. 2018).

    ``input_scale``: the U-Net sees the field average-pooled by this factor and its mask logits are
    upsampled back to the field. Blasts are 30-60 px across in a 224 px field, so at 2 they stay whole
    while the U-Net costs a quarter (5.5 instead of 22.6 ms per field on one CPU core). Held-out Dice on
    block fold 0 after 4 CPU epochs: 0.864 at 2 vs 0.877 at 1, trained in 129 vs 487 s
    (``research/segmentation_scale_experiment.py``). The compact profile runs on 112 px fields, where
    the U-Net at scale 1 costs what it cost at scale 2 on 224 px, so it stays at 1.

    ``hard_gate``: feed the backbones the field where the mask says "cell" (probability >= 0.5) and
    exact zeros elsewhere, instead of the field times the soft probability. The soft mask lets the
    background's texture through at small weight, and the trained backbones read it (a flat background
    costs the shipped model about 12 points; ``research/diagnose_flat_background.py``). Off in both
    profiles until a trial shows it keeps accuracy; the gate has no gradient, which phase 3 does not
    need (the U-Net is trained in phase 2 and frozen after).
    """

    base_width: int = 8
    depth: int = 4
    input_scale: int = 1
    hard_gate: bool = False

    def __post_init__(self) -> None:
        if self.input_scale < 1:
            raise ValueError(f"input_scale must be >= 1, got {self.input_scale}")


@dataclass(frozen=True)
class FeatureConfig:
    """The two backbones of HybridCN-NAS, built from timm definitions without pretrained weights."""

    convnext: str = "convnext_atto"
    nasnet_stem: int = 16
    nasnet_num_features: int = 24 * 16
    input_size: int = 224

    @property
    def nasnet_channels(self) -> int:
        return self.nasnet_num_features // 24


@dataclass(frozen=True)
class HeadConfig:
    """Multi-head self-attention classifier over the mRMR-selected features."""

    mrmr_k: int = 256
    token_dim: int = 16
    model_dim: int = 64
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1

    @property
    def tokens(self) -> int:
        return self.mrmr_k // self.token_dim


@dataclass(frozen=True)
class Profile:
    """How big each network is and how fields are prepared.

    ``field_size`` is a field in the scanner's pixels (the Taleqani fields are 224 px across); whole
    slides are tiled at that size. ``image_size`` is what the networks see: every field is fitted to it
    first (:func:`preprocessing.pipeline.fit_field`), so a model can run below the native resolution.
    """

    name: str
    image_size: int = 224
    field_size: int = 224
    classes: tuple[str, ...] = CLASS_NAMES
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """``to_dict`` as it reads back from a run's JSON (tuples as lists): the form to compare runs in."""
        return json.loads(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(
            name=data["name"],
            image_size=data["image_size"],
            field_size=data.get("field_size", 224),  # repositories exported before the field existed
            classes=tuple(data["classes"]),
            preprocess=PreprocessConfig.from_dict(data["preprocess"]),
            segmentation=SegmentationConfig(**data["segmentation"]),
            features=FeatureConfig(**data["features"]),
            head=HeadConfig(**data["head"]),
        )

    def with_changes(self, **changes: Any) -> Profile:
        return replace(self, **changes)

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> Profile:
        """Apply ``SECTION.FIELD=VALUE`` (or ``FIELD=VALUE`` at the top level) assignments, values as JSON.

        ``["segmentation.input_scale=2", "preprocess.flatten_background=true"]`` tries a variant of a
        profile from the command line without a profile of its own; the result is recorded with the run.
        """
        data = self.to_dict()
        for assignment in assignments:
            key, separator, text = assignment.partition("=")
            path = key.strip().split(".")
            target = data
            for part in path[:-1]:
                target = target.get(part) if isinstance(target, dict) else None
            if not separator or not isinstance(target, dict) or path[-1] not in target or isinstance(
                    target[path[-1]], dict):
                raise ValueError(f"bad profile override {assignment!r}: expected SECTION.FIELD=VALUE with a field "
                                 f"of the profile, e.g. segmentation.input_scale=2")
            try:
                target[path[-1]] = json.loads(text)
            except json.JSONDecodeError:
                target[path[-1]] = text
        return Profile.from_dict(data)


PROFILES: dict[str, Profile] = {
    # Trains (about 20 minutes) and serves on a 2-core CPU: fields at half resolution (112 px), narrow U-Net,
    # ConvNeXt-Atto, NASNet-A with 16 penultimate filters. Without CLAHE/multiscale: that ablation won on
    # block fold 0 with two seeds (98.4 and 98.6% against 96.5 and 95.0%) and was less background-sensitive
    # (MODEL_CARD.md); the paper profile keeps them.
    "compact": Profile(
        name="compact",
        image_size=112,
        preprocess=PreprocessConfig(enhance=False),
        features=FeatureConfig(input_size=112),
    ),
    # The paper's configuration: ConvNeXt-Base + NASNet-A Large at 331 px, full-width U-Net, mRMR K=2000.
    "paper": Profile(
        name="paper",
        segmentation=SegmentationConfig(base_width=32, depth=5),
        features=FeatureConfig(
            convnext="convnext_base", nasnet_stem=96, nasnet_num_features=4032, input_size=331
        ),
        head=HeadConfig(mrmr_k=2000, token_dim=50, model_dim=256, heads=8, layers=2),
    ),
    # A few-second profile for unit tests of the training and export code.
    "tiny": Profile(
        name="tiny",
        image_size=64,
        field_size=64,
        segmentation=SegmentationConfig(base_width=4, depth=3),
        features=FeatureConfig(convnext="convnext_atto", nasnet_stem=8, nasnet_num_features=24 * 4, input_size=64),
        head=HeadConfig(mrmr_k=32, token_dim=8, model_dim=16, heads=2, layers=1),
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
