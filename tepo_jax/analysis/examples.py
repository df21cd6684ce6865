"""Example run files for trying the analysis without training (and for its tests).

Trajectories come from the synthetic tasks played through the REAL tools and tokenizer
(`tepo_jax.sft.data.build_sft_trajectories`), plus a few scripted faulty calls (a python
error, an unused print, an off-topic search) so both call qualities occur. SFT trajectories
carry no sampler entropies, so per-token entropies are drawn from a seeded generator: a level
per segment r_k that tends to drop after an ok call and rise after a failed one, times
per-token noise. The ΔH statistics of these files are therefore synthetic: they exercise the
code paths, they say nothing about a model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from tepo_jax.data.prompts import system_prompt, to_messages
from tepo_jax.paths import as_path
from tepo_jax.data.synthetic import make_big_arithmetic, make_multihop, reference_solution
from tepo_jax.rewards import compute_reward
from tepo_jax.rl.loop import eval_metrics
from tepo_jax.rl.tepo_metrics import tepo_step_metrics
from tepo_jax.rollout.builder import TrajectoryBuilder
from tepo_jax.rollout.trajectory import MODEL_KINDS, TokenKind, Trajectory, attach_reward
from tepo_jax.runlog import RunLog
from tepo_jax.sft.data import build_sft_trajectories
from tepo_jax.tiny_tokenizer import build_tiny_tokenizer
from tepo_jax.tokenizer import encode_chat, load_tokenizer
from tepo_jax.tools import PythonTool, SandboxConfig, ToolBridge, ToolFormat
from tepo_jax.tools.format import call_record, encode_results
from tepo_jax.tools.search import BM25Index, LocalSearch, build_index

_FAULTS = {
    "math": [{"role": "model", "text": "Let me check the size of the result first.\n"
                                       "<python>print(1 / 0)</python>"},
             {"role": "tool", "tool": "python"},
             {"role": "model", "text": "That failed. Let me count something else.\n"
                                       "<python>print(len('abc') * 1234567)</python>"},
             {"role": "tool", "tool": "python"}],
    "qa": [{"role": "model", "text": "Maybe the weather matters.\n"
                                     "<search>weather forecast tomorrow rain</search>"},
           {"role": "tool", "tool": "search"}],
}


def with_entropies(traj: Trajectory, rng: np.random.Generator) -> Trajectory:
    """A copy with seeded synthetic entropies/logprobs on the model tokens (0 elsewhere)."""
    ent = np.zeros(len(traj), np.float32)
    level = rng.uniform(1.0, 2.0)
    for k in range(traj.num_calls + 1):
        if k:
            ok = traj.tool_calls[k - 1].status == "ok"
            drop = rng.uniform(-0.6, 0.2) if ok else rng.uniform(-0.1, 0.6)
            level = float(np.clip(level + drop, 0.15, 3.0))
            call = slice(*traj.tool_calls[k - 1].call_span)
            ent[call] = rng.uniform(0.02, 0.3, call.stop - call.start)
        seg = np.isin(traj.kinds, [TokenKind.REASONING, TokenKind.ANSWER]) & (traj.turns == k)
        ent[seg] = level * rng.gamma(4.0, 0.25, int(seg.sum()))
    model = np.isin(traj.kinds, np.array(MODEL_KINDS, np.int8))
    ent[~model] = 0.0
    logp = np.where(model, -ent * rng.uniform(0.2, 0.9, len(traj)), 0.0).astype(np.float32)
    return dataclasses.replace(traj, entropies=ent, logprobs=logp).validate()


def synthetic_examples(n_math: int = 3, n_qa: int = 3, seed: int = 0):
    """(arithmetic + multi-hop examples, the multi-hop corpus)."""
    qa, corpus = make_multihop(n_qa, seed)
    return list(make_big_arithmetic(n_math, seed)) + list(qa), corpus


def build_trajectories(examples: Sequence, tokenizer, bridge, seed: int = 0,
                       redundant_rate: float = 0.5) -> list[Trajectory]:
    """Scored trajectories (no entropies yet): SFT reference solutions of `examples` plus a
    faulty variant of the first example of each task, all through the real tools."""
    trajs = build_sft_trajectories(examples, tokenizer, bridge, redundant_rate=redundant_rate,
                                   seed=seed)
    firsts = {ex.task: ex for ex in reversed(examples)}
    trajs += play_faulty([firsts[t] for t in sorted(firsts)], tokenizer, bridge)
    return [attach_reward(t, compute_reward(t)) for t in trajs]


def play_faulty(examples: Sequence, tokenizer, bridge) -> list[Trajectory]:
    """Reference solutions with the task's faulty calls put first, played one by one."""
    fmt, out = ToolFormat(), []
    for i, ex in enumerate(examples):
        script = _FAULTS[ex.task] + reference_solution(ex)
        gold = list(ex.answers) if ex.task == "qa" else ex.answer
        b = TrajectoryBuilder(encode_chat(tokenizer, to_messages(ex)), tokenizer=tokenizer,
                              prompt_id=ex.id, group_id=1000 + i, sample_index=1,
                              gold=gold, task=ex.task)
        for t in range(0, len(script), 2):
            is_call = t + 1 < len(script)
            b.add_model_turn(tokenizer.encode(script[t]["text"], add_special_tokens=False),
                             is_call=is_call)
            if is_call:
                calls = fmt.parse_calls(b.last_text)
                results = bridge.run_batch(calls)
                b.add_tool_result(*call_record(fmt, calls, results),
                                  encode_results(tokenizer, fmt, [r.text for r in results]))
        out.append(b.finish("answer"))
    return out


def write_run(run_dir: str | Path, trajs: Sequence[Trajectory], steps: int = 3,
              seed: int = 0) -> dict[str, Path]:
    """A workdir laid out as the training driver writes it, through the driver's own writer
    (`tepo_jax.runlog.RunLog`): trajectories/sft_data.jsonl (the trajectories, no entropies),
    eval_000000.jsonl, rl_000001.jsonl ... rl_<steps>.jsonl (the same prompts with fresh
    entropies each step), eval_<steps>.jsonl, and metrics.jsonl with the 'rl' rows of
    `tepo_step_metrics` and the 'eval' rows of `eval_metrics` (keys `eval/...`)."""
    run = as_path(run_dir)
    rng = np.random.default_rng(seed)
    (run / "metrics.jsonl").unlink(missing_ok=True)    # RunLog appends; a rewrite starts afresh
    log = RunLog(run, tensorboard=False)
    log.save_trajectories("sft_data", trajs)
    for step in range(steps + 1):
        if step:
            batch = [with_entropies(t, rng) for t in trajs]
            log.write(step, "rl", tepo_step_metrics(batch))
            log.save_trajectories(f"rl_{step:06d}", batch)
        if step in (0, steps):
            batch = [with_entropies(t, rng) for t in trajs]
            log.write(step, "eval", eval_metrics(batch))
            log.save_trajectories(f"eval_{step:06d}", batch)
    log.close()
    return {"trajectories": run / "trajectories", "metrics": log.metrics_path}


def tools_and_tokenizer(work_dir: str | Path, examples: Sequence, corpus: Sequence[dict]):
    """(tokenizer, bridge) for synthetic examples: a tiny BPE trained on their text, a BM25
    index over `corpus` and the sandboxed python tool. Close the bridge after use."""
    work = Path(work_dir)
    texts = [system_prompt()] + [p["text"] for p in corpus] + \
        [t.get("text", "") for e in examples for t in reference_solution(e)] + \
        [t.get("text", "") for f in _FAULTS.values() for t in f]
    tok = load_tokenizer(build_tiny_tokenizer(texts, work / "tok", vocab_size=600))
    build_index(corpus, str(work / "index"))
    bridge = ToolBridge({"python": PythonTool(SandboxConfig(timeout_s=10)),
                         "search": LocalSearch(BM25Index.load(str(work / "index")))})
    return tok, bridge


def main(out_dir: str = "runs/example", seed: int = 0) -> None:
    """Write runs/example/{tepo_sparse,grpo}/... from the synthetic tasks."""
    out = Path(out_dir)
    examples, corpus = synthetic_examples(seed=seed)
    tok, bridge = tools_and_tokenizer(out / "_work", examples, corpus)
    try:
        trajs = build_trajectories(examples, tok, bridge, seed=seed)
    finally:
        bridge.close()
    for i, algo in enumerate(("tepo_sparse", "grpo")):
        write_run(out / algo, trajs, seed=seed + i)
    print(f"wrote {out}/{{tepo_sparse,grpo}}/trajectories and metrics.jsonl")


if __name__ == "__main__":
    import sys
    main(*sys.argv[1:2])
