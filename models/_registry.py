"""Name -> builder registry for the networks, in the manner of timm's ``register_model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``builder`` under its function name."""
    _MODEL_BUILDERS[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_MODEL_BUILDERS)


def create_model(name: str, profile: Any, **kwargs: Any) -> nn.Module:
    """Build the registered network ``name`` at the sizes of ``profile`` (a :class:`hybridcn.profiles.Profile`)."""
    try:
        builder = _MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}") from None
    return builder(profile, **kwargs)
