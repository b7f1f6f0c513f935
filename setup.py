"""spin_jax: self-play (SPIN-Diffusion) and preference fine-tuning of diffusion models in JAX."""

from setuptools import find_packages, setup

setup(
    name="spin_jax",
    version="0.1.0",
    description="SPIN-Diffusion and Diffusion-DPO/KTO/SFT for Stable Diffusion in JAX/Flax",
    packages=find_packages(include=["spin_jax", "spin_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml_collections",
        "tensorflow-datasets",
        "safetensors",
        "transformers>=4.40",
        "Pillow",
        "numpy",
        "tqdm",
        "absl-py",
        "pyarrow",
        "scipy",
        "tensorboardX",
    ],
    extras_require={
        # PyTorch, diffusers, peft and transformers' PyTorch models are test references only.
        # torch is pinned: an unpinned requirement pulls several GB of CUDA wheels.
        "test": [
            "pytest",
            "pytest-xdist",
            "chex",
            "torch==2.13.0",
            "diffusers>=0.30",
            "transformers>=4.40",
            "peft",
            "ruff",
        ],
        "gpu": ["jax[cuda13]"],
    },
)
