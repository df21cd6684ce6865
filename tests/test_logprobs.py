"""logprob_and_entropy against numpy written from the definitions."""
import numpy as np
import pytest

from tepo_jax.logprobs import logprob_and_entropy


def numpy_reference(logits, targets):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    logp = np.log(p)
    entropy = -(p * logp).sum(-1)
    target_logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return target_logp, entropy


@pytest.mark.parametrize("vocab_chunk", [None, 7, 64, 1000])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_matches_numpy(vocab_chunk, scale):
    rng = np.random.default_rng(0)
    logits = (scale * rng.standard_normal((3, 5, 100))).astype(np.float32)
    targets = rng.integers(0, 100, (3, 5))
    lp, ent = logprob_and_entropy(logits, targets, vocab_chunk=vocab_chunk)
    ref_lp, ref_ent = numpy_reference(logits, targets)
    np.testing.assert_allclose(np.asarray(lp), ref_lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=1e-4, rtol=0)


def test_extreme_logits_stay_finite():
    logits = np.zeros((2, 10), np.float32)
    logits[0, 3] = 1e4  # one-hot distribution: entropy 0, logprob 0 for the argmax
    logits[1, :] = -1e4
    lp, ent = logprob_and_entropy(logits, np.array([3, 0]), vocab_chunk=4)
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(ent))
    np.testing.assert_allclose(np.asarray(ent), [0.0, np.log(10)], atol=1e-5)
    np.testing.assert_allclose(float(lp[0]), 0.0, atol=1e-6)


def test_bf16_logits_are_upcast():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 50)).astype(np.float32)
    import jax.numpy as jnp
    lp, ent = logprob_and_entropy(jnp.asarray(logits, jnp.bfloat16), np.zeros(4, np.int32))
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    ref_lp, ref_ent = numpy_reference(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
                                      np.zeros(4, np.int64))
    np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=1e-4)
