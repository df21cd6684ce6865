"""The pilot study (the paper's first experiment): is the entropy drop after a tool call a
signal of the call's quality?

For every tool call of a set of trajectories we
1. label its quality from what the tool returned, with a rule per tool (`QUALITY_RULES`,
   pluggable: `register_quality_rule`), and
2. relate the binary quality to ΔH_k = H(r_k) − H(r_{k−1}) (`tepo_jax.rollout.trajectory`):
   mean ΔH by quality, the fraction of entropy-reducing calls (ΔH < 0) by quality, and the
   point-biserial correlation (Pearson between quality ∈ {0, 1} and ΔH) with a seeded
   bootstrap CI and a Fisher-z CI. TEPO's premise predicts a negative correlation: good calls
   lower the entropy of what the model writes next.

Default rules (docs/analysis.md):
* any tool: status `error` / `timeout` / `parse_error` (anything but `ok`) -> low.
* search: high if the result contains a gold answer (normalised, whole words) or a needed
  entity: an entity (capitalised span or number) of the gold chain (the example's supporting
  passages) that the call's own query does not already name. Without supporting passages the
  needed entities are those of the result that the model uses later. "No results" -> low.
* python: high if the output contains a gold answer, or prints a value (a number, else a
  whole output line) that appears later in the model's text (later calls' arguments, the
  final turn, or all later model tokens when a decoder is given). Empty output, an error
  trace in the output, or an unused value -> low.
* other tools: the generic rule (status ok and the result holds a gold answer or a value the
  model uses later).
* a multi-call turn (function calling: one call record, tool names joined by ","): one ΔH,
  one label, from the rule of its tool when all its calls used one tool, else the generic
  rule, over its results (one text per call); per-tool statistics count it under each tool.

CLI:  python -m tepo_jax.analysis.pilot --trajectories FILE_OR_DIR [--phase rl|eval|sft|all]
          [--dataset records.jsonl] [--tokenizer DIR] [--rules-module my.rules] [--json out.json]

A directory is a run's `trajectories/`, where the driver writes `rl_XXXXXX.jsonl` (RL
rollouts), `eval_XXXXXX.jsonl` (greedy held-out rollouts) and `sft_data.jsonl` (SFT data, no
sampler entropies); only the `--phase` files are read (default rl).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from tepo_jax.analysis.stats import bootstrap_ci, fisher_ci, fisher_p_value, pearson
from tepo_jax.rewards.qa import as_gold_list, normalize_answer
from tepo_jax.rl.tepo_metrics import call_tools
from tepo_jax.rollout.trajectory import (MODEL_KINDS, ToolCallRecord, Trajectory,
                                         entropy_deltas, read_jsonl)

# ----------------------------------------------------------------------------- labelling


@dataclasses.dataclass(frozen=True)
class CallContext:
    """Everything a quality rule may look at for one call."""
    traj: Trajectory
    index: int                        # 0-based position of the call in traj.tool_calls
    call: ToolCallRecord
    gold: tuple[str, ...]
    later_text: str                   # model text after this call's result
    supporting: tuple[str, ...] = ()  # gold-chain passages (QA datasets); may be empty
    question: str = ""


@dataclasses.dataclass(frozen=True)
class Quality:
    high: bool
    reason: str                       # short tag, e.g. 'gold_answer', 'status:error'


QualityRule = Callable[[CallContext], Quality]
QUALITY_RULES: dict[str, QualityRule] = {}


def register_quality_rule(tool: str) -> Callable[[QualityRule], QualityRule]:
    """Decorator: use `fn(ctx) -> Quality` for calls of `tool` (replaces any earlier rule)."""
    def deco(fn: QualityRule) -> QualityRule:
        QUALITY_RULES[tool] = fn
        return fn
    return deco


_ENTITY_RE = re.compile(r"\b[A-Z][\w'’-]*(?:\s+(?:of\s+|de\s+|van\s+)?[A-Z][\w'’-]*)*")
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*\d)")
_NOT_ENTITIES = {"the", "a", "an", "in", "on", "at", "of", "who", "what", "which", "where",
                 "when", "how", "doc", "title", "so", "now", "first", "let", "i", "it", "this",
                 "that", "is", "was", "no", "results", "found", "yes"}
_ERROR_MARKERS = ("Traceback (most recent call last)", "Error:", "[timed out", "[exit status",
                  "[process killed")


def entities(text: str) -> set[str]:
    """Capitalised spans ("Zorblax Corp", "Ab Cd") and numbers of `text`, normalised
    (`normalize_answer`); a lone sentence-initial function word ("The", "Which") is dropped."""
    out = set()
    for m in _ENTITY_RE.finditer(text):
        words = m.group(0).split()
        while words and words[0].lower() in _NOT_ENTITIES:   # "The mayor" -> no entity
            words = words[1:]
        norm = normalize_answer(" ".join(words))
        if norm and norm not in _NOT_ENTITIES:
            out.add(norm)
    out.update(_numbers(text))
    return out


def _numbers(text: str) -> set[str]:
    out = set()
    for m in _NUMBER_RE.finditer(text):
        s = m.group(0)
        if "." in s and re.fullmatch(r"-?\d+\.0+", s):
            s = s.split(".")[0]             # 12.0 -> 12
        out.add(s)
    return out


_TAG_RE = re.compile(r"</?[A-Za-z_][\w-]*>")


def contains_phrase(text: str, phrase: str) -> bool:
    """Whole-word containment after normalisation (`normalize_answer`); markup tags such as
    <answer> in `text` count as word breaks."""
    p = normalize_answer(phrase)
    return bool(p) and f" {p} " in f" {normalize_answer(_TAG_RE.sub(' ', text))} "


def _contains_gold(ctx: CallContext) -> bool:
    return any(contains_phrase(ctx.call.result, g) for g in ctx.gold)


def _status_failure(ctx: CallContext) -> Quality | None:
    if ctx.call.status != "ok":
        return Quality(False, f"status:{ctx.call.status}")
    return None


def _value_used(value: str, later_text: str) -> bool:
    if re.fullmatch(r"-?\d+(?:\.\d+)?", value):
        return value in _numbers(later_text)
    return contains_phrase(later_text, value)


@register_quality_rule("search")
def search_quality(ctx: CallContext) -> Quality:
    failed = _status_failure(ctx)
    if failed:
        return failed
    result = ctx.call.result.strip()
    if not result or result.lower().startswith("no results"):
        return Quality(False, "no_results")
    if _contains_gold(ctx):
        return Quality(True, "gold_answer")
    known = entities(ctx.call.arguments) | entities(ctx.question)
    found = entities(result) - known
    if ctx.supporting:
        needed = set().union(*(entities(p) for p in ctx.supporting)) - known
        if found & needed:
            return Quality(True, "needed_entity")
        return Quality(False, "irrelevant")
    if any(_value_used(e, ctx.later_text) for e in found):
        return Quality(True, "entity_used_later")
    return Quality(False, "irrelevant")


def printed_values(output: str) -> list[str]:
    """The values a python run printed: its numbers (single digits only when the output is
    just that digit), else its non-empty lines."""
    nums = _numbers(output)
    if nums:
        stripped = output.strip()
        return sorted(n for n in nums if len(n.lstrip("-")) > 1 or n == stripped)
    return [ln.strip() for ln in output.splitlines() if ln.strip()]


@register_quality_rule("python")
def python_quality(ctx: CallContext) -> Quality:
    failed = _status_failure(ctx)
    if failed:
        return failed
    out = ctx.call.result
    if any(m in out for m in _ERROR_MARKERS):
        return Quality(False, "error_output")
    if not out.strip():
        return Quality(False, "no_output")
    if _contains_gold(ctx):
        return Quality(True, "gold_answer")
    if any(_value_used(v, ctx.later_text) for v in printed_values(out)):
        return Quality(True, "value_used")
    return Quality(False, "value_unused")


def generic_quality(ctx: CallContext) -> Quality:
    """Rule for tools without their own: ok, non-empty, and a gold answer or a used value."""
    failed = _status_failure(ctx)
    if failed:
        return failed
    if not ctx.call.result.strip():
        return Quality(False, "no_output")
    if _contains_gold(ctx):
        return Quality(True, "gold_answer")
    values = printed_values(ctx.call.result) + sorted(entities(ctx.call.result))
    if any(_value_used(v, ctx.later_text) for v in values):
        return Quality(True, "value_used")
    return Quality(False, "value_unused")


def later_model_text(traj: Trajectory, index: int,
                     decode: Callable[[list[int]], str] | None = None) -> str:
    """Model text after call `index`'s result: decoded later model tokens when `decode` is
    given, else the later calls' arguments and the final turn's text."""
    call = traj.tool_calls[index]
    start = max(call.result_span[1], call.call_span[1])
    if decode is not None:
        later = np.isin(traj.kinds[start:], np.array(MODEL_KINDS, dtype=np.int8))
        return decode(traj.token_ids[start:][later].tolist())
    parts = [c.arguments for c in traj.tool_calls[index + 1:]] + [traj.final_text]
    return "\n".join(parts)


@dataclasses.dataclass(frozen=True)
class CallLabel:
    """One labelled call: identity, quality and its ΔH (NaN when a segment is empty)."""
    traj_index: int
    prompt_id: str
    turn: int                         # k, 1-based
    tool: str                         # the record's name ("a,b" for a multi-call turn)
    tools: tuple[str, ...]            # its distinct tools: ("a", "b"); per-tool stats use these
    status: str
    high: bool
    reason: str
    dh: float
    reducing: int                     # I_k = 1[ΔH_k < 0]


@dataclasses.dataclass(frozen=True)
class ExampleInfo:
    """What a dataset knows about a prompt that the trajectory does not carry."""
    supporting: tuple[str, ...] = ()
    question: str = ""


def turn_record(call: ToolCallRecord) -> ToolCallRecord:
    """The record a rule sees: for a multi-call turn, whose result is the JSON list of the
    calls' result texts, those texts one per line; a single call as it is."""
    if "," not in call.name:
        return call
    try:
        texts = json.loads(call.result)
    except ValueError:
        return call
    if not isinstance(texts, list):
        return call
    return dataclasses.replace(call, result="\n".join(map(str, texts)))


def rule_for(tools: Sequence[str], table: Mapping[str, QualityRule]) -> QualityRule:
    """The rule of a turn's tool when it used one tool, else `generic_quality`."""
    return table.get(tools[0], generic_quality) if len(tools) == 1 else generic_quality


def label_calls(trajs: Sequence[Trajectory], *,
                rules: Mapping[str, QualityRule] | None = None,
                examples: Mapping[str, ExampleInfo] | None = None,
                decode: Callable[[list[int]], str] | None = None) -> list[CallLabel]:
    """Label every call of `trajs`. `rules` override `QUALITY_RULES` per tool name;
    `examples` maps prompt_id to supporting passages/question (see `examples_from_records`);
    `decode` (token ids -> text) lets rules see all later model text."""
    table = {**QUALITY_RULES, **(rules or {})}
    examples = examples or {}
    out = []
    for ti, traj in enumerate(trajs):
        info = examples.get(traj.prompt_id, ExampleInfo())
        for i, (call, dh) in enumerate(zip(traj.tool_calls, entropy_deltas(traj))):
            tools = call_tools(call)
            ctx = CallContext(traj=traj, index=i, call=turn_record(call),
                              gold=tuple(as_gold_list(traj.gold)),
                              later_text=later_model_text(traj, i, decode),
                              supporting=info.supporting, question=info.question)
            q = rule_for(tools, table)(ctx)
            out.append(CallLabel(ti, traj.prompt_id, call.turn, call.name, tools, call.status,
                                 bool(q.high), q.reason, float(dh), int(dh < 0)))
    return out


def examples_from_records(records: Iterable) -> dict[str, ExampleInfo]:
    """prompt_id -> ExampleInfo from dataset records (QAExample / MathExample or dicts)."""
    out = {}
    for r in records:
        get = r.get if isinstance(r, Mapping) else (lambda k, d=None, r=r: getattr(r, k, d))
        out[str(get("id"))] = ExampleInfo(tuple(get("supporting_passages", ()) or ()),
                                          str(get("question", "") or ""))
    return out


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
    ci_bootstrap: tuple[float, float]
    ci_fisher: tuple[float, float]
    p_value: float
    level: float
    n_boot: int
    seed: int
    resample: str

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


def pilot_report(labels: Sequence[CallLabel], *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, resample: str = "call") -> PilotReport:
    """Quality vs ΔH over the calls with a defined ΔH. `resample`: 'call' (each call is a
    bootstrap unit) or 'trajectory' (calls of one trajectory are resampled together)."""
    if resample not in ("call", "trajectory"):
        raise ValueError(f"resample must be 'call' or 'trajectory', got {resample!r}")
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
    return PilotReport(
        n_calls=len(labels), n_defined=len(defined),
        by_quality={"high": by_q["high"], "low": by_q["low"]},
        by_tool={t: _split_by_quality([lb for lb in defined if t in lb.tools])
                 for t in sorted({t for lb in defined for t in lb.tools})},
        reasons=dict(sorted(reasons.items())), r=r,
        ci_bootstrap=bootstrap_ci(q, dh, n_boot=n_boot, level=level, seed=seed,
                                  clusters=clusters),
        ci_fisher=fisher_ci(r, len(defined), level), p_value=fisher_p_value(r, len(defined)),
        level=level, n_boot=n_boot, seed=seed, resample=resample)


def run_pilot(trajs: Sequence[Trajectory], **kwargs) -> tuple[list[CallLabel], PilotReport]:
    """label_calls + pilot_report; kwargs go to whichever accepts them."""
    label_kw = {k: kwargs.pop(k) for k in ("rules", "examples", "decode") if k in kwargs}
    labels = label_calls(trajs, **label_kw)
    return labels, pilot_report(labels, **kwargs)


# ----------------------------------------------------------------------------- output


def _fmt(v: float, spec: str = "+.4f") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


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
    lines += ["", f"point-biserial r(quality, ΔH) = {_fmt(rep.r)}   (n = {rep.n_defined}, "
                  f"Fisher-z p = {_fmt(rep.p_value, '.3g')})",
              f"  {pct} bootstrap CI ({rep.n_boot} resamples of {rep.resample}s, seed "
              f"{rep.seed}): [{_fmt(rep.ci_bootstrap[0])}, {_fmt(rep.ci_bootstrap[1])}]",
              f"  {pct} Fisher-z CI: [{_fmt(rep.ci_fisher[0])}, {_fmt(rep.ci_fisher[1])}]",
              "  (negative r: high-quality calls lower the entropy more)",
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
    p = Path(path)
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
    from tepo_jax.data.jsonl import read_records
    out: dict[str, ExampleInfo] = {}
    for f in paths:
        out.update(examples_from_records(read_records(f)))
    return out


def make_decoder(tokenizer_dir: str | Path) -> Callable[[list[int]], str]:
    """token ids -> text with the run's tokenizer (special tokens kept)."""
    from tepo_jax.tokenizer import load_tokenizer
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
    ap.add_argument("--rules-module", action="append", default=[],
                    help="module imported first; it may call register_quality_rule")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resample", choices=("call", "trajectory"), default="call")
    ap.add_argument("--json", default=None, help="write the report (and labels) as JSON here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    for mod in args.rules_module:
        importlib.import_module(mod)
    try:
        trajs = load_trajectories(args.trajectories, args.last, args.phase)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    examples = load_examples(args.dataset)
    decode = make_decoder(args.tokenizer) if args.tokenizer else None
    labels, rep = run_pilot(trajs, examples=examples, decode=decode, n_boot=args.n_boot,
                            level=args.level, seed=args.seed, resample=args.resample)
    print(format_report(rep))
    if args.json:
        out = {"report": rep.to_dict(), "labels": [_nan_to_none(dataclasses.asdict(lb))
                                                   for lb in labels]}
        Path(args.json).write_text(json.dumps(out, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
