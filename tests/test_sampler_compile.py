"""What the compiled sampler costs: decode scratch memory against the vocabulary size, and the
number of compiles (one per shape bucket, never per prompt length).

Memory: the decode call is compiled (not run) for abstract inputs at V and 4V, and XLA's
`memory_analysis().temp_size_in_bytes` is compared. The [B, V] fp32 logits are the one
vocabulary-sized array a step needs; sampling (top-k/top-p bisection included), logprob and
entropy must not add another, so the growth is at most B * 4 bytes per vocabulary entry.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import Decoder
from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams
from tepo_jax.sampling.engine import decode_temp_bytes
from tepo_jax.sampling.sample import _argmax, _inverse_cdf

B = 4
TINY = ModelConfig(family="llama", vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1, head_dim=16)


def decode_growth_per_entry(chunk):
    v1, v2 = TINY.vocab_size, 4 * TINY.vocab_size
    t1 = decode_temp_bytes(TINY, B, window=16, steps=4, vocab_chunk=chunk)
    t2 = decode_temp_bytes(TINY.replace(vocab_size=v2), B, window=16, steps=4, vocab_chunk=chunk)
    return (t2 - t1) / (v2 - v1)


def test_chunked_decode_temp_memory_grows_by_one_logits_array():
    # 384 divides neither 2048 nor 8192: the clamped last chunk is part of the program.
    assert decode_growth_per_entry(384) <= 4 * B


@pytest.mark.skipif(jax.default_backend() == "cpu", reason=(
    "vocab_chunk=None relies on XLA fusing elementwise work into reductions (TPU/GPU); XLA's CPU "
    "backend materialises reduction operands (~2.3 [B,V] arrays per step measured), which is why "
    "CPU uses chunks. The unchunked inverse-CDF draw is checked on CPU below."))
def test_unchunked_decode_temp_memory_grows_by_one_logits_array():
    assert decode_growth_per_entry(None) <= 4 * B


def test_unchunked_draw_has_no_vocab_sized_temporaries():
    """With vocab_chunk=None the inverse-CDF search and argmax keep only [B, block] and [B]
    temporaries: their scratch bytes do not grow with V at all (a cumulative sum over [B, V]
    would add one [B, V] array; the previous single-level search did)."""
    def draw(z):
        b = z.shape[0]
        return (_inverse_cdf(z, jnp.zeros((b,), jnp.uint32), jnp.ones((b,)), jnp.full((b,), 0.5), None),
                _argmax(z, None))

    temp = {v: jax.jit(draw).lower(jax.ShapeDtypeStruct((B, v), jnp.float32)).compile()
            .memory_analysis().temp_size_in_bytes for v in (5000, 20000)}
    assert temp[20000] - temp[5000] <= 0, temp


def test_compiles_once_per_bucket():
    """24 prompt lengths and many budgets over several generate calls: decode compiles exactly
    once per window bucket it ran at and prefill once per (window, chunk) bucket pair, never
    per prompt length (nor twice for one bucket, e.g. for the first, freshly made cache)."""
    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True)
    config = SamplerConfig(max_slots=2, cache_buckets=(16, 32, 64), prefill_buckets=(4, 8), steps_per_call=4)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    state = jax.device_put(state, jax.devices()[0])  # committed, as load_hf leaves the params
    s = Sampler(nnx.merge(graphdef, state), config)
    decode, prefill = s._decode, s._prefill
    used = {"decode": set(), "prefill": set()}

    def spy(fn, name, key):
        def call(*args, **kw):
            used[name].add(key(args, kw))
            return fn(*args, **kw)
        return call

    s._decode = spy(decode, "decode", lambda a, kw: kw["window"])
    s._prefill = spy(prefill, "prefill", lambda a, kw: (kw["window"], a[2].shape[1]))  # tokens [B, T]
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.arange(1, 49, 2))  # 24 distinct lengths, windows 16 to 64
    calls = []
    for part in range(3):
        prompts = [list(rng.integers(0, 64, n)) for n in lengths[part::3]]
        calls.append((prompts, [SamplingParams(max_tokens=int(m), seed=int(m))
                                for m in rng.integers(1, 14, len(prompts))]))
    for prompts, params in calls + calls[:1]:  # the last call repeats the first one's buckets
        assert all(len(o.tokens) >= 1 for o in s.generate(prompts, params))
    n_window, n_prefill = len(config.cache_buckets), len(config.prefill_buckets)
    assert 2 <= len(used["decode"]) and 2 <= len(used["prefill"])
    assert decode._cache_size() == len(used["decode"]) <= n_window
    assert prefill._cache_size() == len(used["prefill"]) <= n_window * n_prefill
