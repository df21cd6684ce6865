"""Jitted batched sampler with a KV cache; emits per-token logprob and entropy (temperature 1,
or SamplerConfig.policy_temperature).

See docs/sampler.md. Public API:
    Sampler(model, SamplerConfig(...), tokenizer=None)
    .generate(prompts, params) -> list[TurnOutput]
    .submit(prompt_ids, params, request_id) -> slot ; .advance() -> list[TurnOutput]
    .append(slot, token_ids, params) ; .release(slot) ; .update_params(model_or_state)
    .prefill(wait=False) ; .timings (SamplerTimings: prefill/decode calls, tokens, seconds)
    SamplerConfig.for_rollout(max_len, slots, ...): the one sizing rule (window_buckets)
"""
from tepo_jax.sampling.config import (FINISH_EOS, FINISH_LENGTH, FINISH_MAX_TOKENS, FINISH_REASONS,
                                      FINISH_STOP_STRING, SamplerConfig, SamplingParams, window_buckets)
from tepo_jax.sampling.sampler import Sampler, SamplerTimings, TurnOutput
from tepo_jax.sampling.stops import StopMatcher, token_bytes_fn

__all__ = ["Sampler", "SamplerConfig", "SamplerTimings", "SamplingParams", "TurnOutput", "StopMatcher",
           "token_bytes_fn", "window_buckets",
           "FINISH_EOS", "FINISH_LENGTH", "FINISH_MAX_TOKENS", "FINISH_REASONS", "FINISH_STOP_STRING"]
