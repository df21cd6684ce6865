"""The demo's comparison over several seeds: GRPO vs TEPO-sparse vs TEPO-dense vs SFT only.

    python -m tepo_jax.study --seeds 3 [--workdir runs/study] [--sft-steps N] [--rl-steps N]

Runs `tepo_jax.demo` once per seed (seed s in <workdir>/seed<s>: its own synthetic data,
tokenizer, SFT warm start and three RL runs), then prints per algorithm the mean over seeds of
held-out accuracy, of its paired gain over SFT only, of tool calls per question (greedy) and
of tool calls per trajectory in its own sampled rollouts (its last steps), each with
a 95% Student-t interval over the seed means (wide with 3 seeds, as it should be), the
per-seed values, and how many seeds beat SFT only beyond their own question-bootstrap
interval. Writes the table to <workdir>/results.md. A seed whose demo already finished is
read back, not rerun.

Runtime: about 9-13 minutes per seed on 2 CPU cores (the demo's), so 35-40 minutes for
`--seeds 3` (39 min measured, cold compilation cache, docs/demo.md).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

from tepo_jax import demo, paths
from tepo_jax.analysis.compare import RolloutSummary, RunSummary
from tepo_jax.analysis.stats import t_interval
from tepo_jax.train import USER_ERRORS

RUNS = (demo.SFT_ONLY,) + demo.ALGOS


def seed_result(workdir: Path, seed: int, sft_steps=None, rl_steps=None) -> demo.DemoResult:
    """The demo for one seed (the demo is resumable: a finished seed only reads)."""
    return demo.run_demo(workdir / f"seed{seed}", seed, sft_steps, rl_steps,
                         log=lambda m: print(f"[seed {seed}] {m}", flush=True))


def _cell(values: Sequence[float], signed: bool = False) -> str:
    mean, lo, hi = t_interval(values)
    spec = "+.3f" if signed else ".3f"
    if math.isnan(mean):
        return "n/a"
    ci = "" if math.isnan(lo) else f" [{lo:{spec}}, {hi:{spec}}]"
    return f"{mean:{spec}}{ci}"


def study_table(per_seed: Mapping[int, tuple[Sequence[RunSummary], Sequence[RolloutSummary]]]) -> str:
    """Markdown: one row per run (SFT only, then ALGOS), mean over seeds with a 95% t-interval
    and the per-seed values. `per_seed[s]` = (held-out summaries in RUNS order, sampled-rollout
    summaries in ALGOS order)."""
    seeds = sorted(per_seed)
    lines = ["| run | accuracy | gain vs SFT | calls/question | sampled calls/trajectory | "
             "seeds beating SFT | accuracy per seed |",
             "|---|---|---|---|---|---|---|"]
    for i, name in enumerate(RUNS):
        rows = [per_seed[s][0][i] for s in seeds]
        acc = [r.accuracy[0] for r in rows]
        gain = [r.accuracy_gain[0] for r in rows if r.accuracy_gain is not None]
        beats = f"{sum(r.beats_reference() for r in rows)}/{len(rows)}" if gain else ""
        sampled = _cell([per_seed[s][1][i - 1].calls[0] for s in seeds]) if i else ""
        lines.append(f"| {name} | {_cell(acc)} | {_cell(gain, True) if gain else ''} | "
                     f"{_cell([r.calls[0] for r in rows])} | {sampled} | {beats} | "
                     f"{', '.join(f'{a:.3f}' for a in acc)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 … N-1")
    p.add_argument("--workdir", default="runs/study")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--rl-steps", type=int, default=None)
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir, t0 = paths.as_path(args.workdir), time.time()  # local or gs://...
    try:
        demo.check_workdir(workdir)
        for s in range(args.seeds):  # every seed's configs before the first one trains
            demo.check_args(workdir / f"seed{s}", s, args.sft_steps, args.rl_steps)
        results = {s: seed_result(workdir, s, args.sft_steps, args.rl_steps) for s in range(args.seeds)}
    except USER_ERRORS as e:
        raise SystemExit(f"error: {demo.error_line(e)}") from None
    table = study_table({s: (r.summaries, r.rollout_rows) for s, r in results.items()})
    header = (f"## {args.seeds} seed(s), {results[0].summaries[0].n_questions} held-out questions each "
              f"(greedy), and each run's sampled rollouts over its last {demo.LAST_STEPS} steps: mean over "
              f"seeds [95% t-interval over seeds]\n\n")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.md").write_text(header + table + "\n")
    print("\n" + header + table)
    print(f"\n[study] total {time.time() - t0:.0f} s; table: {workdir / 'results.md'}")


if __name__ == "__main__":
    main()
