"""Sampler configuration (fixed per compiled sampler) and per-request sampling parameters.

`SamplerConfig` fixes every shape the jitted functions see: the number of slots, the cache
length, the attention-window buckets, the prefill chunk buckets and the number of decode
steps run per device call. `SamplingParams` travels with each request and only changes array
values, never shapes, so a new request never recompiles anything.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from tepo_jax.models.config import ModelConfig

# Finish reasons reported by `Sampler.advance()`.
FINISH_EOS = "eos"                  # sampled one of the stop token ids (kept as the last token)
FINISH_STOP_STRING = "stop_string"  # the token that completes a stop string (kept)
FINISH_MAX_TOKENS = "max_tokens"    # the turn reached its max_tokens
FINISH_LENGTH = "length"            # the sequence filled the KV cache (max_len tokens)
FINISH_REASONS = (FINISH_EOS, FINISH_STOP_STRING, FINISH_MAX_TOKENS, FINISH_LENGTH)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Shapes and defaults of one compiled sampler.

    max_slots: sequences decoded together (the compiled batch); requests fill free slots.
    cache_buckets: attention-window lengths, ascending; the KV cache holds `cache_buckets[-1]`
        positions, and each device call attends over (and writes) only the smallest bucket that
        covers every active sequence, so early tokens do not pay for the whole cache.
    prefill_buckets: token-chunk lengths prefill is compiled for; longer inputs are prefilled
        in several chunks of the largest bucket.
    steps_per_call: decode steps run inside one device loop before returning to the host
        (the loop also exits early once every slot has stopped). Stop strings are checked on
        the host after each call, so a sequence can overshoot a stop string by up to this
        many tokens of wasted (discarded) compute.
    vocab_chunk: entropy/logprob statistics and sampling visit the vocabulary in chunks of
        this many columns, so their temporaries are [B, chunk] (XLA on CPU materialises the
        operands of reductions: keep chunks there). None = one pass per statistic over [B, V],
        for TPU/GPU where XLA fuses elementwise work into reductions (the inverse-CDF search
        still works in blocks of 4096 columns, so it never forms a [B, V] cumulative sum).
    max_stop_token_ids: width of the per-slot stop-token table (eos ids + request stop ids).
    policy_temperature: τ of the policy whose per-token logprob and entropy are recorded:
        softmax(logits / τ). 1 (the default) records the model's own distribution; an RL run
        that trains the tempered policy (`loss.tempered_policy`, TRL's and verl's convention)
        sets τ = its sampling temperature. A request's `temperature` stays that of the raw
        logits: a request at τ without truncation draws from the recorded distribution itself.
    """

    max_slots: int = 8
    cache_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    prefill_buckets: tuple[int, ...] = (32, 128, 512)
    steps_per_call: int = 32
    eos_ids: tuple[int, ...] = ()
    max_stop_token_ids: int = 8
    vocab_chunk: Optional[int] = 8192
    policy_temperature: float = 1.0
    # Defaults for SamplingParams fields left as None.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        for name in ("cache_buckets", "prefill_buckets"):
            b = tuple(getattr(self, name))
            if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"{name} must be non-empty, positive and strictly ascending, got {b}")
            object.__setattr__(self, name, b)
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {self.steps_per_call}")
        if not 0 < self.policy_temperature < float("inf"):   # NaN fails too
            raise ValueError(f"policy_temperature must be a finite number > 0, got {self.policy_temperature}")
        if len(self.eos_ids) > self.max_stop_token_ids:
            raise ValueError(f"{len(self.eos_ids)} eos_ids exceed max_stop_token_ids={self.max_stop_token_ids}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop", normalize_stop(self.stop))

    @property
    def max_len(self) -> int:
        """Positions one sequence can hold (prompt + all turns), = the largest cache bucket."""
        return self.cache_buckets[-1]

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_rollout(cls, max_len: int, slots: int, *, model=None,
                    steps_per_call: int = 16, **fields) -> "SamplerConfig":
        """The sizing rule the driver, the library and the benchmarks share: a cache of
        `max_len` positions with `window_buckets(max_len, model, slots)`, `slots` sequences,
        and 16 decode steps per device call (stop strings are checked between calls, so a turn
        overshoots its stop by at most 15 discarded tokens). Pass the `model` (its ModelConfig
        or the Decoder): without it every candidate window is kept, paying programs that may
        save nothing."""
        return cls(max_slots=slots, cache_buckets=window_buckets(max_len, model, slots),
                   steps_per_call=steps_per_call, **fields)


# Windows below this are not worth a compiled program of their own.
MIN_WINDOW = 64
# A smaller window gets its own decode program only where a decode step at it reads at least
# this fraction fewer bytes than at the next larger window kept. Each program is one more
# compile in every cold start (~1 s on CPU for the benchmarks' 4-layer model; more for larger
# models and on TPU), and a small saving buys little: on the rl_step benchmark's model (8
# slots, cache 256) the 128 window saves 8% of a step's bytes, and the rollout with it ran
# 1-5% faster (12 calls interleaved in one process: median 1289 against 1250 tok/s; 2-core
# AVX-512 host) while it cost a second ~1.1 s decode compile in the first sampler call. At 256
# slots and a 2048 cache on Qwen2.5-0.5B (bf16) a halved window saves ~40% (1024 against
# 2048: 43%; 512 against 1024: 38%), and all three are kept.
MIN_WINDOW_SAVING = 0.2


def decode_step_bytes(model: "ModelConfig", slots: int, positions: float) -> float:
    """Bytes one decode step reads: every weight once (of an untied input embedding only the
    `slots` looked-up rows; a tied one is read whole as the output head) and each slot's keys
    and values at `positions` positions (a window, or a mean context). Decode is
    memory-bound at the batch sizes a sampler runs, so this is its cost (and the HBM
    roofline of `benchmarks/sampler.py`)."""
    weights = model.num_params
    if not model.tie_word_embeddings:
        weights -= (model.vocab_size - slots) * model.hidden_size
    kv_per_position = model.num_layers * 2 * model.num_kv_heads * model.head_dim * _itemsize(model.dtype)
    return weights * _itemsize(model.param_dtype) + slots * positions * kv_per_position


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize  # jnp dtypes (bfloat16 too) are numpy dtypes


def window_buckets(max_len: int, model=None, slots: Optional[int] = None) -> tuple[int, ...]:
    """Attention windows for a cache of `max_len` positions: among a quarter, a half and all of
    it (none below MIN_WINDOW, none above max_len), the ones that pay for their compiled
    decode program. Each window is one program; with `model` (a ModelConfig or a Decoder)
    and `slots`, a window is kept only where a decode step at it reads MIN_WINDOW_SAVING
    fewer bytes than at the next larger window kept (`decode_step_bytes`): small batches of
    short sequences are weight-bound and get one window, long caches with many slots keep
    all three."""
    candidates = sorted({min(max_len, max(MIN_WINDOW, max_len // k)) for k in (4, 2, 1)})
    if model is None or slots is None:
        return tuple(candidates)
    model = getattr(model, "cfg", model)  # a Decoder passed for its config
    if not hasattr(model, "num_params"):
        raise TypeError(f"model must be a ModelConfig (or a Decoder), got {type(model).__name__}")
    kept = [max_len]
    for w in reversed(candidates[:-1]):
        if decode_step_bytes(model, slots, w) <= (1 - MIN_WINDOW_SAVING) * decode_step_bytes(model, slots, kept[-1]):
            kept.append(w)
    return tuple(reversed(kept))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; None fields take the SamplerConfig default.

    temperature 0 (or greedy=True) picks the argmax. top_k 0 and top_p 1 disable truncation.
    seed: the request's random stream; token i of the sequence uses fold_in(key(seed), i), so
    the same seed gives the same tokens whatever else is in the batch. None = config seed plus
    the request's submission counter.
    stop: stop strings for this request (replaces the config's). stop_token_ids: extra ids
    that end a turn, on top of the config's eos_ids.
    """

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    greedy: bool = False
    max_tokens: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Sequence[int] = ()
    seed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ResolvedParams:
    """SamplingParams with every default filled in and validated (host side)."""

    temperature: float
    top_p: float
    top_k: int
    greedy: bool
    max_tokens: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    seed: int


def normalize_stop(stop) -> tuple[str, ...]:
    """A stop spec (None, str, or a sequence of str) as a tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a str or a list/tuple of str, got {type(stop).__name__}: {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop strings must be str, got {type(s).__name__}: {s!r}")
        if not s:
            raise ValueError("stop strings must be non-empty")
    return tuple(stop)


def _whole(value, name: str) -> int:
    """`value` as an int if it is a whole number (3 or 3.0); a ValueError naming `name` if not
    (int(2.7) would quietly make a top_k of 2.7 a 2)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def resolve(params: Optional[SamplingParams], cfg: SamplerConfig, default_seed: int,
            vocab_size: Optional[int] = None) -> ResolvedParams:
    """The request's settings, the config's where `params` leaves them None, checked.
    `vocab_size`: stop_token_ids must be ids of the vocabulary (one outside it never fires)."""
    p = params or SamplingParams()
    if not isinstance(p, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(p).__name__}")
    temperature = cfg.temperature if p.temperature is None else float(p.temperature)
    top_p = cfg.top_p if p.top_p is None else float(p.top_p)
    top_k = cfg.top_k if p.top_k is None else _whole(p.top_k, "top_k")
    max_tokens = cfg.max_new_tokens if p.max_tokens is None else _whole(p.max_tokens, "max_tokens")
    if not 0 <= temperature < float("inf"):   # NaN fails too
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    extra_ids = tuple(_whole(i, "stop_token_ids") for i in p.stop_token_ids)
    outside = [i for i in extra_ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if outside:
        raise ValueError(f"stop_token_ids {outside} are not token ids of the vocabulary [0, {vocab_size})")
    stop_ids = tuple(dict.fromkeys(cfg.eos_ids + extra_ids))
    if len(stop_ids) > cfg.max_stop_token_ids:
        raise ValueError(f"{len(stop_ids)} stop token ids exceed max_stop_token_ids={cfg.max_stop_token_ids}")
    seed = default_seed if p.seed is None else int(p.seed)
    return ResolvedParams(temperature=temperature, top_p=top_p, top_k=top_k,
                          greedy=bool(p.greedy or temperature == 0.0), max_tokens=max_tokens,
                          stop=cfg.stop if p.stop is None else normalize_stop(p.stop),
                          stop_token_ids=stop_ids, seed=seed)
