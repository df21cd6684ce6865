"""Token logprob and full-vocabulary entropy at temperature 1, in one pass over the logits.

This is the single definition both the sampler and the trainer use, so the invariant
"sampler logprob/entropy == training forward logprob/entropy" holds by construction.

With m = max_v z_v, s = Σ_v e^(z_v − m) and u = Σ_v (z_v − m) e^(z_v − m):
    log Z = m + log s
    log p(y) = z_y − log Z
    H = −Σ p_v log p_v = log s − u / s
(u is taken relative to the max so that H does not cancel two large numbers.)
All in float32. With `vocab_chunk`, m is one max reduction over the logits and s, u are
accumulated over vocabulary chunks at that m (dynamic slices, so no full-size temporary is
needed beyond the logits themselves). `softmax_stats` also returns s per chunk: the sampler's
draw at temperature 1 without truncation uses the same normaliser, so it reuses m and these
chunk sums instead of passes of its own over the logits (`tepo_jax/sampling/sample.py`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class SoftmaxStats(NamedTuple):
    """Softmax statistics of float32 logits z [..., V] (see the module docstring)."""

    m: jax.Array           # [...]: max_v z_v
    chunk_sums: jax.Array  # [..., n]: Σ e^(z − m) over each of the n vocabulary chunks, in order
    s: jax.Array           # [...]: Σ_v e^(z − m), the chunk sums added in order
    u: jax.Array           # [...]: Σ_v (z − m) e^(z − m)


def _chunk_sums(zc, m, fresh):
    """(Σ e, Σ (z − m) e) over the last axis of a chunk, e = e^(z − m) where `fresh`, else 0."""
    centered = zc - m[..., None]
    e = jnp.where(fresh, jnp.exp(centered), 0.0)
    return jnp.sum(e, axis=-1), jnp.sum(centered * e, axis=-1)


def softmax_stats(z: jax.Array, vocab_chunk: Optional[int] = None) -> SoftmaxStats:
    """SoftmaxStats of float32 z [..., V]; chunks of `vocab_chunk` columns (one chunk if None).

    Chunks are dynamic slices of z (a padded or transposed copy of z would be a second
    full-size array); the last one is clamped to end at V and `fresh` drops the columns the
    previous chunk already saw: the chunking of `tepo_jax.sampling.sample.vocab_fold`.
    """
    v = z.shape[-1]
    m = jnp.max(z, axis=-1)
    if not vocab_chunk or vocab_chunk >= v:
        s, u = _chunk_sums(z, m, True)
        return SoftmaxStats(m, s[..., None], s, u)
    c, n = vocab_chunk, -(-v // vocab_chunk)

    def body(i, carry):
        s, u, sums = carry
        start = jnp.minimum(i * c, v - c)
        zc = jax.lax.dynamic_slice_in_dim(z, start, c, axis=z.ndim - 1)
        sc, uc = _chunk_sums(zc, m, start + jnp.arange(c) >= i * c)
        return s + sc, u + uc, jax.lax.dynamic_update_index_in_dim(sums, sc, i, axis=z.ndim - 1)

    zero = jnp.zeros(z.shape[:-1], z.dtype)
    s, u, sums = jax.lax.fori_loop(0, n, body, (zero, zero, jnp.zeros(z.shape[:-1] + (n,), z.dtype)))
    return SoftmaxStats(m, sums, s, u)


def logprob_entropy_from_stats(z: jax.Array, targets: jax.Array,
                               stats: SoftmaxStats) -> tuple[jax.Array, jax.Array]:
    """(logprob of targets, entropy), float32 [...], from float32 z [..., V] and its stats."""
    log_s = jnp.log(stats.s)
    target_logit = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - stats.m - log_s, log_s - stats.u / stats.s


def logprob_and_entropy(logits: jax.Array, targets: jax.Array,
                        vocab_chunk: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] (any float dtype), targets int[...] -> (logprob, entropy), float32 [...]."""
    z = logits.astype(jnp.float32)
    return logprob_entropy_from_stats(z, targets, softmax_stats(z, vocab_chunk))
