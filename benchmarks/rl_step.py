"""One whole RL step vs TRL's `GRPOTrainer` step: rollout, reward, reference logprobs, update.

    python -m benchmarks.rl_step [--quick] [--steps 4] [--hidden 256] [--layers 4]
        [--vocab 32000] [--prompts 2] [--group 4] [--new-tokens 128] [--skip-peer]
        [--retain-host-memory]

Workload (both sides, one process, CPU): one random Qwen2 checkpoint (hidden 256, 4 layers,
vocab 32000) saved by transformers and loaded by both; a byte-level BPE tokenizer trained on
the prompts (the model's vocabulary is larger than the tokenizer's, as Qwen's is); `prompts`
prompts × G = `group` samples of `new-tokens` sampled tokens (temperature 1; the random
model practically never writes eos or the answer stop, and TRL is held to the full length by
`min_new_tokens`; the model-token counts are printed), GRPO with a
β = 0.04 k3 KL to the frozen initial policy, AdamW lr 1e-6, one update per batch. The reward
is one Python function, timed on both sides.
  ours: the library path with every tool off (`tepo_jax.api.Trainer(...).open()`), and
        `tepo_jax.rl.loop.rl_step` (the agent loop, rewards, advantages, packing, train step).
        Without `--retain-host-memory` (the default here), the run's
        `train.retain_freed_host_memory` is off: TRL's step runs in the same process and
        glibc's settings would hold for it too, so both sides run on glibc's defaults, as TRL's
        users do. A run of ours in a fresh CPU-only process has them on (tepo_jax/hostmem.py);
        `benchmarks/tunix_step.py` measures ours that way.
  peer: `trl.GRPOTrainer.train()` on the same prompts (the chat-rendered prompt text ours
        samples from), `per_device_train_batch_size = prompts · G`, `num_generations = G`,
        `beta = 0.04`, `max_completion_length = new-tokens`, `use_cpu`.

Per phase (seconds of the step): rollout (sampling, the reward excluded), reward, reference
logprobs, the sampler-vs-trainer logprob check, update (forward + backward + AdamW), and the
rest of the step (host work). On our side the reference logprobs and the check are computed
inside the update's compiled program (their seconds are in `update`); TRL's phases are timed
by wrapping its `_generate`, `_calculate_rewards` and reference `_get_per_token_logps_and_entropies`.

Cold start: the first step of each side includes everything a fresh process pays before it
(our JAX traces and compiles, with the persistent compilation cache off; torch has none).
`compile_log.CompileLog` reports the trace/lower/compile seconds of our programs, per program.

Measured (2-core AMD EPYC VM, AVX2, no AVX-512; jax 0.10.2 CPU, torch 2.13, TRL 1.16):
  before (a separate logprob pass for the check and one for the reference, full head):
    ours: warm step 6.77 s = rollout 1.35, reference 1.04, check 1.05, update 3.33;
          first step 26.7 s (compile 19.4 s in 5 programs)
  after:
    ours: warm step 4.01 s = rollout 1.29, update 2.67 (reference inside); first step
          20.2 s (compile 15.3 s in 4 programs: train_step 7.5, decode 4.8 for two windows,
          prefill 0.7, trace 2.3)
    peer: warm step 10.78 s = rollout 4.81, reference 1.28, update 4.59 (first 10.7 s)
    rl_step: ours 4.03 s/step, peer 10.78 s/step, ratio 2.67
  then train rows padded to 192 instead of 256 (`rl/batch.sequence_length_buckets`), on a
  2-core AMD EPYC VM with AVX-512 (6 steps each, alternating runs): warm step 2.10 / 2.04 s
  -> 1.86 / 1.70 s (update 1.23 / 1.22 -> 1.15 / 0.97 s); `make bench` there: ours 2.06
  s/step, peer 7.39 s/step, ratio 3.58; first step 10-15 s, compile 8-12 s (11 runs).

Last line: `rl_step: ours X s/step, peer Y s/step, ratio R` (median warm step; R = peer / ours).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import tempfile
import time

from benchmarks._compile import compile_line, start_compile_log
from benchmarks._host import host_line

QUESTION = "What is {a} plus {b}?"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--steps", type=int, default=4, help="steps per side; the first is the cold one")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--retain-host-memory", action="store_true",
                    help="ours with the host-memory setting of a fresh CPU-only run (tepo_jax/hostmem.py)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.new_tokens, args.steps = 64, 2, 4096, 32, 3
    return args


class PhaseClock:
    """Seconds per named phase; `wrap` times a callable (blocking on JAX results when asked)."""

    def __init__(self):
        self.seconds = collections.Counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def wrap(self, name: str, fn, block: bool = False):
        def timed(*args, **kwargs):
            with self.phase(name):
                out = fn(*args, **kwargs)
                if block:
                    import jax
                    jax.block_until_ready(out)
                return out
        return timed

    def take(self) -> dict:
        out, self.seconds = dict(self.seconds), collections.Counter()
        return out


def score(text: str, gold: list) -> float:
    """The reward of both sides: 1 for the right number in answer tags, else a small
    shaping term (so the groups' rewards differ and the advantages are not all zero)."""
    if f"<answer>{gold[0]}</answer>" in text:
        return 1.0
    return 0.1 * (text.count("<answer>") > 0) + 0.01 * (len(text) % 7)


def make_rows(n: int) -> list[dict]:
    return [{"question": QUESTION.format(a=11 + 7 * i, b=23 + 5 * i), "answer": str(34 + 12 * i)}
            for i in range(n)]


def prompt_texts(rows: list[dict]) -> list[str]:
    """What the tokenizer is trained on: the system and user prompts the math task writes
    with every tool off (so the prompt is a few dozen tokens, not a byte per character)."""
    from tepo_jax.data.prompts import system_prompt, user_prompt
    from tepo_jax.data.records import MathExample

    return [system_prompt((), "short")] + [user_prompt(MathExample(f"q{i}", r["question"], r["answer"]))
                                           for i, r in enumerate(rows)]


def build_files(args, root: str) -> tuple[str, str]:
    """(checkpoint dir, tokenizer dir): the random Qwen2 model and a BPE tokenizer."""
    from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint
    from tepo_jax.tiny_tokenizer import build_tiny_tokenizer

    ckpt, tok = os.path.join(root, "model"), os.path.join(root, "tokenizer")
    make_tiny_hf_checkpoint(ckpt, "qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                            num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads)
    build_tiny_tokenizer(prompt_texts(make_rows(64)) * 4, tok, vocab_size=1024)
    return ckpt, tok


def cache_len(args) -> int:
    """KV cache positions of the rollout: the prompt (under 96 tokens) and every new token."""
    return 64 * -(-(args.new_tokens + 96) // 64)


def our_config(args, ckpt: str, tok: str, workdir: str):
    from tepo_jax.config import defaults

    c = defaults()
    c.workdir, c.mode, c.seed = workdir, "rl", 0
    c.model.hf_checkpoint, c.tokenizer.path = ckpt, tok
    c.data.task, c.data.prompt, c.data.prompts_per_step = "math", "short", args.prompts
    c.tools.python = c.tools.search = False
    c.algo.advantage = "grpo"
    c.rollout.group_size, c.rollout.max_tokens, c.rollout.max_turn_tokens = args.group, args.new_tokens, args.new_tokens
    c.rollout.cache_len = cache_len(args)
    c.loss.kl_coef, c.optim.lr = args.beta, 1e-6
    c.train.compilation_cache_dir = ""      # the cold start is measured: no persistent cache
    c.train.save_trajectories = False
    c.train.retain_freed_host_memory = args.retain_host_memory   # see the module docstring
    return c


def run_ours(args, ckpt: str, tok: str, workdir: str) -> tuple[list[dict], list[str], list[str]]:
    """Per step {'total': s, phase: s, ...}; the lines to print; the prompt texts sampled from."""
    import jax
    import numpy as np

    from tepo_jax.api import Trainer
    from tepo_jax.compile_log import CompileLog
    from tepo_jax.rl import loop as rl_loop
    from tepo_jax.rl.optim import OptimConfig, build_schedule
    from tepo_jax.rl.train_step import make_train_step, split_model
    from tepo_jax import experiment, multihost
    from tepo_jax.rl.batch import sequence_length_buckets

    clock = PhaseClock()
    config = our_config(args, ckpt, tok, workdir)

    def timed_score(text: str, gold: list) -> float:   # the library reads a reward's signature
        with clock.phase("reward"):
            return score(text, gold)
    rows = make_rows(args.prompts)
    steps, notes = [], []
    with CompileLog() as setup_compiles:
        t_start = time.perf_counter()
        run = Trainer(config, reward=timed_score, train_data=rows, eval_data=rows[:1]).open()
    try:
        c = run.config
        model_def, optimizer, state, shardings = run.new_state("rl")
        step_fn = make_train_step(model_def, optimizer, run.loss_cfg, run.mesh, shardings, run.batch_sharding,
                                  micro_batches=c.train.micro_batches, schedule=build_schedule(OptimConfig.for_rl(c)),
                                  reference=True)
        ref_params = jax.device_put(split_model(run.model)[1], shardings.params)
        agent = run.agent(args.prompts * args.group)
        step_cfg = rl_loop.RLStepConfig(advantage=rl_loop.advantage_config(c), rest=None, kl_coef=c.loss.kl_coef,
                                        row_multiple=experiment.batch_shards(run.mesh) * c.train.micro_batches,
                                        seq_buckets=sequence_length_buckets(128, c.rollout.cache_len))
        timed_step = clock.wrap("update", step_fn, block=True)
        agent_run = agent.run

        def timed_rollout(*a, **k):
            with clock.phase("rollout"):
                return agent_run(*a, **k)
        agent.run = timed_rollout
        setup_s = time.perf_counter() - t_start
        notes.append(f"ours: setup {setup_s:.1f} s (load, tokenizer, sharding), "
                     f"compiles in it {setup_compiles.summary()}")
        for i in range(args.steps):
            with CompileLog() as compiles:
                t0 = time.perf_counter()
                state, metrics, trajs = rl_loop.rl_step(
                    state, run.exp.train_examples[:args.prompts], i, agent=agent, model_def=model_def, train_step=timed_step,
                    put_batch=lambda b: multihost.put_global(b, run.batch_sharding),
                    cfg=step_cfg, seed=0, ref_params=ref_params)
                total = time.perf_counter() - t0
            phases = clock.take()
            phases["rollout"] = phases.get("rollout", 0.0) - phases.get("reward", 0.0)
            phases["host"] = total - sum(phases.values())
            phases["total"], phases["compile"], phases["programs"] = total, compiles.total_s, compiles.programs
            phases["tokens"] = sum(int(t.model_mask().sum()) for t in trajs)
            steps.append(phases)
            if i == 0:
                notes.append(f"ours: first step compiles {compiles.summary(top=6)}")
        prompt_lens = [int(np.argmax(t.model_mask())) for t in trajs[::args.group]]
        prompts = [run.exp.tokenizer.decode(t.token_ids[:n].tolist()) for t, n in zip(trajs[::args.group], prompt_lens)]
        notes.append(f"ours: prompt tokens {prompt_lens}, model tokens per step {[s['tokens'] for s in steps]}, "
                     f"sampler-vs-trainer logprob diff {metrics.get('rl/sampler_trainer_logprob_diff', float('nan')):.2e}, "
                     f"kl {metrics['train/kl']:.2e}")
    finally:
        run.close()
    return steps, notes, prompts


def run_peer(args, ckpt: str, tok: str, workdir: str, prompts: list[str]) -> tuple[list[dict], list[str]]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    clock = PhaseClock()
    tokenizer = AutoTokenizer.from_pretrained(tok)
    rows = make_rows(args.prompts)
    # `prompts`: the exact text our side sampled from (its chat template and system prompt).
    per_step = args.prompts * args.group
    data = Dataset.from_list([{"prompt": p, "gold": r["answer"]} for p, r in zip(prompts, rows)] * (args.steps + 1))

    def reward(prompts, completions, gold, **_):
        return [score(c, [g]) for c, g in zip(completions, gold)]

    cfg = GRPOConfig(output_dir=workdir, per_device_train_batch_size=per_step, num_generations=args.group,
                     gradient_accumulation_steps=1, max_completion_length=args.new_tokens, beta=args.beta,
                     learning_rate=1e-6, max_steps=args.steps, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, temperature=1.0, top_p=1.0, shuffle_dataset=False,
                     generation_kwargs={"min_new_tokens": args.new_tokens}, seed=0)
    trainer = GRPOTrainer(model=ckpt, reward_funcs=reward, args=cfg, train_dataset=data,
                          processing_class=tokenizer)
    trainer._generate = clock.wrap("rollout", trainer._generate)
    trainer._calculate_rewards = clock.wrap("reward", trainer._calculate_rewards)
    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(model, *a, **k):
        if model is trainer.ref_model:
            return clock.wrap("reference", logps)(model, *a, **k)
        return logps(model, *a, **k)
    trainer._get_per_token_logps_and_entropies = timed_logps
    steps = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t0
            phases = clock.take()
            phases["update"] = total - sum(phases.values())
            phases["total"] = total
            steps.append(phases)

    trainer.add_callback(StepTimes())
    trainer.train()
    return steps, [f"peer: trl GRPOTrainer, torch {torch.__version__}, {torch.get_num_threads()} threads"]


PHASES = ("rollout", "reward", "reference", "check", "update", "host")


def phase_table(name: str, steps: list[dict]) -> list[str]:
    warm = steps[1:] or steps
    med = {p: statistics.median(s.get(p, 0.0) for s in warm) for p in PHASES + ("total",)}
    parts = ", ".join(f"{p} {med[p]:.2f}" for p in PHASES if med[p] > 0.0005)
    first = steps[0]
    compile_part = f" (compile {first['compile']:.1f} s)" if "compile" in first else ""
    return [f"{name}: warm step {med['total']:.2f} s = {parts}",
            f"{name}: first step {first['total']:.2f} s{compile_part}; steps {[round(s['total'], 2) for s in steps]}"]


def main(argv=None):
    args = parse_args(argv)
    print(host_line())
    compiles = start_compile_log()   # ours only: the peer is torch
    print(f"workload: qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"{args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens, beta {args.beta}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as root:
        ckpt, tok = build_files(args, root)
        ours, notes, prompts = run_ours(args, ckpt, tok, os.path.join(root, "ours"))
        for line in notes + phase_table("ours", ours):
            print(line, flush=True)
        ours_s = statistics.median(s["total"] for s in ours[1:] or ours)
        if args.skip_peer:
            print(compile_line(compiles))
            print(f"rl_step: ours {ours_s:.2f} s/step, peer nan s/step, ratio nan")
            return
        peer, notes = run_peer(args, ckpt, tok, os.path.join(root, "peer"), prompts)
        for line in notes + phase_table("peer", peer):
            print(line, flush=True)
    peer_s = statistics.median(s["total"] for s in peer[1:] or peer)
    print(compile_line(compiles))
    print(f"rl_step: ours {ours_s:.2f} s/step, peer {peer_s:.2f} s/step, ratio {peer_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
