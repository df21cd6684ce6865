"""Token selection from raw logits: temperature, top-k, top-p, greedy; per-slot seeds.

Everything here is pure and shape-static (jit-friendly) and works row-wise on [B, V] logits
with per-row parameters, so one compiled function serves any mix of requests.

Sort-free truncation. Top-k and top-p need a threshold, not an order: keep the tokens whose
logit is >= t. We find t by bisection over the 2^32 float32 values, ordered through the
monotone float -> uint32 map `_sortable` (exact after 32 halvings, no tolerance):
  top-k: the largest t with  #{v : z_v >= t} >= k           (= the k-th largest logit)
  top-p: the largest t with  Σ_{z_v >= t} p_v >= top_p       (p = softmax(z/T) over the top-k set)
which is transformers' order (temperature, then top-k, then top-p on the renormalised top-k
distribution) and its "smallest set whose mass reaches top_p" rule. Ties at the threshold are
all kept. Each bisection step is one fused reduction over [B, V] (no sort, no second [B, V]
array); the 64 steps only run when some row truncates (`lax.cond`).

Sampling is Gumbel-max, argmax(z/T + g) over the kept tokens, which is exactly categorical
sampling and decomposes over vocabulary chunks (a running (max, argmax)), so with
`vocab_chunk` it never materialises [B, V] noise. The noise of sequence b's token at
position i comes from fold_in(key(seed_b), i): the same seed gives the same tokens whatever
else is in the batch and however the decode is split into device calls.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

_NEG_INF = -jnp.inf


class SlotSampling(NamedTuple):
    """Per-slot sampling parameters, arrays [B]."""

    temperature: jax.Array  # float32; ignored where greedy
    top_p: jax.Array        # float32 in (0, 1]; 1 = off
    top_k: jax.Array        # int32; 0 = off
    greedy: jax.Array       # bool
    seed: jax.Array         # uint32


def _sortable(z: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (flip all bits of negatives, the sign bit of others)."""
    u = lax.bitcast_convert_type(z, jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _bisect(pred, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Largest uint32 t in [lo, hi) with pred(t), given pred(lo) true, pred(hi) false, pred monotone."""
    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return lax.fori_loop(0, 32, body, (lo, hi))[0]


def truncation_threshold(z: jax.Array, keys: jax.Array, s: SlotSampling, inv_t: jax.Array) -> jax.Array:
    """uint32[B]: the sortable key of the smallest kept logit per row (top-k, then top-p)."""
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1) + 1  # finite logits: the max key is far below 2^32 - 1
    k = s.top_k[:, None]
    # top-k: count(keys >= t) >= k; k = 0 or k >= V keeps everything (t = lo).
    t_k = _bisect(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k[:, 0], lo, hi)
    t_k = jnp.where((s.top_k > 0) & (s.top_k < z.shape[-1]), t_k, lo)
    # top-p on the top-k set, probabilities at temperature T (unnormalised: e^((z - m)/T)).
    m = jnp.max(z, axis=-1, keepdims=True)

    def mass(t):
        e = jnp.exp((z - m) * inv_t[:, None])
        return jnp.sum(jnp.where(keys >= t[:, None], e, 0.0), axis=-1)

    total = mass(t_k)
    t_p = _bisect(lambda t: mass(t) >= s.top_p * total, t_k, hi)
    return jnp.where(s.top_p < 1.0, t_p, t_k)


def _gumbel_argmax(z: jax.Array, keep, inv_t, rng_keys, vocab_chunk: Optional[int]) -> jax.Array:
    """argmax_v (z_v/T + g_v) over kept v; keep(offset, keys_chunk) -> bool mask; int32[B]."""
    b, v = z.shape
    chunk = v if not vocab_chunk or vocab_chunk >= v else vocab_chunk
    n = -(-v // chunk)

    def chunk_best(c, zc, col):
        noise = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, c), (zc.shape[-1],)))(rng_keys)
        score = jnp.where(keep(zc) & (col < v), zc * inv_t[:, None] + noise, _NEG_INF)
        idx = jnp.argmax(score, axis=-1)
        return jnp.take_along_axis(score, idx[:, None], -1)[:, 0], idx.astype(jnp.int32) + c * chunk

    if n == 1:
        return chunk_best(0, z, jnp.arange(v)[None])[1]
    pad = n * chunk - v
    zp = jnp.pad(z, ((0, 0), (0, pad)))
    chunks = jnp.moveaxis(zp.reshape(b, n, chunk), 1, 0)

    def body(carry, xs):
        best, arg = carry
        c, zc = xs
        val, idx = chunk_best(c, zc, c * chunk + jnp.arange(chunk)[None])
        better = val > best
        return (jnp.where(better, val, best), jnp.where(better, idx, arg)), None

    init = (jnp.full((b,), _NEG_INF, z.dtype), jnp.zeros((b,), jnp.int32))
    return lax.scan(body, init, (jnp.arange(n), chunks))[0][1]


def sample_tokens(logits: jax.Array, s: SlotSampling, positions: jax.Array,
                  vocab_chunk: Optional[int] = None) -> jax.Array:
    """Next token per row: int32[B]. logits: float32 [B, V] (raw); positions: int32[B], the
    position the sampled token will occupy (the per-token index of the random stream)."""
    z = logits.astype(jnp.float32)
    inv_t = jnp.where(s.greedy, 1.0, 1.0 / jnp.maximum(s.temperature, 1e-6)).astype(jnp.float32)
    rng_keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions)
    truncates = jnp.any(~s.greedy & (((s.top_k > 0) & (s.top_k < z.shape[-1])) | (s.top_p < 1.0)))
    lowest = jnp.zeros((z.shape[0],), jnp.uint32)
    threshold = lax.cond(truncates, lambda: truncation_threshold(z, _sortable(z), s, inv_t), lambda: lowest)

    def keep(zc):
        return _sortable(zc) >= threshold[:, None]

    sampled = _gumbel_argmax(z, keep, inv_t, rng_keys, vocab_chunk)
    return jnp.where(s.greedy, jnp.argmax(z, axis=-1).astype(jnp.int32), sampled)
