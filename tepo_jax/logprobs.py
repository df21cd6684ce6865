"""Token logprob and full-vocabulary entropy at temperature 1, in one pass over the logits.

This is the single definition both the sampler and the trainer use, so the invariant
"sampler logprob/entropy == training forward logprob/entropy" holds by construction.

With m = max_v z_v, s = Σ_v e^(z_v − m) and u = Σ_v (z_v − m) e^(z_v − m):
    log Z = m + log s
    log p(y) = z_y − log Z
    H = −Σ p_v log p_v = log s − u / s
(u is taken relative to the max so that H does not cancel two large numbers.)
All in float32. With `vocab_chunk`, the three statistics are accumulated over vocabulary
chunks with a running max (the online-softmax rescaling), so no full-size temporary is needed
beyond the logits themselves.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _stats(z: jax.Array):
    """(m, s, u) over the last axis of float32 logits z."""
    m = jnp.max(z, axis=-1)
    centered = z - m[..., None]
    e = jnp.exp(centered)
    return m, jnp.sum(e, axis=-1), jnp.sum(centered * e, axis=-1)


def _merge(a, b):
    """Combine the statistics of two vocabulary chunks (online softmax).

    Re-centring u from max m_a to m: Σ (z − m) e^(z−m) = e^(m_a−m) · (u_a + (m_a − m) · s_a).
    """
    (ma, sa, ua), (mb, sb, ub) = a, b
    m = jnp.maximum(ma, mb)
    ca, cb = jnp.exp(ma - m), jnp.exp(mb - m)
    return m, sa * ca + sb * cb, ca * (ua + (ma - m) * sa) + cb * (ub + (mb - m) * sb)


def _chunked_stats(z: jax.Array, chunk: int):
    # Chunks are dynamic slices of z (a padded or transposed copy of z would be a second
    # full-size array); the last one is clamped to end at V and the columns the previous
    # chunk already saw are set far below any logit (finite, so they add exactly 0 to s and u).
    v = z.shape[-1]

    def body(i, carry):
        start = jnp.minimum(i * chunk, v - chunk)
        zc = jax.lax.dynamic_slice_in_dim(z, start, chunk, axis=z.ndim - 1)
        fresh = start + jnp.arange(chunk) >= i * chunk
        return _merge(carry, _stats(jnp.where(fresh, zc, -1e30)))

    init = (jnp.full(z.shape[:-1], -1e30, z.dtype), jnp.zeros(z.shape[:-1], z.dtype),
            jnp.zeros(z.shape[:-1], z.dtype))
    return jax.lax.fori_loop(0, -(-v // chunk), body, init)


def logprob_and_entropy(logits: jax.Array, targets: jax.Array,
                        vocab_chunk: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] (any float dtype), targets int[...] -> (logprob, entropy), float32 [...]."""
    z = logits.astype(jnp.float32)
    m, s, u = _stats(z) if not vocab_chunk or vocab_chunk >= z.shape[-1] else _chunked_stats(z, vocab_chunk)
    log_s = jnp.log(s)
    target_logit = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - m - log_s, log_s - u / s
