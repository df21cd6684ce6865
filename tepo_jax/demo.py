"""`make demo`: SFT warm start, then GRPO, TEPO-sparse and TEPO-dense from it, on the CPU.

    python -m tepo_jax.demo [--workdir runs/demo] [--seed 0] [--sft-steps N] [--rl-steps N]

1. Builds the demo's synthetic tool tasks (tepo_jax/data/synthetic.py: products that need
   python, small products the SFT demonstrator does in its head, facts that need a search,
   facts stated in the question), a tiny BPE tokenizer and a tiny Qwen2-shaped model, and
   runs SFT on the demonstrator's trajectories — exported as an HF checkpoint.
2. Runs RL three times from that checkpoint with the same seed and budget, one per advantage.
3. Evaluates every run greedily on the same held-out questions and prints a table with 95%
   bootstrap intervals over questions (accuracy, the paired accuracy gain over SFT only,
   tool calls per question), a per-family table, and the pilot study on the runs' own RL
   rollouts (ΔH per call-quality class); writes them to <workdir>/results.md and plots
   training reward, held-out accuracy, calls per question and ΔH to <workdir>/curves.png
   and ΔH per quality class to <workdir>/pilot.png.
Every step is an ordinary `tepo_jax.train` run with its own workdir, checkpoints and metrics,
so an interrupted demo resumes where it stopped. docs/demo.md explains the task design and
the measured results; `python -m tepo_jax.study --seeds 3` repeats it over seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import time
from pathlib import Path
from typing import Optional

from tepo_jax import paths
from tepo_jax.analysis import compare, pilot
from tepo_jax.analysis.plots import plot_dh_by_class, plot_training_curves
from tepo_jax.analysis.traces import read_metrics
from tepo_jax.config import ADVANTAGES, validate
from tepo_jax.data import jsonl, synthetic
from tepo_jax.data.loading import synthetic_data_dir
from tepo_jax.rollout.trajectory import read_jsonl
from tepo_jax.errors import ConfigError
from tepo_jax.train import USER_ERRORS, train

ALGOS = ADVANTAGES   # every advantage the stack has, from the same SFT checkpoint
SFT_ONLY = "SFT only"
CURVES = (("reward/score", (), "training reward (sampled rollouts)"),
          ("accuracy", (), "held-out accuracy (greedy)"),
          ("tepo/calls_per_traj", (), "tool calls per trajectory"),
          ("tepo/dh_mean", (), "mean ΔH per call"))


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.py"


def base_config(seed: int):
    """configs/demo_cpu.py, loaded by path (so the demo runs from any working directory)."""
    spec = importlib.util.spec_from_file_location("demo_cpu_config", DEMO_CONFIG)
    if spec is None or not DEMO_CONFIG.exists():
        raise FileNotFoundError(f"{DEMO_CONFIG}: the demo's config is missing (run from a clone of the repo)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.seed = seed
    return c


def sft_config(workdir: Path, steps: Optional[int] = None, seed: int = 0):
    c = base_config(seed)
    c.mode, c.workdir = "sft", str(workdir / "sft")
    if steps is not None:
        c.sft.steps = steps
    return c


def rl_config(workdir: Path, algo: str, steps: Optional[int] = None, seed: int = 0):
    c = base_config(seed)
    sft_final = str(workdir / "sft" / "sft_final")
    c.mode, c.workdir = "rl", str(workdir / algo)
    c.model.tiny, c.model.hf_checkpoint, c.tokenizer.path = False, sft_final, sft_final
    c.algo.advantage = algo
    if steps is not None:
        c.train.steps = steps
    return c


LAST_STEPS = 5   # the sampled-rollout table averages the runs' last this many RL steps


@dataclasses.dataclass
class DemoResult:
    summaries: list[compare.RunSummary]
    table: str
    families: str
    rollouts: str
    rollout_rows: list[compare.RolloutSummary]   # one per algorithm, in ALGOS order
    pilot: pilot.PilotReport
    wall_s: float


def eval_file(run_dir: Path, step: int) -> Path:
    path = run_dir / "trajectories" / f"eval_{step:06d}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no evaluation at step {step} (did the run finish?)")
    return path


def rl_step_seconds(run_dir: Path) -> Optional[float]:
    """The run's RL steps' wall time (rollout, reward, update: `time/step_s`), summed over its
    metrics.jsonl: the same whether the run just ran, was resumed, or is read back finished
    (timing the `train` call would count only the last attempt). None without such rows."""
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path, phase="rl") if path.exists() else []
    times = [r["time/step_s"] for r in rows if r.get("time/step_s") is not None]
    return float(sum(times)) if times else None


def summarize_runs(workdir: Path, steps: int, seed: int = 0) -> tuple[list, str]:
    """Summaries (SFT only first) with intervals, and the per-family markdown table."""
    sft_trajs = read_jsonl(eval_file(workdir / ALGOS[0], 0))
    reference = compare.question_outcomes(sft_trajs)
    runs = {SFT_ONLY: sft_trajs, **{a: read_jsonl(eval_file(workdir / a, steps)) for a in ALGOS}}
    rows = [compare.summarize(SFT_ONLY, sft_trajs, seed=seed)]
    rows += [compare.summarize(a, runs[a], reference, seed=seed, wall_s=rl_step_seconds(workdir / a))
             for a in ALGOS]
    families = {ex.id: synthetic.family_of(ex) or ex.task
                for ex in jsonl.read_records(synthetic_data_dir(sft_config(workdir)) / "eval.jsonl")}
    return rows, compare.family_table(runs, lambda pid: families.get(pid, "?"))


def rollout_summaries(workdir: Path, seed: int = 0) -> list[compare.RolloutSummary]:
    """Each run's own sampled rollouts over its last LAST_STEPS steps: where a policy's
    probabilities moved without changing its greedy choice (calls TEPO-sparse cut, say)."""
    return [compare.summarize_rollouts(
        a, [read_jsonl(f) for f in pilot.trajectory_files(workdir / a / "trajectories", LAST_STEPS, "rl")], seed=seed)
        for a in ALGOS]


def demo_pilot(workdir: Path, seed: int = 0) -> pilot.PilotReport:
    """The pilot study on the three runs' RL rollouts (the policies' own calls)."""
    data = synthetic_data_dir(sft_config(workdir))
    examples = pilot.load_examples([data / "train.jsonl", data / "eval.jsonl"])
    trajs = [t for a in ALGOS for t in pilot.load_trajectories(workdir / a / "trajectories", phase="rl")]
    labels, report = pilot.run_pilot(trajs, examples=examples, resample="trajectory", seed=seed)
    plot_dh_by_class(labels, report, workdir / "pilot.png")
    return report


def check_workdir(workdir) -> None:
    """PathError (one line) when `workdir` cannot be a directory (a file is in the way)."""
    paths.make_dir(workdir, f"--workdir {workdir}")


def check_args(workdir: Path, seed: int = 0, sft_steps: Optional[int] = None,
               rl_steps: Optional[int] = None) -> None:
    """Every argument and every config the demo will run (the SFT run and the RL runs), checked
    before any of it trains: a bad --rl-steps fails now, not after SFT. ConfigError or
    PathError, one line naming the flag or the field."""
    for flag, value in (("--seed", seed), ("--sft-steps", sft_steps), ("--rl-steps", rl_steps)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    check_workdir(workdir)
    validate(sft_config(workdir, sft_steps, seed))
    for algo in ALGOS:
        validate(rl_config(workdir, algo, rl_steps, seed))


def run_demo(workdir: Path, seed: int = 0, sft_steps: Optional[int] = None,
             rl_steps: Optional[int] = None, log=print) -> DemoResult:
    t0 = time.time()
    check_args(workdir, seed, sft_steps, rl_steps)
    sft = sft_config(workdir, sft_steps, seed)
    log(f"[demo] SFT warm start: {sft.sft.steps} steps -> {workdir / 'sft'}")
    train(sft)
    log(f"[demo] SFT done in {time.time() - t0:.0f} s")
    for algo in ALGOS:
        t1 = time.time()
        cfg = rl_config(workdir, algo, rl_steps, seed)
        log(f"[demo] RL with {algo}: {cfg.train.steps} steps -> {workdir / algo}")
        train(cfg)
        log(f"[demo] {algo} done in {time.time() - t1:.0f} s")
    steps = rl_config(workdir, ALGOS[0], rl_steps, seed).train.steps
    rows, families = summarize_runs(workdir, steps, seed)
    plot_training_curves({a: str(workdir / a / "metrics.jsonl") for a in ALGOS}, str(workdir / "curves.png"),
                         curves=CURVES, smooth_window=3)
    report = demo_pilot(workdir, seed)
    rollout_rows = rollout_summaries(workdir, seed)
    result = DemoResult(rows, compare.results_table(rows), families,
                        compare.rollout_table(rollout_rows, LAST_STEPS), rollout_rows, report, time.time() - t0)
    (workdir / "results.md").write_text(results_markdown(result))
    return result


def results_markdown(r: DemoResult) -> str:
    return (f"## Held-out evaluation ({r.summaries[0].n_questions} questions, greedy; 95% bootstrap "
            f"intervals over questions)\n\n{r.table}\n\n## Per task family (held-out, greedy)\n\n{r.families}\n\n"
            f"## The runs' own sampled rollouts (training prompts, temperature 1; 95% bootstrap "
            f"intervals over prompt groups)\n\n{r.rollouts}\n\n"
            f"## Pilot study: ΔH by call quality (the runs' RL rollouts)\n\n```\n"
            f"{pilot.format_class_summary(r.pilot)}\n```\n")


def error_line(e: BaseException) -> str:
    """The first line of a user error's message (what `tepo_jax.train` prints too)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, default=None, help="default: configs/demo_cpu.py")
    p.add_argument("--rl-steps", type=int, default=None, help="default: configs/demo_cpu.py")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = paths.as_path(args.workdir)  # a local path or gs://bucket/demo
    try:
        result = run_demo(workdir, args.seed, args.sft_steps, args.rl_steps,
                          log=lambda m: print(m, flush=True))
    except USER_ERRORS as e:
        raise SystemExit(f"error: {error_line(e)}") from None
    print("\n" + results_markdown(result))
    print(f"[demo] total {result.wall_s:.0f} s; results: {workdir / 'results.md'}, "
          f"plots: {workdir / 'curves.png'}, {workdir / 'pilot.png'}")


if __name__ == "__main__":
    main()
