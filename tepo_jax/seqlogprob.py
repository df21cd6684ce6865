"""Per-token logprob and entropy of whole sequences, chunked so memory does not scale with T × V.

The training forward pass needs log p(token) for every token of [B, T] sequences. Materialising
[B, T, V] float32 logits (and their gradient) is the largest buffer of the step for real vocab
sizes (152k for Qwen2.5). Here the sequence axis is cut into chunks of `chunk_size` positions;
a scan computes one chunk's logits at a time and reduces them immediately with
`tepo_jax.logprobs.logprob_and_entropy` (the one definition the sampler also uses). The chunk
body is `jax.checkpoint`ed, so the backward pass recomputes a chunk's logits instead of storing
them: peak memory is O(B · chunk_size · V) in both directions.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from tepo_jax.logprobs import logprob_and_entropy


def _chunk_logprob_entropy(hidden, kernel, targets, vocab_chunk, entropy_grad):
    """hidden [B, C, D], kernel [D, V], targets int[B, C] -> (logprob, entropy) float32 [B, C]."""
    logits = jnp.einsum("BCD,DV->BCV", hidden, kernel.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    lp, ent = logprob_and_entropy(logits, targets, vocab_chunk)
    return lp, (ent if entropy_grad else jax.lax.stop_gradient(ent))


def sequence_logprob_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                             chunk_size: Optional[int] = 256,
                             vocab_chunk: Optional[int] = None,
                             entropy_grad: bool = False) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D] (hidden[t] predicts targets[t]), kernel [D, V], targets int[B, T].

    Returns (logprob, entropy), float32 [B, T], of targets[t] under softmax(hidden[t] @ kernel).
    `chunk_size=None` (or >= T) computes all logits at once (the reference path).
    The entropy is a metric unless `entropy_grad` (e.g. an entropy bonus): by default it is
    stop-gradient'ed inside the chunk, so the backward scan does no work for it.
    """
    b, t, d = hidden.shape
    if not chunk_size or chunk_size >= t:
        return _chunk_logprob_entropy(hidden, kernel, targets, vocab_chunk, entropy_grad)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, n·C, D] -> [n, B, C, D]: the batch axis (and its sharding) stays where it was.
    hs = jnp.moveaxis(hidden.reshape(b, n, chunk_size, d), 1, 0)
    ys = jnp.moveaxis(targets.reshape(b, n, chunk_size), 1, 0)
    body = jax.checkpoint(lambda h, y, k: _chunk_logprob_entropy(h, k, y, vocab_chunk, entropy_grad))

    def step(_, xs):
        return None, body(xs[0], xs[1], kernel)

    _, (lp, ent) = jax.lax.scan(step, None, (hs, ys))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk_size)[:, :t]  # noqa: E731
    return unchunk(lp), unchunk(ent)


def prediction_mask(segment_ids: jax.Array) -> jax.Array:
    """bool[B, T]: token t has a prediction (t > 0, same non-padding segment as t − 1)."""
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return (segment_ids == prev) & (segment_ids != 0)


def token_logprob_entropy(hidden: jax.Array, kernel: jax.Array, tokens: jax.Array,
                          segment_ids: jax.Array, chunk_size: Optional[int] = 256,
                          vocab_chunk: Optional[int] = None,
                          entropy_grad: bool = False) -> tuple[jax.Array, jax.Array]:
    """Batch-convention logprob/entropy [B, T]: value[t] belongs to token t (see rl/batch.py).

    logprob[t] = log p(tokens[t] | tokens[<t]) from hidden[t − 1]; entropy[t] = entropy of that
    distribution (the one token t was sampled from). 0 where there is no prediction.
    """
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    lp, ent = sequence_logprob_entropy(hidden, kernel, next_tokens, chunk_size, vocab_chunk, entropy_grad)
    has_pred = prediction_mask(segment_ids)
    shift = lambda x: jnp.where(has_pred, jnp.pad(x[:, :-1], ((0, 0), (1, 0))), 0.0)  # noqa: E731
    return shift(lp), shift(ent)
