"""The RL step and its cold start vs Tunix: first sampler call, sampling, first and warm GRPO step.

    python -m benchmarks.tunix_step [--quick] [--rounds 1] [--steps 4] [--skip-peer]
        [--tunix-python .venv-tunix/bin/python]

Workload: `benchmarks/rl_step.py`'s (one random Qwen2 checkpoint, hidden 256, 4 layers, vocab
32000, saved by transformers and loaded by both sides' own loaders; 2 prompts x G=4 of the
math task's chat-rendered prompt, 63 tokens each; 128 sampled tokens at temperature 1;
GRPO with a beta = 0.04 k3 KL to the frozen initial policy, AdamW lr 1e-6, one update per
batch). Both sides are JAX on the same CPU, so this is the like-for-like comparison.
  ours:  the sampler (`tepo_jax.sampling.Sampler`, the rollout's sizing rule) and the library
         RL step (`rl_step.run_ours`: the agent loop with tools off, rewards, advantages,
         packing, the train step with the reference inside; as any run in a fresh CPU-only
         process, with `hostmem.retain_freed_memory()` applied by the Trainer).
  tunix: `benchmarks/_tunix_peer.py` in Tunix's own virtualenv (`make bench` makes
         .venv-tunix from benchmarks/requirements-tunix.txt): its `Sampler`, and its
         `GRPOLearner` over an `RLCluster` (actor, reference and rollout on one CPU device),
         with glibc's and JAX's defaults, as Tunix runs.
Each part runs in a fresh process (a cold start: JAX compiles everything, no persistent
cache), one at a time; with --rounds N the four parts run N times in alternation (ours,
Tunix, ours, ...) and every figure is the median over rounds. Compile seconds are trace +
lower + backend compile counted by `tepo_jax.compile_log` on both sides.

Printed: the first sampler call (wall and compile seconds), warm sampling tokens/s, the first
GRPO step (wall and compile), the warm step with its phases, each side by side.

Measured (2-core AMD EPYC VM with AVX-512, jax 0.10.2 CPU, Tunix 0.1.7; `--rounds 2`, medians):
  before the plain-draw decode program (`sample_tokens(plain=True)`):
    first sampler call: ours 4.82 s (compile 3.96 s), tunix 3.30 s (compile 2.15 s)
    sampling batch 8:   ours 1386 tok/s, tunix 802 tok/s
    first GRPO step:    ours 11.35 s (compile 8.70 s), tunix 10.69 s (compile 6.82 s)
    warm GRPO step:     ours 1.85 s, tunix 3.07 s (ratio 1.66)
  after:
    first sampler call: ours 3.35 s (compile 2.70 s), tunix 3.81 s (compile 2.37 s)
    sampling batch 8:   ours 1782 tok/s, tunix 733 tok/s
    first GRPO step:    ours 10.39 s (compile 8.12 s), tunix 12.02 s (compile 8.58 s)
    warm GRPO step:     ours 1.74 s (rollout 0.71, update 1.00 with the reference inside),
                        tunix 3.00 s (rollout 1.43, reference 0.33, update 1.21); ratio 1.72
  The host's speed moves both sides by 10-20% between runs (Tunix's first call: 3.30 vs
  3.81 s); one decode program's trace and compile fell by a quarter to a third in isolation
  (see sampling/engine.py).
  after the byte rule for attention windows (`sampling.config.window_buckets`: this
  workload's 8 slots on a 256-position cache keep one window, so one decode program instead
  of two), two runs:
    first sampler call: ours 2.23 / 2.62 s (compile 1.53 / 1.91 s), tunix 3.54 / 3.43 s (2.29 / 2.26 s)
    sampling batch 8:   ours 1565 / 1359 tok/s, tunix 879 / 901 tok/s
    first GRPO step:    ours 8.54 / 8.02 s (compile 6.57 / 6.22 s), tunix 11.35 / 10.11 s
    warm GRPO step:     ours 1.56 / 1.41 s, tunix 2.79 / 2.99 s; ratio 1.79 / 2.12
  after the KV cache's keys stored [B, K, H, S] (`models.decoder.LayerCache`), `--rounds 3`:
    first sampler call: ours 2.21 s (compile 1.58 s), tunix 3.30 s (compile 2.22 s)
    sampling batch 8:   ours 1737 tok/s, tunix 849 tok/s
    first GRPO step:    ours 7.92 s (compile 6.04 s), tunix 10.06 s (compile 7.08 s)
    warm GRPO step:     ours 1.35 s (rollout 0.68, update 0.67), tunix 2.78 s (rollout 1.39,
                        reference 0.30, update 1.16); ratio 2.06

Last line: `tunix_step: ours X s/step, peer Y s/step, ratio R` (median warm GRPO step; R =
Tunix / ours).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import rl_step
from benchmarks._compile import time_sampler_calls
from benchmarks._host import host_line
from benchmarks.cap_isa import module_command

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TUNIX_PYTHON = REPO / ".venv-tunix" / "bin" / "python"
PART_TIMEOUT_S = 900


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of all four parts")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per part; the first is the cold one")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON", str(DEFAULT_TUNIX_PYTHON)),
                    help="the interpreter of Tunix's virtualenv (env TUNIX_PYTHON)")
    ap.add_argument("--part", choices=("ours-sampler", "ours-grpo"), help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 2:
        ap.error("--rounds must be >= 1 and --steps >= 2 (a cold step and a warm one)")
    return args


def workload(args) -> argparse.Namespace:
    """rl_step's workload arguments (its --quick shapes with ours)."""
    # Ours runs alone in a fresh process: with the host-memory setting such a run applies.
    return rl_step.parse_args((["--quick"] if args.quick else []) + ["--steps", str(args.steps),
                                                                    "--retain-host-memory"])


def write_files(work: argparse.Namespace, root: str) -> str:
    """The checkpoint, its tokenizer and prompts.json in one directory (what both sides read)."""
    from tepo_jax.data.prompts import to_messages
    from tepo_jax.data.records import MathExample
    from tepo_jax.tokenizer import load_tokenizer, render_chat

    ckpt, tok_dir = rl_step.build_files(work, root)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), ckpt)
    tok = load_tokenizer(ckpt)
    rows = rl_step.make_rows(work.prompts)
    prompts = [{"prompt": render_chat(tok, to_messages(MathExample(f"q{i}", r["question"], r["answer"]), (), "short")),
                "answer": r["answer"]} for i, r in enumerate(rows)]
    with open(os.path.join(ckpt, "prompts.json"), "w") as f:
        json.dump(prompts, f, indent=1)
    return ckpt


def ours_sampler(work, files: str) -> dict:
    """Our first sampler call (cold) and warm calls on the rollout's batch."""
    import jax

    from tepo_jax.checkpoints.hf import load_hf
    from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams
    from tepo_jax.tokenizer import load_tokenizer

    jax.config.update("jax_enable_compilation_cache", False)
    with open(os.path.join(files, "prompts.json")) as f:
        rows = json.load(f)
    tok = load_tokenizer(files)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows for _ in range(work.group)]
    model = load_hf(files)
    sampler = Sampler(model, SamplerConfig.for_rollout(rl_step.cache_len(work), len(prompts), model=model.cfg))

    def call(seed: int) -> int:
        params = [SamplingParams(temperature=1.0, max_tokens=work.new_tokens, seed=seed * len(prompts) + i)
                  for i in range(len(prompts))]
        return sum(len(o.tokens) for o in sampler.generate(prompts, params))

    return time_sampler_calls("ours", call, warm_calls=3)


def ours_grpo(work, files: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        steps, notes, _ = rl_step.run_ours(work, files, files, workdir)
    for line in notes:
        print(line)
    return {"steps": steps}


def run_part(cmd: list[str], env: dict) -> dict:
    """Run one part in a fresh process; its RESULT line, parsed (its other lines are echoed)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=PART_TIMEOUT_S, check=False)
    lines = proc.stdout.splitlines()
    for line in lines[:-1]:
        print("  " + line, flush=True)
    if proc.returncode or not lines or not lines[-1].startswith("RESULT "):
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def part_commands(args, files: str) -> dict[str, tuple[list[str], dict]]:
    ours = module_command(sys.executable, "benchmarks.tunix_step") + ["--files", files, "--steps", str(args.steps)]
    ours += ["--quick"] if args.quick else []
    work = workload(args)
    tunix = module_command(args.tunix_python, "benchmarks._tunix_peer") + ["--files", files,
             "--steps", str(args.steps), "--group", str(work.group), "--new-tokens", str(work.new_tokens),
             "--cache-len", str(rl_step.cache_len(work)), "--beta", str(work.beta)]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    parts = {"ours-sampler": (ours + ["--part", "ours-sampler"], env),
             "ours-grpo": (ours + ["--part", "ours-grpo"], env)}
    if not args.skip_peer:
        parts["tunix-sampler"] = (tunix + ["--part", "sampler"], env)
        parts["tunix-grpo"] = (tunix + ["--part", "grpo"], env)
    return parts


def warm_phases(steps: list[dict]) -> dict:
    """Median of each phase over the warm steps (all but the first)."""
    warm = steps[1:]
    names = {k for s in warm for k in s if k not in ("compile", "programs", "tokens")}
    return {k: statistics.median(s.get(k, 0.0) for s in warm) for k in names}


def summarize(side: str, rounds: list[dict]) -> dict:
    """Medians over rounds of one side's figures."""
    med = statistics.median
    sampler = [r[f"{side}-sampler"] for r in rounds]
    grpo = [r[f"{side}-grpo"]["steps"] for r in rounds]
    warm = [warm_phases(s) for s in grpo]
    return {"first_call_s": med([s["first_call_s"] for s in sampler]),
            "first_call_compile_s": med([s["first_call_compile_s"] for s in sampler]),
            "tok_per_s": med([s["tok_per_s"] for s in sampler]),
            "first_step_s": med([s[0]["total"] for s in grpo]),
            "first_step_compile_s": med([s[0]["compile"] for s in grpo]),
            "first_step_programs": grpo[0][0].get("programs", 0),
            "warm": {k: med([w.get(k, 0.0) for w in warm]) for k in warm[0]}}


def phases_text(warm: dict) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(warm.items()) if k != "total" and v >= 0.005)
    return f"{warm['total']:.2f} s ({parts})"


def main(argv=None):
    args = parse_args(argv)
    work = workload(args)
    if args.part:
        result = ours_sampler(work, args.files) if args.part == "ours-sampler" else ours_grpo(work, args.files)
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(host_line())
    print(f"workload: qwen2 hidden {work.hidden}, {work.layers} layers, vocab {work.vocab}; {work.prompts} prompts "
          f"x G={work.group}, {work.new_tokens} new tokens, beta {work.beta}, {args.steps} GRPO steps per part, "
          f"{args.rounds} round(s)")
    if not args.skip_peer and not Path(args.tunix_python).exists():
        print(f"peer: no Tunix interpreter at {args.tunix_python} (`make bench` makes .venv-tunix); "
              f"measuring ours only")
        args.skip_peer = True
    with tempfile.TemporaryDirectory() as root:
        files = write_files(work, root)
        rounds = []
        for r in range(args.rounds):
            rounds.append({})
            for name, (cmd, env) in part_commands(args, files).items():
                print(f"round {r + 1}: {name}", flush=True)
                rounds[-1][name] = run_part(cmd, env)
    sides = ["ours"] + ([] if args.skip_peer else ["tunix"])
    figures = {side: summarize(side, rounds) for side in sides}
    if not args.skip_peer:
        print(f"peer: google-tunix {rounds[0]['tunix-grpo']['version']}")

    def row(label: str, fmt) -> None:
        print(f"{label}: " + ", ".join(f"{side} {fmt(figures[side])}" for side in sides))

    row("first sampler call", lambda f: f"{f['first_call_s']:.2f} s (compile {f['first_call_compile_s']:.2f} s)")
    row(f"sampling batch {work.prompts * work.group}", lambda f: f"{f['tok_per_s']:.0f} tok/s")
    row("first GRPO step", lambda f: f"{f['first_step_s']:.2f} s (compile {f['first_step_compile_s']:.2f} s)")
    row("warm GRPO step", lambda f: phases_text(f["warm"]))
    ours = figures["ours"]
    print(f"compile: {ours['first_step_compile_s']:.2f} s in {ours['first_step_programs']} programs "
          f"(our first GRPO step, median of {args.rounds} round(s))")
    peer_s = figures["tunix"]["warm"]["total"] if "tunix" in figures else float("nan")
    print(f"tunix_step: ours {ours['warm']['total']:.2f} s/step, peer {peer_s:.2f} s/step, "
          f"ratio {peer_s / ours['warm']['total']:.2f}")


if __name__ == "__main__":
    main()
