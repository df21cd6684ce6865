"""Sampler against transformers: greedy tokens, logprobs/entropies, seeds, stops, resume, refill.

Tiny random Qwen2 and Llama 3.1 checkpoints are built and saved here, loaded through the real
loader, and every emitted number is checked against transformers' logits for the same tokens
(numpy, float64), atol 1e-4 in fp32. The greedy and logprob/entropy tests also run with
vocab_chunk=48, which does not divide the vocabulary of 128 (chunks 0-47, 48-95 and the
clamped 80-127): the chunked statistics, threshold and inverse-CDF passes end to end.
"""
import numpy as np
import pytest

from tepo_jax.checkpoints.hf import load_hf
from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams
from tepo_jax.testing.hf_models import hf_logits, make_tiny_hf_checkpoint

EOS = 2  # the tiny checkpoints' eos_token_id
CONFIG = SamplerConfig(max_slots=4, cache_buckets=(32, 64), prefill_buckets=(8, 16), steps_per_call=8,
                       eos_ids=(EOS,))
FAMILIES = {
    "qwen2": dict(family="qwen2", vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2),
    "llama": dict(family="llama", vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2,
                  rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, kw in FAMILIES.items():
        path = tmp_path_factory.mktemp(name)
        torch_model = make_tiny_hf_checkpoint(path, seed=3, **kw)
        out[name] = (torch_model, load_hf(path), path)
    return out


@pytest.fixture(scope="module")
def samplers(models):
    # Token i renders as "<i>" for stop strings (the Qwen2.5 tokenizer tests are in test_sampler_stops.py).
    return {name: Sampler(model, CONFIG, token_bytes=lambda t: f"<{t}>".encode())
            for name, (_, model, _) in models.items()}


@pytest.fixture(scope="module")
def chunked_samplers(models):
    return {name: Sampler(model, CONFIG.replace(vocab_chunk=48)) for name, (_, model, _) in models.items()}


@pytest.fixture(params=["one_pass", "chunk48"])
def sampler_for(request, samplers, chunked_samplers):
    """name -> sampler, for the default config (one pass over V = 128) and vocab_chunk=48."""
    if request.param == "chunk48":
        assert chunked_samplers["qwen2"].config.vocab_chunk == 48
        return chunked_samplers
    assert samplers["qwen2"].config.vocab_chunk >= 128
    return samplers


def reference_stats(torch_model, prompt, tokens, tau=1.0):
    """(argmax, logprob, entropy) of transformers at each generated position, numpy float64;
    logprob and entropy of softmax(logits / tau)."""
    full = np.asarray(list(prompt) + list(tokens), np.int64)[None]
    z = hf_logits(torch_model, full)[0, len(prompt) - 1:len(full[0]) - 1].astype(np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ent = -(np.exp(logp) * logp).sum(-1)
    return z.argmax(-1), np.take_along_axis(logp, np.asarray(tokens)[:, None], -1)[:, 0], ent


def assert_stats_match(torch_model, prompt, out, tau=1.0):
    _, lp, ent = reference_stats(torch_model, prompt, out.tokens, tau)
    np.testing.assert_allclose(out.logprobs, lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.entropies, ent, atol=1e-4, rtol=0)


def prompts(n, seed=0, lengths=(5, 11, 19, 1, 8, 14, 3)):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 128, lengths[i % len(lengths)])) for i in range(n)]


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_greedy_matches_transformers_generate(name, models, sampler_for):
    import torch

    torch_model = models[name][0]
    ps = prompts(3)  # 19 tokens: chunked prefill (bucket 16); 19 + 24 > 32: window grows to 64
    outs = sampler_for[name].generate(ps, SamplingParams(greedy=True, max_tokens=24))
    for p, out in zip(ps, outs):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24,
                                       eos_token_id=EOS, pad_token_id=0)[0, len(p):].numpy()
        np.testing.assert_array_equal(out.tokens, ref)
        assert out.finish_reason == ("eos" if ref[-1] == EOS and len(ref) < 24 else "max_tokens")
        assert_stats_match(torch_model, p, out)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_sampled_logprobs_are_untruncated_temperature_1(name, models, sampler_for):
    """top-p/top-k/temperature change which tokens are drawn, never what is reported for them."""
    ps = prompts(4, seed=1)
    params = [SamplingParams(temperature=0.7, top_p=0.8, seed=1), SamplingParams(top_k=5, seed=2),
              SamplingParams(temperature=1.3, seed=3), SamplingParams(temperature=0.5, top_k=9, top_p=0.9, seed=4)]
    params = [SamplingParams(**{**p.__dict__, "max_tokens": 16}) for p in params]
    outs = sampler_for[name].generate(ps, params)
    for p, out in zip(ps, outs):
        assert_stats_match(models[name][0], p, out)


@pytest.mark.parametrize("vocab_chunk", [None, 48])
def test_policy_temperature_records_the_tempered_policy_and_draws_as_before(models, samplers, vocab_chunk):
    """policy_temperature=τ: the recorded logprobs/entropies are those of softmax(logits / τ)
    whatever a request draws with (τ itself, τ with top-k, another temperature, greedy); a
    request's temperature keeps its meaning: the same seeds draw the same tokens as a sampler
    at τ = 1, and greedy stays the argmax."""
    tau = 0.7
    torch_model, model, _ = models["qwen2"]
    tempered = Sampler(model, CONFIG.replace(policy_temperature=tau, vocab_chunk=vocab_chunk))
    ps = prompts(4, seed=5)
    params = [SamplingParams(temperature=tau, seed=1, max_tokens=16),
              SamplingParams(temperature=tau, top_k=7, seed=2, max_tokens=16),
              SamplingParams(temperature=1.3, seed=3, max_tokens=16),
              SamplingParams(greedy=True, max_tokens=16)]
    outs = tempered.generate(ps, params)
    plain = samplers["qwen2"].generate(ps, params)
    for p, out, ref in zip(ps, outs, plain):
        assert_stats_match(torch_model, p, out, tau)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        assert np.abs(out.logprobs - ref.logprobs).max() > 1e-3   # not the τ = 1 values
    with pytest.raises(ValueError, match="policy_temperature"):
        CONFIG.replace(policy_temperature=0.0)


def test_seeded_sampling_is_reproducible_and_batch_independent(samplers):
    s = samplers["qwen2"]
    ps = prompts(4, seed=2)
    params = SamplingParams(temperature=1.0, top_k=40, max_tokens=20, seed=7)
    alone = s.generate([ps[0]], params)[0]
    again = s.generate([ps[0]], params)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=m, seed=100 + m) for m in (3, 20, 9)]
    # The same request in slot 2, its batch mates different and finishing at different times.
    mixed = s.generate([ps[1], ps[2], ps[0], ps[3]], [others[0], others[1], params, others[2]])[2]
    assert mixed.slot != alone.slot
    np.testing.assert_array_equal(alone.tokens, again.tokens)
    np.testing.assert_array_equal(alone.tokens, mixed.tokens)
    np.testing.assert_allclose(alone.logprobs, mixed.logprobs, atol=1e-5)
    other_seed = s.generate([ps[0]], SamplingParams(temperature=1.0, top_k=40, max_tokens=20, seed=8))[0]
    assert not np.array_equal(alone.tokens, other_seed.tokens)


def test_slot_refill_continuous_batching(models, samplers):
    """More requests than slots: finished slots are refilled while the others keep decoding."""
    s, torch_model = samplers["llama"], models["llama"][0]
    ps = prompts(7, seed=3)
    budgets = [3, 30, 5, 12, 2, 9, 4]
    submitted, outs, queue = {}, {}, list(range(7))
    refilled_while_running = False
    while queue or any(st == "running" for st in map(s.slot_state, range(4))):
        while queue and s.free_slots:
            i = queue.pop(0)
            refilled_while_running |= len(outs) > 0 and any(s.slot_state(j) == "running" for j in range(4))
            submitted[s.submit(ps[i], SamplingParams(greedy=True, max_tokens=budgets[i]), request_id=i)] = i
        for out in s.advance():
            outs[out.request_id] = out
            s.release(out.slot)
    assert refilled_while_running and sorted(outs) == list(range(7))
    for i, out in outs.items():
        ref_argmax, _, _ = reference_stats(torch_model, ps[i], out.tokens)
        np.testing.assert_array_equal(out.tokens, ref_argmax)
        assert len(out.tokens) == budgets[i] or out.finish_reason == "eos"
        assert_stats_match(torch_model, ps[i], out)


def test_resume_after_stop_string_equals_full_forward(models, samplers):
    """Turn 1 stops on a stop string mid device call (tokens after it are discarded and their
    cache rows go stale), a tool result is appended, turn 2 decodes on from the cache: every
    token's logprob/entropy equals one uninterrupted forward over the whole concatenation."""
    s, torch_model = samplers["qwen2"], models["qwen2"][0]
    prompt = prompts(1, seed=4, lengths=(9,))[0]
    free_run = s.generate([prompt], SamplingParams(greedy=True, max_tokens=20))[0].tokens
    assert len(free_run) == 20
    # Stop string = the rendering of tokens j, j+1 (split across two tokens), j+1 mid-call.
    j = next(j for j in range(3, 18) if (j + 1) % 8 != 7 and
             all((free_run[i], free_run[i + 1]) != (free_run[j], free_run[j + 1]) for i in range(j)))
    stop = f"<{free_run[j]}><{free_run[j + 1]}>"
    sampler = s
    slot = sampler.submit(prompt, SamplingParams(greedy=True, max_tokens=20, stop=stop))
    (turn1,) = sampler.advance() or sampler.advance() or sampler.advance()
    assert turn1.finish_reason == "stop_string" and turn1.stop == stop and turn1.discarded > 0
    np.testing.assert_array_equal(turn1.tokens, free_run[:j + 2])
    tool = [5, 6, 7, 8, 9]
    sampler.append(slot, tool, SamplingParams(temperature=0.9, max_tokens=12, seed=5))
    turn2 = []
    while not turn2:
        turn2 = sampler.advance()
    turn2 = turn2[0]
    assert sampler.sequence(slot) == prompt + list(turn1.tokens) + tool + list(turn2.tokens)
    assert_stats_match(torch_model, prompt, turn1)
    assert_stats_match(torch_model, prompt + list(turn1.tokens) + tool, turn2)
    sampler.release(slot)


def test_eos_max_tokens_and_full_cache(samplers):
    s = samplers["qwen2"]
    prompt = prompts(1, seed=5, lengths=(6,))[0]
    free_run = s.generate([prompt], SamplingParams(greedy=True, max_tokens=10))[0]
    assert free_run.finish_reason == "max_tokens" and len(free_run.tokens) == 10
    eos = int(free_run.tokens[4])
    out = s.generate([prompt], SamplingParams(greedy=True, max_tokens=10, stop_token_ids=[eos]))[0]
    first = int(np.argmax(free_run.tokens == eos))
    assert out.finish_reason == "eos" and out.stop == eos
    np.testing.assert_array_equal(out.tokens, free_run.tokens[:first + 1])
    long_prompt = prompts(1, seed=6, lengths=(CONFIG.max_len - 3,))[0]
    slot = s.submit(long_prompt, SamplingParams(greedy=True, max_tokens=50))
    (out,) = s.advance()
    assert out.finish_reason == "length" and len(out.tokens) == 3  # positions 61, 62, 63
    with pytest.raises(ValueError, match="exceeds the cache"):
        s.append(slot, [5])
    s.release(slot)


def test_timings_count_the_work_and_one_sizing_rule(samplers):
    """`Sampler.timings` counts prefill tokens, decode calls and device steps; `window_buckets`
    is the one rule for attention windows (a quarter, a half, all; never below 64 or above)."""
    from tepo_jax.sampling import SamplerTimings, window_buckets
    s = samplers["llama"]
    s.timings = SamplerTimings()
    ps = prompts(3, seed=5)
    for p in ps:
        s.submit(p, SamplingParams(greedy=True, max_tokens=6))
    s.prefill(wait=True)
    assert s.timings.prefill_tokens == sum(len(p) - 1 for p in ps) and s.timings.prefill_s > 0
    outs, steps = [], []
    while len(outs) < 3:
        outs += s.advance()
        steps.append(s.last_steps)
    for o in outs:
        s.release(o.slot)
    assert s.timings.decode_calls == len(steps) and s.timings.decode_steps == sum(steps) >= 6
    assert s.timings.decode_s > 0
    assert window_buckets(1024) == (256, 512, 1024) and window_buckets(128) == (64, 128)
    assert window_buckets(40) == (40,)
    cfg = SamplerConfig.for_rollout(1024, 8, seed=3)
    assert (cfg.cache_buckets, cfg.max_slots, cfg.max_len, cfg.seed) == ((256, 512, 1024), 8, 1024, 3)


def test_windows_are_kept_only_where_they_cut_the_bytes_a_decode_step_reads():
    """`decode_step_bytes` against a count from the model's own arrays (the abstract model's
    parameter leaves, of an untied embedding only the slots' looked-up rows, plus the slots'
    KV cache up to the window), and `window_buckets`' rule: a smaller candidate is kept if and
    only if a step at it reads MIN_WINDOW_SAVING fewer bytes than at the next larger window
    kept."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tepo_jax.models.config import ModelConfig
    from tepo_jax.models.decoder import build_abstract, init_cache
    from tepo_jax.sampling.config import MIN_WINDOW_SAVING, decode_step_bytes, window_buckets

    def counted(cfg, slots, window):
        model = build_abstract(cfg)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        weights = sum(x.size * x.dtype.itemsize for x in leaves)
        if not cfg.tie_word_embeddings:  # a step reads only the looked-up rows
            weights -= (cfg.vocab_size - slots) * cfg.hidden_size * model.embed.dtype.itemsize
        cache = jax.eval_shape(lambda: init_cache(cfg, slots, window))
        return weights + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

    small = ModelConfig(family="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=544, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True)
    tied_bf16 = small.replace(tie_word_embeddings=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for cfg in (small, tied_bf16):
        for slots, window in ((8, 256), (64, 1024)):
            assert decode_step_bytes(cfg, slots, window) == counted(cfg, slots, window)

    # 8 slots, cache 256 (the rl_step benchmark): the weights dominate, one window.
    assert window_buckets(256, small, 8) == (256,)
    # Many slots and long sequences: the cache dominates, every candidate is kept.
    assert window_buckets(4096, small, 64) == (1024, 2048, 4096)
    kept_counts = set()
    for slots in (1, 4, 16, 64, 256):
        kept = window_buckets(2048, small, slots)
        kept_counts.add(len(kept))
        assert kept[-1] == 2048
        for w in window_buckets(2048)[:-1]:  # every smaller candidate
            larger = min(k for k in kept if k > w)
            saves = decode_step_bytes(small, slots, w) <= (1 - MIN_WINDOW_SAVING) * decode_step_bytes(
                small, slots, larger)
            assert (w in kept) == saves, (slots, w, kept)
    assert kept_counts == {1, 2, 3}  # the sweep sees every outcome, so the check above has teeth
    assert SamplerConfig.for_rollout(256, 8, model=small).cache_buckets == (256,)
    assert SamplerConfig.for_rollout(4096, 64, model=build_abstract(small)).cache_buckets == (1024, 2048, 4096)
    with pytest.raises(TypeError, match="model must be a ModelConfig"):
        SamplerConfig.for_rollout(256, 8, model="Qwen2.5-0.5B")
