"""Our decoder vs transformers' PyTorch Qwen2 / Llama on tiny random checkpoints (fp32).

Each checkpoint is built and saved here, loaded through the real loader (`load_hf`), and its
logits compared with the PyTorch model's: max abs diff <= 1e-4. Also padding, packed
sequences and the KV-cache path (prefill, then one token at a time, ragged rows).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tepo_jax.checkpoints import load_hf
from tepo_jax.models.decoder import init_cache
from tepo_jax.testing.hf_models import hf_logits, make_tiny_hf_checkpoint

ATOL = 1e-4
VOCAB = 96
LLAMA3 = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)

# name -> make_tiny_hf_checkpoint kwargs. GQA ratios 1/2/4, head_dim != hidden/heads, tied and
# untied, llama3 scaling on and off.
CASES = {
    "qwen2-mha-tied": dict(family="qwen2", hidden_size=64, num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "qwen2-gqa2-headdim24": dict(family="qwen2", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=24),
    "qwen2-gqa4-tied": dict(family="qwen2", hidden_size=48, num_heads=8, num_kv_heads=2,
                            tie_word_embeddings=True),
    "llama-gqa4-llama3": dict(family="llama", hidden_size=64, num_heads=8, num_kv_heads=2,
                              rope_scaling=LLAMA3),
    "llama-gqa2-noscale-headdim8": dict(family="llama", hidden_size=64, num_heads=4, num_kv_heads=2,
                                        head_dim=8),
    "llama-mha-llama3-headdim32": dict(family="llama", hidden_size=64, num_heads=2, num_kv_heads=2,
                                       head_dim=32, rope_scaling=LLAMA3, tie_word_embeddings=True),
}


@functools.cache
def _checkpoint(name, tmp_root):
    kw = dict(CASES[name])
    family = kw.pop("family")
    path = f"{tmp_root}/{name}"
    torch_model = make_tiny_hf_checkpoint(path, family, vocab_size=VOCAB, num_layers=2, seed=len(name), **kw)
    return torch_model, load_hf(path)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids=segment_ids)[0]


@functools.partial(jax.jit, static_argnums=0)
def _cached_forward(graphdef, state, tokens, positions, cache, valid):
    return nnx.merge(graphdef, state)(tokens, positions, cache=cache, valid=valid)


def forward(model, tokens, positions, segment_ids=None):
    graphdef, state = nnx.split(model)
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids)
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), segment_ids))


def _tokens(rng, b, t):
    return rng.randint(0, VOCAB, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_root):
    torch_model, model = _checkpoint(name, tmp_root)
    rng = np.random.RandomState(0)
    tokens = _tokens(rng, 2, 24)
    # Positions run past original_max_position_embeddings (16) into the scaled region.
    positions = np.broadcast_to(np.arange(24) + 40, (2, 24)).astype(np.int32)
    ours = forward(model, tokens, positions)
    ref = hf_logits(torch_model, tokens, positions)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # Positions from 0 as well (transformers' default position ids).
    np.testing.assert_allclose(forward(model, tokens, positions - 40), hf_logits(torch_model, tokens),
                               atol=ATOL, rtol=0)


def test_llama3_scaling_matters(tmp_root):
    """The parity case above would not catch a scaling bug if scaling changed nothing."""
    _, model = _checkpoint("llama-gqa4-llama3", tmp_root)
    unscaled = nnx.clone(model)
    unscaled.cfg = model.cfg.replace(rope_scaling=None)
    for layer in unscaled.layers:
        layer.attn.cfg = unscaled.cfg
    tokens = _tokens(np.random.RandomState(1), 1, 24)
    positions = (np.arange(24) + 40)[None].astype(np.int32)
    diff = np.abs(forward(model, tokens, positions) - forward(unscaled, tokens, positions)).max()
    assert diff > 100 * ATOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_unpadded_transformers(side, tmp_root):
    torch_model, model = _checkpoint("qwen2-gqa2-headdim24", tmp_root)
    rng = np.random.RandomState(2)
    lengths, t = [20, 13], 20
    tokens = _tokens(rng, 2, t)
    segment_ids = np.zeros((2, t), np.int32)
    positions = np.zeros((2, t), np.int32)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        segment_ids[i, sl] = 1
        positions[i, sl] = np.arange(n)
    ours = forward(model, tokens, positions, segment_ids)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        ref = hf_logits(torch_model, tokens[i:i + 1, sl])[0]
        np.testing.assert_allclose(ours[i, sl], ref, atol=ATOL, rtol=0)
    assert np.isfinite(ours).all()


def _packed_row_matches_separate_runs(name, tmp_root, parts, seed):
    """One row of two packed sequences and padding (`parts` lengths): each sequence's logits
    equal transformers' run of it alone. Returns (model, tokens, positions, ours, second slice)."""
    torch_model, model = _checkpoint(name, tmp_root)
    tokens = _tokens(np.random.RandomState(seed), 1, sum(parts))
    segment_ids = np.array([[1] * parts[0] + [2] * parts[1] + [0] * parts[2]], np.int32)
    positions = np.array([list(range(parts[0])) + list(range(parts[1])) + [0] * parts[2]], np.int32)
    ours = forward(model, tokens, positions, segment_ids)[0]
    first, second = slice(0, parts[0]), slice(parts[0], parts[0] + parts[1])
    np.testing.assert_allclose(ours[first], hf_logits(torch_model, tokens[:, first])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours[second], hf_logits(torch_model, tokens[:, second])[0], atol=ATOL, rtol=0)
    return model, tokens, positions, ours, second


def test_packed_sequences_match_separate_transformers_runs(tmp_root):
    # Two sequences and 4 padding slots in one row of 22.
    model, tokens, positions, ours, second = _packed_row_matches_separate_runs("llama-gqa4-llama3", tmp_root,
                                                                               [11, 7, 4], seed=3)
    # Without segment ids the second sequence would see the first: the mask is doing the work.
    unpacked = forward(model, tokens, positions)[0]
    assert np.abs(unpacked[second] - ours[second]).max() > 100 * ATOL


def test_long_packed_rows_attend_in_query_blocks_and_match_transformers(tmp_root):
    """A long row attends in causal query blocks (block [i, e) sees keys [0, e) only); with two
    packed sequences and padding it still equals transformers' separate runs, a sequence
    boundary falling inside a block."""
    from tepo_jax.models.decoder import _causal_query_block

    parts = [170, 110, 20]
    t = sum(parts)
    assert _causal_query_block(t) is not None and t % _causal_query_block(t)
    _packed_row_matches_separate_runs("qwen2-gqa2-headdim24", tmp_root, parts, seed=4)


def test_query_blocked_attention_has_the_gradient_of_the_full_square():
    """The causal query blocks (split q, keys as joined key blocks) give the values and the
    q/k/v gradients of one softmax over the whole T x T square, at a T that is not a multiple
    of the block and with packed-sequence and padding rows in the mask."""
    from tepo_jax.models.decoder import _attend, _causal_query_block

    b, t, n, kv, h = 2, 300, 4, 2, 8
    block = _causal_query_block(t)
    assert block is not None and t % block
    rng = np.random.RandomState(7)
    q, w = (jnp.asarray(rng.randn(b, t, n, h).astype(np.float32)) for _ in range(2))
    k, v = (jnp.asarray(rng.randn(b, kv, t, h).astype(np.float32)) for _ in range(2))
    segment = np.ones((b, t), np.int32)
    segment[1, 170:280], segment[1, 280:] = 2, 0                    # a packed row, then padding
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] != 0)
    causal = np.tril(np.ones((t, t), bool))[None]
    mask = jnp.asarray(same & causal | np.eye(t, dtype=bool)[None])   # every row sees a key

    def loss(q_block):
        return lambda q, k, v: jnp.sum(_attend(q, k, v, mask, h ** -0.5, q_block) * w)

    blocked = jax.jit(jax.value_and_grad(loss(block), argnums=(0, 1, 2)))(q, k, v)
    full = jax.jit(jax.value_and_grad(loss(None), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(blocked[0], full[0], rtol=1e-5)
    for got, want in zip(blocked[1], full[1]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("name", ["qwen2-gqa2-headdim24", "llama-gqa4-llama3"])
def test_kv_cache_prefill_then_decode_matches_full_forward(name, tmp_root):
    """Ragged prompts (right-padded, `valid` mask), prefill, then one token at a time."""
    _, model = _checkpoint(name, tmp_root)
    rng = np.random.RandomState(4)
    prompt_lens, steps, max_len = np.array([9, 5, 1]), 6, 32
    b, p = len(prompt_lens), prompt_lens.max()
    full = _tokens(rng, b, p + steps)  # row i: prompt = full[i, :len_i], then `steps` new tokens
    graphdef, state = nnx.split(model)
    prompt_valid = np.arange(p)[None] < prompt_lens[:, None]
    logits, cache = _cached_forward(graphdef, state, jnp.asarray(full[:, :p]),
                                    jnp.asarray(np.broadcast_to(np.arange(p), (b, p)).astype(np.int32)),
                                    init_cache(model.cfg, b, max_len), jnp.asarray(prompt_valid))
    got = [[np.asarray(logits[i, n - 1])] for i, n in enumerate(prompt_lens)]
    seqs = [list(full[i, :n]) for i, n in enumerate(prompt_lens)]
    for s in range(steps):
        step_tokens = np.array([[full[i, p + s]] for i in range(b)], np.int32)
        step_pos = (prompt_lens + s)[:, None].astype(np.int32)
        logits, cache = _cached_forward(graphdef, state, jnp.asarray(step_tokens), jnp.asarray(step_pos),
                                        cache, jnp.ones((b, 1), bool))
        for i in range(b):
            got[i].append(np.asarray(logits[i, 0]))
            seqs[i].append(full[i, p + s])
    for i in range(b):
        seq = np.array(seqs[i], np.int32)[None]
        ref = forward(model, seq, np.arange(seq.shape[1], dtype=np.int32)[None])[0]
        np.testing.assert_allclose(np.stack(got[i]), ref[prompt_lens[i] - 1:], atol=1e-5, rtol=0)


def test_kv_cache_padding_is_not_written(tmp_root):
    """Padded prefill slots stay zero, so a later request reusing the cache sees nothing stale."""
    _, model = _checkpoint("qwen2-gqa2-headdim24", tmp_root)
    graphdef, state = nnx.split(model)
    tokens = _tokens(np.random.RandomState(5), 2, 6)
    valid = np.array([[True] * 6, [True] * 2 + [False] * 4])
    positions = np.broadcast_to(np.arange(6), (2, 6)).astype(np.int32)
    _, cache = _cached_forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
                               init_cache(model.cfg, 2, 8), jnp.asarray(valid))
    k = np.transpose(np.asarray(cache[0].k), (0, 3, 1, 2))  # [B, K, H, S] -> [B, S, K, H]
    assert (np.abs(k[0, :6]).max(axis=(-1, -2)) > 0).all() and (k[0, 6:] == 0).all()
    assert (k[1, 2:] == 0).all() and (np.abs(k[1, :2]).max(axis=(-1, -2)) > 0).all()
