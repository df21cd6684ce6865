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

Sampling is the inverse CDF of the kept, temperature-scaled distribution with ONE uniform per
row: one pass sums the kept mass, a second walks the vocabulary with a running cumulative sum
and takes the first token past u * total. Unlike Gumbel-max it needs no random number per
vocabulary entry (on CPU the threefry bits alone were ~4 [B, V] buffers and a large share of
the step). The uniform of sequence b's token at position i comes from fold_in(key(seed_b), i):
the same seed gives the same tokens whatever else is in the batch and however the decode is
split into device calls.

Memory: every pass goes through `vocab_fold`, which visits the vocabulary in chunks of
`vocab_chunk` columns (dynamic slices, no copies), so the temporaries XLA materialises are
[B, chunk], never a second [B, V] array — XLA's CPU backend does not fuse elementwise work
into reductions, so an unchunked pass would materialise its operands at full size.
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


def vocab_fold(z: jax.Array, chunk: Optional[int], fn, init):
    """Fold fn(carry, zc [B, c], col int[c], fresh bool[c]) over vocabulary chunks of z [B, V].

    Chunks are dynamic slices of z (no padded or transposed copy); the last one is clamped to
    end at V and `fresh` marks its columns not already seen by the previous chunk. With
    chunk None (or >= V) fn sees all of z at once: best where XLA fuses elementwise work into
    reductions (TPU/GPU); on CPU chunking bounds the [B, c] temporaries XLA materialises.
    """
    v = z.shape[-1]
    c = v if not chunk or chunk >= v else chunk
    n = -(-v // c)
    if n == 1:
        return fn(init, z, jnp.arange(v), jnp.ones((v,), bool))

    def body(i, carry):
        start = jnp.minimum(i * c, v - c)
        col = start + jnp.arange(c)
        return fn(carry, lax.dynamic_slice_in_dim(z, start, c, axis=1), col, col >= i * c)

    return lax.fori_loop(0, n, body, init)


def _bisect(pred, z: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Largest uint32 t in [lo, hi) with pred(z, t), given pred(z, lo) true, pred(z, hi) false,
    pred monotone in t.

    z goes through the loop behind an optimization barrier so that XLA cannot hoist pred's
    elementwise work on z (exp, the sortable keys) out of the loop into [B, V] buffers.
    """
    def body(_, carry):
        lo, hi, z = carry
        lo, hi, zz = lax.optimization_barrier((lo, hi, z))
        mid = lo + (hi - lo) // 2
        ok = pred(zz, mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid), z

    return lax.fori_loop(0, 32, body, (lo, hi, z))[0]


def _weights(zc, fresh, m, inv_t, threshold):
    """Unnormalised kept probabilities e^((z - m)/T) of a chunk, 0 where truncated or stale."""
    keep = (_sortable(zc) >= threshold[:, None]) & fresh[None]
    return jnp.where(keep, jnp.exp((zc - m[:, None]) * inv_t[:, None]), 0.0)


def truncation_threshold(z: jax.Array, s: SlotSampling, inv_t: jax.Array,
                         chunk: Optional[int] = None) -> jax.Array:
    """uint32[B]: the sortable key of the smallest kept logit per row (top-k, then top-p)."""
    b = z.shape[0]
    big = jnp.full((b,), 0xFFFFFFFF, jnp.uint32)
    lo, hi = vocab_fold(z, chunk, lambda c, zc, col, fresh: (
        jnp.minimum(c[0], jnp.min(jnp.where(fresh, _sortable(zc), big[:, None]), axis=-1)),
        jnp.maximum(c[1], jnp.max(_sortable(zc), axis=-1))), (big, jnp.zeros((b,), jnp.uint32)))
    hi = hi + 1  # finite logits: the max key is far below 2^32 - 1
    zero_i = jnp.zeros((b,), jnp.int32)

    def count(zz, t):  # top-k: count(keys >= t) >= k; k = 0 or k >= V keeps everything (t = lo).
        return vocab_fold(zz, chunk, lambda c, zc, col, fresh: c + jnp.sum(
            (_sortable(zc) >= t[:, None]) & fresh[None], axis=-1, dtype=jnp.int32), zero_i) >= s.top_k

    t_k = jnp.where((s.top_k > 0) & (s.top_k < z.shape[-1]), _bisect(count, z, lo, hi), lo)
    m = jnp.max(z, axis=-1)

    def mass(zz, t):  # top-p on the top-k set, probabilities at temperature T
        return vocab_fold(zz, chunk, lambda c, zc, col, fresh: c + jnp.sum(
            _weights(zc, fresh, m, inv_t, t), axis=-1), jnp.zeros((b,), jnp.float32))

    total = mass(z, t_k)
    t_p = _bisect(lambda zz, t: mass(zz, t) >= s.top_p * total, z, t_k, hi)
    return jnp.where(s.top_p < 1.0, t_p, t_k)


def _inverse_cdf(z, threshold, inv_t, u, chunk):
    """Categorical sample by inverse CDF of the kept e^((z - m)/T), one uniform u per row.

    Pass 1 sums the kept mass; pass 2 walks the chunks with a running cumulative sum and
    records the first column where it exceeds u * total. Temporaries are [B, chunk].
    """
    b, v = z.shape
    m = jnp.max(z, axis=-1)
    total = vocab_fold(z, chunk, lambda c, zc, col, fresh: c + jnp.sum(
        _weights(zc, fresh, m, inv_t, threshold), axis=-1), jnp.zeros((b,), jnp.float32))
    target = u * total

    def walk(carry, zc, col, fresh):
        before, found, last = carry
        w = _weights(zc, fresh, m, inv_t, threshold)
        cum = before[:, None] + jnp.cumsum(w, axis=-1)
        hit = (cum > target[:, None]) & (w > 0)
        first = jnp.min(jnp.where(hit, col[None], v), axis=-1)
        last = jnp.maximum(last, jnp.max(jnp.where(w > 0, col[None], -1), axis=-1))
        return cum[:, -1], jnp.minimum(found, first), last

    init = (jnp.zeros((b,), jnp.float32), jnp.full((b,), v, jnp.int32), jnp.full((b,), -1, jnp.int32))
    _, found, last = vocab_fold(z, chunk, walk, init)
    # Rounding can leave u * total at or past the final cumulative sum: take the last kept token.
    return jnp.where(found < v, found, jnp.maximum(last, 0)).astype(jnp.int32)


def _argmax(z, chunk):
    b = z.shape[0]

    def fn(carry, zc, col, fresh):
        best, arg = carry
        zc = jnp.where(fresh[None], zc, _NEG_INF)
        i = jnp.argmax(zc, axis=-1)
        val = jnp.take_along_axis(zc, i[:, None], -1)[:, 0]
        better = val > best  # strict: the first maximum wins, as in jnp.argmax
        return jnp.where(better, val, best), jnp.where(better, col[i], arg)

    return vocab_fold(z, chunk, fn, (jnp.full((b,), _NEG_INF), jnp.zeros((b,), jnp.int32)))[1]


def sample_tokens(logits: jax.Array, s: SlotSampling, positions: jax.Array,
                  vocab_chunk: Optional[int] = None) -> jax.Array:
    """Next token per row: int32[B]. logits: float32 [B, V] (raw); positions: int32[B], the
    position the sampled token will occupy (the per-token index of the random stream)."""
    z = logits.astype(jnp.float32)
    inv_t = jnp.where(s.greedy, 1.0, 1.0 / jnp.maximum(s.temperature, 1e-6)).astype(jnp.float32)
    u = jax.vmap(lambda seed, pos: jax.random.uniform(jax.random.fold_in(jax.random.key(seed), pos)))(
        s.seed, positions)
    truncates = jnp.any(~s.greedy & (((s.top_k > 0) & (s.top_k < z.shape[-1])) | (s.top_p < 1.0)))
    lowest = jnp.zeros((z.shape[0],), jnp.uint32)
    threshold = lax.cond(truncates, lambda: truncation_threshold(z, s, inv_t, vocab_chunk), lambda: lowest)
    sampled = _inverse_cdf(z, threshold, inv_t, u, vocab_chunk)
    return jnp.where(s.greedy, _argmax(z, vocab_chunk), sampled)
