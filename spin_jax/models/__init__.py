"""Stable Diffusion networks in Flax and their diffusers-format weights."""
