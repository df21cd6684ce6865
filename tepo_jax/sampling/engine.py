"""The jitted device side of the sampler: chunked prefill and a multi-step decode loop.

Both are pure functions of (param state, KV cache, per-slot arrays); the model graph is bound
once with `nnx.split`, so jit sees the parameters as explicit inputs and compiles once per
static shape: (window bucket, prefill chunk) for prefill, (window bucket) for decode, and for
decode once more where a batch holds a slot that is not plain (tempered, truncating or greedy):
a batch of plain slots (the RL rollout) runs a program without those paths, whose trace and
compile take a quarter to a third less time (1.4-1.5 -> 1.1 s for the rl_step benchmark's
model, 1.9-2.0 -> 1.1-1.5 s for the sampler benchmark's, on a 2-core AVX-512 host).

Window. The cache holds `max_len` positions but a call only needs the positions its sequences
use, so each call attends over (and writes) the first `window` positions only: the window is
sliced out of the donated cache once per call, carried through the loop, and written back in
place. Decode time therefore follows the sequence length, not the cache size.

Decode loop (`lax.while_loop`, up to `n_steps` steps, exits when no slot is active). Each slot
feeds its pending token (the last token of its sequence, not yet in the cache) at its
position; the step writes that token's keys/values, samples the next token from the raw
logits, and emits (token, logprob, entropy) into [B, N] buffers at the slot's own column
counter. Logprob and entropy come from `tepo_jax.logprobs` (`softmax_stats`, then
`logprob_entropy_from_stats`) on the fp32 logits before truncation, at temperature 1 or at the
policy temperature τ (`logit_scale` = 1/τ): the trainer's definition. The same statistics (max,
chunk sums of e^(z - m)) are the draw's normaliser for rows at that temperature without
truncation, so per step the logits are read by
one max, one exp pass and the gathered block of the draw. A slot stops on a stop token id
(eos), on its max_tokens, or when the cache is full.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from tepo_jax.logprobs import logprob_entropy_from_stats, softmax_stats
from tepo_jax.models.decoder import LayerCache, build_abstract, init_cache
from tepo_jax.sampling.sample import SlotSampling, sample_tokens
from tepo_jax.xla_options import program_options

# Device-side finish codes (host maps them to the FINISH_* strings).
RUNNING, STOP_EOS, STOP_MAX_TOKENS, STOP_LENGTH = 0, 1, 2, 3


class SlotState(NamedTuple):
    """Per-slot decode state, arrays [B] (stop_ids [B, E], -1 padded)."""

    tokens: jax.Array      # int32: pending token, input of the next step
    positions: jax.Array   # int32: its position
    active: jax.Array      # bool
    generated: jax.Array   # int32: tokens sampled in the current turn
    max_tokens: jax.Array  # int32: the turn's budget
    stop_ids: jax.Array    # int32 [B, E]
    sampling: SlotSampling


class DecodeOut(NamedTuple):
    """What one decode call returns besides the cache. Buffers are [B, N]; column j < count[b]
    holds slot b's j-th token of this call."""

    tokens: jax.Array      # int32 [B]: pending token after the call
    positions: jax.Array   # int32 [B]
    active: jax.Array      # bool [B]
    generated: jax.Array   # int32 [B]
    out_tokens: jax.Array  # int32 [B, N]
    logprobs: jax.Array    # float32 [B, N]
    entropies: jax.Array   # float32 [B, N]
    count: jax.Array       # int32 [B]
    reason: jax.Array      # int32 [B]: RUNNING or a STOP_* code
    steps: jax.Array       # int32 []: loop iterations run


def _window(cache, window: int):
    if window == cache[0].length:
        return cache
    return tuple(LayerCache(c.k[..., :window], c.v[:, :, :window]) for c in cache)


def _unwindow(cache, win_cache, window: int, sharding):
    if window != cache[0].length:
        win_cache = tuple(LayerCache(lax.dynamic_update_slice(c.k, w.k, (0, 0, 0, 0)),
                                     lax.dynamic_update_slice(c.v, w.v, (0, 0, 0, 0)))
                          for c, w in zip(cache, win_cache))
    if sharding is not None:
        win_cache = jax.lax.with_sharding_constraint(win_cache, sharding)
    return win_cache


def prefill(graphdef, state, cache, tokens, positions, valid, *, window: int, cache_sharding=None):
    """Write the keys/values of tokens int32[B, T] at positions [B, T] where valid; -> cache."""
    model = nnx.merge(graphdef, state)
    _, win = model.hidden_states(tokens, positions, cache=_window(cache, window), valid=valid)
    return _unwindow(cache, win, window, cache_sharding)


def _step(graphdef, state, slots: SlotState, cache, *, max_len, vocab_chunk, emit_stats, plain, logit_scale):
    model = nnx.merge(graphdef, state)
    logits, cache = model(slots.tokens[:, None], slots.positions[:, None], cache=cache,
                          valid=slots.active[:, None])
    z = logits[:, 0]  # float32 [B, V]
    if logit_scale != 1.0:   # the policy at temperature 1/logit_scale (the trainer scales alike)
        z = z * jnp.float32(logit_scale)
    new_pos = slots.positions + 1
    if emit_stats:
        # One pass of softmax statistics serves the draw (same normaliser at temperature 1
        # without truncation) and the token's logprob/entropy.
        stats = softmax_stats(z, vocab_chunk)
        tok = sample_tokens(z, slots.sampling, new_pos, vocab_chunk, stats, plain=plain)
        lp, ent = logprob_entropy_from_stats(z, tok, stats)
    else:
        tok = sample_tokens(z, slots.sampling, new_pos, vocab_chunk, plain=plain)
        lp = ent = jnp.zeros(tok.shape, jnp.float32)
    return tok, new_pos, lp, ent, cache


def decode(graphdef, state, cache, slots: SlotState, n_steps, *, window: int, buf_len: int,
           vocab_chunk: Optional[int] = None, emit_stats: bool = True, plain: bool = False,
           logit_scale: float = 1.0, cache_sharding=None):
    """Run up to n_steps (<= buf_len) decode steps on device -> (cache, DecodeOut).

    `plain`: every active slot samples plainly (`sample.is_plain`), so the program holds only
    that draw (`sample_tokens(plain=True)`): a smaller program, quicker to compile.
    `logit_scale` (static): the logits are multiplied by it before the logprob/entropy and the
    draw (1/τ for a policy at temperature τ; the slots' temperatures are then relative to τ)."""
    b = slots.tokens.shape[0]
    max_len = cache[0].length
    rows = jnp.arange(b)

    def cond(c):
        return (c["i"] < n_steps) & jnp.any(c["slots"].active)

    def body(c):
        s: SlotState = c["slots"]
        tok, new_pos, lp, ent, cache_w = _step(graphdef, state, s, c["cache"], max_len=max_len,
                                               vocab_chunk=vocab_chunk, emit_stats=emit_stats, plain=plain,
                                               logit_scale=logit_scale)
        col = jnp.where(s.active, c["count"], buf_len)  # inactive slots write out of range: dropped
        generated = s.generated + s.active
        is_eos = jnp.any(tok[:, None] == s.stop_ids, axis=-1)
        code = jnp.where(is_eos, STOP_EOS, jnp.where(
            generated >= s.max_tokens, STOP_MAX_TOKENS, jnp.where(new_pos >= max_len - 1, STOP_LENGTH, RUNNING)))
        stopping = s.active & (code != RUNNING)
        s = s._replace(tokens=jnp.where(s.active, tok, s.tokens),
                       positions=jnp.where(s.active, new_pos, s.positions),
                       active=s.active & ~stopping, generated=generated)
        return dict(
            i=c["i"] + 1, slots=s, cache=cache_w, count=c["count"] + c["slots"].active,
            reason=jnp.where(stopping, code, c["reason"]),
            out_tokens=c["out_tokens"].at[rows, col].set(tok, mode="drop"),
            logprobs=c["logprobs"].at[rows, col].set(lp, mode="drop"),
            entropies=c["entropies"].at[rows, col].set(ent, mode="drop"))

    init = dict(i=jnp.int32(0), slots=slots, cache=_window(cache, window),
                count=jnp.zeros((b,), jnp.int32), reason=jnp.zeros((b,), jnp.int32),
                out_tokens=jnp.zeros((b, buf_len), jnp.int32),
                logprobs=jnp.zeros((b, buf_len), jnp.float32),
                entropies=jnp.zeros((b, buf_len), jnp.float32))
    c = lax.while_loop(cond, body, init)
    s = c["slots"]
    out = DecodeOut(s.tokens, s.positions, s.active, s.generated, c["out_tokens"], c["logprobs"],
                    c["entropies"], c["count"], c["reason"], c["i"])
    return _unwindow(cache, c["cache"], window, cache_sharding), out


def compile_fns(graphdef, cache_sharding=None):
    """(prefill, decode) jitted with the cache donated; graphdef and window are bound/static."""
    backend = cache_sharding.mesh.devices.flat[0].platform if cache_sharding is not None else None
    options = program_options(backend)
    pre = jax.jit(functools.partial(prefill, graphdef, cache_sharding=cache_sharding),
                  static_argnames=("window",), donate_argnames=("cache",), compiler_options=options)
    dec = jax.jit(functools.partial(decode, graphdef, cache_sharding=cache_sharding),
                  static_argnames=("window", "buf_len", "vocab_chunk", "emit_stats", "plain", "logit_scale"),
                  donate_argnames=("cache",), compiler_options=options)
    return pre, dec


def abstract_slots(batch: int, max_stop_ids: int = 8) -> SlotState:
    """SlotState of ShapeDtypeStructs, for lowering decode without data."""
    def arr(dtype, *shape):
        return jax.ShapeDtypeStruct(shape or (batch,), dtype)

    i32 = jnp.int32
    return SlotState(arr(i32), arr(i32), arr(bool), arr(i32), arr(i32), arr(i32, batch, max_stop_ids),
                     SlotSampling(arr(jnp.float32), arr(jnp.float32), arr(i32), arr(bool), arr(jnp.uint32)))


def decode_temp_bytes(model_cfg, batch: int, window: int, steps: int, vocab_chunk: Optional[int],
                      emit_stats: bool = True) -> int:
    """XLA scratch (temp) bytes of one decode call, compiled for abstract inputs: nothing is
    allocated, so it also works for shapes that would not fit in memory."""
    graphdef, state = nnx.split(build_abstract(model_cfg))
    cache = jax.eval_shape(lambda: init_cache(model_cfg, batch, window))
    _, dec = compile_fns(graphdef)
    compiled = dec.lower(state, cache, abstract_slots(batch), jax.ShapeDtypeStruct((), jnp.int32),
                         window=window, buf_len=steps, vocab_chunk=vocab_chunk,
                         emit_stats=emit_stats).compile()
    return compiled.memory_analysis().temp_size_in_bytes
