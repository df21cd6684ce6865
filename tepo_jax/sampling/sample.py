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
row: the first token whose cumulative kept mass exceeds u * total. The search has two levels
so that no cumulative sum over [B, V] is formed (a scan always materialises its output, on
every backend): one pass gives the kept mass of each block of c columns ([B, n]), running sums
of those find the block holding the crossing, then a cumulative sum over that block alone
([B, c]) finds the token. At temperature 1 without truncation the block masses are the
chunk sums Σ e^(z - m) that the decode step's logprob/entropy statistics compute anyway
(`tepo_jax.logprobs.softmax_stats`, same blocks, same max): passed in as `stats`, the draw
then makes no pass over the logits of its own (the same tokens as with its own pass).
Greedy's argmax runs only when some row is greedy. Unlike Gumbel-max it needs no
random number per vocabulary entry (on CPU the threefry bits alone were ~4 [B, V] buffers and
a large share of the step). The uniform of sequence b's token at position i comes from
fold_in(key(seed_b), i): the same seed gives the same tokens whatever else is in the batch and
however the decode is split into device calls.

Memory: every pass goes through `vocab_fold`, which visits the vocabulary in chunks of
`vocab_chunk` columns (dynamic slices, no copies), so the temporaries XLA materialises are
[B, chunk], never a second [B, V] array. With vocab_chunk None each pass is one elementwise +
reduction over [B, V]: no second [B, V] array where XLA fuses the elementwise work into the
reduction (TPU/GPU); XLA's CPU backend does not, and materialises the operands (hence chunks
on CPU).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from tepo_jax.logprobs import SoftmaxStats

_NEG_INF = -jnp.inf
_CDF_BLOCK = 4096  # block width of the inverse-CDF search when vocab_chunk is None


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


def _weights(zc, mask, m, inv_t, threshold):
    """Unnormalised kept probabilities e^((z - m)/T) of a chunk [B, c], 0 where truncated or
    where `mask` (broadcastable to [B, c]) is False."""
    keep = (_sortable(zc) >= threshold[:, None]) & mask
    return jnp.where(keep, jnp.exp((zc - m[:, None]) * inv_t[:, None]), 0.0)


def truncation_threshold(z: jax.Array, s: SlotSampling, inv_t: jax.Array,
                         chunk: Optional[int] = None) -> jax.Array:
    """uint32[B]: the sortable key of the smallest kept logit per row (top-k, then top-p).

    The bisections search all of [0, 2^32 - 1): key 0 keeps every token, and 2^32 - 1 (a NaN's
    key) keeps none of finite logits, so no pass is needed to bound the search.
    """
    b = z.shape[0]
    lo = jnp.zeros((b,), jnp.uint32)
    hi = jnp.full((b,), 0xFFFFFFFF, jnp.uint32)
    zero_i = jnp.zeros((b,), jnp.int32)

    def count(zz, t):  # top-k: count(keys >= t) >= k; k = 0 or k >= V keeps everything (t = lo).
        return vocab_fold(zz, chunk, lambda c, zc, col, fresh: c + jnp.sum(
            (_sortable(zc) >= t[:, None]) & fresh[None], axis=-1, dtype=jnp.int32), zero_i) >= s.top_k

    t_k = jnp.where((s.top_k > 0) & (s.top_k < z.shape[-1]), _bisect(count, z, lo, hi), lo)
    m = jnp.max(z, axis=-1)

    def mass(zz, t):  # top-p on the top-k set, probabilities at temperature T
        return vocab_fold(zz, chunk, lambda c, zc, col, fresh: c + jnp.sum(
            _weights(zc, fresh[None], m, inv_t, t), axis=-1), jnp.zeros((b,), jnp.float32))

    total = mass(z, t_k)
    t_p = _bisect(lambda zz, t: mass(zz, t) >= s.top_p * total, z, t_k, hi)
    return jnp.where(s.top_p < 1.0, t_p, t_k)


def _first(mask, fallback):
    """Per row, the first column where mask [B, n] holds, else fallback [B]."""
    return jnp.where(jnp.any(mask, axis=-1), jnp.argmax(mask, axis=-1), fallback)


def _last(mask):
    """Per row, the last column where mask [B, n] holds (0 if none)."""
    return mask.shape[-1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)


def _block_masses(z, threshold, inv_t, m, c):
    """float32 [B, n]: the kept mass Σ e^((z - m)/T) of each of vocab_fold's n blocks of c
    columns (one pass over z)."""
    b, v = z.shape
    n = -(-v // c)

    def fn(carry, zc, col, fresh):
        i, masses = carry
        mass = jnp.sum(_weights(zc, fresh[None], m, inv_t, threshold), axis=-1)
        return i + 1, lax.dynamic_update_index_in_dim(masses, mass, i, axis=1)

    return vocab_fold(z, c, fn, (jnp.int32(0), jnp.zeros((b, n), jnp.float32)))[1]


def _inverse_cdf(z, threshold, inv_t, u, chunk, m=None, masses=None):
    """Categorical sample by inverse CDF of the kept e^((z - m)/T), one uniform u per row.

    Two levels, so no cumulative sum over [B, V] is ever formed. Blocks are vocab_fold's
    chunks of c = chunk columns (_CDF_BLOCK when chunk is None). One pass over z gives each
    block's kept mass ([B, n], `_block_masses`, or `masses` when the caller has them); adding
    them up block by block finds the block where the running mass first exceeds u * total,
    and the mass before it; a cumulative sum inside that one block ([B, c], gathered per row)
    then finds the token. `m`: the row max of z, if the caller has it.
    """
    b, v = z.shape
    c = min(chunk or _CDF_BLOCK, v)
    m = jnp.max(z, axis=-1) if m is None else m
    masses = _block_masses(z, threshold, inv_t, m, c) if masses is None else masses
    n = masses.shape[1]
    total = lax.fori_loop(0, n, lambda i, t: t + masses[:, i], jnp.zeros((b,), jnp.float32))
    target = u * total

    def find_block(i, carry):
        # Every block with mass updates (block, before) until one passes the target, so if
        # rounding leaves u * total at or past the final sum, the last block with mass is used.
        run, block, before, found = carry
        new = run + masses[:, i]
        update = ~found & (new > run)
        return (new, jnp.where(update, i, block), jnp.where(update, run, before),
                found | (update & (new > target)))

    zero = jnp.zeros((b,), jnp.float32)
    init = (zero, jnp.zeros((b,), jnp.int32), zero, jnp.zeros((b,), bool))
    _, block, before, _ = lax.fori_loop(0, n, find_block, init)
    start = jnp.minimum(block * c, v - c)  # the last block ends at V, as in vocab_fold
    cols = start[:, None] + jnp.arange(c)
    w = _weights(jnp.take_along_axis(z, cols, 1), cols >= (block * c)[:, None], m, inv_t, threshold)
    hit = (before[:, None] + jnp.cumsum(w, axis=-1) > target[:, None]) & (w > 0)
    return (start + _first(hit, _last(w > 0))).astype(jnp.int32)


def _stats_blocks_fit(stats: Optional[SoftmaxStats], v: int, vocab_chunk: Optional[int]) -> bool:
    """The stats' chunk sums are the inverse-CDF search's block masses (same blocks)."""
    return stats is not None and stats.chunk_sums.shape[-1] == -(-v // min(vocab_chunk or _CDF_BLOCK, v))


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


def is_plain(temperature: float, top_p: float, top_k: int, greedy: bool, vocab_size: int) -> bool:
    """A row that draws from softmax(z) itself: temperature 1, no truncation, not greedy."""
    return not greedy and temperature == 1.0 and top_p >= 1.0 and not 0 < top_k < vocab_size


def sample_tokens(logits: jax.Array, s: SlotSampling, positions: jax.Array,
                  vocab_chunk: Optional[int] = None, stats: Optional[SoftmaxStats] = None,
                  plain: bool = False) -> jax.Array:
    """Next token per row: int32[B]. logits: float32 [B, V] (raw); positions: int32[B], the
    position the sampled token will occupy (the per-token index of the random stream).

    `stats`: `tepo_jax.logprobs.softmax_stats(logits, vocab_chunk)`, when the caller computes
    it anyway (the decode step, for logprob/entropy). A row at temperature 1 that does not
    truncate draws from the same normaliser: its block masses are the stats' chunk sums (the
    same sums of e^(z - m) over the same blocks), so the draw needs no pass of its own over
    the logits; the other rows' masses take one pass, run only when some row needs it.

    `plain` (static): the caller promises every row is plain (`is_plain`: temperature 1, no
    top-k/top-p, not greedy; the RL rollout). Only the inverse-CDF draw is then compiled, not
    the truncation bisections, the tempered masses and the argmax that no row would run;
    the tokens are the same as without the promise.
    """
    z = logits.astype(jnp.float32)
    b, v = z.shape
    u = jax.vmap(lambda seed, pos: jax.random.uniform(jax.random.fold_in(jax.random.key(seed), pos)))(
        s.seed, positions)
    lowest = jnp.zeros((b,), jnp.uint32)
    if plain:
        ones = jnp.ones((b,), jnp.float32)
        m, masses = (stats.m, stats.chunk_sums) if _stats_blocks_fit(stats, v, vocab_chunk) else (None, None)
        return _inverse_cdf(z, lowest, ones, u, vocab_chunk, m, masses)
    inv_t = jnp.where(s.greedy, 1.0, 1.0 / jnp.maximum(s.temperature, 1e-6)).astype(jnp.float32)
    truncates = jnp.any(~s.greedy & (((s.top_k > 0) & (s.top_k < v)) | (s.top_p < 1.0)))
    threshold = lax.cond(truncates, lambda: truncation_threshold(z, s, inv_t, vocab_chunk), lambda: lowest)
    c = min(vocab_chunk or _CDF_BLOCK, v)
    if _stats_blocks_fit(stats, v, vocab_chunk):
        m = stats.m
        from_stats = s.greedy | ((inv_t == 1.0) & (threshold == 0))  # greedy rows: not drawn
        masses = lax.cond(jnp.all(from_stats), lambda: stats.chunk_sums,
                          lambda: jnp.where(from_stats[:, None], stats.chunk_sums,
                                            _block_masses(z, threshold, inv_t, m, c)))
    else:
        m, masses = jnp.max(z, axis=-1), None
    sampled = _inverse_cdf(z, threshold, inv_t, u, vocab_chunk, m, masses)
    # The argmax is a pass of its own (a variadic reduction): only when some row is greedy.
    return lax.cond(jnp.any(s.greedy), lambda: jnp.where(s.greedy, _argmax(z, vocab_chunk), sampled),
                    lambda: sampled)
