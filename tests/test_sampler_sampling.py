"""Token selection (temperature, top-k, top-p, greedy) against sort-based numpy; bad inputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import Decoder
from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams
from tepo_jax.logprobs import softmax_stats
from tepo_jax.sampling.sample import SlotSampling, _inverse_cdf, _sortable, sample_tokens, truncation_threshold


def numpy_kept(z, temperature, top_k, top_p):
    """transformers' order: temperature, top-k, then top-p on the renormalised top-k set (sorts)."""
    z = z.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if 0 < top_k < len(z):
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        p = np.where(keep, np.exp(z - z.max()), 0.0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        first = int(np.argmax(np.cumsum(p[order]) >= top_p))  # smallest prefix reaching top_p
        keep &= z >= z[order[first]]
    return keep


def slot_sampling(n, temperature=1.0, top_p=1.0, top_k=0, greedy=False, seed=None):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    seeds = jnp.arange(n, dtype=jnp.uint32) if seed is None else full(seed, jnp.uint32)
    return SlotSampling(full(temperature, jnp.float32), full(top_p, jnp.float32), full(top_k, jnp.int32),
                        full(greedy, bool), seeds)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.5, 50, 0.5),
                                                     (1.0, 3, 0.99), (1.0, 1, 1.0), (1.0, 0, 0.01)])
@pytest.mark.parametrize("chunk", [None, 128])  # 128 over V=300: the last chunk is clamped
def test_truncation_threshold_matches_sorting(temperature, top_k, top_p, chunk):
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal((6, 300))).astype(np.float32)
    z[1, :40] = z[1, 0]  # ties at the top
    z[2] = np.round(z[2])  # many ties
    s = slot_sampling(6, temperature, top_p, top_k)
    zj = jnp.asarray(z)
    t = jax.jit(truncation_threshold, static_argnums=3)(
        zj, s, jnp.full((6,), 1 / temperature, jnp.float32), chunk)
    kept = np.asarray(_sortable(zj) >= t[:, None])
    for row in range(6):
        np.testing.assert_array_equal(kept[row], numpy_kept(z[row], temperature, top_k, top_p), err_msg=f"row {row}")


@pytest.mark.parametrize("vocab,chunk", [(7, None), (640, 256)])  # 640: chunks 0-255, 256-511, 384-639
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 4, 0.8)])
def test_sampled_frequencies_follow_the_truncated_distribution(temperature, top_k, top_p, vocab, chunk):
    base = np.array([1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -3.0], np.float32)
    z = np.full(vocab, -50.0, np.float32)  # p < 1e-20: never drawn
    z[np.linspace(0, vocab - 1, 7).astype(int)] = base  # spread over the blocks
    n = 40_000
    s = slot_sampling(n, temperature, top_p, top_k)
    positions = jnp.zeros((n,), jnp.int32)
    toks = jax.jit(sample_tokens, static_argnums=3)(jnp.tile(z, (n, 1)), s, positions, chunk)
    freq = np.bincount(np.asarray(toks), minlength=len(z)) / n
    p = np.where(numpy_kept(z, temperature, top_k, top_p), np.exp(z / temperature), 0.0)
    p /= p.sum()
    assert np.all(freq[p == 0] == 0)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)


@pytest.mark.parametrize("vocab,chunk", [(1000, 128), (1000, 300), (5000, None), (50, None)])
def test_inverse_cdf_picks_the_token_whose_interval_holds_u(vocab, chunk):
    """The two-level search against numpy's cumulative sum (float64): u in the middle of token
    j's CDF interval draws j; u = 0 draws the first kept token; u = 1 (past the float32 total)
    falls back to the last kept token. Rows 4-7 truncate at a random threshold."""
    rng = np.random.default_rng(vocab)
    z = (3 * rng.standard_normal((8, vocab))).astype(np.float32)
    inv_t = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    thr = np.array(_sortable(jnp.asarray(np.quantile(z, 0.9, axis=-1).astype(np.float32))))
    thr[:4] = 0
    keep = np.asarray(_sortable(jnp.asarray(z))) >= thr[:, None]
    w = np.where(keep, np.exp((z.astype(np.float64) - z.max(-1, keepdims=True)) * inv_t[:, None]), 0.0)
    cum = np.cumsum(w, -1)
    probable = [rng.choice(np.flatnonzero(w[r] > 1e-3 * cum[r, -1])) for r in range(8)]
    u_mid = np.array([(cum[r, j] - w[r, j] / 2) / cum[r, -1] for r, j in enumerate(probable)])
    draw = jax.jit(_inverse_cdf, static_argnums=4)
    for u, expected in [(u_mid, probable), (np.zeros(8), keep.argmax(-1)),
                        (np.ones(8), vocab - 1 - keep[:, ::-1].argmax(-1))]:
        toks = draw(jnp.asarray(z), jnp.asarray(thr), jnp.asarray(inv_t), jnp.asarray(u, jnp.float32), chunk)
        np.testing.assert_array_equal(toks, expected)


def test_greedy_and_seed_stream():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32)
    pos = jnp.arange(8, dtype=jnp.int32)
    sample = jax.jit(sample_tokens)
    greedy = sample(z, slot_sampling(8, temperature=0.3, greedy=True), pos)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(z), -1))
    z_ties = jnp.zeros((2, 50)).at[:, 20].set(1.0).at[:, 45].set(1.0)  # first maximum wins, across chunks
    chunked = jax.jit(sample_tokens, static_argnums=3)(z_ties, slot_sampling(2, greedy=True), pos[:2], 16)
    np.testing.assert_array_equal(chunked, [20, 20])
    a = sample(z, slot_sampling(8, seed=5), pos)
    b = sample(z[::-1], slot_sampling(8, seed=5), pos[::-1])  # rows permuted
    np.testing.assert_array_equal(a, np.asarray(b)[::-1])
    c = sample(z, slot_sampling(8, seed=5), pos + 1)  # next position: fresh noise
    assert not np.array_equal(a, c)



@pytest.mark.parametrize("vocab,chunk", [(1000, 128), (1000, None), (300, 512)])
def test_draw_from_softmax_stats_equals_its_own_passes(vocab, chunk):
    """With the decode step's softmax stats, rows at temperature 1 without truncation draw from
    the stats' chunk sums; every row draws the token it draws without them, in a batch that
    mixes such rows with tempered, truncated and greedy ones and in one made of them alone."""
    rng = np.random.default_rng(vocab)
    n = 64
    z = jnp.asarray((3 * rng.standard_normal((n, vocab))).astype(np.float32))
    s = slot_sampling(n)
    kind = np.arange(n) % 4
    s = s._replace(temperature=jnp.where(kind == 1, 0.7, 1.0).astype(jnp.float32),
                   top_p=jnp.where(kind == 2, 0.9, 1.0).astype(jnp.float32), greedy=jnp.asarray(kind == 3))
    pos = jnp.arange(n, dtype=jnp.int32)
    sample = jax.jit(sample_tokens, static_argnums=3)
    stats = jax.jit(softmax_stats, static_argnums=1)(z, chunk)
    mixed = sample(z, s, pos, chunk, stats)
    np.testing.assert_array_equal(mixed, sample(z, s, pos, chunk))
    plain = kind == 0
    only_plain = jax.tree.map(lambda x: x[plain], s)
    stats_plain = jax.tree.map(lambda x: x[plain], stats)
    np.testing.assert_array_equal(sample(z[plain], only_plain, pos[plain], chunk, stats_plain),
                                  np.asarray(mixed)[plain])
    # The plain-only program (no truncation, tempered-mass or argmax paths compiled) draws
    # the same tokens, with the stats and without them.
    sample_plain = jax.jit(functools.partial(sample_tokens, plain=True), static_argnums=3)
    np.testing.assert_array_equal(sample_plain(z[plain], only_plain, pos[plain], chunk, stats_plain),
                                  np.asarray(mixed)[plain])
    np.testing.assert_array_equal(sample_plain(z[plain], only_plain, pos[plain], chunk),
                                  np.asarray(mixed)[plain])


@pytest.mark.parametrize("params,plain", [
    (dict(), True), (dict(temperature=0.7), False), (dict(top_p=0.9), False), (dict(top_k=5), False),
    (dict(top_k=64), True), (dict(greedy=True), False), (dict(temperature=0.0), False)])
def test_sampler_compiles_the_plain_draw_only_when_every_slot_is_plain(tiny_sampler, params, plain):
    """One slot's parameters decide: any tempered, truncating (top-k below the vocabulary) or
    greedy slot runs the full program, so its tokens follow its own parameters."""
    seen, decode = [], tiny_sampler._decode

    def spy(*args, **kw):
        seen.append(kw["plain"])
        return decode(*args, **kw)

    tiny_sampler._decode = spy
    try:
        tiny_sampler.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=3, seed=0),
                                                    SamplingParams(max_tokens=3, seed=1, **params)])
    finally:
        tiny_sampler._decode = decode
    assert seen and set(seen) == {plain}, seen


@pytest.fixture(scope="module")
def tiny_sampler():
    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True)
    return Sampler(Decoder(cfg, rngs=nnx.Rngs(0)),
                   SamplerConfig(max_slots=2, cache_buckets=(16,), prefill_buckets=(8,), steps_per_call=4))


def test_bad_inputs_raise_clear_errors(tiny_sampler):
    s = tiny_sampler
    with pytest.raises(ValueError, match="prompt is empty"):
        s.submit([])
    with pytest.raises(ValueError, match="does not fit the cache"):
        s.submit(list(range(16)))
    with pytest.raises(ValueError, match="outside"):
        s.submit([1, 64])
    with pytest.raises(ValueError, match="flat sequence of int"):
        s.submit([[1, 2]])
    with pytest.raises(ValueError, match="stop must be a str or a list/tuple of str, got int"):
        s.submit([1, 2], SamplingParams(stop=123))
    with pytest.raises(ValueError, match="stop strings must be str, got bytes"):
        s.submit([1, 2], SamplingParams(stop=[b"</python>"]))
    with pytest.raises(ValueError, match="need a tokenizer"):
        s.submit([1, 2], SamplingParams(stop="</python>"))
    with pytest.raises(ValueError, match="top_p"):
        s.submit([1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="4 prompts"):
        s.generate([[1]] * 4, [SamplingParams()] * 3)
    with pytest.raises(ValueError, match="params must be a SamplingParams or a list of them"):
        s.generate([[1]], {0: SamplingParams()})
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        s.submit([1, 2], SamplingParams(temperature=float("nan")))
    with pytest.raises(ValueError, match="top_k must be a whole number, got 2.7"):
        s.submit([1, 2], SamplingParams(top_k=2.7))
    with pytest.raises(ValueError, match=r"stop_token_ids \[64, -1\] are not token ids of the vocabulary \[0, 64\)"):
        s.submit([1, 2], SamplingParams(stop_token_ids=[3, 64, -1]))
    assert s.free_slots == [0, 1]     # a refused request takes no slot
    a = s.submit([1, 2])
    with pytest.raises(ValueError, match="needs a finished turn"):
        s.append(a, [3])
    s.submit([3])
    with pytest.raises(ValueError, match="all 2 compiled slots are busy"):
        s.submit([4])
    with pytest.raises(ValueError, match="slot must be an int"):
        s.release(2)
    s.release(0)
    s.release(1)
    assert s.free_slots == [0, 1]
    with pytest.raises(ValueError, match="must be non-empty, positive and strictly ascending"):
        SamplerConfig(cache_buckets=(512, 256))
