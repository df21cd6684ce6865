"""Per-token logprob and entropy of whole sequences, chunked so memory does not scale with T × V.

The training forward pass needs log p(token) for every token of [B, T] sequences. Materialising
[B, T, V] float32 logits (and their gradient) is the largest buffer of the step for real vocab
sizes (152k for Qwen2.5). Here the sequence axis is cut into chunks of `chunk_size` positions;
a scan computes one chunk's logits at a time and reduces them immediately with
`tepo_jax.logprobs.logprob_and_entropy` (the one definition the sampler also uses). The backward
pass recomputes a chunk's logits instead of storing them: peak memory is O(B · chunk_size · V)
in both directions.

The chunk has a custom VJP (entropy as a metric, the default): the forward keeps only
log Z = target_logit − logprob per token, and the backward recomputes the logits once and forms
d logits = g · (onehot(y) − exp(z − log Z)) in one pass, the closed form of the softmax
gradient. (Autodiff of a `jax.checkpoint`ed chunk instead re-ran the max / exp-sum / entropy
passes over [B, C, V] and differentiated through the max: three more passes per chunk.)
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from tepo_jax.logprobs import logprob_and_entropy


def _logits(hidden, kernel):
    return jnp.einsum("BCD,DV->BCV", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def _chunk_logprob_entropy(hidden, kernel, targets, vocab_chunk, entropy_grad):
    """hidden [B, C, D], kernel [D, V], targets int[B, C] -> (logprob, entropy) float32 [B, C]."""
    if not entropy_grad:
        return _chunk_metric_entropy(hidden, kernel, targets, vocab_chunk)
    return logprob_and_entropy(_logits(hidden, kernel), targets, vocab_chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_metric_entropy(hidden, kernel, targets, vocab_chunk):
    """`_chunk_logprob_entropy` whose entropy carries no gradient (a metric)."""
    return logprob_and_entropy(_logits(hidden, kernel), targets, vocab_chunk)


def _chunk_fwd(hidden, kernel, targets, vocab_chunk):
    logits = _logits(hidden, kernel)
    lp, ent = logprob_and_entropy(logits, targets, vocab_chunk)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (lp, ent), (hidden, kernel, targets, target_logit - lp)   # last: log Z [B, C]


def _chunk_bwd(vocab_chunk, res, cts):
    hidden, kernel, targets, log_z = res
    g = cts[0]                                                        # the entropy's is dropped
    logits = _logits(hidden, kernel)
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    dz = g[..., None] * (onehot - jnp.exp(logits - log_z[..., None]))  # d logp / d z, [B, C, V]
    dz = dz.astype(hidden.dtype)
    d_hidden = jnp.einsum("BCV,DV->BCD", dz, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_kernel = jnp.einsum("BCD,BCV->DV", hidden, dz,
                          preferred_element_type=jnp.float32).astype(kernel.dtype)
    return d_hidden, d_kernel, None


_chunk_metric_entropy.defvjp(_chunk_fwd, _chunk_bwd)


def sequence_logprob_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                             chunk_size: Optional[int] = 256,
                             vocab_chunk: Optional[int] = None,
                             entropy_grad: bool = False,
                             needed: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D] (hidden[t] predicts targets[t]), kernel [D, V], targets int[B, T].

    Returns (logprob, entropy), float32 [B, T], of targets[t] under softmax(hidden[t] @ kernel).
    `chunk_size=None` (or >= T) computes all logits at once (the reference path).
    The entropy is a metric unless `entropy_grad` (e.g. an entropy bonus): by default it is
    stop-gradient'ed inside the chunk, so the backward scan does no work for it.

    `needed` (bool[B, T], optional): the positions whose values are used; the others may be
    returned as 0. The head (the [D, V] matmul, most of a small model's step) then runs only
    on chunks that hold a needed position (`_needed_positions_first`).
    """
    b, t, d = hidden.shape
    if needed is not None and chunk_size:
        return _needed_positions_first(hidden, kernel, targets, needed, chunk_size, vocab_chunk, entropy_grad)
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
    # Entropy as a metric: the custom VJP saves only log Z per chunk. With an entropy gradient,
    # the checkpointed body has autodiff recompute the chunk's logits in the backward pass.
    chunk_fn = lambda h, y, k: _chunk_logprob_entropy(h, k, y, vocab_chunk, entropy_grad)  # noqa: E731
    body = jax.checkpoint(chunk_fn) if entropy_grad else chunk_fn

    def scan_body(_, xs):
        return None, body(xs[0], xs[1], kernel)

    _, (lp, ent) = jax.lax.scan(scan_body, None, (hs, ys))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk_size)[:, :t]  # noqa: E731
    return unchunk(lp), unchunk(ent)


# Rows (B·C) of a chunk's [B·C, D] x [D, V] head matmul when skipping: chunks small enough
# that little of a partly needed one is waste, big enough that the matmul stays efficient (on a
# 2-core AVX2 host, head fwd+bwd of B=4, T=512, D=512, V=32k with 3/4 needed: 5.7 s whole,
# 4.6 s at 128 rows, 3.6 s at 256-512 rows, 4.5 s at 1024).
SKIP_CHUNK_ROWS = 512


def _needed_positions_first(hidden, kernel, targets, needed, chunk_size, vocab_chunk, entropy_grad):
    """`sequence_logprob_entropy` over the needed positions only, with static shapes.

    Each row's positions are reordered, needed ones first (a stable sort, row-local, so the
    batch sharding holds), and cut into chunks; a chunk past every row's needed count is
    skipped by `lax.cond` (forward and backward), so the head runs on about max-row-count
    positions instead of T. In RL batches the prompts, tool results and padding are a third
    to a half of T. The values are put back in place; skipped positions read 0.
    """
    b, t, d = hidden.shape
    chunk = min(chunk_size, t, max(16, 1 << (SKIP_CHUNK_ROWS // b).bit_length() - 1))  # a power of two
    n = -(-t // chunk)
    order = jnp.argsort(~needed, axis=1, stable=True)                       # needed first
    pad = n * chunk - t
    hs = jnp.pad(jnp.take_along_axis(hidden, order[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))
    ys = jnp.pad(jnp.take_along_axis(targets, order, axis=1), ((0, 0), (0, pad)))
    active = jnp.arange(n) * chunk < jnp.max(jnp.sum(needed, axis=1))       # chunk holds a needed one
    hs = jnp.moveaxis(hs.reshape(b, n, chunk, d), 1, 0)
    ys = jnp.moveaxis(ys.reshape(b, n, chunk), 1, 0)
    chunk_fn = lambda h, y, k: _chunk_logprob_entropy(h, k, y, vocab_chunk, entropy_grad)  # noqa: E731
    body = jax.checkpoint(chunk_fn) if entropy_grad else chunk_fn
    zeros = jnp.zeros((b, chunk), jnp.float32)

    def scan_body(_, xs):
        h, y, on = xs
        return None, jax.lax.cond(on, lambda: body(h, y, kernel), lambda: (zeros, zeros))

    _, (lp, ent) = jax.lax.scan(scan_body, None, (hs, ys, active))
    inverse = jnp.argsort(order, axis=1)
    unsort = lambda x: jnp.take_along_axis(jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t], inverse, axis=1)  # noqa: E731
    return unsort(lp), unsort(ent)


def prediction_mask(segment_ids: jax.Array) -> jax.Array:
    """bool[B, T]: token t has a prediction (t > 0, same non-padding segment as t − 1)."""
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return (segment_ids == prev) & (segment_ids != 0)


def token_logprob_entropy(hidden: jax.Array, kernel: jax.Array, tokens: jax.Array,
                          segment_ids: jax.Array, chunk_size: Optional[int] = 256,
                          vocab_chunk: Optional[int] = None,
                          entropy_grad: bool = False,
                          needed: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Batch-convention logprob/entropy [B, T]: value[t] belongs to token t (see rl/batch.py).

    logprob[t] = log p(tokens[t] | tokens[<t]) from hidden[t − 1]; entropy[t] = entropy of that
    distribution (the one token t was sampled from). 0 where there is no prediction, and where
    `needed` (bool[B, T], batch convention: the tokens whose values are used) is False.
    """
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    if needed is not None:   # token t's value comes from hidden[t − 1]
        needed = jnp.pad(needed[:, 1:], ((0, 0), (0, 1)))
    lp, ent = sequence_logprob_entropy(hidden, kernel, next_tokens, chunk_size, vocab_chunk, entropy_grad,
                                       needed)
    has_pred = prediction_mask(segment_ids)
    shift = lambda x: jnp.where(has_pred, jnp.pad(x[:, :-1], ((0, 0), (1, 0))), 0.0)  # noqa: E731
    return shift(lp), shift(ent)
