"""RL train-step throughput vs transformers/PyTorch: forward + backward + AdamW update, fp32.

    python -m benchmarks.train_step [--quick] [--hidden 512] [--layers 8] [--vocab 32000]
        [--batch 4] [--seq-len 512] [--seq-chunk 256] [--micro-batches 1] [--remat]
        [--repeats 5] [--skip-peer] [--mfu]

Workload: one random Llama-shaped checkpoint (saved by transformers, loaded by our loader, so
both sides start from the same fp32 weights); `batch` rows of `seq-len` tokens, the first
quarter of each row a prompt (loss mask 0), random advantages and old logprobs. One step =
the policy loss of `tepo_jax.rl.loss` (clipped ratio, token mean, entropy metric) → backward
→ global-norm clipping → AdamW update.
  ours: the jitted `train_step` (chunked logprob/entropy, donated state), one CPU device.
  peer: transformers `LlamaForCausalLM` forward (full [B, T, V] logits), the same loss written
        in torch, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`.
Each side is warmed up (our compile; torch's first step; then interleaved rounds until one
runs without page faults, at most 4, see Host memory), then the two are timed in alternation
(so both see the same background load on a shared machine); tokens/s = batch · seq_len / median step time over --repeats. The warm-up
losses of both sides are printed and must agree (same weights, same batch, same loss).

Host memory: the process calls `tepo_jax.hostmem.retain_freed_memory()` first (as a run of
`tepo_jax.train` does by default on a CPU-only install), for both sides: glibc then reuses freed
heap blocks instead of mmap'ing large ones afresh for every step, and JAX runs our step on the
calling thread, whose blocks come from that heap. XLA's CPU runtime allocates a step's
temporaries as one block (1.7 GB here) per execution, so without it every step of ours took
~430k page faults, 1-4 s of kernel time on this 2-core VM (torch, whose tensors are mostly below
glibc's mmap threshold, less). The model line says `host malloc retain|default`.

Measured (2-core AMD EPYC VM, jax 0.10.2 CPU, torch 2.13 CPU, defaults):
  before: train_step: ours 351 tok/s, peer 452 tok/s, ratio 0.78
  after:  train_step: ours 633 tok/s, peer 497 tok/s, ratio 1.27   (both sides retain; the
          host was slower in this run than in the one above: ours 3.2 s/step, peer 4.1 s/step)
Where ours went (profile of the step, XLA thunk times; per-op, `jax.profiler` trace): page
faults of the per-step temp block (above); attention as 5-D einsums with the [B, T, T] scores
transposed between layouts, and the full T × T square computed for a causal mask (now query
blocks that skip the keys after the block: block fwd+bwd 483 -> 250 ms); RoPE's
concatenate-of-halves, whose backward was pad fusions (~300 ms), and its cos/sin per layer;
the logprob chunk's autodiff backward (max / exp-sum / entropy passes recomputed, gradient
through the max; now a custom VJP: head fwd+bwd 1.21 -> 0.80 s); the query blocks' key
prefixes taken as slices, whose gradients were zero-padded full-length copies summed per layer
(now key blocks split and joined; the same values bit for bit, and 3.22 -> 3.12 s/step,
medians of 6 steps alternated in one process; `make bench` at 16:03 UTC, 2026-12-07, on a
faster moment of the VM: ours 653 tok/s, peer 544 tok/s, ratio 1.20; at 17:25, with
`retain_freed_memory` running our step on the calling thread and 5 repeats: 604 against 443
tok/s, ratio 1.36).

`--mfu` (accelerator only): model FLOPs utilisation of our step, FLOPs = 6 · params · tokens
+ attention (12 · layers · T² · heads · head_dim per row, causal counted in full), peak from
--peak-tflops (default: H100/H200 dense bf16, 989).

Last line: `train_step: ours X tok/s, peer Y tok/s, ratio R`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._compile import compile_line, start_compile_log
from benchmarks._host import host_line


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--family", default="llama", choices=("llama", "qwen2"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seq-chunk", type=int, default=256)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of our step (params stay fp32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--mfu", action="store_true")
    ap.add_argument("--preset", default="", help="a real model shape with random weights (e.g. Qwen2.5-0.5B); "
                    "no transformers checkpoint, no peer (accelerator hosts)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 128, 352, 2, 4096
        args.batch, args.seq_len, args.seq_chunk, args.repeats = 2, 128, 64, 2
    return args


def make_workload(args, seed=0):
    rng = np.random.default_rng(seed)
    b, t = args.batch, args.seq_len
    mask = np.zeros((b, t), np.float32)
    mask[:, t // 4:] = 1.0
    return {
        "tokens": rng.integers(0, args.vocab, (b, t)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32),
        "loss_mask": mask,
        "advantages": (rng.standard_normal((b, 1)) * mask).astype(np.float32),
        "old_logprobs": (-rng.random((b, t)) * 8 * mask).astype(np.float32),
        "ref_logprobs": np.zeros((b, t), np.float32),
        "token_weights": np.ones((b, t), np.float32),
    }


def build_ours(model, args, work, ocfg, loss_cfg):
    """A no-argument callable running one of our steps to completion (state carried inside)."""
    from tepo_jax.rl.batch import TrainBatch
    from tepo_jax.rl.optim import build_optimizer
    from tepo_jax.rl.train_step import create_train_state, make_train_step
    from tepo_jax.sharding import MeshConfig, batch_sharding, make_mesh

    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer = build_optimizer(ocfg)
    model_def, state, shardings = create_train_state(model, optimizer, mesh)
    step = make_train_step(model_def, optimizer, loss_cfg, mesh, shardings, batch_sharding(mesh),
                           args.micro_batches)
    batch = jax.device_put(TrainBatch(**work), batch_sharding(mesh))
    box = {"state": state}

    def run():
        box["state"], metrics = step(box["state"], batch)
        jax.block_until_ready((box["state"], metrics))
        return float(metrics["loss"])
    return run


def torch_loss(model, work, eps_low, eps_high):
    """The loss of tepo_jax.rl.loss (no KL, unit weights) written in torch on full logits."""
    import torch

    tokens = torch.as_tensor(work["tokens"], dtype=torch.long)
    logits = model(input_ids=tokens).logits[:, :-1].float()         # [B, T-1, V] predicts t+1
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, -1, tokens[:, 1:, None])[..., 0]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = torch.as_tensor(work["loss_mask"][:, 1:])
    adv = torch.as_tensor(work["advantages"][:, 1:])
    ratio = torch.exp(torch.where(mask > 0, logp - torch.as_tensor(work["old_logprobs"][:, 1:]), 0.0))
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    n = mask.sum()
    return (pg * mask).sum() / n, (entropy * mask).sum() / n


def build_peer(torch_model, args, work, ocfg, loss_cfg):
    """A no-argument callable running one torch step (forward, backward, clip, AdamW)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch_model.train()
    decay = [p for p in torch_model.parameters() if p.ndim >= 2]
    no_decay = [p for p in torch_model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ocfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=ocfg.learning_rate, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = torch_loss(torch_model, work, loss_cfg.eps_low, loss_cfg.eps_high)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), ocfg.max_grad_norm)
        opt.step()
        return float(loss.detach())
    return step


def minor_faults() -> int:
    """Minor page faults of this process so far (both sides run in it, one at a time)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, faults=None):
    """(seconds, fn's result); appends the call's page faults to `faults` if given."""
    f0, t0 = minor_faults(), time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    if faults is not None:
        faults.append(minor_faults() - f0)
    return dt, out


def step_flops(cfg, b, t):
    attention = 12 * cfg.num_layers * t * t * cfg.num_heads * cfg.head_dim
    return b * (6 * cfg.num_params * t + attention)


def preset_model(args):
    """A preset's shape (models/presets.py) with random weights, in --dtype, remat as asked."""
    from flax import nnx

    from tepo_jax.models.decoder import Decoder
    from tepo_jax.models.presets import preset

    dtype = jnp.dtype(args.dtype)
    return Decoder(preset(args.preset, dtype=dtype, param_dtype=jnp.float32), rngs=nnx.Rngs(0), remat=args.remat)


def main(argv=None):
    args = parse_args(argv)
    from tepo_jax.hostmem import retain_freed_memory

    retained = retain_freed_memory()  # before JAX or torch runs anything; applies to both sides
    from tepo_jax.checkpoints.hf import load_hf
    from tepo_jax.rl.loss import LossConfig
    from tepo_jax.rl.optim import OptimConfig
    from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint

    ocfg = OptimConfig(learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0)
    loss_cfg = LossConfig(eps_low=0.2, eps_high=0.28, seq_chunk=args.seq_chunk)
    print(host_line())
    compiles = start_compile_log()
    if args.preset:
        model, torch_model = preset_model(args), None
        args.skip_peer, args.vocab = True, model.cfg.vocab_size
    else:
        with tempfile.TemporaryDirectory() as d:
            torch_model = make_tiny_hf_checkpoint(
                d, args.family, vocab_size=args.vocab, hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, max_position_embeddings=max(4096, args.seq_len))
            dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
            model = load_hf(d, remat=args.remat, dtype=dtype)
    work = make_workload(args)
    cfg = model.cfg
    tokens = args.batch * args.seq_len
    print(f"model: {cfg.family} {cfg.num_params / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, "
          f"vocab {cfg.vocab_size}, seq_chunk {args.seq_chunk}, micro_batches {args.micro_batches}, "
          f"remat {args.remat}, compute {args.dtype}, jax {jax.default_backend()}, "
          f"host malloc {'retain' if retained else 'default'}")
    sides = {"ours": build_ours(model, args, work, ocfg, loss_cfg)}
    if not args.skip_peer:
        sides["peer"] = build_peer(torch_model, args, work, ocfg, loss_cfg)
    for name, run in sides.items():  # warm-up: our compile, torch's first step (same weights)
        s, loss = timed(run)
        print(f"{name}: warm-up step {s:.1f}s, loss {loss:.5f}")
    # Interleaved warm-up rounds until one runs without page faults (at most 4): torch's steps
    # leave long-lived blocks (optimizer state, gradients) in heap memory our step had just
    # freed, so the heap grows (fresh pages: faults) for a few rounds until both sides' blocks
    # fit; from then on both reuse their memory, as a training process does.
    rounds = []
    for _ in range(4):
        warm = {name: [] for name in sides}
        for name, run in sides.items():
            timed(run, warm[name])
        rounds.append({name: f[0] for name, f in warm.items()})
        if all(f[0] < 1000 for f in warm.values()):
            break
    print(f"allocator warm-up: {len(rounds)} interleaved round(s), page faults {rounds}")
    # Interleaved repeats, so both sides see the same background load on a shared machine.
    times = {name: [] for name in sides}
    faults = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            times[name].append(timed(run, faults[name])[0])
    flops = step_flops(cfg, args.batch, args.seq_len)
    sec = {name: statistics.median(ts) for name, ts in times.items()}
    for name, s in sec.items():
        print(f"{name}: {s * 1e3:.1f} ms/step (median of {[round(t, 2) for t in times[name]]}), "
              f"{tokens / s:.0f} tok/s, {flops / s / 1e9:.1f} GFLOP/s, page faults {faults[name]}")
    ours_s = sec["ours"]
    if args.mfu:
        print(f"ours: MFU {flops / ours_s / (args.peak_tflops * 1e12) * 100:.1f}% "
              f"(peak {args.peak_tflops} TFLOP/s)")
    print(compile_line(compiles))
    if args.skip_peer:
        print(f"train_step: ours {tokens / ours_s:.0f} tok/s, peer nan tok/s, ratio nan")
        return
    peer_s = sec["peer"]
    print(f"train_step: ours {tokens / ours_s:.0f} tok/s, peer {tokens / peer_s:.0f} tok/s, "
          f"ratio {peer_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
