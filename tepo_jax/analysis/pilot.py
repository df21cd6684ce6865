"""The pilot study (the paper's first experiment): is the entropy drop after a tool call a
signal of the call's quality?

For every tool call of a set of trajectories we
1. label its quality from what the tool returned, with a rule per tool (`QUALITY_RULES`;
   your own: `rules={tool: fn}`, or `--rules pkg.module:TABLE` on the command line), and its class (useful / redundant / useless), and
2. relate the binary quality to ΔH_k = H(r_k) − H(r_{k−1}) (`tepo_jax.rollout.trajectory`):
   mean ΔH by quality, the fraction of entropy-reducing calls (ΔH < 0) by quality, and the
   point-biserial correlation (Pearson between quality ∈ {0, 1} and ΔH) with a seeded
   bootstrap CI and a Fisher-z CI, and the mean ΔH per class with its bootstrap CI. TEPO's
   premise predicts a negative correlation: good calls lower the entropy of what the model
   writes next. An interval is only given for a class of at least `min_class_n` calls (10):
   over one or a few points a bootstrap is narrow and means nothing, and the report says so.

The labels and their rules live in `tepo_jax.analysis.quality` (re-exported here).

CLI:  python -m tepo_jax.analysis.pilot --trajectories FILE_OR_DIR [--phase rl|eval|sft|all]
          [--dataset records.jsonl] [--tokenizer DIR] [--rules my.rules:RULES] [--json out.json]

A directory is a run's `trajectories/`, where the driver writes `rl_XXXXXX.jsonl` (RL
rollouts), `eval_XXXXXX.jsonl` (greedy held-out rollouts) and `sft_data.jsonl` (SFT data, no
sampler entropies); only the `--phase` files are read (default rl).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from tepo_jax.analysis.quality import (  # noqa: F401  (re-exported: the pilot's public names)
    MIN_CLASS_N, QUALITY_CLASSES, QUALITY_RULES, CallContext, CallLabel, ExampleInfo, Quality, QualityRule,
    contains_phrase, entities, examples_from_records, generic_quality, is_redundant, label_calls,
    later_model_text, printed_values, python_quality, rule_for, search_quality,
    turn_record)
from tepo_jax.analysis.stats import (bootstrap_ci, bootstrap_mean_ci, fisher_ci,  # noqa: F401
                                     fisher_p_value, pearson)
from tepo_jax.data.jsonl import JsonlError, read_records
from tepo_jax.paths import PathError, as_path, make_dir
from tepo_jax.importpath import ImportPathError, import_object
from tepo_jax.rollout.trajectory import Trajectory, TrajectoryError, read_jsonl
from tepo_jax.tokenizer import TokenizerLoadError, load_tokenizer

# ----------------------------------------------------------------------------- statistics


def group_stats(dh: np.ndarray, reducing: np.ndarray) -> dict[str, float]:
    n = int(dh.size)
    return {"n": n,
            "dh_mean": float(dh.mean()) if n else math.nan,
            "dh_std": float(dh.std()) if n else math.nan,
            "dh_median": float(np.median(dh)) if n else math.nan,
            "frac_reducing": float(reducing.mean()) if n else math.nan}


@dataclasses.dataclass
class PilotReport:
    n_calls: int                          # all labelled calls
    n_defined: int                        # calls with a defined ΔH (used for the statistics)
    by_quality: dict[str, dict]           # 'high' / 'low' -> n, dh_mean, dh_std, frac_reducing
    by_tool: dict[str, dict[str, dict]]   # tool -> 'high'/'low'/'all' -> stats (a multi-call
                                          # turn counts under each of its tools)
    reasons: dict[str, int]               # 'tool/reason' -> count (all calls, per tool)
    r: float                              # point-biserial (quality, ΔH)
    ci_bootstrap: tuple[float, float]     # NaN when a quality has < min_class_n calls
    ci_fisher: tuple[float, float]
    p_value: float
    level: float
    n_boot: int
    seed: int
    resample: str
    by_class: dict[str, dict] = dataclasses.field(default_factory=dict)  # useful/redundant/useless ->
                                          # n, dh_mean, dh_lo, dh_hi (NaN below min_class_n), frac_reducing
    notes: list[str] = dataclasses.field(default_factory=list)  # why an interval is not given
    min_class_n: int = MIN_CLASS_N

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        return _nan_to_none(dataclasses.asdict(self))


def _nan_to_none(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


def _split_by_quality(labels: Sequence[CallLabel]) -> dict[str, dict]:
    out = {}
    for name, want in (("high", True), ("low", False), ("all", None)):
        sel = [lb for lb in labels if want is None or lb.high == want]
        out[name] = group_stats(np.array([lb.dh for lb in sel], np.float64),
                                np.array([lb.reducing for lb in sel], np.float64))
    return out


def class_stats(labels: Sequence[CallLabel], *, n_boot: int, level: float, seed: int,
                resample: str, min_n: int) -> dict[str, dict]:
    """Mean ΔH per quality class with its bootstrap CI (calls, or trajectories as clusters),
    NaN bounds for a class with fewer than `min_n` calls."""
    out = {}
    for name in QUALITY_CLASSES:
        sel = [lb for lb in labels if lb.quality_class == name]
        dh = np.array([lb.dh for lb in sel], np.float64)
        stats = group_stats(dh, np.array([lb.reducing for lb in sel], np.float64))
        lo = hi = math.nan
        if len(sel) >= min_n:
            clusters = np.array([lb.traj_index for lb in sel]) if resample == "trajectory" else None
            _, lo, hi = bootstrap_mean_ci(dh, n_boot=n_boot, level=level, seed=seed, clusters=clusters)
        out[name] = {**stats, "dh_lo": lo, "dh_hi": hi}
    return out


def small_class_notes(n_high: int, n_low: int, by_class: Mapping[str, dict], min_n: int) -> list[str]:
    """Why an interval is left out: the classes with fewer than `min_n` calls."""
    notes = []
    smaller = min((n_high, "high"), (n_low, "low"))
    if smaller[0] < min_n:
        notes.append(f"no bootstrap CI for r: only {smaller[0]} {smaller[1]}-quality call(s); an "
                     f"interval needs >= {min_n} in each quality (the Fisher-z one assumes a large sample too)")
    for name, st in by_class.items():
        if 0 < st["n"] < min_n:
            notes.append(f"no CI for the {name} class: {st['n']} call(s) (needs >= {min_n})")
    return notes


def pilot_report(labels: Sequence[CallLabel], *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, resample: str = "call", min_class_n: int = MIN_CLASS_N) -> PilotReport:
    """Quality vs ΔH over the calls with a defined ΔH. `resample`: 'call' (each call is a
    bootstrap unit) or 'trajectory' (calls of one trajectory are resampled together).
    Intervals are only given for classes of at least `min_class_n` calls (`notes` says which
    were left out)."""
    if resample not in ("call", "trajectory"):
        raise ValueError(f"resample must be 'call' or 'trajectory', got {resample!r}")
    problem = bad_settings(n_boot=n_boot, level=level, min_class_n=min_class_n)
    if problem:
        raise ValueError(problem)
    defined = [lb for lb in labels if not math.isnan(lb.dh)]
    q = np.array([float(lb.high) for lb in defined])
    dh = np.array([lb.dh for lb in defined])
    r = pearson(q, dh)
    clusters = np.array([lb.traj_index for lb in defined]) if resample == "trajectory" else None
    reasons: dict[str, int] = {}
    for lb in labels:
        for tool in lb.tools:
            key = f"{tool}/{lb.reason}"
            reasons[key] = reasons.get(key, 0) + 1
    by_q = _split_by_quality(defined)
    by_class = class_stats(defined, n_boot=n_boot, level=level, seed=seed, resample=resample,
                           min_n=min_class_n)
    notes = small_class_notes(by_q["high"]["n"], by_q["low"]["n"], by_class, min_class_n)
    enough = min(by_q["high"]["n"], by_q["low"]["n"]) >= min_class_n
    return PilotReport(
        n_calls=len(labels), n_defined=len(defined),
        by_quality={"high": by_q["high"], "low": by_q["low"]},
        by_tool={t: _split_by_quality([lb for lb in defined if t in lb.tools])
                 for t in sorted({t for lb in defined for t in lb.tools})},
        reasons=dict(sorted(reasons.items())), r=r,
        ci_bootstrap=bootstrap_ci(q, dh, n_boot=n_boot, level=level, seed=seed,
                                  clusters=clusters) if enough else (math.nan, math.nan),
        ci_fisher=fisher_ci(r, len(defined), level), p_value=fisher_p_value(r, len(defined)),
        level=level, n_boot=n_boot, seed=seed, resample=resample, by_class=by_class,
        notes=notes, min_class_n=min_class_n)


def run_pilot(trajs: Sequence[Trajectory], **kwargs) -> tuple[list[CallLabel], PilotReport]:
    """label_calls + pilot_report; kwargs go to whichever accepts them."""
    label_kw = {k: kwargs.pop(k) for k in ("rules", "examples", "decode") if k in kwargs}
    labels = label_calls(trajs, **label_kw)
    return labels, pilot_report(labels, **kwargs)


# ----------------------------------------------------------------------------- output


def _fmt(v: float, spec: str = "+.4f") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_class_summary(rep: PilotReport) -> str:
    """Mean ΔH per quality class with its interval, r(quality, ΔH), and the notes."""
    pct = f"{rep.level:.0%}"
    lines = [f"{'class':<11}{'n':>6}{'mean ΔH':>10}  {pct + ' CI':<21}{'frac ΔH<0':>10}"]
    for name, st in rep.by_class.items():
        ci = "n/a" if math.isnan(st["dh_lo"]) else f"[{_fmt(st['dh_lo'])}, {_fmt(st['dh_hi'])}]"
        lines.append(f"{name:<11}{st['n']:>6}{_fmt(st['dh_mean']):>10}  {ci:<21}"
                     f"{_fmt(st['frac_reducing'], '.3f'):>10}")
    boot = "n/a" if math.isnan(rep.ci_bootstrap[0]) else \
        f"[{_fmt(rep.ci_bootstrap[0])}, {_fmt(rep.ci_bootstrap[1])}]"
    lines += ["", f"r(high quality, ΔH) = {_fmt(rep.r)} (n = {rep.n_defined}); {pct} bootstrap CI "
                  f"(resampling {'trajectories' if rep.resample == 'trajectory' else 'calls'}): {boot}; Fisher-z CI: [{_fmt(rep.ci_fisher[0])}, "
                  f"{_fmt(rep.ci_fisher[1])}]",
              "useful = result holds what the answer needed and it was not known before; redundant = "
              "it was (in the question, an earlier result, or the same call ran before); useless = "
              "failed or irrelevant. TEPO's premise: useful calls lower the entropy (ΔH < 0), the others do not."]
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)


RESAMPLE_UNITS = {"call": "calls", "trajectory": "trajectories"}   # resample= -> its plural


def format_report(rep: PilotReport) -> str:
    """A readable table of the report."""
    pct = f"{rep.level:.0%}"
    lines = [f"pilot study: {rep.n_calls} tool calls, {rep.n_defined} with a defined ΔH",
             "", f"{'group':<22}{'n':>6}{'mean ΔH':>11}{'std':>9}{'frac ΔH<0':>11}"]

    def row(name, s):
        lines.append(f"{name:<22}{s['n']:>6}{_fmt(s['dh_mean']):>11}"
                     f"{_fmt(s['dh_std'], '.4f'):>9}{_fmt(s['frac_reducing'], '.3f'):>11}")

    for qname in ("high", "low"):
        row(f"quality={qname}", rep.by_quality[qname])
    for tool, parts in rep.by_tool.items():
        for qname in ("high", "low", "all"):
            row(f"{tool} {qname}", parts[qname])
    boot = "not shown (see note)" if math.isnan(rep.ci_bootstrap[0]) else \
        f"[{_fmt(rep.ci_bootstrap[0])}, {_fmt(rep.ci_bootstrap[1])}]"
    lines += ["", f"point-biserial r(quality, ΔH) = {_fmt(rep.r)}   (n = {rep.n_defined}, "
                  f"Fisher-z p = {_fmt(rep.p_value, '.3g')})",
              f"  {pct} bootstrap CI ({rep.n_boot} resamples of {RESAMPLE_UNITS[rep.resample]}, seed "
              f"{rep.seed}): {boot}",
              f"  {pct} Fisher-z CI: [{_fmt(rep.ci_fisher[0])}, {_fmt(rep.ci_fisher[1])}]",
              "  (negative r: high-quality calls lower the entropy more)",
              "", "mean ΔH by quality class:", format_class_summary(rep),
              "", "labels (tool/reason: count): " +
              ", ".join(f"{k}: {v}" for k, v in rep.reasons.items())]
    return "\n".join(lines)


PHASES = ("rl", "eval", "sft", "all")


def trajectory_files(path: str | Path, last: int | None = None,
                     phase: str | None = "rl") -> list[Path]:
    """A JSONL file as given, or the `<phase>_*.jsonl` files of a run's trajectories
    directory in step order (rl_000001.jsonl, rl_000002.jsonl, ...; every `*.jsonl` for
    phase 'all' or None), so evaluation rollouts and SFT data are not mixed into RL ones;
    `last` keeps only the last N files."""
    if phase not in PHASES + (None,):
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if last is not None and last < 1:
        raise ValueError(bad_settings(last=last))
    p = as_path(path)   # a local path or a URL (gs://bucket/run/trajectories)
    if p.is_dir():
        pattern = "*.jsonl" if phase in (None, "all") else f"{phase}_*.jsonl"
        files = sorted(p.glob(pattern))
        if not files:
            others = sorted(f.name for f in p.glob("*.jsonl"))
            hint = f"; it has {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: " \
                   "choose another phase ('all': every file)" if others else ""
            raise FileNotFoundError(f"no {pattern} trajectory files in {p}{hint}")
        return files[-last:] if last else files
    if not p.exists():
        raise FileNotFoundError(f"no trajectory file or directory {p}")
    return [p]


def load_trajectories(path: str | Path, last: int | None = None,
                      phase: str | None = "rl") -> list[Trajectory]:
    """The trajectories of `trajectory_files(path, last, phase)`, in file order."""
    return [t for f in trajectory_files(path, last, phase) for t in read_jsonl(f)]


def load_examples(paths: Iterable[str | Path]) -> dict[str, ExampleInfo]:
    """prompt_id -> ExampleInfo from dataset records JSONL files (`tepo_jax.data` format)."""
    out: dict[str, ExampleInfo] = {}
    for f in paths:
        out.update(examples_from_records(read_records(f)))
    return out


def make_decoder(tokenizer_dir: str | Path) -> Callable[[list[int]], str]:
    """token ids -> text with the run's tokenizer (special tokens kept)."""
    tok = load_tokenizer(tokenizer_dir)
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m tepo_jax.analysis.pilot",
                                 description="Tool-call quality vs entropy change (ΔH).")
    ap.add_argument("--trajectories", required=True, help="trajectory JSONL file or directory")
    ap.add_argument("--phase", choices=PHASES, default="rl",
                    help="which files of a directory: rl_*, eval_*, sft_* or all *.jsonl")
    ap.add_argument("--last", type=int, default=None, help="only the last N files of a directory")
    ap.add_argument("--dataset", action="append", default=[],
                    help="records JSONL (ids, questions, supporting passages); repeatable")
    ap.add_argument("--tokenizer", default=None,
                    help="HF tokenizer dir: decode all later model text for the rules")
    ap.add_argument("--rules", action="append", default=[], metavar="PKG.MODULE:TABLE",
                    help="a dict {tool name: rule(ctx) -> Quality} that adds to / overrides the "
                         "default rules; repeatable")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resample", choices=("call", "trajectory"), default="call")
    ap.add_argument("--min-class-n", type=int, default=MIN_CLASS_N,
                    help="smallest class (calls) that gets an interval")
    ap.add_argument("--plot", default=None, help="write ΔH by quality class as a PNG here")
    ap.add_argument("--json", default=None, help="write the report (and labels) as JSON here")
    return ap.parse_args(argv)


def bad_settings(*, n_boot: int = 1, level: float = 0.5, min_class_n: int = 1,
                 last: int | None = None, flags: bool = False) -> str | None:
    """What is wrong with these settings (one line, naming the flag when `flags`), or None."""
    name = (lambda n: f"--{n.replace('_', '-')}") if flags else (lambda n: n)
    if last is not None and last < 1:
        return f"{name('last')} must be >= 1 (the number of newest files to read), got {last}"
    if n_boot < 1:
        return f"{name('n_boot')} must be >= 1 (bootstrap resamples), got {n_boot}"
    if not 0 < level < 1:
        return f"{name('level')} must be in (0, 1), e.g. 0.95 for 95% intervals, got {level}"
    if min_class_n < 1:
        return f"{name('min_class_n')} must be >= 1, got {min_class_n}"
    return None


class PilotError(ValueError):
    """A bad command-line setting or output path; the message is one line naming it."""


def prepare_output(path: str, flag: str):
    """`path` as an epath with its directory created, checked before any work is done:
    PathError / PilotError naming `flag` when a file is in the way or the directory cannot be
    made."""
    p = as_path(path)
    if p.is_dir():
        raise PilotError(f"{flag} {path}: is a directory, expected a file name")
    make_dir(p.parent, f"{flag} {path}")
    return p


def load_rules(specs: Sequence[str]) -> dict[str, QualityRule]:
    """The rule tables named by `specs` ("pkg.module:TABLE"), merged in order."""
    out = {}
    for spec in specs:
        table = import_object(spec, "--rules")
        if not isinstance(table, Mapping) or not all(callable(fn) for fn in table.values()):
            raise ImportPathError(f"--rules {spec!r}: expected a dict of tool name -> rule(ctx)")
        out.update(table)
    return out


# Errors about the user's inputs: one line on stderr, exit status 2, no traceback.
USER_ERRORS = (PilotError, OSError, ImportPathError, TrajectoryError, JsonlError, TokenizerLoadError,
               PathError)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as e:
        print(f"error: {(str(e) or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        return 2


def _run(args) -> int:
    problem = bad_settings(n_boot=args.n_boot, level=args.level, min_class_n=args.min_class_n,
                           last=args.last, flags=True)
    if problem:
        raise PilotError(problem)
    plot_path = prepare_output(args.plot, "--plot") if args.plot else None
    json_path = prepare_output(args.json, "--json") if args.json else None
    rules = load_rules(args.rules)
    trajs = load_trajectories(args.trajectories, args.last, args.phase)
    if not trajs:
        raise PilotError(f"--trajectories {args.trajectories}: no trajectories in it")
    examples = load_examples(args.dataset)
    decode = make_decoder(args.tokenizer) if args.tokenizer else None
    labels, rep = run_pilot(trajs, rules=rules, examples=examples, decode=decode, n_boot=args.n_boot,
                            level=args.level, seed=args.seed, resample=args.resample,
                            min_class_n=args.min_class_n)
    print(format_report(rep))
    if plot_path:
        from tepo_jax.analysis.plots import plot_dh_by_class  # matplotlib: only when asked to plot
        plot_dh_by_class(labels, rep, plot_path)
    if json_path:
        out = {"report": rep.to_dict(), "labels": [_nan_to_none(dataclasses.asdict(lb))
                                                   for lb in labels]}
        json_path.write_text(json.dumps(out, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
