"""Held-out comparison of runs with honest intervals: accuracy and tool calls per question,
each with a 95% percentile-bootstrap CI over questions, and the paired difference in
accuracy against a reference run (SFT only) on the same questions.

A run's evaluation is its eval trajectories (`trajectories/eval_XXXXXX.jsonl`, one greedy
rollout per question); everything here is computed from those files, so the demo, the
multi-seed study and a notebook report the same numbers.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from tepo_jax.analysis.stats import bootstrap_mean_ci, paired_difference_ci
from tepo_jax.rollout.trajectory import Trajectory, entropy_reducing

Interval = tuple[float, float, float]   # (estimate, lo, hi)


@dataclasses.dataclass(frozen=True)
class QuestionOutcomes:
    """Per-question results of one evaluation, in sorted prompt-id order."""
    prompt_ids: tuple[str, ...]
    correct: np.ndarray        # float[n]: exact match (mean over samples of a question)
    calls: np.ndarray          # float[n]: tool calls per question
    reducing: int              # entropy-reducing calls, all questions together
    num_calls: int
    failures: int              # calls whose status is not ok


def question_outcomes(trajs: Sequence[Trajectory]) -> QuestionOutcomes:
    """Group `trajs` by prompt id (several samples of a question are averaged)."""
    by_id: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_id[t.prompt_id].append(t)
    ids = tuple(sorted(by_id))
    mean = lambda f: np.array([np.mean([f(t) for t in by_id[i]]) for i in ids], np.float64)  # noqa: E731
    calls = [c for t in trajs for c in t.tool_calls]
    return QuestionOutcomes(ids, mean(lambda t: float(t.em or 0.0)), mean(lambda t: float(t.num_calls)),
                            reducing=sum(sum(entropy_reducing(t)) for t in trajs), num_calls=len(calls),
                            failures=sum(c.status != "ok" for c in calls))


@dataclasses.dataclass(frozen=True)
class RunSummary:
    name: str
    n_questions: int
    accuracy: Interval
    calls: Interval
    accuracy_gain: Optional[Interval]    # paired, against the reference run; None for it
    frac_reducing: float                 # entropy-reducing calls / calls
    failure_rate: float                  # failed calls / calls
    wall_s: Optional[float] = None

    def beats_reference(self) -> bool:
        """True when the paired CI of the accuracy gain lies above 0."""
        return self.accuracy_gain is not None and self.accuracy_gain[1] > 0


def summarize(name: str, trajs: Sequence[Trajectory], reference: Optional[QuestionOutcomes] = None,
              *, seed: int = 0, wall_s: Optional[float] = None) -> RunSummary:
    """Accuracy and calls with bootstrap CIs; with `reference`, the paired accuracy gain on
    the questions both evaluations share (an error if they share none)."""
    out = question_outcomes(trajs)
    gain = None
    if reference is not None:
        gain = paired_difference_ci(*_paired(out, reference), seed=seed)
    ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
    return RunSummary(name, len(out.prompt_ids), bootstrap_mean_ci(out.correct, seed=seed),
                      bootstrap_mean_ci(out.calls, seed=seed), gain,
                      ratio(out.reducing, out.num_calls), ratio(out.failures, out.num_calls), wall_s)


def _paired(a: QuestionOutcomes, b: QuestionOutcomes) -> tuple[np.ndarray, np.ndarray]:
    shared = sorted(set(a.prompt_ids) & set(b.prompt_ids))
    if not shared:
        raise ValueError("the two evaluations share no question: cannot pair them")
    ia, ib = ({p: i for i, p in enumerate(x.prompt_ids)} for x in (a, b))
    return (a.correct[[ia[p] for p in shared]], b.correct[[ib[p] for p in shared]])


def fmt_interval(iv: Optional[Interval], signed: bool = False) -> str:
    """'0.688 [0.609, 0.766]'; 'n/a' for a missing one."""
    if iv is None or iv[0] is None or math.isnan(iv[0]):
        return "n/a"
    spec = "+.3f" if signed else ".3f"
    if math.isnan(iv[1]):
        return format(iv[0], spec)
    return f"{iv[0]:{spec}} [{iv[1]:{spec}}, {iv[2]:{spec}}]"


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def results_table(rows: Sequence[RunSummary]) -> str:
    """Markdown table: one row per run, intervals in brackets (95%, bootstrap over questions)."""
    head = ("| run | accuracy [95% CI] | gain vs SFT [95% CI] | calls/question [95% CI] "
            "| entropy-reducing calls | tool failures | RL step time |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r.wall_s:.0f} s" if r.wall_s is not None else ""
        lines.append(f"| {r.name} | {fmt_interval(r.accuracy)} | {fmt_interval(r.accuracy_gain, True)} | "
                     f"{fmt_interval(r.calls)} | {_fmt(r.frac_reducing)} | {_fmt(r.failure_rate)} | {wall} |")
    return "\n".join(lines)


def family_table(runs: Mapping[str, Sequence[Trajectory]], family: Callable[[str], str]) -> str:
    """Markdown table of accuracy and calls/question per task family (`family(prompt_id)`),
    one column pair per run: where each run gained or lost."""
    fams: dict[str, dict[str, list]] = defaultdict(dict)
    for name, trajs in runs.items():
        out = question_outcomes(trajs)
        for fam in sorted({family(p) for p in out.prompt_ids}):
            sel = np.array([family(p) == fam for p in out.prompt_ids])
            fams[fam][name] = (out.correct[sel].mean(), out.calls[sel].mean(), int(sel.sum()))
    names = list(runs)
    lines = ["| family | n | " + " | ".join(f"{n} acc | {n} calls" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for fam, per_run in sorted(fams.items()):
        n = next(iter(per_run.values()))[2]
        cells = " | ".join(f"{per_run[r][0]:.2f} | {per_run[r][1]:.2f}" if r in per_run else "n/a | n/a"
                           for r in names)
        lines.append(f"| {fam} | {n} | {cells} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RolloutSummary:
    """A run's own sampled rollouts over its last training steps (on-policy, temperature 1)."""
    name: str
    n_trajectories: int
    reward: Interval
    calls: Interval


def summarize_rollouts(name: str, steps: Sequence[Sequence[Trajectory]], *, seed: int = 0) -> RolloutSummary:
    """Mean reward and calls per trajectory over the rollouts of `steps` (one list per step),
    with bootstrap CIs that resample whole groups (one prompt's samples at one step)."""
    trajs = [t for step in steps for t in step]
    groups = np.array([i * 1_000_003 + t.group_id for i, step in enumerate(steps) for t in step])
    reward = np.array([float(t.reward or 0.0) for t in trajs])
    calls = np.array([float(t.num_calls) for t in trajs])
    return RolloutSummary(name, len(trajs), bootstrap_mean_ci(reward, seed=seed, clusters=groups),
                          bootstrap_mean_ci(calls, seed=seed, clusters=groups))


def rollout_table(rows: Sequence[RolloutSummary], last: int) -> str:
    lines = [f"| run | training reward, last {last} steps [95% CI] | calls/trajectory, last {last} steps [95% CI] |",
             "|---|---|---|"]
    lines += [f"| {r.name} | {fmt_interval(r.reward)} | {fmt_interval(r.calls)} |" for r in rows]
    return "\n".join(lines)
