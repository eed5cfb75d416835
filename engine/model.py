"""The served model as the CPU side needs it: read once from the repository's typed manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.repository import read_manifest
from hybridcn.contracts import Manifest
from hybridcn.profiles import Profile
from preprocessing import PreprocessConfig, StainReference


@dataclass(frozen=True)
class ServedModel:
    """Sizes, stain reference, preprocessing and review threshold of the model in a repository."""

    manifest: Manifest
    field_size: int  # a field in scanner pixels; slides are tiled at this size
    reference: StainReference
    preprocess: PreprocessConfig
    review_threshold: float

    @classmethod
    def from_repository(cls, repository: Path, *, review_threshold: float | None = None) -> ServedModel:
        manifest = read_manifest(repository)
        return cls(
            manifest=manifest,
            field_size=Profile.from_dict(manifest.profile).field_size,  # the profile knows older manifests' default
            reference=StainReference.from_dict(manifest.stain_reference),
            preprocess=PreprocessConfig.from_dict(manifest.profile["preprocess"]),
            review_threshold=float(review_threshold if review_threshold is not None else manifest.review_threshold),
        )

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def image_size(self) -> int:
        """What the networks see (fields are fitted to this before Triton)."""
        return self.manifest.image_size
