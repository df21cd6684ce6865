"""Checkpoints: HF safetensors <-> NNX Decoder (`hf`), and the train state."""
from tepo_jax.checkpoints.hf import CheckpointError, load_hf, load_hf_config, save_hf

__all__ = ["CheckpointError", "load_hf", "load_hf_config", "save_hf"]
