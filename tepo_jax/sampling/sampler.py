"""Host driver of the jitted sampler: slots, continuous batching, stops, multi-turn resume.

Slot API (what the rollout loop uses):
    slot = sampler.submit(prompt_ids, params, request_id=...)   # fill a free slot
    outs = sampler.advance()       # prefill what is pending, run one device decode call;
                                   # -> list[TurnOutput] for the turns that finished
    sampler.append(slot, tool_result_ids, params)   # resume a finished turn (multi-turn)
    sampler.release(slot)          # free the slot for a new request
`generate(prompts, params)` drives the same API for the one-shot case, refilling slots as
sequences finish.

Sequence bookkeeping per slot: `seq` holds every kept token (prompt, sampled turns, appended
tool results); the cache holds keys/values for positions [0, cached); decoding needs all of
`seq` but its last token in the cache, and feeds that last ("pending") token itself. A stop
string truncates `seq` at the stopping token; cache entries past it are stale and simply
rewritten later (a query only attends to positions <= its own, all rewritten by then).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx

from tepo_jax.models.decoder import BATCH_AXES, Decoder, init_cache
from tepo_jax.sampling import engine
from tepo_jax.sampling.config import (FINISH_EOS, FINISH_LENGTH, FINISH_MAX_TOKENS, FINISH_STOP_STRING,
                                      ResolvedParams, SamplerConfig, SamplingParams, resolve)
from tepo_jax.sampling.sample import SlotSampling, is_plain
from tepo_jax.sampling.stops import StopMatcher, TokenBytes, token_bytes_fn
from tepo_jax.sizing import kv_cache_shardings   # the one place that knows the cache layout

_REASONS = {engine.STOP_EOS: FINISH_EOS, engine.STOP_MAX_TOKENS: FINISH_MAX_TOKENS,
            engine.STOP_LENGTH: FINISH_LENGTH}
FREE, RUNNING, FINISHED = "free", "running", "finished"


@dataclasses.dataclass
class TurnOutput:
    """One finished turn of one slot (the tokens sampled since its submit/append)."""

    slot: int
    request_id: Any
    tokens: np.ndarray       # int32 [n]: sampled ids, the stopping token included
    logprobs: np.ndarray     # float32 [n]: log p(token), untruncated, at config.policy_temperature (1)
    entropies: np.ndarray    # float32 [n]: full-vocabulary entropy of that distribution
    finish_reason: str       # "eos" | "stop_string" | "max_tokens" | "length"
    stop: Union[str, int, None] = None  # the stop string or stop token id that ended it
    discarded: int = 0       # tokens sampled past a stop string and dropped


@dataclasses.dataclass
class SamplerTimings:
    """Where a sampler's time went, for users and benchmarks (`Sampler.timings`; reset by
    assigning a new one). decode_s is the wall time of `advance()` calls, which wait for the
    device (and include any prefill they ran first); prefill_s counts `prefill(wait=True)`."""

    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_calls: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0


@dataclasses.dataclass
class _Slot:
    state: str = FREE
    request_id: Any = None
    params: Optional[ResolvedParams] = None
    seq: list = dataclasses.field(default_factory=list)
    cached: int = 0
    turn: list = dataclasses.field(default_factory=list)       # (token, logprob, entropy)
    generated: int = 0
    matcher: Optional[StopMatcher] = None


class Sampler:
    """Batched sampler over `config.max_slots` slots of one KV cache.

    model: a Decoder (its `mesh`, if any, is the mesh used; params keep their shardings).
    tokenizer / token_bytes: needed only for stop strings (id -> exact bytes).
    emit_stats=False skips the logprob/entropy computation (benchmarking its cost).
    """

    def __init__(self, model: Decoder, config: SamplerConfig, *, tokenizer=None,
                 token_bytes: Optional[TokenBytes] = None, emit_stats: bool = True):
        self.config, self.model_config, self.mesh = config, model.cfg, model.mesh
        self.emit_stats = emit_stats
        self._token_bytes = token_bytes or (token_bytes_fn(tokenizer) if tokenizer is not None else None)
        if self.mesh is not None:
            batch_ways = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
            if config.max_slots % batch_ways:
                raise ValueError(f"max_slots={config.max_slots} must be a multiple of the mesh batch "
                                 f"axes data*fsdp={batch_ways}")
        self._graphdef, self._state = nnx.split(model)
        self._cache_sharding = self._make_cache_sharding()
        self._prefill, self._decode = engine.compile_fns(self._graphdef, self._cache_sharding)
        self.cache = self._init_cache()
        self.slots = [_Slot() for _ in range(config.max_slots)]
        self._requests = itertools.count()
        self.last_steps = 0  # device loop iterations of the last advance()
        self.timings = SamplerTimings()

    # ---- setup -------------------------------------------------------------------------
    def _make_cache_sharding(self):
        if self.mesh is None:
            return None
        c = self.config
        return kv_cache_shardings(self.model_config, self.mesh, c.max_slots, c.max_len)[0].k

    def _init_cache(self):
        # Committed to a device, as the caches prefill/decode return are: an uncommitted first
        # cache would make their first call compile once more than the later ones.
        c, m = self.config, self.model_config
        make = lambda: init_cache(m, c.max_slots, c.max_len, dtype=m.dtype)  # noqa: E731
        device = next(iter(jax.tree.leaves(self._state)[0].devices()))  # (mesh None: one device)
        sharding = self._cache_sharding or jax.sharding.SingleDeviceSharding(device)
        return jax.jit(make, out_shardings=sharding)()

    def update_params(self, model_or_state) -> None:
        """Use new parameters (same structure), e.g. after a train step."""
        self._state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

    # ---- slot API ------------------------------------------------------------------------
    @property
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.state == FREE]

    def slot_state(self, slot: int) -> str:
        return self._slot(slot).state

    def sequence(self, slot: int) -> list[int]:
        """Every kept token id of the slot's sequence (prompt, turns, appended ids)."""
        return list(self._slot(slot).seq)

    def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
               request_id: Any = None) -> int:
        """Start a request in a free slot; returns the slot. Decoding starts at the next step()."""
        ids = self._check_ids(prompt_ids, "prompt")
        if len(ids) > self.config.max_len - 1:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the cache: max_len="
                             f"{self.config.max_len} positions, one needed for a new token")
        free = self.free_slots
        if not free:
            raise ValueError(f"all {self.config.max_slots} compiled slots are busy; release() a "
                             "finished slot or build the sampler with a larger max_slots")
        n = next(self._requests)
        p = resolve(params, self.config, default_seed=self.config.seed + n,
                    vocab_size=self.model_config.vocab_size)
        matcher = StopMatcher(p.stop, self._token_bytes)  # validates before the slot is taken
        slot = free[0]
        self.slots[slot] = _Slot(state=RUNNING, request_id=n if request_id is None else request_id,
                                 params=p, seq=ids, cached=0, matcher=matcher)
        return slot

    def append(self, slot: int, token_ids: Sequence[int], params: Optional[SamplingParams] = None) -> None:
        """Resume a finished turn: add token_ids (e.g. a tool result) and decode on from there.

        Only the new ids (and the previous turn's last token) are prefilled; the rest of the
        sequence stays in the cache. `params` default to the slot's previous ones.
        """
        s = self._slot(slot)
        if s.state != FINISHED:
            raise ValueError(f"slot {slot} is {s.state}; append() needs a finished turn")
        ids = self._check_ids(token_ids, "appended ids")
        if len(s.seq) + len(ids) > self.config.max_len - 1:
            raise ValueError(f"appending {len(ids)} ids to slot {slot} ({len(s.seq)} tokens) exceeds "
                             f"the cache: max_len={self.config.max_len}, one position needed for a new token")
        p = s.params if params is None else resolve(params, self.config, default_seed=s.params.seed,
                                                    vocab_size=self.model_config.vocab_size)
        s.matcher = StopMatcher(p.stop, self._token_bytes)
        s.params, s.turn, s.generated = p, [], 0
        s.seq = s.seq + ids
        s.state = RUNNING

    def release(self, slot: int) -> None:
        """Free a slot (finished or not); its cache rows are reused by the next request."""
        self._slot(slot)
        self.slots[slot] = _Slot()

    def prefill(self, wait: bool = False) -> None:
        """Write the pending tokens of every running slot into the cache now. advance() does
        this itself first; calling it separately (with `wait`: until the device is done, the
        time counted in `timings.prefill_s`) lets a caller time prefill and decode apart."""
        t0 = time.perf_counter()
        self._run_prefills()
        if wait:
            jax.block_until_ready(self.cache)
            self.timings.prefill_s += time.perf_counter() - t0

    def advance(self) -> list[TurnOutput]:
        """Prefill pending tokens, run one device decode call, return the turns that finished."""
        t0 = time.perf_counter()
        self._run_prefills()
        running = [i for i, s in enumerate(self.slots) if s.state == RUNNING]
        if not running:
            self.last_steps = 0
            return []
        n = self.config.steps_per_call
        window = self._bucket(max(len(self.slots[i].seq) - 1 for i in running) + n)
        plain = all(is_plain(self._relative_temperature(p), p.top_p, p.top_k, p.greedy, self.model_config.vocab_size)
                    for p in (self.slots[i].params for i in running))
        self.cache, out = self._decode(self._state, self.cache, self._slot_arrays(), np.int32(n),
                                       window=window, buf_len=n, vocab_chunk=self.config.vocab_chunk,
                                       emit_stats=self.emit_stats, plain=plain,
                                       logit_scale=1.0 / self.config.policy_temperature)
        out = jax.device_get(out)
        self.last_steps = int(out.steps)
        self.timings.decode_calls += 1
        self.timings.decode_steps += self.last_steps
        self.timings.decode_s += time.perf_counter() - t0
        return [o for i in running if (o := self._collect(i, out)) is not None]

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Union[None, SamplingParams, Sequence[SamplingParams]] = None) -> list[TurnOutput]:
        """One turn per prompt (outputs in prompt order); more prompts than slots are queued and
        start as slots free up. Leaves all slots free."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(prompts)
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"params must be a SamplingParams or a list of them (one per prompt), "
                             f"got {type(params).__name__}")
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            self._check_ids(p, f"prompt {i}")
        if self.free_slots != list(range(self.config.max_slots)):
            raise ValueError("generate() needs every slot free; release() the slot API's requests first")
        results: list = [None] * len(prompts)
        queue = list(range(len(prompts)))
        while queue or any(s.state == RUNNING for s in self.slots):
            while queue and self.free_slots:
                i = queue.pop(0)
                self.submit(prompts[i], params[i], request_id=i)
            for o in self.advance():
                results[o.request_id] = o
                self.release(o.slot)
        return results

    # ---- internals -------------------------------------------------------------------------
    def _slot(self, slot: int) -> _Slot:
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < len(self.slots):
            raise ValueError(f"slot must be an int in [0, {len(self.slots)}), got {slot!r}")
        return self.slots[slot]

    def _check_ids(self, ids, what: str) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{what} must be a flat sequence of int token ids, got {np.shape(ids)} {arr.dtype}")
        if arr.size == 0:
            raise ValueError(f"{what} is empty: at least one token id is needed")
        v = self.model_config.vocab_size
        if arr.min() < 0 or arr.max() >= v:
            raise ValueError(f"{what} has token ids outside [0, {v}): min {arr.min()}, max {arr.max()}")
        return [int(x) for x in arr]

    def _relative_temperature(self, p: ResolvedParams) -> float:
        """The request's temperature on the decode step's logits, which are already divided by
        the policy temperature τ: T/τ (exactly 1 at T = τ, the plain draw)."""
        return p.temperature / self.config.policy_temperature

    def _bucket(self, needed: int) -> int:
        return next((b for b in self.config.cache_buckets if b >= needed), self.config.max_len)

    def _run_prefills(self) -> None:
        """Prefill seq[cached:-1] of every running slot, batched, in chunks of a prefill bucket."""
        c = self.config
        while True:
            todo = {i: len(s.seq) - 1 - s.cached for i, s in enumerate(self.slots)
                    if s.state == RUNNING and len(s.seq) - 1 > s.cached}
            if not todo:
                return
            t = next((b for b in c.prefill_buckets if b >= max(todo.values())), c.prefill_buckets[-1])
            tokens = np.zeros((c.max_slots, t), np.int32)
            positions = np.tile(np.arange(t, dtype=np.int32), (c.max_slots, 1))
            valid = np.zeros((c.max_slots, t), bool)
            for i, n in todo.items():
                s, n = self.slots[i], min(n, t)
                tokens[i, :n] = s.seq[s.cached:s.cached + n]
                positions[i] += s.cached
                valid[i, :n] = True
                s.cached += n
            window = self._bucket(int(positions[valid].max()) + 1)
            self.cache = self._prefill(self._state, self.cache, tokens, positions, valid, window=window)
            self.timings.prefill_calls += 1
            self.timings.prefill_tokens += int(valid.sum())

    def _slot_arrays(self) -> engine.SlotState:
        c, b = self.config, self.config.max_slots
        e = c.max_stop_token_ids
        tokens, positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
        active, budget = np.zeros(b, bool), np.ones(b, np.int32)
        stop_ids = np.full((b, e), -1, np.int32)
        temp, top_p = np.ones(b, np.float32), np.ones(b, np.float32)
        top_k, greedy, seed = np.zeros(b, np.int32), np.zeros(b, bool), np.zeros(b, np.uint32)
        for i, s in enumerate(self.slots):
            if s.state != RUNNING:
                continue
            p = s.params
            tokens[i], positions[i], active[i] = s.seq[-1], len(s.seq) - 1, True
            budget[i] = p.max_tokens - s.generated
            stop_ids[i, :len(p.stop_token_ids)] = p.stop_token_ids
            temp[i], top_p[i], top_k[i], greedy[i] = self._relative_temperature(p), p.top_p, p.top_k, p.greedy
            seed[i] = p.seed % 2**32
        return engine.SlotState(tokens, positions, active, np.zeros(b, np.int32), budget, stop_ids,
                                SlotSampling(temp, top_p, top_k, greedy, seed))

    def _collect(self, i: int, out: engine.DecodeOut) -> Optional[TurnOutput]:
        """Move slot i's new tokens to the host record; a TurnOutput if its turn finished."""
        s = self.slots[i]
        n = int(out.count[i])
        s.cached = max(s.cached, len(s.seq) + n - 1)  # every token fed this call is in the cache
        reason, stop = _REASONS.get(int(out.reason[i])), None
        for j in range(n):
            tok = int(out.out_tokens[i, j])
            s.seq.append(tok)
            s.turn.append((tok, float(out.logprobs[i, j]), float(out.entropies[i, j])))
            s.generated += 1
            hit = s.matcher.feed(tok)
            if hit is not None:
                reason, stop, discarded = FINISH_STOP_STRING, hit, n - 1 - j
                # Roll back: keep the stopping token, drop the rest (their cache rows are stale).
                s.cached = min(s.cached, len(s.seq))
                return self._finish(i, reason, stop, discarded)
        if reason is None:
            return None
        if reason == FINISH_EOS:
            stop = s.seq[-1]
        return self._finish(i, reason, stop, 0)

    def _finish(self, i: int, reason: str, stop, discarded: int) -> TurnOutput:
        s = self.slots[i]
        s.state = FINISHED
        toks, lps, ents = zip(*s.turn) if s.turn else ((), (), ())
        return TurnOutput(slot=i, request_id=s.request_id, tokens=np.asarray(toks, np.int32),
                          logprobs=np.asarray(lps, np.float32), entropies=np.asarray(ents, np.float32),
                          finish_reason=reason, stop=stop, discarded=discarded)
