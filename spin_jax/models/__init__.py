"""Stable Diffusion networks in Flax and their diffusers-format weights."""

from typing import Any

__all__ = ["StableDiffusion", "load_pretrained", "save_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy, so `spin_jax.models.convert` & co. import without building every network module.
    if name in __all__:
        from spin_jax.models import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'spin_jax.models' has no attribute {name!r}")
