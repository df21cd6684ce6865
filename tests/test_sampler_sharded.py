"""The sampler on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated CPU devices equals 1 device."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tepo_jax.checkpoints.hf import load_hf
from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams
from tepo_jax.sharding import MeshConfig, make_mesh
from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint

CONFIG = SamplerConfig(max_slots=4, cache_buckets=(32,), prefill_buckets=(16,), steps_per_call=8, eos_ids=(2,))


def _run(sampler, prompts):
    params = [SamplingParams(greedy=True, max_tokens=12), SamplingParams(top_p=0.9, max_tokens=12, seed=1),
              SamplingParams(temperature=0.8, top_k=10, max_tokens=12, seed=2), SamplingParams(max_tokens=5, seed=3),
              SamplingParams(greedy=True, max_tokens=12)]  # 5 requests, 4 slots: one refill
    return sampler.generate(prompts, params)


def test_sharded_sampler_equals_unsharded(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    make_tiny_hf_checkpoint(tmp_path, "qwen2", vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2, seed=1)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = Sampler(load_hf(tmp_path, mesh=mesh), CONFIG)
    plain = Sampler(load_hf(tmp_path), CONFIG)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 128, n)) for n in (4, 9, 17, 6, 3)]

    outs, ref = _run(sharded, prompts), _run(plain, prompts)

    for o, r in zip(outs, ref):
        np.testing.assert_array_equal(o.tokens, r.tokens)
        assert o.finish_reason == r.finish_reason
        np.testing.assert_allclose(o.logprobs, r.logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(o.entropies, r.entropies, atol=1e-4, rtol=0)
    for layer in sharded.cache:  # still on its sharding after donation through prefill/decode
        for x in layer:
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None)), 4)
    q = sharded._state["layers"][0]["attn"]["q_proj"][...]
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor", None)), 3)


def test_slots_must_divide_the_batch_axes(tmp_path):
    make_tiny_hf_checkpoint(tmp_path, "llama", vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, seed=0)
    model = load_hf(tmp_path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    with pytest.raises(ValueError, match="max_slots=6 must be a multiple of the mesh batch axes data\\*fsdp=4"):
        Sampler(model, CONFIG.replace(max_slots=6))
