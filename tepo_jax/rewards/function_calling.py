"""Rewards for function calls, as ToolRL defines them and ResT trains with them.

References
- ToolRL: Qian et al., "ToolRL: Reward is All Tool Learning Needs", arXiv 2504.13958
  (reward design, Sec. 3.3; code: github.com/qiancheng0/ToolRL,
  `verl/utils/reward_score/rlla.py`).
- ResT: Lin et al., "ResT: Reshaping Token-Level Policy Gradients for Tool-Use Large Language
  Models", arXiv 2509.21826. Its released code reuses ToolRL's `rlla.py` reward unchanged and
  its training script (`train_ResT.sh`) sets `SCHEDULEREWARD=1`, ToolRL's dynamic range.

What we reproduce (checked against that code, not only the paper text):
  R = R_format + R_correct.
  R_format ∈ [f_lo, f_hi] (default [0, 1]): f_hi if the text has the required structure,
    else f_lo. ToolRL checks `<think>…</think>` then `<tool_call>…</tool_call>` (and
    `<response>` when the gold has one); ours: every call block closed and not nested, an
    optional required `<think>` block before the first call (`require_think`), and calls
    present exactly when the gold has calls (ToolRL picks the pattern from the gold too).
  R_correct ∈ [c_lo, c_hi] (default [-3, 3]):
    - gold has no calls -> 0 (ToolRL);
    - a call that cannot be parsed (malformed JSON, no call when one is due) -> c_lo;
    - predicted calls == gold calls (same order, names, arguments) -> c_hi;
    - else S = r_name + Σ_{gold g} best match of an unused predicted call with g's name of
      [r_key(g, p) + r_value(g, p)], where r_name = multiset Jaccard of the name lists
      (|G∩P| / (|G|+|P|-|G∩P|): an extra or a missing call lowers it), r_key = Jaccard of the
      argument keys, r_value = number of gold arguments whose value is equal in p;
      S_max = 1 + Σ_g (1 + |args(g)|); R_correct = c_lo + (c_hi - c_lo) · S / S_max.
    ToolRL normalises by S_max (gold-side counts), not by max(|pred|, |gold|); extra predicted
    calls are penalised through r_name.
  Range schedule (ToolRL's `SCHEDULEREWARD`, what ResT trains with), with step t and T=150:
    f_hi(t) = max(1, 2 - (2 - 1)·t/T)      f_lo(t) = min(-1, -2 + (2 + 0)·t/T)
    c_hi(t) = min(3, 2 + (3 - 2)·t/T)      c_lo(t) = max(-3, -2 + (-3 + 2)·t/T)
  i.e. each end moves linearly from its start toward the static value and is clamped at a
  limit; note the format minimum stops at -1, not at its static value 0 (as in the code).
  `LinearRange` holds (start, end, steps, limit) per end, so other schedules are config.

Logged parts (FunctionCallRewardResult.parts): format, correctness, name, keys, values,
match (S), max_match (S_max), exact, num_pred, num_gold, and the ranges in force.
`f1` = S / S_max in [0, 1] (1 for an exact match; TEPO's F1_i slot), `em` = exact match.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any, Optional, Sequence

from tepo_jax.rewards.base import RewardResult
from tepo_jax.tools.base import ParseError
from tepo_jax.tools.json_format import (LLAMA31, QWEN25, JsonCallFormat, calls_as_dicts,
                                        normalize_calls)


@dataclasses.dataclass(frozen=True)
class FunctionCallRewardResult(RewardResult):
    """RewardResult whose `parts` hold every part of the function-call reward, for logging."""


@dataclasses.dataclass(frozen=True)
class LinearRange:
    """One end of a reward range: start + (end - start)·t/steps, never past `limit`
    (default: `end`). steps == 0 means the end value from the first step."""

    start: float
    end: float
    steps: int = 150
    limit: Optional[float] = None

    def at(self, step: int) -> float:
        if self.steps <= 0:
            return self.end
        value = self.start + (self.end - self.start) * step / self.steps
        limit = self.end if self.limit is None else self.limit
        return min(value, limit) if self.end >= self.start else max(value, limit)


@dataclasses.dataclass(frozen=True)
class FunctionCallRewardConfig:
    """Static ranges (ToolRL's defaults) or scheduled ranges (ResT); see module docstring."""

    format_range: tuple[float, float] = (0.0, 1.0)
    correct_range: tuple[float, float] = (-3.0, 3.0)
    schedule: bool = False
    format_lo: LinearRange = LinearRange(-2.0, 0.0, 150, limit=-1.0)
    format_hi: LinearRange = LinearRange(2.0, 1.0, 150)
    correct_lo: LinearRange = LinearRange(-2.0, -3.0, 150)
    correct_hi: LinearRange = LinearRange(2.0, 3.0, 150)
    require_think: bool = False     # ToolRL/ResT prompts ask for <think>; ours need not
    exact_only: bool = False        # ToolRL's COARSEREWARD: exact match or c_lo
    dialect: str = "qwen2.5"        # how calls are written: 'qwen2.5' | 'llama3.1'

    def ranges(self, step: int = 0) -> dict[str, tuple[float, float]]:
        if not self.schedule:
            return {"format": tuple(self.format_range), "correct": tuple(self.correct_range)}
        return {"format": (self.format_lo.at(step), self.format_hi.at(step)),
                "correct": (self.correct_lo.at(step), self.correct_hi.at(step))}


TOOLRL = FunctionCallRewardConfig(require_think=True)
REST = FunctionCallRewardConfig(require_think=True, schedule=True)


# ------------------------------------------------------------------------- the matching

def match_score(a: Sequence, b: Sequence) -> float:
    """ToolRL's list similarity: 1 if equal, else multiset Jaccard (0 if either is empty)."""
    if list(a) == list(b):
        return 1.0
    if not a or not b:
        return 0.0
    ca, cb = Counter(a), Counter(b)
    inter = sum(min(ca[k], cb[k]) for k in ca.keys() & cb.keys())
    return inter / (len(a) + len(b) - inter)


def call_match(gold: list[dict], pred: list[dict]) -> dict[str, float]:
    """S and its parts for predicted vs gold calls (greedy per gold call, as ToolRL)."""
    name = match_score([g["name"] for g in gold], [p["name"] for p in pred])
    keys = values = 0.0
    max_match = 1.0 + sum(1 + len(g["arguments"]) for g in gold)
    used: set[int] = set()
    for g in gold:
        best, best_i, best_parts = 0.0, -1, (0.0, 0.0)
        for i, p in enumerate(pred):
            if i in used or p["name"] != g["name"]:
                continue
            k = match_score(list(g["arguments"]), list(p["arguments"]))
            v = float(sum(1 for a, val in g["arguments"].items()
                          if a in p["arguments"] and p["arguments"][a] == val))
            if k + v > best:
                best, best_i, best_parts = k + v, i, (k, v)
        if best_i >= 0:
            used.add(best_i)
            keys, values = keys + best_parts[0], values + best_parts[1]
    return {"name": name, "keys": keys, "values": values, "match": name + keys + values,
            "max_match": max_match}


# ------------------------------------------------------------------------------ format

def _structure_ok(text: str, fmt: JsonCallFormat, has_calls: bool, gold_has_calls: bool,
                  require_think: bool) -> bool:
    d = fmt.dialect
    if d.call_open:
        opens = [i for i in _find_all(text, d.call_open)]
        closes = [i for i in _find_all(text, d.call_close)]
        if len(opens) != len(closes):
            return False
        for o, c, nxt in zip(opens, closes, opens[1:] + [len(text)]):
            if not o < c < nxt:
                return False
    if has_calls != gold_has_calls:
        return False
    if require_think:
        t0, t1 = text.find("<think>"), text.find("</think>")
        first_call = text.find(d.call_open) if d.call_open else len(text)
        if text.count("<think>") != 1 or text.count("</think>") != 1 or not 0 <= t0 < t1:
            return False
        if has_calls and d.call_open and t1 > first_call:
            return False
    return True


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + len(needle))
    return out


# ---------------------------------------------------------------------------- the reward

class FunctionCallReward:
    """`reward(text, gold, step=0) -> FunctionCallRewardResult`.

    text: the model's text for the example: one turn (ToolRL/ResT single-step setting) or
    the model turns of a multi-turn trajectory joined in order (all calls are collected).
    gold: the gold calls (see `normalize_calls`).
    """

    def __init__(self, config: FunctionCallRewardConfig = FunctionCallRewardConfig()):
        self.config = config
        dialect = {"qwen2.5": QWEN25, "llama3.1": LLAMA31}[config.dialect]
        self.fmt = JsonCallFormat(dialect)

    def __call__(self, text: str, gold: Any, step: int = 0) -> FunctionCallRewardResult:
        cfg, ranges = self.config, self.config.ranges(step)
        (f_lo, f_hi), (c_lo, c_hi) = ranges["format"], ranges["correct"]
        gold_calls = normalize_calls(gold)
        parsed = self.fmt.parse_calls(text)
        malformed = any(isinstance(c, ParseError) for c in parsed)
        pred = calls_as_dicts(parsed)
        ok = _structure_ok(text, self.fmt, bool(parsed), bool(gold_calls), cfg.require_think)
        r_format = f_hi if ok else f_lo
        parts = {"name": 0.0, "keys": 0.0, "values": 0.0, "match": 0.0,
                 "max_match": 1.0 + sum(1 + len(g["arguments"]) for g in gold_calls)}
        exact = float(pred == gold_calls and not malformed)
        if not gold_calls:
            r_correct, f1 = 0.0, float(not parsed)
        elif malformed or not pred:
            r_correct, f1 = c_lo, 0.0
        elif exact:
            r_correct, f1 = c_hi, 1.0
            # Logged as a full match: each gold call's keys (Jaccard 1) and every value.
            parts.update(name=1.0, keys=float(len(gold_calls)), match=parts["max_match"],
                         values=float(sum(len(g["arguments"]) for g in gold_calls)))
        elif cfg.exact_only:
            r_correct, f1 = c_lo, 0.0
        else:
            parts = call_match(gold_calls, pred)
            f1 = parts["match"] / parts["max_match"]
            r_correct = c_lo + (c_hi - c_lo) * f1
        parts.update(format=r_format, correctness=r_correct, exact=exact,
                     num_pred=float(len(parsed)), num_gold=float(len(gold_calls)),
                     format_lo=f_lo, format_hi=f_hi, correct_lo=c_lo, correct_hi=c_hi)
        return FunctionCallRewardResult(
            score=r_format + r_correct, f1=f1, em=exact, malformed=malformed or not ok,
            extracted=json.dumps(pred, ensure_ascii=False), parts=parts)

function_call_reward = FunctionCallReward()


def function_calling_reward(text: str, gold: Any) -> FunctionCallRewardResult:
    """Registry entry (task 'function_calling'): static ToolRL ranges, step 0, no <think>
    requirement. Trainers that schedule ranges build `FunctionCallReward(config)` and pass
    the step."""
    return function_call_reward(text, gold)



def reward_config(config, dialect: str = "qwen2.5") -> FunctionCallRewardConfig:
    """The function-call reward of an experiment config (`config.reward`): ToolRL's static
    ranges (fc_schedule='off'), or ResT's scheduled ones ('rest') over fc_schedule_steps."""
    r = config.reward
    steps = r.fc_schedule_steps
    base = FunctionCallRewardConfig()
    ends = {name: dataclasses.replace(getattr(base, name), steps=steps)
            for name in ("format_lo", "format_hi", "correct_lo", "correct_hi")}
    return FunctionCallRewardConfig(schedule=r.fc_schedule == "rest", require_think=r.fc_require_think,
                                    dialect=dialect, **ends)
