"""Flax NNX decoder for the Qwen2 / Qwen2.5 and Llama 3 / 3.1 families.

One implementation: GQA attention with rotary embeddings, RMSNorm, SwiGLU MLP. The family
differences (qkv bias, llama3 rope scaling, tied embeddings) come from `ModelConfig`.

Every parameter carries its logical PartitionSpec (`out_sharding`, mesh axes `data`, `fsdp`,
`tensor`) from the moment it is created; `tepo_jax.sharding` turns those into NamedShardings
for a concrete mesh. Activations are constrained at block boundaries when a mesh is given.

Two call paths share all the code:
- full forward: `model(tokens, positions, segment_ids=...)` — padding and packed sequences via
  segment ids (0 = padding), causal within a segment;
- KV-cache forward: `model(tokens, positions, cache=cache, valid=...)` — the new tokens' keys and
  values are written into the cache at their positions, and each query attends to every cache
  slot at a position <= its own. Prefill and one-token decode are the same function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.rope import RopeTables, apply_rope, inverse_frequencies, rope_tables

# Mesh axes the batch dimension of activations is split over.
BATCH_AXES = ("data", "fsdp")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class LayerCache(NamedTuple):
    """Keys [B, K, H, S] and values [B, K, S, H] of one layer (S indexed by token position).

    Heads before positions: attention reads the cache as batched matrices per (B, K) with no
    transpose (a [B, S, K, H] cache was copied into that layout by every layer at every decode
    step: ~2 copies of the whole attended window per layer per step). The keys are stored
    transposed, [H, S], so the scores q·kᵀ are a plain [Q, H] × [H, S] product: with [S, H]
    keys, the matmul repacked the whole key window of every layer at every decode step (on a
    2-core CPU at 8 slots, ~0.3 ms per layer and step against ~0.1 ms with [H, S] keys).
    """

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        """S, the positions the cache holds."""
        return self.v.shape[2]


KVCache = tuple  # tuple[LayerCache, ...], one per layer


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> LayerCache:
    """The shapes of one layer's `LayerCache` (keys [B, K, H, S], values [B, K, S, H])."""
    k, h = cfg.num_kv_heads, cfg.head_dim
    return LayerCache((batch, k, h, max_len), (batch, k, max_len, h))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shapes = cache_shapes(cfg, batch, max_len)
    dtype = dtype or cfg.dtype
    return tuple(LayerCache(jnp.zeros(shapes.k, dtype), jnp.zeros(shapes.v, dtype))
                 for _ in range(cfg.num_layers))


class _InitKeys:
    """One init key per parameter, folded from a single `rngs.params()` key.

    A Python counter instead of drawing from `nnx.Rngs` per parameter: under eval_shape / jit
    every Rngs draw updates a traced counter, which made tracing a 70B-size init take ~10 s.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.base, self.count = rngs.params(), 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.base, self.count)


def _param(keys: _InitKeys, shape, sharding, dtype, init="normal") -> nnx.Param:
    if init == "normal":
        value = 0.02 * jax.random.normal(keys(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    # Metadata only: tepo_jax.sharding places values on a concrete mesh (see its docstring).
    return nnx.Param(value, out_sharding=sharding, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: ModelConfig, keys: _InitKeys):
        self.scale = _param(keys, (dim,), (None,), cfg.param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in fp32 like the reference implementation, then scale in the input dtype.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, keys: _InitKeys):
        d, n, k, h, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.q_proj = _param(keys, (d, n, h), ("fsdp", "tensor", None), pd)
        self.k_proj = _param(keys, (d, k, h), ("fsdp", "tensor", None), pd)
        self.v_proj = _param(keys, (d, k, h), ("fsdp", "tensor", None), pd)
        self.o_proj = _param(keys, (n, h, d), ("tensor", None, "fsdp"), pd)
        if cfg.qkv_bias:
            self.q_bias = _param(keys, (n, h), ("tensor", None), pd, init="zeros")
            self.k_bias = _param(keys, (k, h), ("tensor", None), pd, init="zeros")
            self.v_bias = _param(keys, (k, h), ("tensor", None), pd, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(keys, (d,), (None,), pd, init="zeros")

    def _project(self, x, kernel, bias_name):
        y = jnp.einsum("BTD,DNH->BTNH", x, kernel[...].astype(x.dtype))
        if self.cfg.qkv_bias:
            y = y + getattr(self, bias_name)[...].astype(x.dtype)
        return y

    def __call__(self, x, rope: RopeTables, mask, cache: Optional[LayerCache], write_index):
        cfg = self.cfg
        q = apply_rope(self._project(x, self.q_proj, "q_bias"), rope)
        k = apply_rope(self._project(x, self.k_proj, "k_bias"), rope)
        v = self._project(x, self.v_proj, "v_bias")
        # Full forward: key index == query index and the mask is causal by index, so query
        # block [i, e) never sees keys >= e. The cache path masks by position: one block.
        if cache is not None:
            keys_t, v, cache = _write_cache(cache, k, v, write_index)   # [B, K, H, S], [B, K, S, H]
            out = _attend(q, keys_t, v, mask, cfg.head_dim ** -0.5, None, keys_transposed=True)
        else:
            k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # BKTH
            out = _attend(q, k, v, mask, cfg.head_dim ** -0.5, _causal_query_block(x.shape[1]))
        out = jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(x.dtype))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(x.dtype)
        return out, cache


def _causal_query_block(t: int) -> Optional[int]:
    """Query rows per block of the causal full forward: about 8 blocks, multiples of 64.

    Block [i, e) attends to keys [0, e) only, so the score work is (n + 1) / 2n of the full
    T × T square (56% for 8 blocks) and each block's scores stay cache-sized on CPU.
    """
    block = max(64, -(-t // 8 // 64) * 64)
    return block if block < t else None


def _attend(q, k, v, mask, scale: float, q_block: Optional[int], keys_transposed: bool = False):
    """Softmax attention. q [B, T, N, H], k/v [B, K, S, H], mask bool[B, T, S] -> [B, T, N, H].
    `keys_transposed`: k is [B, K, H, S] (the cache's layout, `LayerCache`; one block only).

    Heads are grouped per kv head (GQA) and moved in front of the sequence axes, so the two
    score einsums are plain batched matmuls over [B, K, G] (no transpose of the [.., T, S]
    scores). With `q_block`, query block [i, e) only sees keys [0, e) (the causal full forward):
    the skipped keys are masked anyway, so the result is that of the full softmax (except in
    rows with no visible key at all, padding queries, whose output is unused).
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    q = jnp.transpose(q.reshape(b, t, kv, n // kv, h), (0, 2, 3, 1, 4))   # BKGTH
    if q_block is None:
        out = _attend_block(q, k, v, mask, scale, keys_transposed)
    else:
        # Splits and concatenates, no slices: the gradient of a split is one concatenate and
        # that of a concatenate is slices, while the gradient of each slice k[:, :, :e] is a
        # zero-padded full-length copy, all summed (an extra [B, K, S, H] pass per block and
        # layer). Block i sees key blocks 0..i, so each block's keys are the first i + 1 key
        # blocks joined: the same keys in the same order, the same values bit for bit.
        ends = list(range(q_block, t, q_block)) + [t]
        q_blocks = jnp.split(q, ends[:-1], axis=3)
        k_blocks = jnp.split(k, ends[:-1], axis=2)
        v_blocks = jnp.split(v, ends[:-1], axis=2)
        out = jnp.concatenate([_attend_block(qb, jnp.concatenate(k_blocks[:i + 1], axis=2),
                                             jnp.concatenate(v_blocks[:i + 1], axis=2),
                                             mask[:, e - qb.shape[3]:e, :e], scale)
                               for i, (qb, e) in enumerate(zip(q_blocks, ends))], axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def _attend_block(q, k, v, mask, scale: float, keys_transposed: bool = False):
    """q [B, K, G, Q, H], k/v [B, K, S, H] (k [B, K, H, S] if `keys_transposed`), mask
    bool[B, Q, S] -> [B, K, G, Q, H]."""
    spec = "BKGQH,BKHS->BKGQS" if keys_transposed else "BKGQH,BKSH->BKGQS"
    scores = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("BKGQS,BKSH->BKGQH", probs, v)


def _write_cache(cache: LayerCache, k, v, write_index):
    """Scatter k/v [B, T, K, H] into the cache (`LayerCache`: keys [B, K, H, S], values
    [B, K, S, H]) at positions write_index [B, T]; out-of-range is dropped. (Indices b, :, s and
    b, :, :, s put the [B, T] index dims first: the update is k or v as it is, [B, T, K, H].)"""
    b = jnp.arange(k.shape[0])[:, None]
    new_k = cache.k.at[b, :, :, write_index].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[b, :, write_index].set(v.astype(cache.v.dtype), mode="drop")
    return new_k.astype(k.dtype), new_v.astype(v.dtype), LayerCache(new_k, new_v)


def _matmul(x, kernel):
    """x [B, T, K] · kernel [K, O] -> [B, T, O], computed as one 2-D matmul [B·T, K] × [K, O].

    Why not the einsum "BTK,KO->BTO": on XLA CPU its autodiff computed each weight gradient
    from a transposed copy of the activation gradient; the 2-D form's backward multiplies the
    arrays as they are (the MLP's fwd + bwd at [4, 512, 512] × [512, 1408]: 198 → 146 ms),
    with the same values, bit for bit. (The attention projections keep their einsums: in the
    2-D form their values moved by float rounding.)
    """
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(x.shape[:-1] + kernel.shape[-1:])


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, keys: _InitKeys):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.gate_proj = _param(keys, (d, f), ("fsdp", "tensor"), pd)
        self.up_proj = _param(keys, (d, f), ("fsdp", "tensor"), pd)
        self.down_proj = _param(keys, (f, d), ("tensor", "fsdp"), pd)
        self.bias = cfg.mlp_bias
        if cfg.mlp_bias:
            self.gate_bias = _param(keys, (f,), ("tensor",), pd, init="zeros")
            self.up_bias = _param(keys, (f,), ("tensor",), pd, init="zeros")
            self.down_bias = _param(keys, (d,), (None,), pd, init="zeros")

    def __call__(self, x):
        gate = _matmul(x, self.gate_proj[...].astype(x.dtype))
        up = _matmul(x, self.up_proj[...].astype(x.dtype))
        if self.bias:
            gate, up = gate + self.gate_bias[...].astype(x.dtype), up + self.up_bias[...].astype(x.dtype)
        out = _matmul(jax.nn.silu(gate) * up, self.down_proj[...].astype(x.dtype))
        return out + self.down_bias[...].astype(x.dtype) if self.bias else out


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, keys: _InitKeys):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, keys)
        self.attn = Attention(cfg, keys)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, keys)
        self.mlp = MLP(cfg, keys)

    def __call__(self, x, rope, mask, cache, write_index):
        attn_out, cache = self.attn(self.input_norm(x), rope, mask, cache, write_index)
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x)), cache


class Decoder(nnx.Module):
    """Decoder-only LM. `mesh` (optional) enables activation sharding constraints."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Optional[jax.sharding.Mesh] = None,
                 remat: bool = False):
        self.cfg = cfg
        self.mesh = mesh
        self.remat = remat
        keys = _InitKeys(rngs)
        self.embed = _param(keys, (cfg.vocab_size, cfg.hidden_size), ("tensor", "fsdp"), cfg.param_dtype)
        self.layers = nnx.List([Block(cfg, keys) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, keys)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(keys, (cfg.hidden_size, cfg.vocab_size), ("fsdp", "tensor"), cfg.param_dtype)

    def _constrain(self, x):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(BATCH_AXES)))

    def hidden_states(self, tokens, positions, *, segment_ids=None, cache: Optional[KVCache] = None,
                      valid=None):
        """Final-norm hidden states [B, T, D] (and the updated cache, or None).

        tokens, positions: int[B, T]. Full forward: `segment_ids` int[B, T] (0 = padding;
        defaults to all ones). Cache forward: `cache` from `init_cache`, `valid` bool[B, T]
        marks the tokens to write (padding is neither written nor attended to).
        """
        if cache is None:
            mask, write_index = _segment_mask(tokens, segment_ids), None
        else:
            cache_len = cache[0].length
            mask = _cache_mask(positions, cache_len)
            # Padding is written out of range, which the scatter drops.
            write_index = positions if valid is None else jnp.where(valid, positions, cache_len)
        x = self._constrain(jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.dtype))
        # cos/sin once for all layers; inv_freq is a trace-time numpy constant, not module state
        # (a numpy attribute would become a leaf).
        cfg = self.cfg
        rope = rope_tables(positions, inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        # Layers unrolled, not a lax.scan over stacked params: on XLA CPU the scanned RL train
        # step (4 layers, fwd + bwd) compiled in 4.9 s against 3.1 s unrolled.
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            block_fn = nnx.remat(Block.__call__) if self.remat else Block.__call__
            x, layer_cache = block_fn(layer, x, rope, mask, layer_cache, write_index)
            x = self._constrain(x)
            new_cache.append(layer_cache)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def unembed_kernel(self) -> jax.Array:
        """[D, V] output projection (the embedding, transposed, when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., V]; fp32 accumulation even for bf16 compute."""
        kernel = self.unembed_kernel().astype(hidden.dtype)
        return jnp.einsum("BTD,DV->BTV", hidden, kernel, preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, *, segment_ids=None, cache=None, valid=None):
        hidden, cache = self.hidden_states(tokens, positions, segment_ids=segment_ids, cache=cache,
                                           valid=valid)
        return self.logits(hidden), cache


def _segment_mask(tokens, segment_ids):
    """bool[B, T, T]: same non-padding segment and causal by index (packed sequences)."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    t = tokens.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same & (segment_ids[:, None, :] != 0)


def _cache_mask(positions, cache_len: int):
    """bool[B, T, S]: a query attends to cache slots at positions <= its own.

    Every slot at a position <= p was written by this sequence before (or with) the token at p,
    so stale entries of an earlier request in a reused slot are never visible.
    """
    return jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]


def count_params(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(x.size for x in jax.tree.leaves(state))


def build_abstract(cfg: ModelConfig, mesh=None) -> Decoder:
    """The model with ShapeDtypeStruct leaves: no memory allocated (for sizing and loading)."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), mesh=mesh))
