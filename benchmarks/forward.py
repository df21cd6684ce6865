"""Forward throughput: our jitted JAX forward vs transformers' PyTorch forward, same weights.

Both sides load the same random HF checkpoint (written to a temp dir), run fp32 full forwards
(logits included) on the same token batch after warm-up, and report the median of a few
repeats (interleaved). CPU by default.

    python -m benchmarks.forward                       # hidden 512, 8 layers, vocab 32k, 8 x 512
    python -m benchmarks.forward --layers 2 --seq 128  # quicker

Host memory: as `benchmarks/train_step.py` and a run of `tepo_jax.train` on a CPU-only install,
the process calls `tepo_jax.hostmem.retain_freed_memory()` first, for both sides. Each call
returns 524 MB of logits; with glibc's defaults both sides mmap'd that and their temporaries
afresh at every call (~180k page faults per call for ours, 180-300k for torch). One A/B pair,
default -> retain: ours 2.10 -> 1.92 s per call, torch 2.24 -> 2.02 s. The model line says
`host malloc retain|default`.

Last line: `forward: ours X tok/s, peer Y tok/s, ratio R` (R = ours / peer).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks._compile import compile_line, start_compile_log
from benchmarks._host import host_line

def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen2", choices=["qwen2", "llama"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def _median_seconds(fns, repeats: int, warmup: int) -> list[float]:
    """Median wall time of each function; repeats interleaved so load changes hit both alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions):
    return nnx.merge(graphdef, state)(tokens, positions)[0]


def main(argv=None) -> float:
    from tepo_jax.hostmem import retain_freed_memory

    print(host_line())
    retained = retain_freed_memory()  # before JAX or torch runs anything; applies to both sides
    compiles = start_compile_log()
    import torch

    from tepo_jax.checkpoints import load_hf
    from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint

    a = _args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        peer = make_tiny_hf_checkpoint(
            tmp, a.family, vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, seed=0)
        model = load_hf(tmp)
    graphdef, state = nnx.split(model)
    rng = np.random.RandomState(0)
    tokens_np = rng.randint(0, a.vocab, (a.batch, a.seq))
    tokens = jnp.asarray(tokens_np, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(a.seq, dtype=jnp.int32), tokens.shape)
    tokens_pt = torch.as_tensor(tokens_np, dtype=torch.long)

    def ours():
        return _forward(graphdef, state, tokens, positions).block_until_ready()

    def theirs():
        with torch.no_grad():
            return peer(tokens_pt, use_cache=False).logits

    diff = float(np.abs(np.asarray(ours()) - theirs().numpy()).max())
    n = a.batch * a.seq
    print(f"model: {a.family} hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
          f"{model.cfg.num_params / 1e6:.1f}M params; batch {a.batch} x {a.seq}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); max |logit diff| {diff:.2e}; "
          f"host malloc {'retain' if retained else 'default'}")
    t_ours, t_peer = _median_seconds([ours, theirs], a.repeats, a.warmup)
    ours_tps, peer_tps = n / t_ours, n / t_peer
    print(compile_line(compiles))
    print(f"forward: ours {ours_tps:.0f} tok/s, peer {peer_tps:.0f} tok/s, ratio {ours_tps / peer_tps:.2f}")
    return ours_tps / peer_tps


if __name__ == "__main__":
    main()
