"""Real models with predictable behaviour, for tests of the sampler and the agent loop.

`bigram_decoder` is an ordinary Decoder whose blocks are switched off (zero attention and MLP
output projections) and whose embedding / unembedding encode a successor table: after RMSNorm a
one-hot embedding becomes 4·one-hot, so the successor's logit is 4·`logit` and every other
logit is 0. Greedy decoding then follows the table exactly, while sampling, logprobs and
entropies are those of a real softmax over the whole vocabulary.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import Decoder


def bigram_decoder(vocab_size: int, successor: Mapping[int, int], *, hidden_size: int = 16,
                   logit: float = 3.0, family: str = "qwen2") -> Decoder:
    """A Decoder that, after token a, puts logit 4·`logit` on successor[a] (others 0)."""
    sources = sorted(successor)
    if len(sources) > hidden_size:
        raise ValueError(f"{len(sources)} source tokens need hidden_size >= {len(sources)}")
    cfg = ModelConfig(family=family, vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=hidden_size // 2, qkv_bias=family == "qwen2", tie_word_embeddings=False)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    embed = np.zeros((vocab_size, hidden_size), np.float32)
    head = np.zeros((hidden_size, vocab_size), np.float32)
    for dim, token in enumerate(sources):
        embed[token, dim] = 1.0
        head[dim, successor[token]] = logit
    model.embed[...] = jnp.asarray(embed)
    model.lm_head[...] = jnp.asarray(head)
    for layer in model.layers:  # blocks add nothing to the residual stream
        layer.attn.o_proj[...] = jnp.zeros_like(layer.attn.o_proj[...])
        layer.mlp.down_proj[...] = jnp.zeros_like(layer.mlp.down_proj[...])
    return model


def chains_to_successors(chains) -> dict[int, int]:
    """{a: b} for every consecutive pair of every chain (a token must have one successor)."""
    out: dict[int, int] = {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            if out.setdefault(a, b) != b:
                raise ValueError(f"token {a} has two successors ({out[a]} and {b})")
    return out
