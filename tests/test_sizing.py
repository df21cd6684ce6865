"""Sizing: exact parts equal the real per-device shards; the activation estimate is checked
against XLA's memory analysis of a compiled train step on 8 simulated CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tepo_jax import cli, sizing
from tepo_jax.logprobs import logprob_and_entropy
from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import init_cache
from tepo_jax.models.presets import preset
from tepo_jax.sharding import MeshConfig, batch_sharding, create_sharded_model, make_mesh

# 2 KV heads do not divide tensor=4: the k/v projections are replicated over that axis.
TINY = ModelConfig(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)
MESHES = [MeshConfig(1, 8, 1), MeshConfig(1, 2, 4), MeshConfig(2, 2, 2), MeshConfig(8, 1, 1)]


def _device_bytes(tree) -> list[int]:
    """Bytes held by each device over all arrays of a pytree."""
    per = {d: 0 for d in jax.devices()}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] += shard.data.nbytes
    return list(per.values())


# Two meshes cover all three axes and the replication case (each costs a compile).
@pytest.mark.parametrize("mesh_cfg", [MeshConfig(1, 2, 4), MeshConfig(2, 2, 2)], ids=str)
def test_param_bytes_equal_real_shards(mesh_cfg):
    mesh = make_mesh(mesh_cfg)
    model = create_sharded_model(TINY, mesh)
    real = _device_bytes(nnx.state(model, nnx.Param))
    assert len(set(real)) == 1  # every device holds the same amount
    est, _ = sizing.param_bytes_per_device(TINY, sizing.abstract_mesh(mesh_cfg, 8))
    assert est == real[0]
    if mesh_cfg.tensor == 4:  # kv projections replicated over tensor: more than a perfect split
        assert est > TINY.num_params * 4 / 8


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=str)
def test_kv_cache_bytes_equal_real_cache(mesh_cfg):
    mesh = make_mesh(mesh_cfg)
    slots, length = 8, 32
    shardings = sizing.kv_cache_shardings(TINY, mesh, slots, length)
    cache = jax.jit(lambda: init_cache(TINY, slots, length), out_shardings=shardings)()
    real = _device_bytes(cache)
    assert len(set(real)) == 1
    est = sizing.estimate_memory(TINY, sizing.abstract_mesh(mesh_cfg, 8),
                                 sizing.Workload(slots=slots, cache_len=length))
    assert est.components["kv_cache"] == real[0]


def _measured_train_step_bytes(mesh_cfg, batch, seq_len):
    """argument + output - aliased + temp bytes of a compiled AdamW step (per device)."""
    mesh = make_mesh(mesh_cfg)
    graphdef, params = nnx.split(create_sharded_model(TINY, mesh), nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = jax.jit(tx.init)(params)

    def step(params, opt_state, tokens):
        def loss_fn(p):
            positions = jnp.broadcast_to(jnp.arange(seq_len), tokens.shape)
            logits, _ = nnx.merge(graphdef, p)(tokens, positions)
            return -logprob_and_entropy(logits[:, :-1], tokens[:, 1:])[0].mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding(mesh))
    m = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


# Seen on CPU (8 simulated devices, no remat): estimate / measured = 0.84-0.92 with fsdp=8 and
# fsdp=4 x tensor=2, 0.95-1.0 with data=8 (B=8..16, T=128..256). With remat the CPU compiler
# does not lower the measured peak (it schedules the recomputation early), so remat is not
# checked here.
ESTIMATE_FACTOR = 1.5


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(1, 4, 2)], ids=str)
def test_estimate_close_to_measured_train_step(mesh_cfg):
    batch, seq_len = 8, 128
    measured = _measured_train_step_bytes(mesh_cfg, batch, seq_len)
    est = sizing.estimate_memory(TINY, sizing.abstract_mesh(mesh_cfg, 8),
                                 sizing.Workload(batch=batch, seq_len=seq_len))
    ratio = est.total / measured
    print(f"estimate {est.total} B, measured {measured} B, ratio {ratio:.3f}")
    assert 1 / ESTIMATE_FACTOR <= ratio <= ESTIMATE_FACTOR


def test_72b_on_one_80gb_device_is_refused_before_allocating():
    cfg = preset("Qwen2.5-72B", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    mesh = sizing.abstract_mesh(MeshConfig(1, 1, 1), 1)
    frozen = sizing.Workload(optimizer="none", slots=8, cache_len=1024)
    with pytest.raises(sizing.MemoryBudgetError, match=r"largest part is params") as e:
        sizing.check_fits(cfg, mesh, frozen, device_memory="80GB")
    assert "fsdp" in str(e.value) and "params alone" in str(e.value)
    # Training: the AdamW moments are bigger still; the params alone are still called out.
    with pytest.raises(sizing.MemoryBudgetError, match=r"largest part is optimizer.*params alone"):
        sizing.check_fits(cfg, mesh, sizing.Workload(), device_kind="h100")


def test_fits_on_a_big_enough_mesh_and_remat_shrinks_activations():
    cfg = preset("Qwen2.5-7B", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    mesh = sizing.abstract_mesh(MeshConfig(1, 8, 1), 8)
    w = sizing.Workload(batch=8, seq_len=4096, slots=64, cache_len=4096)
    with pytest.raises(sizing.MemoryBudgetError, match=r"largest part is activations.*turn on remat"):
        sizing.check_fits(cfg, mesh, w, device_memory="95GB")
    est = sizing.check_fits(cfg, mesh, sizing.Workload(**{**w.__dict__, "remat": True}), device_memory="95GB")
    assert est.fits
    # bf16 params split 8 ways exactly (every sharded dim divides 8); fp32 moments are 4x that.
    assert est.components["params"] == pytest.approx(cfg.num_params * 2 / 8, rel=1e-3)
    assert est.components["optimizer"] == 4 * est.components["params"]


def test_parse_bytes_and_device_table():
    assert sizing.parse_bytes("95GB") == 95 * 10 ** 9
    assert sizing.parse_bytes("16GiB") == 16 * 2 ** 30
    assert sizing.parse_bytes(1234) == 1234
    assert sizing.memory_for_kind("NVIDIA H100 80GB HBM3") == 80 * 10 ** 9
    assert sizing.memory_for_kind("TPU v5 lite") == 16 * 2 ** 30
    assert sizing.memory_for_kind("TPU v5p") == 95 * 10 ** 9
    assert sizing.memory_for_kind("cpu") is None
    with pytest.raises(ValueError):
        sizing.parse_bytes("lots")


def test_cli_exit_codes(capsys):
    base = ["size", "--model", "Qwen2.5-7B", "--mesh", "1,8,1", "--devices", "8", "--device-memory", "95GB",
            "--slots", "64", "--cache-len", "4096", "--batch", "8", "--seq-len", "4096"]
    assert cli.main(base + ["--remat"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and "activations" in out and "fits" in out
    assert cli.main(base) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli.main(["size", "--model", "No-Such-Model", "--devices", "1", "--device-memory", "1GB"]) == 2
    assert cli.main(["size", "--model", "Qwen2.5-7B", "--mesh", "1,3,1", "--devices", "8",
                     "--device-memory", "1GB"]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["size", "--model", "Qwen2.5-7B", "--mesh", "bad"])
    assert e.value.code == 2
