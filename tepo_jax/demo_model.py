"""Model demo: a tiny random Qwen2 checkpoint, loaded, run, and checked against transformers.

    python -m tepo_jax.demo_model [--family llama] [--steps 8]

Builds a random Qwen2ForCausalLM (or Llama) with transformers in a temp dir, loads it with
`tepo_jax.checkpoints.load_hf`, runs a full forward, compares the logits with PyTorch's, then
greedily continues a prompt with the KV cache (prefill, then one token at a time) and checks the
continuation against transformers' greedy `generate`. Runs on CPU in a few seconds.
"""
from __future__ import annotations

import argparse
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tepo_jax.checkpoints import load_hf
from tepo_jax.models.decoder import count_params, init_cache
from tepo_jax.testing.hf_models import hf_logits, make_tiny_hf_checkpoint


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, positions, cache, valid):
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache=cache, valid=valid)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy(model, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy continuation of int[B, T] prompts: prefill once, then one token per step."""
    b, t = prompt.shape
    graphdef, state = nnx.split(model)
    cache = init_cache(model.cfg, b, t + steps)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    token, cache = _step(graphdef, state, jnp.asarray(prompt), positions, cache, jnp.ones((b, t), bool))
    out = [token]
    for i in range(steps - 1):
        pos = jnp.full((b, 1), t + i, jnp.int32)
        token, cache = _step(graphdef, state, token[:, None], pos, cache, jnp.ones((b, 1), bool))
        out.append(token)
    return np.stack([np.asarray(x) for x in out], axis=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="tiny model demo")
    p.add_argument("--family", default="qwen2", choices=["qwen2", "llama"])
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        peer = make_tiny_hf_checkpoint(tmp, a.family, vocab_size=256, hidden_size=64, num_layers=2,
                                       num_heads=4, num_kv_heads=2, tie_word_embeddings=a.family == "qwen2")
        model = load_hf(tmp)
    cfg = model.cfg
    print(f"checkpoint: {type(peer).__name__}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_heads}/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, tied={cfg.tie_word_embeddings}")
    print(f"params: ours {count_params(model):,}, transformers {sum(x.numel() for x in peer.parameters()):,}")

    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    positions = np.broadcast_to(np.arange(12), prompt.shape).astype(np.int32)
    logits, _ = model(jnp.asarray(prompt), jnp.asarray(positions))
    diff = np.abs(np.asarray(logits) - hf_logits(peer, prompt)).max()
    print(f"forward: tokens {prompt.shape} -> logits {logits.shape} {logits.dtype}; "
          f"max |ours - transformers| = {diff:.2e}")

    ours = greedy(model, prompt, a.steps)
    with torch.no_grad():
        ref = peer.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=a.steps,
                            do_sample=False, min_new_tokens=a.steps, pad_token_id=0)[:, prompt.shape[1]:].numpy()
    print(f"greedy with KV cache ({a.steps} tokens): {ours.tolist()}")
    print(f"transformers generate:               {ref.tolist()}  match={np.array_equal(ours, ref)}")
    if diff > 1e-4 or not np.array_equal(ours, ref):
        raise SystemExit("demo_model: ours and transformers disagree")


if __name__ == "__main__":
    main()
