"""DreamBooth fine-tuning of Stable Diffusion in JAX/Flax NNX."""

__version__ = "0.1.0"
