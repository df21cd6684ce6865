"""Tiny random transformers checkpoints (Qwen2 / Llama 3.1) built and saved on the spot.

Tests and demos build them in a temporary directory, load them with `tepo_jax.checkpoints.load_hf`
and compare against the returned PyTorch model. Every weight is random — norms and biases too,
so a loader that forgets one of them (or transposes it wrongly) is caught by a logit comparison.
"""
from __future__ import annotations

import os
from typing import Optional

_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _hf_config(family: str, *, vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
               num_kv_heads, head_dim, tie_word_embeddings, rope_theta, rope_scaling,
               max_position_embeddings, rms_norm_eps, dtype):
    import transformers

    rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": float(rope_theta), **rope_scaling}
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
              num_hidden_layers=num_layers, num_attention_heads=num_heads,
              num_key_value_heads=num_kv_heads, tie_word_embeddings=tie_word_embeddings,
              rope_parameters=rope, max_position_embeddings=max_position_embeddings,
              rms_norm_eps=rms_norm_eps, bos_token_id=1, eos_token_id=2, dtype=dtype)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if family == "qwen2":
        return transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    if family == "llama":
        return transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    raise ValueError(f"unknown family {family!r} (qwen2 | llama)")


def _randomize(model, seed: int) -> None:
    """Random values for every tensor, scaled so activations and logits are O(1).

    Matrices (embedding too) N(0, 1/hidden_or_fan_in), norms N(1, 0.2), biases N(0, 0.5). (With the
    usual N(0, 0.02) init a tiny model's logits are ~1e-2 and barely depend on attention, so a
    1e-4 comparison would hardly test anything.)
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith(".bias"):
                value = 0.5 * noise
            else:
                value = noise / p.shape[-1] ** 0.5
            p.copy_(value.to(p.dtype))


def make_tiny_hf_checkpoint(out_dir: str | os.PathLike, family: str = "qwen2", *,
                            vocab_size: int = 128, hidden_size: int = 64,
                            intermediate_size: Optional[int] = None, num_layers: int = 2,
                            num_heads: int = 4, num_kv_heads: int = 2, head_dim: Optional[int] = None,
                            tie_word_embeddings: bool = False, rope_theta: Optional[float] = None,
                            rope_scaling: Optional[dict] = None, max_position_embeddings: int = 4096,
                            rms_norm_eps: float = 1e-6, dtype: str = "float32", seed: int = 0,
                            max_shard_size: Optional[str | int] = None):
    """Build a random Qwen2ForCausalLM / LlamaForCausalLM, `save_pretrained` it to `out_dir`.

    `rope_scaling`: a llama3 dict (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) or None. `dtype`: the stored dtype ("float32",
    "bfloat16", "float16"). `max_shard_size` (e.g. "20KB") splits the weights over several
    safetensors files with an index. Returns the torch model in eval mode (in `dtype`).
    """
    import torch

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {_TORCH_DTYPES}, got {dtype!r}")
    if rope_theta is None:
        rope_theta = 1_000_000.0 if family == "qwen2" else 500_000.0
    config, cls = _hf_config(
        family, vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size + 32, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps, dtype=dtype)
    torch.manual_seed(seed)
    model = cls(config)
    _randomize(model, seed)
    # Cast parameters only: `model.to(dtype)` would also cast the rotary inv_freq buffer, which
    # transformers keeps in float32 when it loads a bf16/fp16 checkpoint.
    for param in model.parameters():
        param.data = param.data.to(getattr(torch, dtype))
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out_dir), **save_kw)
    return model.eval()


def hf_logits(model, tokens, positions=None):
    """float32 numpy logits [B, T, V] of a transformers causal LM (no padding, no cache)."""
    import numpy as np
    import torch

    kw = {} if positions is None else {"position_ids": torch.as_tensor(np.asarray(positions), dtype=torch.long)}
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False, **kw)
    return out.logits.float().numpy()
