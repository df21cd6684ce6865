"""Your own reward, tools and data, as Python objects (`tepo_jax.api.Trainer`) or named by
import path in the config (`--config.reward.fn=mypkg.rewards:score`,
`--config.tools.extra=mypkg.tools:Calculator,mypkg.tools:lookup`). docs/api.md shows both.

- A reward is `fn(text, gold)` (the final model turn's text and the example's gold answer) or
  `fn(trajectory)` (the whole `Trajectory`: tokens, calls, results), returning a float or a
  `RewardResult`. A float is the score GRPO and TEPO both use (TEPO's F1_i). A numpy
  number counts as a float; a bool, None, NaN or an infinity does not, and a reward that
  returns one (or raises) stops the run with an error naming the reward and the example.
- A tool is an object with `name` and `run(argument, timeout) -> ToolResult` (the `Tool`
  protocol), a class building one with no arguments, or a plain function `fn(argument: str)`
  whose return value (as text) is the result; the model calls it as `<name>argument</name>`
  and the function's docstring (first line) describes it in the system prompt.
- Data is a list of dicts (`{"question", "answer"}` for math, `{"question", "answers"}` for
  QA; the fields `tepo_jax.data.records.from_dict` reads). A dict may carry a
  `"demonstration"`: the model turns of a solution (each but the last ending in a tool call,
  the last in `<answer>…</answer>`), which SFT plays through your tools as its warm start.

Everything is checked when it is given, with a one-line error that names it.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from tepo_jax.data.function_calling import FunctionCallingExample
from tepo_jax.data.records import FieldError, MathExample, QAExample, from_dict
from tepo_jax.errors import ConfigError, one_line
from tepo_jax.importpath import ImportPathError, import_object
from tepo_jax.rewards.base import RewardResult
from tepo_jax.rewards.extract import extract_answer
from tepo_jax.tools.base import Tool, ToolResult, ToolStatus
from tepo_jax.tools.format import TAG_NAME, ToolFormat

# fn(text, gold, trajectory) -> RewardResult: what the rollout calls for a user reward.
UserRewardFn = Callable[[str, Any, Any], RewardResult]


class PluginError(ConfigError):
    """A user reward, tool or dataset that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class UserParts:
    """What a user plugs into a run (each part optional; None keeps the config's own)."""

    reward: Optional[UserRewardFn] = None
    tools: tuple[Tool, ...] = ()
    train_examples: Optional[list] = None
    eval_examples: Optional[list] = None
    demonstrations: Mapping[str, list] = dataclasses.field(default_factory=dict)  # example id -> turns

    @property
    def tool_descriptions(self) -> dict[str, str]:
        return {t.name: getattr(t, "description", "") for t in self.tools}


# ----------------------------------------------------------------------------- rewards

def as_reward(fn, where: str = "reward", examples: Iterable[Sequence] = ()) -> UserRewardFn:
    """`fn(text, gold)` or `fn(trajectory)` (returning a float or a RewardResult) as the
    rollout's reward function. `examples` (lists of examples, or None) give the questions an
    error names besides the example id."""
    if not callable(fn):
        raise PluginError(f"{where}: {fn!r} is not callable")
    n = _required_positional(fn, where)
    if n not in (1, 2):
        raise PluginError(f"{where}: {_name(fn)} takes {n} required arguments; a reward takes "
                          "(text, gold) or (trajectory)")
    name, examples = _name(fn), [list(e) for e in examples if e is not None]

    def reward(text: str, gold, trajectory) -> RewardResult:
        def example() -> str:
            return describe_example(getattr(trajectory, "prompt_id", None), examples)
        try:
            value = fn(trajectory) if n == 1 else fn(text, gold)
        except Exception as e:
            raise PluginError(f"reward {name} raised {type(e).__name__}: {one_line(e, 300)} "
                              f"(on {example()})") from e
        return as_reward_result(value, name, example)
    return reward


def reward_number(value) -> float:
    """A reward value as a Python float: an int, float or numpy number (a numpy scalar or 0-d
    array; a 0-d array of another library, jax.numpy or torch, is read through numpy); a
    ValueError saying what it is otherwise (a bool, None, a string, NaN, inf)."""
    if not isinstance(value, np.ndarray) and hasattr(value, "__array__") and getattr(value, "ndim", None) == 0:
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{type(value).__name__}; it must return a float or a RewardResult")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{number}; a reward must be a finite number")
    return number


def as_reward_result(value, name: str, example: str | Callable[[], str] = "") -> RewardResult:
    """What reward `name` returned as a RewardResult with finite Python floats, or a
    PluginError naming the reward, the value and (when given) the example."""
    def error(what: str, problem: ValueError) -> PluginError:
        on = example() if callable(example) else example
        return PluginError(f"reward {name} returned {what}{problem}" + (f" (on {on})" if on else ""))
    if isinstance(value, RewardResult):
        fields = {"score": value.score, "f1": value.f1, "em": value.em,
                  **{f"parts[{k!r}]": v for k, v in value.parts.items()}}
        checked = {}
        for field, v in fields.items():
            try:
                checked[field] = reward_number(v)
            except ValueError as e:
                raise error(f"a RewardResult whose {field} is ", e) from None
        return dataclasses.replace(value, score=checked["score"], f1=checked["f1"], em=checked["em"],
                                   parts={k: checked[f"parts[{k!r}]"] for k in value.parts})
    try:
        score = reward_number(value)
    except ValueError as e:
        raise error("", e) from None
    return RewardResult(score=score, f1=score, em=score, malformed=False, extracted=None)


def describe_example(example_id, examples: Sequence[Sequence] = ()) -> str:
    """"example 'id' ('the question…')" for an error message (the question when `examples`
    hold the id)."""
    if example_id is None:
        return "an example"
    for group in examples:
        for ex in group:
            if getattr(ex, "id", None) == example_id:
                q = " ".join(str(getattr(ex, "question", "")).split())
                return f"example {example_id!r} ({q[:60] + '…' if len(q) > 60 else q!r})"
    return f"example {example_id!r}"


# ----------------------------------------------------------------------------- tools

@dataclasses.dataclass(frozen=True)
class FunctionAsTool:
    """A plain function `fn(argument: str)` as a tag-format tool. The bridge enforces the
    deadline (a call past it is abandoned); an exception is an ERROR result the model sees."""

    name: str
    fn: Callable[[str], Any]
    description: str = ""

    def run(self, argument: str, timeout: float) -> ToolResult:
        t0 = time.perf_counter()
        try:
            out, status = self.fn(argument), ToolStatus.OK
            text = out if isinstance(out, str) else repr(out)
        except Exception as e:  # the model's argument broke the tool: tell the model
            text, status = f"{type(e).__name__}: {e}", ToolStatus.ERROR
        return ToolResult(text, status, time.perf_counter() - t0, self.name)


def as_tool(obj, where: str = "tool") -> Tool:
    """A Tool object, a class building one, or a plain one-argument function, as a Tool."""
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as e:
            raise PluginError(f"{where}: {obj.__name__}() failed ({type(e).__name__}: {e})") from None
    if callable(getattr(obj, "run", None)) and isinstance(getattr(obj, "name", None), str):
        return obj
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj):
        if _required_positional(obj, where) != 1:
            raise PluginError(f"{where}: {_name(obj)} must take one argument (the text the model "
                              "writes between its tags)")
        doc = (inspect.getdoc(obj) or "").strip().splitlines()
        return FunctionAsTool(obj.__name__, obj, doc[0] if doc else "")
    raise PluginError(f"{where}: {obj!r} is neither a tool (name + run(argument, timeout)) nor a "
                      "one-argument function")


def check_tool_names(tools: Sequence[Tool], enabled_builtins: Sequence[str] = ()) -> None:
    """Raise a one-line PluginError naming the first of a user's `tools` (Tool objects, e.g.
    from `as_tool`) whose name cannot be a tag-format tool: not a tag name (the format's own
    rule, `TAG_NAME`), one of the format's reserved tags (answer, result), the name of a
    built-in tool the run enables (`enabled_builtins`, e.g. ("python",) for
    tools.python=True: `from_config.enabled_tools(config)`), or the name of another tool."""
    names = [t.name for t in tools]
    reserved = ToolFormat().reserved_tags
    for i, name in enumerate(names):
        if not isinstance(name, str) or not TAG_NAME.fullmatch(name):
            raise PluginError(f"tool name {name!r}: the model calls a tool as <name>…</name>, so its "
                              "name starts with an ASCII letter or '_', then letters, digits, '_' or '-'")
        if name in reserved:
            raise PluginError(f"tool name {name!r} is reserved: <{name}> is the call format's own tag "
                              f"(reserved: {', '.join(reserved)}); rename the tool")
        if name in enabled_builtins:
            raise PluginError(f"tool name {name!r} clashes with the built-in tool {name!r} "
                              f"(tools.{name}=True); rename your tool or set tools.{name}=False")
        if name in names[:i]:
            raise PluginError(f"tool name {name!r} is used twice (by two of your tools)")


# ----------------------------------------------------------------------------- data

EXAMPLE_TYPES = (MathExample, QAExample, FunctionCallingExample)


def as_examples(data, where: str = "data") -> tuple[list, dict[str, list]]:
    """(examples, {example id: demonstration turns}) from a list of dicts (or of examples), or
    any indexable dataset of them (a grain MapDataset / data source); a dict with "answer" is
    math, with "answers" QA (or say "task"). Each row is checked as the JSONL readers check a
    line (`records.from_dict`); an error names the row and the field."""
    if isinstance(data, (str, bytes, Mapping)) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise PluginError(f"{where}: expected a list of dicts, a dataset of them, or a path, "
                          f"got {type(data).__name__}")
    out, demos, rows_of = [], {}, {}
    for i in range(len(data)):
        row = data[i]
        if isinstance(row, EXAMPLE_TYPES):
            example = row
        elif not isinstance(row, Mapping):
            raise PluginError(f"{where}[{i}]: expected a dict such as {{'question': ..., 'answer': ...}}, "
                              f"got {type(row).__name__}")
        else:
            row = dict(row)
            row.setdefault("id", f"{where}-{i}")
            try:
                example = from_dict(row)
            except FieldError as e:
                raise PluginError(f"{where}[{i}].{e.field}: {e.problem}" if e.field else
                                  f"{where}[{i}]: {e.problem}") from None
            if "demonstration" in row:
                problem = demonstration_problem(row["demonstration"])
                if problem:
                    raise PluginError(f"{where}[{i}].demonstration: {problem}")
                demos[example.id] = list(row["demonstration"])
        if example.id in rows_of:
            raise PluginError(f"{where}[{i}]: id {example.id!r} is also the id of {where}[{rows_of[example.id]}]")
        rows_of[example.id] = i
        out.append(example)
    if not out:
        raise PluginError(f"{where}: no examples")
    return out, demos


def demonstration_problem(turns) -> Optional[str]:
    """What is wrong with a row's "demonstration", or None: it must be the model turns of a
    solution (a list of strings), the last giving the answer as <answer>…</answer> (the
    turns before it each end in a tool call, which SFT checks when it plays them)."""
    if isinstance(turns, str) or not isinstance(turns, (list, tuple)) or not turns or \
            not all(isinstance(t, str) for t in turns):
        return "expected a list of model turn texts"
    if extract_answer(turns[-1]) is None:
        return (f"the last turn ({one_line(turns[-1], 40)!r}) has no <answer>…</answer>; a demonstration "
                "ends with the model's answer")
    return None


# ----------------------------------------------------------------------------- from the config

def parts_from_config(config) -> UserParts:
    """The reward and tools a config names by import path (`reward.fn`, `tools.extra`),
    imported and checked now: a one-line PluginError naming the field otherwise."""
    reward = None
    if config.reward.fn:
        reward = as_reward(_import(config.reward.fn, "config.reward.fn"), f"config.reward.fn={config.reward.fn!r}")
    specs = [s.strip() for s in config.tools.extra.split(",") if s.strip()]
    tools = tuple(as_tool(_import(s, "config.tools.extra"), f"config.tools.extra={s!r}") for s in specs)
    return UserParts(reward=reward, tools=tools)


def merge(base: UserParts, extra: Optional[UserParts]) -> UserParts:
    """`extra`'s parts where given, else `base`'s; tools from both."""
    if extra is None:
        return base
    return UserParts(reward=extra.reward or base.reward, tools=base.tools + extra.tools,
                     train_examples=extra.train_examples if extra.train_examples is not None else base.train_examples,
                     eval_examples=extra.eval_examples if extra.eval_examples is not None else base.eval_examples,
                     demonstrations={**base.demonstrations, **extra.demonstrations})


def _import(spec: str, field: str):
    try:
        return import_object(spec, field)
    except ImportPathError as e:
        raise PluginError(str(e)) from None


def _required_positional(fn, where: str) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise PluginError(f"{where}: cannot read the signature of {_name(fn)}") from None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               for p in params)


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
