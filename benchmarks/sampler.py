"""Sampler throughput vs transformers `generate`, entropy-emission overhead, decode memory.

    python -m benchmarks.sampler [--quick] [--hidden 512] [--layers 8] [--vocab 32000]
        [--batch 32] [--prompt-len 64] [--new-tokens 256] [--steps-per-call 64] [--repeats 2]
        [--skip-peer] [--skip-memory]

Workload: one random Llama-shaped checkpoint (saved by transformers, loaded by our loader, so
both sides run the same fp32 weights), `batch` random prompts of `prompt-len` tokens, exactly
`new-tokens` sampled tokens each (temperature 1, no top-k/top-p, no eos) — the RL setting.
Each side is warmed up first (our compiles; torch's first call), then timed end to end
(prefill + decode, host loop included); tokens/s = batch * new_tokens / seconds, best of
--repeats (transformers: best of min(2, --repeats), it is the slow side).

Entropy overhead: the same sampler built with emit_stats=False (no logprob/entropy in the
decode step), timed the same way; overhead = t_with / t_without - 1.

Memory: the decode call is lowered and compiled (not run) for two vocabulary sizes on abstract
inputs (V and 4V) and XLA's `memory_analysis()` temp (scratch) bytes are compared: the growth
per extra vocabulary entry must be at most one [B, V] fp32 logits array's worth (B * 4 bytes).

Last line: `sampler: ours X tok/s, peer Y tok/s, ratio R`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from tepo_jax.checkpoints.hf import load_hf
from tepo_jax.models.decoder import build_abstract, init_cache
from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams
from tepo_jax.sampling import engine
from tepo_jax.sampling.sample import SlotSampling
from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps-per-call", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.batch = 128, 2, 4096, 8
        args.prompt_len, args.new_tokens, args.repeats = 16, 32, 1
    return args


def sampler_config(args) -> SamplerConfig:
    total = args.prompt_len + args.new_tokens
    buckets = tuple(sorted({b for b in (128, 256, 384, 512, 768, 1024) if b < total + 1} | {
        -(-(total + 1) // 128) * 128}))
    return SamplerConfig(max_slots=args.batch, cache_buckets=buckets, prefill_buckets=(args.prompt_len,),
                         steps_per_call=args.steps_per_call, max_new_tokens=args.new_tokens)


def time_ours(model, args, prompts):
    """(seconds with logprob+entropy, seconds without): best of --repeats, runs interleaved so
    load from other processes hits both alike."""
    params = [SamplingParams(temperature=1.0, max_tokens=args.new_tokens, seed=i) for i in range(len(prompts))]
    samplers = {emit: Sampler(model, sampler_config(args), emit_stats=emit) for emit in (True, False)}
    for s in samplers.values():
        s.generate(prompts, params)  # warm-up: compiles every window bucket
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeats):
        for emit, s in samplers.items():
            t0 = time.perf_counter()
            outs = s.generate(prompts, params)
            best[emit] = min(best[emit], time.perf_counter() - t0)
            assert all(len(o.tokens) == args.new_tokens for o in outs)
    return best[True], best[False]


def time_peer(torch_model, args, prompts):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch_model.generation_config.eos_token_id = None
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        torch_model.generate(ids, max_new_tokens=8, **kw)  # warm-up
        best = float("inf")
        for _ in range(min(2, args.repeats)):
            t0 = time.perf_counter()
            out = torch_model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == args.prompt_len + args.new_tokens
    return best


def decode_temp_bytes(cfg, batch: int, max_len: int, steps: int, vocab_chunk) -> int:
    """XLA scratch bytes of one compiled decode call, from abstract inputs (nothing allocated)."""
    graphdef, state = nnx.split(build_abstract(cfg))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, np.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)  # noqa: E731
    slots = engine.SlotState(i32(batch), i32(batch), jax.ShapeDtypeStruct((batch,), bool), i32(batch), i32(batch),
                             i32(batch, 8), SlotSampling(f32(batch), f32(batch), i32(batch),
                                                         jax.ShapeDtypeStruct((batch,), bool),
                                                         jax.ShapeDtypeStruct((batch,), np.uint32)))
    _, decode = engine.compile_fns(graphdef)
    compiled = decode.lower(state, cache, slots, i32(), window=max_len, buf_len=steps,
                              vocab_chunk=vocab_chunk).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_check(args, cfg):
    b = args.batch
    v1, v2 = cfg.vocab_size, 4 * cfg.vocab_size
    chunk = SamplerConfig().vocab_chunk
    t1 = decode_temp_bytes(cfg, b, 256, args.steps_per_call, chunk)
    t2 = decode_temp_bytes(cfg.replace(vocab_size=v2), b, 256, args.steps_per_call, chunk)
    per_entry = (t2 - t1) / (v2 - v1)
    print(f"memory (vocab_chunk={chunk}): decode-call XLA temp bytes {t1 / 2**20:.1f} MiB at V={v1}, {t2 / 2**20:.1f} MiB at V={v2}: "
          f"+{per_entry:.1f} bytes per vocab entry; one [B,V] fp32 logits array = {4 * b} bytes per entry "
          f"-> {'OK' if per_entry <= 4 * b * 1.05 else 'GROWS BEYOND ONE [B,V] ARRAY'}")


def main(argv=None):
    args = parse_args(argv)
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices, {os.cpu_count()} cpus")
    print(f"model hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}; "
          f"batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}, fp32")
    with tempfile.TemporaryDirectory() as d:
        torch_model = make_tiny_hf_checkpoint(
            d, "llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=int(2.75 * args.hidden), seed=0)
        model = load_hf(d)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, args.vocab, args.prompt_len)) for _ in range(args.batch)]
    n_tokens = args.batch * args.new_tokens
    t_ours, t_plain = time_ours(model, args, prompts)
    print(f"ours: {t_ours:.2f}s ({n_tokens / t_ours:.0f} tok/s) with logprob+entropy, {t_plain:.2f}s without "
          f"-> entropy/logprob overhead {100 * (t_ours / t_plain - 1):+.1f}%")
    if not args.skip_memory:
        memory_check(args, model.cfg)
    t_peer = float("nan") if args.skip_peer else time_peer(torch_model, args, prompts)
    if not args.skip_peer:
        print(f"transformers generate(do_sample=True, use_cache=True): {t_peer:.2f}s ({n_tokens / t_peer:.0f} tok/s)")
    ours, peer = n_tokens / t_ours, n_tokens / t_peer
    print(f"sampler: ours {ours:.0f} tok/s, peer {peer:.0f} tok/s, ratio {ours / peer:.2f}")


if __name__ == "__main__":
    main()
