"""Tool-call quality labels for the pilot study (`tepo_jax.analysis.pilot`).

Every call gets a binary quality from what the tool returned, with a rule per tool
(`QUALITY_RULES`; your own: `label_calls(rules={tool: fn})`), and a class: `useful` (high quality and
new), `redundant` (high quality, but what it brought was already known: the same call ran
before, or a gold answer was in the question or an earlier result) or `useless` (low quality).

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
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from tepo_jax.rewards.qa import as_gold_list, normalize_answer
from tepo_jax.rl.tepo_metrics import call_tools
from tepo_jax.rollout.trajectory import MODEL_KINDS, ToolCallRecord, Trajectory, entropy_deltas


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


# The default rule of each tool, written out here (tools without one use generic_quality).
QUALITY_RULES: dict[str, QualityRule] = {"search": search_quality, "python": python_quality}


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
    redundant: bool = False           # what it brought was already there (`is_redundant`)

    @property
    def quality_class(self) -> str:
        """'useful' (high quality, new information), 'redundant' (high quality, but already
        known) or 'useless' (low quality)."""
        return "useless" if not self.high else ("redundant" if self.redundant else "useful")


QUALITY_CLASSES = ("useful", "redundant", "useless")
# A class with fewer calls than this gets no interval: a bootstrap over a handful of points
# (or over one positive) is as narrow as it is meaningless.
MIN_CLASS_N = 10


def is_redundant(traj: Trajectory, index: int, gold: Sequence[str], question: str = "") -> bool:
    """True when call `index` brought nothing new: the same call (tool and arguments) ran
    earlier in the trajectory, or a gold answer was already in the question or in an earlier
    call's result."""
    call, earlier = traj.tool_calls[index], traj.tool_calls[:index]
    if any(c.name == call.name and c.arguments == call.arguments for c in earlier):
        return True
    known = [question] + [c.result for c in earlier]
    return any(contains_phrase(text, g) for text in known if text for g in gold)


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
                                 bool(q.high), q.reason, float(dh), int(dh < 0),
                                 is_redundant(traj, i, ctx.gold, info.question)))
    return out


def examples_from_records(records: Iterable) -> dict[str, ExampleInfo]:
    """prompt_id -> ExampleInfo from dataset records (QAExample / MathExample or dicts)."""
    out = {}
    for r in records:
        get = r.get if isinstance(r, Mapping) else (lambda k, d=None, r=r: getattr(r, k, d))
        out[str(get("id"))] = ExampleInfo(tuple(get("supporting_passages", ()) or ()),
                                          str(get("question", "") or ""))
    return out
