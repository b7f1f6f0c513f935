"""Data: record sources, the latent cache and the synthetic store.

The TFDS builder (`spin_jax.data.tfds_pickapic`) imports tensorflow_datasets, so it is loaded
only when asked for (`open_source("tfds", ...)` or an explicit import).
"""

from spin_jax.data.latent_cache import (
    LatentCache,
    cache_key,
    open_latent_cache,
    params_fingerprint,
    sample_latents,
)
from spin_jax.data.sources import VIEWS, Source, open_source, shard_range
from spin_jax.data.synthetic_store import SyntheticStore, generation_work
from spin_jax.data.transforms import SKIP_REASONS

__all__ = [
    "SKIP_REASONS",
    "VIEWS",
    "LatentCache",
    "Source",
    "SyntheticStore",
    "cache_key",
    "generation_work",
    "open_latent_cache",
    "open_source",
    "params_fingerprint",
    "sample_latents",
    "shard_range",
]
