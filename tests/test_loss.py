"""Policy loss vs numpy written from the formulas (each aggregation mode, with and without ResT
weights); exact-zero gradients on masked tokens;
chunked sequence logprob vs the unchunked computation (values, gradients, memory); the packer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import Decoder
from tepo_jax.rl.batch import (SequenceData, TrainBatch, bucket, pack_sequences,
                               sequence_from_trajectory)
from tepo_jax.config import defaults, validate
from tepo_jax.errors import ConfigError
from tepo_jax.rl.loss import (AggMode, LossConfig, loss_and_metric_sums, loss_denominator, loss_token_mask,
                              num_sequences, per_token_terms, policy_loss, sequence_token_counts,
                              token_loss_inputs, token_losses)
from tepo_jax.rl.train_step import forward_logprobs, split_model
from tepo_jax.seqlogprob import head_loss, sequence_logprob_entropy, token_logprob_entropy

TINY = ModelConfig(family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=4, qkv_bias=True)


# ----------------------------------------------------------------------------- numpy reference
def numpy_loss(logp, entropy, b: TrainBatch, eps_low, eps_high, beta):
    """The docs/design.md loss, straight from the formulas, float64."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    logp, old, ref, adv, w = f(logp), f(b.old_logprobs), f(b.ref_logprobs), f(b.advantages), f(b.token_weights)
    seg = np.asarray(b.segment_ids)
    has_pred = np.zeros_like(seg, bool)
    has_pred[:, 1:] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    m = (f(b.loss_mask) * has_pred) > 0
    n = m.sum()
    ratio = np.exp(logp - old)
    pg = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    pg_loss = (w * pg)[m].sum() / n
    kl_mean = kl[m].mean() if beta > 0 else 0.0   # ref_logprobs are not read when β = 0
    # d loss / d logp: the unclipped branch is active unless the ratio left the range in the
    # advantage's direction (then the clipped constant wins and the gradient is 0).
    binds = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    grad = np.where(m, (w * np.where(binds, 0.0, -adv * ratio) + beta * (1 - np.exp(ref - logp))) / n, 0.0)
    return {
        "loss": pg_loss + beta * kl_mean,
        "pg_loss": pg_loss,
        "kl": kl_mean,
        "clip_frac_low": ((adv < 0) & (ratio < 1 - eps_low))[m].mean(),
        "clip_frac_high": ((adv > 0) & (ratio > 1 + eps_high))[m].mean(),
        "ratio_mean": ratio[m].mean(),
        "entropy_mean": f(entropy)[m].mean(),
        "logprob_diff_mean_abs": np.abs(logp - old)[m].mean(),
        "num_model_tokens": n,
    }, grad


def random_batch(rng, b=3, t=24, vocab=64, packed=True):
    seg = np.ones((b, t), np.int32)
    if packed:
        seg[0, 10:] = 2          # two sequences in row 0
        seg[1, 18:] = 0          # padding at the end of row 1
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        for s in np.unique(seg[r]):
            idx = np.where(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    mask[seg == 0] = 0
    old = -np.abs(rng.standard_normal((b, t))).astype(np.float32) - 0.5
    return TrainBatch(
        tokens=rng.integers(0, vocab, (b, t)).astype(np.int32), positions=pos, segment_ids=seg,
        loss_mask=mask, advantages=(rng.standard_normal((b, t)) * mask).astype(np.float32),
        old_logprobs=old, ref_logprobs=(old + 0.3 * rng.standard_normal((b, t))).astype(np.float32),
        token_weights=rng.uniform(0.2, 2.0, (b, t)).astype(np.float32))


@pytest.mark.parametrize("eps_low,eps_high,beta", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 0.05)])
def test_loss_matches_numpy(eps_low, eps_high, beta):
    rng = np.random.default_rng(1)
    batch = random_batch(rng)
    # Ratios spread over [e^-0.6, e^0.6]: both clip sides are crossed with both advantage signs.
    logp = (batch.old_logprobs + rng.uniform(-0.6, 0.6, batch.tokens.shape)).astype(np.float32)
    entropy = rng.uniform(0, 3, batch.tokens.shape).astype(np.float32)
    cfg = LossConfig(eps_low=eps_low, eps_high=eps_high, kl_coef=beta)
    (loss, metrics), grad = jax.value_and_grad(policy_loss, has_aux=True)(
        jnp.asarray(logp), jnp.asarray(entropy), batch, cfg)
    ref, ref_grad = numpy_loss(logp, entropy, batch, eps_low, eps_high, beta)
    assert ref["clip_frac_low"] > 0 and ref["clip_frac_high"] > 0
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5, atol=1e-7)
    for k, v in ref.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ loss aggregation modes
def numpy_sequences(seg):
    """(row, columns) of every sequence: runs of equal non-zero segment ids, by a plain loop."""
    out = []
    for r in range(seg.shape[0]):
        t = 0
        while t < seg.shape[1]:
            u = t
            while u + 1 < seg.shape[1] and seg[r, u + 1] == seg[r, t]:
                u += 1
            if seg[r, t] != 0:
                out.append((r, np.arange(t, u + 1)))
            t = u + 1
    return out


def numpy_agg_loss(logp, b: TrainBatch, eps_low, eps_high, beta, mode, norm_len):
    """loss, pg_loss, kl and d loss / d logp of docs/design.md's aggregation modes, float64,
    sequence by sequence: ℓ_t = w_t·pg_t + β·kl_t on model tokens; token_mean Σ ℓ / N;
    seq_mean_token_mean mean over sequences of (Σ_s ℓ / n_s); seq_mean_token_sum_norm
    Σ ℓ / (S·L); S counts the sequences with a model token."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    logp, old, ref, adv = f(logp), f(b.old_logprobs), f(b.ref_logprobs), f(b.advantages)
    w = f(b.token_weights)
    seg = np.asarray(b.segment_ids)
    has_pred = np.zeros_like(seg, bool)
    has_pred[:, 1:] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    m = (f(b.loss_mask) * has_pred) > 0
    ratio = np.exp(logp - old)
    pg = w * -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    binds = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    dl = w * np.where(binds, 0.0, -adv * ratio) + beta * (1 - np.exp(ref - logp))
    seqs = [(r, cols[m[r, cols]]) for r, cols in numpy_sequences(seg)]
    seqs = [(r, cols) for r, cols in seqs if len(cols)]
    n_tokens, n_seqs = m.sum(), len(seqs)
    out = {"pg_loss": 0.0, "kl": 0.0}
    grad = np.zeros_like(logp)
    for r, cols in seqs:
        if mode == "token_mean":
            scale = 1.0 / n_tokens
        elif mode == "seq_mean_token_mean":
            scale = 1.0 / len(cols) / n_seqs
        else:
            scale = 1.0 / (n_seqs * norm_len)
        out["pg_loss"] += pg[r, cols].sum() * scale
        out["kl"] += kl[r, cols].sum() * scale
        grad[r, cols] = dl[r, cols] * scale
    out["loss"] = out["pg_loss"] + beta * out["kl"]
    return out, grad


def multi_segment_batch(rng, rest: bool):
    """5 rows × 32: 2 to 4 sequences per row, trailing padding, a sequence with no model token
    and an all-padding row; with `rest`, random token weights (else ones)."""
    b, t = 5, 32
    seg = np.zeros((b, t), np.int32)
    for r, lengths in enumerate([(7, 9, 10), (8, 8, 8, 8), (20, 12), (3, 13, 5, 6), ()]):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start:start + n] = i + 1
            start += n
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        for s in np.unique(seg[r]):
            idx = np.where(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    mask[seg == 0] = 0
    mask[2, 20:] = 0                      # row 2, sequence 2: no model token
    old = -np.abs(rng.standard_normal((b, t))).astype(np.float32) - 0.5
    weights = rng.uniform(0.2, 2.0, (b, t)) if rest else np.ones((b, t))
    return TrainBatch(
        tokens=rng.integers(0, 64, (b, t)).astype(np.int32), positions=pos, segment_ids=seg,
        loss_mask=mask, advantages=(rng.standard_normal((b, t)) * mask).astype(np.float32),
        old_logprobs=old, ref_logprobs=(old + 0.3 * rng.standard_normal((b, t))).astype(np.float32),
        token_weights=weights.astype(np.float32))


MODES = [m.value for m in AggMode]


@pytest.mark.parametrize("rest", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_loss_aggregation_modes_match_numpy(mode, rest):
    rng = np.random.default_rng(11)
    batch = multi_segment_batch(rng, rest)
    logp = (batch.old_logprobs + rng.uniform(-0.6, 0.6, batch.tokens.shape)).astype(np.float32)
    entropy = rng.uniform(0, 3, batch.tokens.shape).astype(np.float32)
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.05, agg_mode=mode, norm_len=40)
    (loss, metrics), grad = jax.value_and_grad(policy_loss, has_aux=True)(
        jnp.asarray(logp), jnp.asarray(entropy), batch, cfg)
    ref, ref_grad = numpy_agg_loss(logp, batch, 0.2, 0.28, 0.05, mode, 40)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5, atol=1e-7)
    for k in ("loss", "pg_loss", "kl"):
        np.testing.assert_allclose(float(metrics[k]), ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-8)
    # The diagnostics stay token means in every mode.
    tm, _ = numpy_loss(logp, entropy, batch, 0.2, 0.28, 0.05)
    for k in ("clip_frac_low", "clip_frac_high", "ratio_mean", "entropy_mean", "logprob_diff_mean_abs",
              "num_model_tokens"):
        np.testing.assert_allclose(float(metrics[k]), tm[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The batch tells the modes apart (else a mode mix-up could pass).
    others = [numpy_agg_loss(logp, batch, 0.2, 0.28, 0.05, o, 40)[0]["loss"] for o in MODES if o != mode]
    assert all(abs(o - ref["loss"]) > 1e-3 * abs(ref["loss"]) for o in others)


def test_sequence_counts_match_numpy_loop():
    batch = multi_segment_batch(np.random.default_rng(12), rest=False)
    seg = np.asarray(batch.segment_ids)
    mask = jnp.asarray(batch.loss_mask)
    counts = np.asarray(sequence_token_counts(jnp.asarray(seg), mask))
    want = np.zeros(seg.shape)
    for r, cols in numpy_sequences(seg):
        want[r, cols] = batch.loss_mask[r, cols].sum()
    np.testing.assert_array_equal(counts, want)
    n_seqs = sum(batch.loss_mask[r, cols].sum() > 0 for r, cols in numpy_sequences(seg))
    assert float(num_sequences(jnp.asarray(seg), mask)) == n_seqs == 12


def test_agg_mode_from_config_and_errors():
    c = defaults()
    c.model.tiny = True
    assert LossConfig.from_config(c).agg_mode is AggMode.TOKEN_MEAN
    c.loss.agg_mode = "seq_mean_token_sum_norm"
    cfg = LossConfig.from_config(validate(c))
    assert cfg.agg_mode is AggMode.SEQ_MEAN_TOKEN_SUM_NORM and cfg.norm_len == c.rollout.max_tokens
    c.loss.agg_mode = "seq_mean"
    with pytest.raises(ConfigError, match=r"^config\.loss\.agg_mode='seq_mean': must be one of") as e:
        validate(c)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="norm_len"):
        LossConfig(agg_mode="seq_mean_token_sum_norm")
    # A non-default mode needs the whole batch's denominator: no silent token mean.
    b = multi_segment_batch(np.random.default_rng(13), rest=False)
    lp = jnp.asarray(b.old_logprobs)
    with pytest.raises(ValueError, match="loss_denominator"):
        loss_and_metric_sums(lp, lp, b, LossConfig(agg_mode="seq_mean_token_mean"), 1.0)


def test_first_token_of_segment_never_carries_loss():
    rng = np.random.default_rng(2)
    batch = random_batch(rng)
    mask = batch.loss_mask.copy()
    mask[0, 0] = mask[0, 10] = 1.0   # first tokens of both segments of row 0: no prediction
    logp = jnp.asarray(batch.old_logprobs + 0.1)
    _, m1 = policy_loss(logp, logp, batch._replace(loss_mask=mask), LossConfig())
    mask[0, 0] = mask[0, 10] = 0.0
    _, m0 = policy_loss(logp, logp, batch._replace(loss_mask=mask), LossConfig())
    assert float(m1["num_model_tokens"]) == float(m0["num_model_tokens"])
    assert float(m1["loss"]) == float(m0["loss"])


def test_masked_per_token_gradient_is_exactly_zero_even_for_garbage_inputs():
    rng = np.random.default_rng(3)
    batch = random_batch(rng)
    off = batch.loss_mask == 0
    # Garbage where mask == 0: huge ratios, inf / nan advantages, extreme reference logprobs.
    bad = batch._replace(advantages=np.where(off, np.nan, batch.advantages).astype(np.float32),
                         old_logprobs=np.where(off, -1e4, batch.old_logprobs).astype(np.float32),
                         ref_logprobs=np.where(off, 1e4, batch.ref_logprobs).astype(np.float32),
                         token_weights=np.where(off, np.inf, batch.token_weights).astype(np.float32))
    logp = jnp.asarray(np.where(off, 50.0, batch.old_logprobs + 0.2).astype(np.float32))
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.1)
    for b in (batch, bad):
        (loss, metrics), g = jax.value_and_grad(policy_loss, has_aux=True)(logp, logp, b, cfg)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
        g = np.asarray(g)
        assert np.all(g[off] == 0.0) and np.count_nonzero(g[~off]) > 0
        per_token = jax.jacrev(lambda lp: per_token_terms(lp, b, jnp.asarray(b.loss_mask), cfg)["pg"]
                               + per_token_terms(lp, b, jnp.asarray(b.loss_mask), cfg)["kl"])(logp)
        assert np.all(np.asarray(per_token)[off] == 0.0)
    (l0, _), (l1, _) = [policy_loss(logp, logp, b, cfg) for b in (batch, bad)]
    assert float(l0) == float(l1)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_an_overflowing_ratio_of_a_loss_token_keeps_the_loss_and_gradient_finite(beta):
    # One loss token the policy now finds e^100 times likelier than when it was sampled (and
    # e^100 less likely than the reference): exp overflows float32 without the clamp, and
    # inf·0 made the loss or its gradient NaN, so the whole step was skipped for one token.
    rng = np.random.default_rng(4)
    batch = random_batch(rng)
    r, c = map(int, np.argwhere(batch.loss_mask > 0)[0])
    logp = np.asarray(batch.old_logprobs + 0.1, np.float32)
    logp[r, c] = -0.5
    old = batch.old_logprobs.copy()
    old[r, c] = -100.5
    ref = batch.ref_logprobs.copy()
    ref[r, c] = 99.5
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=beta)
    for a in (0.0, 1.0, -1.0):
        adv = batch.advantages.copy()
        adv[r, c] = a
        b = batch._replace(old_logprobs=old, ref_logprobs=ref, advantages=adv)
        (loss, metrics), g = jax.value_and_grad(policy_loss, has_aux=True)(jnp.asarray(logp), jnp.asarray(logp), b, cfg)
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all(), (a, float(loss))
        assert all(np.isfinite(float(v)) for v in metrics.values())
        # the clamped token's gradient is 0, as the clipped branch's; the others are untouched
        assert np.asarray(g)[r, c] == 0.0
        mask = batch.loss_mask.copy()
        mask[r, c] = 0.0
        rest = per_token_terms(jnp.asarray(logp), b, jnp.asarray(mask), cfg)
        full = per_token_terms(jnp.asarray(logp), b, jnp.asarray(batch.loss_mask), cfg)
        off = np.ones_like(mask, bool)
        off[r, c] = False
        np.testing.assert_array_equal(np.asarray(full["pg"])[off], np.asarray(rest["pg"])[off])
        assert float(full["ratio"][r, c]) == pytest.approx(np.exp(20.0), rel=1e-6)   # e^MAX_LOG_RATIO, float32


def _model_grad_fn(model_def, cfg):
    def loss_fn(p, batch):
        logp, ent = forward_logprobs(model_def, p, batch, cfg)
        n = jnp.maximum(jnp.sum(batch.loss_mask), 1.0)
        return loss_and_metric_sums(logp, ent, batch, cfg, n)[0]
    return jax.jit(jax.grad(loss_fn))


def test_param_gradient_ignores_masked_tokens_bit_exactly():
    """Changing anything the masked tokens carry (advantages, old/ref logprobs, weights) or the
    ids of padding tokens leaves the parameter gradient bit-identical."""
    rng = np.random.default_rng(4)
    model_def, params = split_model(Decoder(TINY, rngs=nnx.Rngs(0)))
    batch = random_batch(rng, vocab=TINY.vocab_size)
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.1, seq_chunk=8)
    off = batch.loss_mask == 0
    pad = batch.segment_ids == 0
    assert pad.any()
    junk = lambda x, v: np.where(off, v, x).astype(x.dtype)  # noqa: E731
    perturbed = batch._replace(
        tokens=np.where(pad, (batch.tokens + 7) % TINY.vocab_size, batch.tokens).astype(np.int32),
        advantages=junk(batch.advantages, 123.0), old_logprobs=junk(batch.old_logprobs, -77.0),
        ref_logprobs=junk(batch.ref_logprobs, 5.0), token_weights=junk(batch.token_weights, 9.0))
    grad_fn = _model_grad_fn(model_def, cfg)
    g0 = grad_fn(params, batch)
    g1 = grad_fn(params, perturbed)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # ...while changing one model token's advantage does change it (the test can fail).
    i = tuple(np.argwhere(~off)[0])
    adv = batch.advantages.copy()
    adv[i] += 1.0
    g2 = grad_fn(params, batch._replace(advantages=adv))
    assert not np.array_equal(np.asarray(g0["lm_head"]), np.asarray(g2["lm_head"]))


def test_hidden_gradient_of_masked_targets_is_exactly_zero():
    """d loss / d hidden[t−1] = 0 exactly when token t is masked (head path), chunked or not."""
    rng = np.random.default_rng(5)
    batch = random_batch(rng, packed=False)
    hidden = jnp.asarray(rng.standard_normal((3, 24, 16)), jnp.float32)
    kernel = jnp.asarray(0.3 * rng.standard_normal((16, 64)), jnp.float32)
    cfg = LossConfig(kl_coef=0.1)

    def loss(h, chunk):
        lp, ent = token_logprob_entropy(h, kernel, batch.tokens, batch.segment_ids, chunk)
        return policy_loss(lp, ent, batch, cfg)[0]

    for chunk in (None, 5):
        g = np.asarray(jax.grad(loss)(hidden, chunk))
        target_masked = np.concatenate([batch.loss_mask[:, 1:] == 0, np.ones((3, 1), bool)], axis=1)
        assert np.all(g[target_masked] == 0.0)
        assert np.all(np.abs(g[~target_masked]).sum(-1) > 0)


# ----------------------------------------------------------------------- chunked logprob
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_sequence_logprob_matches_unchunked(chunk):
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.standard_normal((2, 21, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 21)))
    lp0, ent0 = sequence_logprob_entropy(hidden, kernel, targets, None, entropy_grad=True)
    lp1, ent1 = sequence_logprob_entropy(hidden, kernel, targets, chunk, entropy_grad=True)
    # Numpy reference of the unchunked path.
    z = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(kernel, np.float64))
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ref = np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0] - logz
    np.testing.assert_allclose(np.asarray(lp0), ref, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lp1), np.asarray(lp0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ent1), np.asarray(ent0), atol=1e-5, rtol=0)

    def f(h, k, c):
        lp, ent = sequence_logprob_entropy(h, k, targets, c, entropy_grad=True)
        return jnp.sum(lp * jnp.cos(jnp.arange(21.0))) + 0.1 * jnp.sum(ent)
    g0 = jax.grad(f, argnums=(0, 1))(hidden, kernel, None)
    g1 = jax.grad(f, argnums=(0, 1))(hidden, kernel, chunk)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("counts", [(0, 17, 40), (100, 3, 0), (0, 0, 0)])
def test_needed_positions_only_match_the_full_head(counts, entropy_grad):
    """`needed=`: the head runs on needed-first chunks (the rest skipped); at the needed
    positions logprob, entropy and the gradients of hidden and kernel equal the full path's,
    elsewhere the values read 0 and the hidden gradient is exactly 0. Rows with no, few and
    all positions needed, scattered (not a prefix), in chunks of 8 of T = 100 positions."""
    rng = np.random.default_rng(11)
    b, t, d, v = 3, 100, 16, 50
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    kernel = jnp.asarray(0.5 * rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    needed = np.zeros((b, t), bool)
    for row, n in enumerate(counts):
        needed[row, rng.choice(t, n, replace=False)] = True
    weights = jnp.asarray(rng.standard_normal((b, t)) * needed, jnp.float32)

    def f(h, k, need):
        lp, ent = sequence_logprob_entropy(h, k, targets, 8, entropy_grad=entropy_grad, needed=need)
        return jnp.sum(lp * weights) + 0.1 * jnp.sum(jnp.where(needed, ent, 0.0)), (lp, ent)

    (_, (lp0, ent0)), g0 = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, kernel, None)
    (_, (lp1, ent1)), g1 = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        hidden, kernel, jnp.asarray(needed))
    np.testing.assert_allclose(np.asarray(lp1)[needed], np.asarray(lp0)[needed], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ent1)[needed], np.asarray(ent0)[needed], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g1[1]), np.asarray(g0[1]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1[0]), np.asarray(g0[0]), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(g1[0])[~needed] == 0.0)
    if sum(counts):
        assert np.abs(np.asarray(g1[1])).sum() > 0


# ------------------------------------------------- the head with the loss gradient in its forward
def _policy_loss_through_head(batch, cfg, chunk, fused):
    """f(hidden, kernel) -> the policy loss of `batch` (whole-batch D), through `head_loss`
    (fused) or by autodiff of the chunked logprobs (`token_logprob_entropy(needed=...)`)."""
    mask = loss_token_mask(batch)
    denominator = loss_denominator(batch, cfg)
    inputs = token_loss_inputs(batch, cfg, denominator)

    def f(h, k):
        if fused:
            loss, lp, ent = head_loss(h, k, batch.tokens, batch.segment_ids, mask > 0,
                                      lambda x, inp: token_losses(x, inp, cfg), inputs, chunk)
            return loss, (lp, ent)
        lp, ent = token_logprob_entropy(h, k, batch.tokens, batch.segment_ids, chunk, needed=mask > 0)
        return jnp.sum(token_losses(lp, token_loss_inputs(batch, cfg, denominator), cfg)), (lp, ent)
    return f


@pytest.mark.parametrize("mode", [m.value for m in AggMode])
@pytest.mark.parametrize("chunk", [4, None])
def test_head_loss_equals_autodiff_of_the_chunked_head(mode, chunk):
    """`head_loss` (the loss gradient formed in the forward pass) gives the loss, logprobs,
    entropies and hidden/kernel gradients of autodiff through the chunked head, in every
    aggregation mode with KL and ResT weights, chunked or not, with a row that has no loss
    token; garbage (inf, huge values) at masked tokens changes nothing, and those positions'
    hidden gradient is exactly 0."""
    rng = np.random.default_rng(12)
    batch = random_batch(rng, b=4, t=40)
    mask = batch.loss_mask.copy()
    mask[2] = 0.0                                        # a row with no loss token
    off = mask == 0
    batch = batch._replace(loss_mask=mask, advantages=np.where(off, np.inf, batch.advantages).astype(np.float32),
                           old_logprobs=np.where(off, 1e4, batch.old_logprobs).astype(np.float32),
                           token_weights=np.where(off, np.nan, batch.token_weights).astype(np.float32))
    hidden = jnp.asarray(rng.standard_normal((4, 40, 16)), jnp.float32)
    kernel = jnp.asarray(0.3 * rng.standard_normal((16, 64)), jnp.float32)
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.1, agg_mode=mode, norm_len=30)
    results = {}
    for fused in (False, True):
        f = _policy_loss_through_head(batch, cfg, chunk, fused)
        results[fused] = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, kernel)
    ((loss0, (lp0, ent0)), g0), ((loss1, (lp1, ent1)), g1) = results[False], results[True]
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lp1), np.asarray(lp0))
    np.testing.assert_array_equal(np.asarray(ent1), np.asarray(ent0))
    for a, b in zip(g0, g1):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-9)
    target_off = np.concatenate([off[:, 1:], np.ones((4, 1), bool)], axis=1)   # hidden[t] predicts t + 1
    assert np.all(np.asarray(g1[0])[target_off] == 0.0) and np.abs(np.asarray(g1[0])).sum() > 0


def _vocab_matmuls(jaxpr, v) -> int:
    """dot_generals of a jaxpr (sub-jaxprs included) with an operand of vocabulary size v."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and any(v in x.aval.shape for x in eqn.invars):
            n += 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += _vocab_matmuls(sub, v)
    return n


def test_head_loss_backward_recomputes_no_logits():
    """Differentiating `head_loss` runs three [rows, D] × [D, V] matmuls per chunk (logits,
    d hidden, d kernel), autodiff of the chunked head four (the logits again in the backward)."""
    rng = np.random.default_rng(13)
    batch = random_batch(rng, t=32)
    cfg = LossConfig(kl_coef=0.1)
    args = (jnp.zeros((3, 32, 16), jnp.float32), jnp.zeros((16, 64), jnp.float32))
    count = {fused: _vocab_matmuls(jax.make_jaxpr(jax.grad(
        lambda h, k: _policy_loss_through_head(batch, cfg, 8, fused)(h, k)[0], argnums=(0, 1)))(*args).jaxpr, 64)
        for fused in (False, True)}
    assert count == {False: 4, True: 3}


def _temp_bytes(t, chunk, vocab=8192, b=2, d=32, fused=False):
    def f(h, k, y):
        if fused:   # the head with the loss gradient in its forward, every position a loss token
            needed = jnp.ones(y.shape, bool)
            return head_loss(h, k, y, needed.astype(jnp.int32), needed, lambda lp, w: w * lp,
                             jnp.ones(y.shape, jnp.float32), chunk)[0]
        lp, ent = sequence_logprob_entropy(h, k, y, chunk)
        return jnp.sum(lp)
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, vocab), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_memory_does_not_scale_with_sequence_times_vocab(fused):
    """The chunked head's forward + backward (autodiff, or `head_loss`'s gradient formed in the
    forward) holds one chunk's logits, not [B, T, V]."""
    logits_bytes = lambda t: 2 * t * 8192 * 4  # noqa: E731  (B·T·V float32)
    chunked = {t: _temp_bytes(t, 64, fused=fused) for t in (256, 1024)}
    full = {t: _temp_bytes(t, None) for t in (256, 1024)}
    # The unchunked forward+backward holds at least the [B, T, V] logits: it grows with T·V ...
    assert full[1024] - full[256] >= logits_bytes(1024) - logits_bytes(256)
    # ... the chunked one holds a [B, 64, V] chunk (plus O(B·T·D) activations) at any T.
    assert chunked[1024] < logits_bytes(1024) / 4
    assert chunked[1024] - chunked[256] < (logits_bytes(1024) - logits_bytes(256)) / 10


def test_token_logprob_convention_and_packing_equal_separate_sequences():
    """value[t] = log p(tokens[t] | tokens[<t]); two packed sequences give the same values as
    each run alone in its own row."""
    model = Decoder(TINY, rngs=nnx.Rngs(1))
    model_def, params = split_model(model)
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 64, 9), rng.integers(0, 64, 6)
    seq = lambda x: SequenceData(x, np.r_[0, np.ones(len(x) - 1)], np.zeros(len(x)), np.zeros(len(x)))  # noqa: E731
    packed = pack_sequences([seq(a), seq(b)], seq_len=16).batch
    alone = pack_sequences([seq(a), seq(b)], seq_len=16, pack=False).batch
    assert packed.tokens.shape == (1, 16) and alone.tokens.shape == (2, 16)
    fwd = jax.jit(lambda p, b: forward_logprobs(model_def, p, b, LossConfig(seq_chunk=4))[0])
    lp_packed = np.asarray(fwd(params, packed))
    lp_alone = np.asarray(fwd(params, alone))
    np.testing.assert_allclose(lp_packed[0, :9], lp_alone[0, :9], atol=1e-6)
    np.testing.assert_allclose(lp_packed[0, 9:15], lp_alone[1, :6], atol=1e-6)
    assert lp_packed[0, 0] == 0 and lp_packed[0, 9] == 0 and lp_packed[0, 15] == 0
    # Direct check of the convention from full logits of sequence a alone.
    logits = np.asarray(jax.jit(lambda t: model(t, jnp.arange(9)[None])[0])(jnp.asarray(a)[None])[0],
                        np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(lp_alone[0, 1:9], logp[np.arange(8), a[1:]], atol=1e-5)


# ------------------------------------------------------------------- the tempered policy
def _tempered_numpy(hidden, kernel, targets, weights, tau):
    """(log p, entropy, d/d(hidden @ kernel) of Σ weights · log p) under softmax(hidden @ kernel
    / tau), float64, from the formulas."""
    z = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)) / tau
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.exp(logp)
    onehot = np.arange(z.shape[-1]) == np.asarray(targets)[..., None]
    dz = np.asarray(weights, np.float64)[..., None] * (onehot - p) / tau
    return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0], -(p * logp).sum(-1), dz


@pytest.mark.parametrize("path", ["whole", "chunked", "needed", "head_loss"])
def test_tempered_policy_logprobs_entropies_and_gradients_match_numpy(path):
    """logit_scale = 1/τ: every head path gives log p, the entropy and the hidden/kernel
    gradients of softmax(logits / τ) (τ = 0.7), against numpy from the formulas; the scale is
    not a no-op (τ = 1 values differ)."""
    rng = np.random.default_rng(21)
    b, t, d, v, tau = 2, 19, 16, 50, 0.7
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    kernel = jnp.asarray(0.5 * rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    weights = rng.standard_normal((b, t)).astype(np.float32)
    used = np.ones((b, t), bool)
    if path == "head_loss":   # batch convention: token t + 1 is predicted from hidden[t]; the last predicts none
        used[:, -1] = False
    weights = jnp.asarray(np.where(used, weights, 0.0))

    def f(h, k):
        if path == "head_loss":
            tokens = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
            w = jnp.pad(weights[:, :-1], ((0, 0), (1, 0)))
            loss, lp, ent = head_loss(h, k, tokens, jnp.ones((b, t), jnp.int32), jnp.asarray(np.roll(used, 1, 1)),
                                      lambda x, inp: x * inp, w, 4, None, logit_scale=1 / tau)
            return loss, (jnp.roll(lp, -1, 1), jnp.roll(ent, -1, 1))
        chunk = {"whole": None, "chunked": 7, "needed": 8}[path]
        lp, ent = sequence_logprob_entropy(h, k, targets, chunk, needed=jnp.asarray(used) if path == "needed" else None,
                                           logit_scale=1 / tau)
        return jnp.sum(lp * weights), (lp, ent)

    (_, (lp, ent)), (gh, gk) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, kernel)
    want_lp, want_ent, dz = _tempered_numpy(hidden, kernel, targets, weights, tau)
    np.testing.assert_allclose(np.asarray(lp)[used], want_lp[used], atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ent)[used], want_ent[used], atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(gh), np.einsum("btv,dv->btd", dz, np.asarray(kernel, np.float64)),
                               atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(gk), np.einsum("btd,btv->dv", np.asarray(hidden, np.float64), dz),
                               atol=1e-4, rtol=0)
    at_one = _tempered_numpy(hidden, kernel, targets, weights, 1.0)[0]
    assert np.abs(at_one - want_lp)[used].max() > 0.1


def test_loss_config_policy_temperature_reaches_the_train_forward():
    """forward_logprobs with LossConfig(policy_temperature=τ) gives log softmax(logits / τ) of
    the model's own logits; from_config sets τ only with loss.tempered_policy."""
    model = Decoder(TINY, rngs=nnx.Rngs(1))
    model_def, params = split_model(model)
    a = np.random.default_rng(8).integers(0, 64, 9)
    batch = pack_sequences([SequenceData(a, np.r_[0, np.ones(8)], np.zeros(9), np.zeros(9))], seq_len=16).batch
    lp = np.asarray(forward_logprobs(model_def, params, batch, LossConfig(seq_chunk=4, policy_temperature=0.6))[0])
    logits = np.asarray(model(jnp.asarray(a)[None], jnp.arange(9)[None])[0][0], np.float64) / 0.6
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp[0, 1:9], logp[np.arange(8), a[1:]], atol=1e-5)
    c = defaults()
    c.rollout.temperature = 0.6
    assert LossConfig.from_config(c).policy_temperature == 1.0
    c.loss.tempered_policy = True
    assert LossConfig.from_config(c).policy_temperature == 0.6
    with pytest.raises(ValueError, match="policy_temperature"):
        LossConfig(policy_temperature=0.0)


# ------------------------------------------------------------------------------- packer
def test_pack_sequences_layout_and_unpack():
    rng = np.random.default_rng(8)
    lengths = [50, 20, 70, 30, 100, 10]
    seqs = []
    for n in lengths:
        mask = np.r_[0, (rng.random(n - 1) < 0.5)].astype(np.float32)
        seqs.append(SequenceData(rng.integers(1, 100, n), mask, rng.standard_normal(n) * mask,
                                 -rng.random(n) * mask, token_weights=1 + mask))
    packed = pack_sequences(seqs, length_buckets=(64, 128, 256), row_multiple=4)
    b = packed.batch
    assert b.tokens.shape == (4, 128) and b.tokens.dtype == np.int32 and b.loss_mask.dtype == np.float32
    for s, p in zip(seqs, packed.placements):
        sl = slice(p.start, p.start + p.length)
        np.testing.assert_array_equal(b.tokens[p.row, sl], s.tokens)
        np.testing.assert_array_equal(b.positions[p.row, sl], np.arange(p.length))
        assert len(set(b.segment_ids[p.row, sl])) == 1 and b.segment_ids[p.row, p.start] > 0
        np.testing.assert_array_equal(b.token_weights[p.row, sl], 1 + s.loss_mask)
        np.testing.assert_array_equal(b.ref_logprobs[p.row, sl], 0)
    for s, got in zip(seqs, packed.unpack(b.old_logprobs)):
        np.testing.assert_array_equal(got, s.old_logprobs.astype(np.float32))
    assert b.loss_mask.sum() == sum(s.loss_mask.sum() for s in seqs)
    pad = b.segment_ids == 0
    assert np.all(b.loss_mask[pad] == 0) and np.all(b.token_weights[pad] == 1)
    unpacked = pack_sequences(seqs, pack=False, length_buckets=(64, 128))
    assert unpacked.batch.tokens.shape == (8, 128)   # 6 rows, bucketed to a power of two


def test_pack_sequences_rejects_bad_input():
    s = SequenceData(np.arange(5), np.ones(5), np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="first token"):
        pack_sequences([s])
    ok = SequenceData(np.arange(5), np.r_[0, np.ones(4)], np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="does not fit"):
        pack_sequences([ok], seq_len=4)
    with pytest.raises(ValueError, match="rows"):
        pack_sequences([ok, ok], seq_len=5, num_rows=1)
    assert bucket(5, (4, 8)) == 8 and bucket(9, (4, 8)) == 16


def test_sequence_from_trajectory_uses_model_tokens():
    class Traj:  # the attributes of tepo_jax.rollout.Trajectory that are read
        token_ids = np.array([5, 6, 7, 8, 9])
        logprobs = np.array([0, -1.0, -2.0, 0, -0.5], np.float32)

        def model_mask(self):
            return np.array([False, True, True, False, True])
    s = sequence_from_trajectory(Traj(), np.full(5, 0.5))
    np.testing.assert_array_equal(s.loss_mask, [0, 1, 1, 0, 1])
    np.testing.assert_array_equal(s.old_logprobs, Traj.logprobs)
