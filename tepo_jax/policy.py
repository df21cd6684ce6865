"""The initial policy of a run, from its config (`config.model`): an HF checkpoint, a random
preset, or the demo's tiny Qwen2-shaped model; and whether each phase of the run fits the
devices with it (`check_config_fits`, formulas in sizing.py)."""
from __future__ import annotations

from typing import Optional

from tepo_jax.checkpoints.hf import load_hf, load_hf_config
from tepo_jax.config import RL, SFT
from tepo_jax.models.config import ModelConfig, dtype_named
from tepo_jax.models.decoder import Decoder
from tepo_jax.models.presets import preset
from tepo_jax.sharding import create_sharded_model
from tepo_jax.sizing import MemoryBudgetError, MemoryEstimate, Workload, check_fits

# The tiny BPE's vocabulary is at most this big (tiny_tokenizer: 1024 / 2048 merges + tags).
TINY_VOCAB_BOUND = 4096


def model_config(config, vocab_size: int) -> ModelConfig:
    """The preset's or the tiny model's shape (not for HF checkpoints: see target_model_config)."""
    m = config.model
    dtype, param_dtype = dtype_named(m.dtype), dtype_named(m.param_dtype)
    if m.preset:
        return preset(m.preset, dtype=dtype, param_dtype=param_dtype)
    return ModelConfig(family="qwen2", vocab_size=vocab_size, hidden_size=m.tiny_hidden,
                       intermediate_size=4 * m.tiny_hidden, num_layers=m.tiny_layers,
                       num_heads=m.tiny_heads, num_kv_heads=m.tiny_kv_heads,
                       head_dim=m.tiny_hidden // m.tiny_heads, qkv_bias=True,
                       tie_word_embeddings=True, rope_theta=10_000.0,
                       max_position_embeddings=config.rollout.cache_len, dtype=dtype,
                       param_dtype=param_dtype)


def target_model_config(config, vocab_size: Optional[int] = None) -> ModelConfig:
    """The policy's shape without allocating it: the HF checkpoint's config.json, the preset,
    or the tiny model (its vocabulary: `vocab_size`, else an upper bound)."""
    m = config.model
    if m.hf_checkpoint:
        return load_hf_config(m.hf_checkpoint, dtype=dtype_named(m.dtype), param_dtype=dtype_named(m.param_dtype))
    return model_config(config, vocab_size or TINY_VOCAB_BOUND)


def build_model(config, mesh, tokenizer) -> Decoder:
    """The initial policy on `mesh`: the HF checkpoint's weights, else random ones from `seed`."""
    m = config.model
    if m.hf_checkpoint:
        return load_hf(m.hf_checkpoint, mesh=mesh, dtype=dtype_named(m.dtype),
                       param_dtype=dtype_named(m.param_dtype), remat=m.remat)
    return create_sharded_model(model_config(config, len(tokenizer)), mesh, seed=config.seed, remat=m.remat)


def config_workloads(config) -> dict[str, Workload]:
    """What each phase of a run puts on the devices, per phase its mode runs (SFT, RL).

    Worst cases: every packed row as long as the cache (SFT: sft.seq_len); one micro-batch of
    rows at a time; the sampler's slots for all trajectories of a step. The driver keeps the
    initial model beside the train state (one frozen copy); an sft_then_rl run with a KL term
    also loads the SFT result as the reference (a second one)."""
    c, chunk = config, config.loss.seq_chunk or None
    out = {}
    if c.mode != "rl":
        out[SFT] = Workload(batch=c.sft.batch_size, seq_len=c.sft.seq_len, remat=c.model.remat,
                            logits_chunk=chunk, frozen_params=1)
    if c.mode != "sft":
        rows = c.data.prompts_per_step * c.rollout.group_size
        frozen = 1 + int(c.mode == "sft_then_rl" and c.loss.kl_coef > 0)
        out[RL] = Workload(batch=-(-rows // c.train.micro_batches), seq_len=c.rollout.cache_len,
                           slots=rows, cache_len=c.rollout.cache_len, remat=c.model.remat,
                           logits_chunk=chunk, frozen_params=frozen)
    return out


def check_config_fits(config, model_cfg: ModelConfig, mesh, device_memory=None,
                      device_kind=None) -> dict[str, MemoryEstimate]:
    """{phase: MemoryEstimate}; MemoryBudgetError (naming the phase) if a phase cannot fit."""
    out = {}
    for phase, workload in config_workloads(config).items():
        try:
            out[phase] = check_fits(model_cfg, mesh, workload, device_memory, device_kind=device_kind)
        except MemoryBudgetError as e:
            raise MemoryBudgetError(f"{phase} phase: {e}") from None
    return out
