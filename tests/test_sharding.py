"""Sharded forward and parameter placement on 8 simulated CPU devices (see conftest.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tepo_jax.checkpoints import load_hf
from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import Decoder
from tepo_jax.sharding import (MeshConfig, batch_sharding, create_sharded_model, fit_spec, make_mesh,
                               param_shardings)
from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint

# 8 heads, 2 KV heads: on tensor=4 the KV projections cannot be split and must be replicated.
CFG = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False)
LAYOUTS = [(2, 2, 2), (1, 8, 1), (2, 1, 4), (8, 1, 1)]


def test_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


@functools.cache
def _mesh(layout):
    return make_mesh(MeshConfig(*layout))


@functools.cache
def _sharded(layout):
    return create_sharded_model(CFG, _mesh(layout), seed=0)


@functools.cache
def _unsharded():
    return Decoder(CFG, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids=segment_ids)[0]


def _inputs():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    positions = np.broadcast_to(np.arange(16), (8, 16)).astype(np.int32)
    segment_ids = np.ones((8, 16), np.int32)
    segment_ids[::3, 12:] = 0  # some right padding
    return tokens, positions, segment_ids


@pytest.fixture(scope="module")
def reference_logits():
    graphdef, state = nnx.split(_unsharded())
    return np.asarray(_forward(graphdef, state, *map(jnp.asarray, _inputs())))


def test_mesh_shape_and_axis_names():
    mesh = _mesh((2, 1, 4))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert MeshConfig(data=2, fsdp=-1).shape(8) == (2, 4, 1)
    with pytest.raises(ValueError):
        MeshConfig(data=3, fsdp=1, tensor=1).shape(8)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "x".join(map(str, l)))
def test_sharded_forward_matches_unsharded(layout, reference_logits):
    mesh = _mesh(layout)
    graphdef, state = nnx.split(_sharded(layout))
    inputs = [jax.device_put(x, batch_sharding(mesh)) for x in _inputs()]
    logits = _forward(graphdef, state, *inputs)
    np.testing.assert_allclose(np.asarray(logits), reference_logits, atol=1e-5, rtol=0)
    # Same random init as the unsharded model, parameter by parameter.
    for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(nnx.state(_unsharded()))):
        # (jit vs eager XLA may round the init's last bit differently)
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-7, rtol=0, err_msg=str(path))


def _unwrap(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


# The rules, written out for (data=2, fsdp=2, tensor=2) and (data=2, fsdp=1, tensor=4).
EXPECTED_SPECS = {
    (2, 2, 2): {
        ("embed",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("final_norm", "scale"): P(None),
        ("layers", 0, "attn", "q_proj"): P("fsdp", "tensor", None),
        ("layers", 0, "attn", "k_proj"): P("fsdp", "tensor", None),
        ("layers", 0, "attn", "o_proj"): P("tensor", None, "fsdp"),
        ("layers", 0, "attn", "q_bias"): P("tensor", None),
        ("layers", 1, "mlp", "gate_proj"): P("fsdp", "tensor"),
        ("layers", 1, "mlp", "down_proj"): P("tensor", "fsdp"),
        ("layers", 1, "input_norm", "scale"): P(None),
    },
    (2, 1, 4): {
        ("layers", 0, "attn", "q_proj"): P("fsdp", "tensor", None),
        # 2 KV heads do not divide over tensor=4: replicated along tensor.
        ("layers", 0, "attn", "k_proj"): P("fsdp", None, None),
        ("layers", 0, "attn", "v_bias"): P(None, None),
        ("layers", 0, "attn", "o_proj"): P("tensor", None, "fsdp"),
        ("layers", 0, "mlp", "up_proj"): P("fsdp", "tensor"),
    },
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "x".join(map(str, l)))
def test_param_shardings_follow_the_rules(layout):
    mesh = _mesh(layout)
    state = nnx.state(_sharded(layout), nnx.Param)
    declared = nnx.get_partition_spec(state)
    flat_declared = dict(nnx.to_flat_state(declared))
    for path, var in nnx.to_flat_state(state):
        sharding = var[...].sharding
        assert isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape, path
        want = fit_spec(_unwrap(flat_declared[path]), var[...].shape, mesh)
        assert sharding.spec == want, (path, sharding.spec, want)
        # Each device holds exactly its slice: the shard shape follows from the spec.
        assert var[...].addressable_shards[0].data.shape == sharding.shard_shape(var[...].shape), path
    for path, spec in EXPECTED_SPECS.get(layout, {}).items():
        assert dict(nnx.to_flat_state(state))[path][...].sharding.spec == spec, path


def test_load_hf_places_each_param_on_its_target_sharding(tmp_path):
    path = str(tmp_path / "ckpt")
    make_tiny_hf_checkpoint(path, "llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=8,
                            num_kv_heads=2, head_dim=8, seed=3)
    mesh = _mesh((2, 2, 2))
    sharded, plain = load_hf(path, mesh=mesh), load_hf(path)
    assert sharded.mesh is mesh
    state = nnx.state(sharded, nnx.Param)
    targets = dict(nnx.to_flat_state(param_shardings(state, mesh)))
    plain_state = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    for p, var in nnx.to_flat_state(state):
        assert var[...].sharding == _unwrap(targets[p]), p
        assert plain_state[p][...].sharding.device_set == {jax.local_devices()[0]}, p
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(plain_state[p][...]), err_msg=str(p))
    assert dict(nnx.to_flat_state(state))[("layers", 0, "attn", "q_proj")][...].sharding.spec == P("fsdp", "tensor", None)


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = _mesh((2, 1, 4))
    assert fit_spec(P("fsdp", "tensor", None), (64, 2, 8), mesh) == P("fsdp", None, None)
    assert fit_spec(P(("data", "tensor"),), (16,), mesh) == P(("data", "tensor"))
    assert fit_spec(P(("data", "tensor"),), (12,), mesh) == P(None)
