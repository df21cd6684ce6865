"""`make demo`: SFT warm start, then GRPO, TEPO-sparse and TEPO-dense from it, on the CPU.

    python -m tepo_jax.demo [--workdir runs/demo] [--sft-steps N] [--rl-steps N]

1. Builds the synthetic tool tasks, a tiny BPE tokenizer and a tiny Qwen2-shaped model, and
   runs SFT on tool-use trajectories (with some redundant calls) — exported as an HF checkpoint.
2. Runs RL three times from that checkpoint with the same seed and budget, one per advantage.
3. Prints a table (accuracy, F1, tool calls per question, fraction of entropy-reducing calls,
   wall time), writes it to <workdir>/results.md and plots reward, calls and ΔH over training
   to <workdir>/curves.png.
Every step is an ordinary `tepo_jax.train` run with its own workdir, checkpoints and metrics,
so an interrupted demo resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

ALGOS = ("grpo", "tepo_sparse", "tepo_dense")
COLUMNS = [("accuracy", "eval/accuracy"), ("F1", "eval/f1"), ("calls/question", "eval/calls_per_question"),
           ("entropy-reducing calls", "eval/tepo/frac_reducing"), ("tool failures", "eval/tool_failure_rate")]


def sft_config(workdir: Path, steps: int):
    from configs.demo_cpu import get_config
    c = get_config()
    c.mode, c.workdir, c.sft.steps = "sft", str(workdir / "sft"), steps
    return c


def rl_config(workdir: Path, algo: str, steps: int):
    from configs.demo_cpu import get_config
    c = get_config()
    sft_final = str(workdir / "sft" / "sft_final")
    c.mode, c.workdir, c.train.steps = "rl", str(workdir / algo), steps
    c.model.tiny, c.model.hf_checkpoint, c.tokenizer.path = False, sft_final, sft_final
    c.algo.advantage = algo
    return c


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def results_table(rows: dict[str, dict], before: dict) -> str:
    header = "| run | " + " | ".join(name for name, _ in COLUMNS) + " | wall time |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    lines.append("| SFT only | " + " | ".join(_fmt(before.get(key)) for _, key in COLUMNS) + " | |")
    for algo, metrics in rows.items():
        cells = " | ".join(_fmt(metrics.get(key)) for _, key in COLUMNS)
        lines.append(f"| {algo} | {cells} | {metrics['wall_s']:.0f} s |")
    return "\n".join(lines)


def first_eval(metrics_file: Path) -> dict:
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if row["phase"] == "eval" and row["step"] == 0:
            return row
    return {}


def main(argv=None) -> None:
    from tepo_jax.analysis.plots import plot_training_curves
    from tepo_jax.train import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--sft-steps", type=int, default=None, help="default: configs/demo_cpu.py")
    p.add_argument("--rl-steps", type=int, default=None, help="default: configs/demo_cpu.py")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir)

    from configs.demo_cpu import get_config
    defaults = get_config()
    sft_steps = args.sft_steps if args.sft_steps is not None else defaults.sft.steps
    rl_steps = args.rl_steps if args.rl_steps is not None else defaults.train.steps
    t0 = time.time()
    print(f"[demo] SFT warm start: {sft_steps} steps -> {workdir / 'sft'}", flush=True)
    train(sft_config(workdir, sft_steps))
    print(f"[demo] SFT done in {time.time() - t0:.0f} s", flush=True)
    rows = {}
    for algo in ALGOS:
        t1 = time.time()
        print(f"[demo] RL with {algo}: {rl_steps} steps -> {workdir / algo}", flush=True)
        rows[algo] = dict(train(rl_config(workdir, algo, rl_steps)), wall_s=time.time() - t1)
    table = results_table(rows, first_eval(workdir / ALGOS[0] / "metrics.jsonl"))
    plot_training_curves({a: str(workdir / a / "metrics.jsonl") for a in ALGOS}, str(workdir / "curves.png"))
    (workdir / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\n[demo] total {time.time() - t0:.0f} s; table: {workdir / 'results.md'}, "
          f"plot: {workdir / 'curves.png'}")


if __name__ == "__main__":
    main()
