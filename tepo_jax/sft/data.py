"""SFT warm-start data: tool-use trajectories for the synthetic tasks, with real tool results.

Each example's script is played through the real tool bridge, so the results the model sees
in SFT are byte for byte what the same calls return during RL. The script is the
demonstrator's (`demonstration`): with its family's tool rate (`sft.tool_rate`) a solution
that calls the tool, else the direct answer (`tepo_jax.data.synthetic`); a share of the tool
solutions (`redundant_rate`) repeats its first call right after the result ("Let me
double-check that."), which adds nothing. That gives RL behaviour to improve: answers the
model cannot give without a tool, and calls TEPO-sparse can cut.

The model turns are tokenised once here (they are targets, not sampled), the results are the
wrapped result text encoded exactly as the rollout encodes it, and the trajectories come out
of the same `TrajectoryBuilder` the rollout uses. A scripted call that fails (an error or
timeout result) stops the build with a ConfigError naming the example and the call: SFT never
trains on a failed call.

Function-calling examples (`FunctionCallingExample`, played with `JsonCallFormat`, see
docs/function_calling.md) get a script of their own (`fc_script`): one turn with a short
reasoning line and all gold calls rendered with `fmt.render_call` (as the chat template renders
an assistant tool call), ended with the end-of-turn token; the calls run through the real
FunctionTools as one batch and their results come back as one `fmt.wrap_results` block; then
a final answer turn built from the results. With `redundant_rate`, an example repeats its first
call in an extra turn before answering (the extra call lowers the ToolRL name score, and gives
TEPO a useless call to learn away).
"""
from __future__ import annotations

import json
import random
import re
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from tepo_jax.chat_templates import QWEN25_CHAT_TEMPLATE
from tepo_jax.data import jsonl
from tepo_jax.errors import ConfigError, one_line
from tepo_jax.data.function_calling import FunctionCallingExample
from tepo_jax.data.prompts import PROMPT_STYLES, system_prompt, user_prompt
from tepo_jax.data.synthetic import (direct_solution, family_of, reference_solution, solution_variants,
                                     tool_solution)
from tepo_jax.rollout.agent import encode_prompt
from tepo_jax.rollout.builder import TrajectoryBuilder
from tepo_jax.rollout.trajectory import Trajectory
from tepo_jax.tiny_tokenizer import render_template
from tepo_jax.tools import AnswerTurn, ToolBridge, ToolCall, ToolFormat, ToolResult, ToolStatus
from tepo_jax.tools.format import CallFormat, call_record, encode_results
from tepo_jax.tools.functions import function_tools
from tepo_jax.tools.json_format import QWEN25, JsonCallFormat

_CALL_RE = re.compile(r"<(python|search)>(.*)</\1>\s*$", re.DOTALL)


def with_redundant_call(turns: list[dict]) -> list[dict]:
    """Repeat the first call right after its result: the second result adds nothing."""
    call = _CALL_RE.search(turns[0]["text"])
    extra = {"role": "model", "text": f"Let me double-check that.\n<{call.group(1)}>{call.group(2)}</{call.group(1)}>"}
    return turns[:2] + [extra, {"role": "tool", "tool": call.group(1)}] + turns[2:]


def tool_rate_of(example, tool_rates: Mapping[str, float]) -> float:
    """How often the demonstrator uses a tool on `example`: its family's `tool_rates` entry;
    for a family not listed (or a non-synthetic example), 1 when its ideal solution calls a
    tool, else 0."""
    family = family_of(example)
    if family in tool_rates:
        return float(tool_rates[family])
    return 1.0 if len(reference_solution(example)) > 1 else 0.0


def demonstration(example, rng: random.Random, tool_rates: Mapping[str, float],
                  redundant_rate: float) -> list[dict]:
    """The demonstrator's script for one example: with its family's tool rate a solution that
    calls the tool (plus, at `redundant_rate`, one useless extra call), else the direct answer."""
    if rng.random() >= tool_rate_of(example, tool_rates):
        return direct_solution(example)
    turns = reference_solution(example)
    if len(turns) == 1:  # the ideal answer is direct (a sum): the tool call is itself redundant
        turns = tool_solution(example)
    if rng.random() < redundant_rate:
        turns = with_redundant_call(turns)
    return turns


def scripts_for(examples: Sequence, redundant_rate: float, seed: int,
                tool_rates: Mapping[str, float] = MappingProxyType({}),
                demonstrations: Mapping[str, list] = MappingProxyType({})) -> list[list[dict]]:
    """Each example's script: the user's demonstration when it has one (its model turns,
    each call's result from the real tool), else the synthetic demonstrator's."""
    rng = random.Random(f"sft-{seed}")
    missing = [ex.id for ex in examples if ex.id not in demonstrations and not family_of(ex)]
    if demonstrations and missing:
        raise ConfigError(f"SFT: example {missing[0]!r} has no demonstration (give every train_data row "
                          "a 'demonstration', or set config.mode='rl')")
    return [user_script(demonstrations[ex.id]) if ex.id in demonstrations
            else demonstration(ex, rng, tool_rates, redundant_rate) for ex in examples]


def user_script(turns: Sequence[str]) -> list[dict]:
    """Model turns with a tool turn after every one but the last."""
    script = []
    for i, text in enumerate(turns):
        script.append({"role": "model", "text": text})
        if i + 1 < len(turns):
            script.append({"role": "tool"})
    return script


def build_sft_trajectories(examples: Sequence, tokenizer, bridge: ToolBridge, *,
                           tools: Sequence[str] = ("python", "search"), fmt: CallFormat = ToolFormat(),
                           redundant_rate: float = 0.3, seed: int = 0,
                           tool_rates: Mapping[str, float] = MappingProxyType({}),
                           prompt_style: str = "full",
                           demonstrations: Mapping[str, list] = MappingProxyType({}),
                           tool_descriptions: Mapping[str, str] = MappingProxyType({})) -> list[Trajectory]:
    """Play every example's script (`demonstration`), running the calls of all examples round
    by round. Function-calling examples play `fc_script` instead."""
    if examples and isinstance(examples[0], FunctionCallingExample):
        return build_fc_sft_trajectories(examples, tokenizer, bridge, fmt=fmt,
                                         redundant_rate=redundant_rate, seed=seed)
    if not examples:
        raise ConfigError("SFT: no training examples")
    scripts = scripts_for(examples, redundant_rate, seed, tool_rates, demonstrations)
    builders = [TrajectoryBuilder(encode_prompt(tokenizer, ex, tools, prompt_style, tool_descriptions), tokenizer=tokenizer,
                                  markup=fmt.markup(), prompt_id=ex.id, group_id=i, sample_index=0,
                                  gold=_gold(ex), task=ex.task)
                for i, ex in enumerate(examples)]
    max_turns = max(len(s) for s in scripts)
    for t in range(0, max_turns, 2):  # model turn t, then (if any) its tool result at t + 1
        pending = []
        for i, (ex, script, builder) in enumerate(zip(examples, scripts, builders)):
            if t >= len(script):
                continue
            text = script[t]["text"]
            is_call = t + 1 < len(script)
            builder.add_model_turn(tokenizer.encode(text, add_special_tokens=False), is_call=is_call)
            if is_call:
                calls = fmt.parse_calls(builder.last_text)
                problem = call_turn_problem(calls)
                if problem:
                    whose = "demonstration" if ex.id in demonstrations else "script"
                    raise ConfigError(f"SFT: the {whose} of train example {i} (id {ex.id!r}), turn {t // 2} "
                                      f"({one_line(text)!r}): {problem}")
                pending.append((i, builder, calls))
        results = iter(bridge.run_batch([c for _, _, calls in pending for c in calls]))
        for i, builder, calls in pending:
            turn_results = [next(results) for _ in calls]
            # SFT teaches what it shows: a call that failed would teach the model that calls
            # end in errors and timeouts (or that an answer follows from a failed call). Neither
            # the demonstrator nor a user's demonstration means to show one (the demonstrator's
            # scripts only make calls that work), so a failure is a broken tool or a bad
            # demonstration, and the run stops here rather than train on it.
            failed = failed_call(calls, turn_results)
            if failed:
                ex = examples[i]
                whose = "demonstration" if ex.id in demonstrations else "script"
                raise ConfigError(f"SFT: the {whose} of train example {i} (id {ex.id!r}), turn {t // 2}: "
                                  f"{failed}; SFT trains only on calls that work")
            _add_results(builder, fmt, tokenizer, calls, turn_results)
    return [b.finish("answer") for b in builders]


def failed_call(calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> str | None:
    """"call calc('17*23') failed (error: RuntimeError: boom)" for the first call of a turn
    whose result is not ok, or None when every call worked."""
    for call, result in zip(calls, results):
        if result.status is not ToolStatus.OK:
            return (f"call {call.tool}({one_line(call.argument)!r}) failed "
                    f"({result.status.value}: {one_line(result.text, 200)})")
    return None


def call_turn_problem(calls) -> str | None:
    """Why a demonstration turn before the last is not a tool call (`fmt.parse_calls` of it),
    or None."""
    if not calls:
        return "every turn but the last must end in a tool call (the last gives the <answer>)"
    errors = [c for c in calls if not isinstance(c, ToolCall)]
    if errors and isinstance(errors[0], AnswerTurn):
        return "it gives the <answer>; only the last turn may (every turn before it ends in a tool call)"
    if errors:
        return getattr(errors[0], "message", None) or f"not a well-formed call ({errors[0]!r})"
    return None


def _add_results(builder: TrajectoryBuilder, fmt: CallFormat, tokenizer, calls, results) -> None:
    """Append one call turn's results as ONE block, as the rollout does."""
    ids = encode_results(tokenizer, fmt, [r.text for r in results])
    builder.add_tool_result(*call_record(fmt, calls, results), ids)


def _gold(example):
    return list(example.answers) if example.task == "qa" else example.answer


# ------------------------------------------------------------------ function calling

RunBatch = Callable[[Sequence[ToolCall]], Sequence[ToolResult]]


def _names(names: Sequence[str]) -> str:
    if len(names) == 2 and names[0] == names[1]:
        return f"{names[0]} twice"
    return " and ".join(names)


def fc_call_text(fmt, calls: Sequence[dict], first: bool) -> str:
    """A call turn: a reasoning line, then every call as the template renders it."""
    lead = f"I need {_names([c['name'] for c in calls])}." if first else \
        f"Let me check {calls[0]['name']} again."
    body = "\n".join(fmt.render_call(c["name"], c["arguments"]) for c in calls)
    return f"{lead}\n{body}{fmt.dialect.end_of_turn}"


def fc_answer_text(fmt, results: Sequence[str]) -> str:
    """The final turn: each result's values in order (its text if it is not a JSON object)."""
    if not results:
        return f"No function call is needed for this.{fmt.dialect.end_of_turn}"
    parts = []
    for text in results:
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        parts.append(", ".join(str(v) for v in value.values()) if isinstance(value, dict) else str(value))
    return "Results: " + "; ".join(parts) + "." + fmt.dialect.end_of_turn


def fc_script(example, fmt, run_batch: RunBatch, redundant: bool = False) -> list[tuple]:
    """[(model turn text, its calls, their results)] for a function-calling example; the last
    turn is the answer (no calls). The gold calls are run through `run_batch`."""
    gold = [dict(c) for c in example.gold_calls]
    rounds = [gold] + ([gold[:1]] if redundant else []) if gold else []
    script = []
    for i, turn in enumerate(rounds):
        calls = [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in turn]
        results = list(run_batch(calls))
        failed = failed_call(calls, results)
        if failed:
            raise ConfigError(f"SFT: the gold calls of example {example.id!r}: {failed}")
        script.append((fc_call_text(fmt, turn, first=i == 0), calls, results))
    first_results = [r.text for r in script[0][2]] if script else []
    return script + [(fc_answer_text(fmt, first_results), [], [])]


def build_fc_sft_trajectories(examples: Sequence, tokenizer, bridge: ToolBridge, *, fmt,
                              redundant_rate: float = 0.3, seed: int = 0) -> list[Trajectory]:
    """SFT trajectories for function-calling examples (see the module docstring); token ids =
    prompt + each turn's ids + each encoded result block, built as the rollout builds them."""
    rng = random.Random(f"sft-fc-{seed}")
    out = []
    for i, ex in enumerate(examples):
        redundant = rng.random() < redundant_rate
        builder = TrajectoryBuilder(encode_prompt(tokenizer, ex), tokenizer=tokenizer,
                                    markup=fmt.markup(), prompt_id=ex.id, group_id=i,
                                    sample_index=0, gold=ex.gold, task=ex.task)
        for text, calls, results in fc_script(ex, fmt, bridge.run_batch, redundant):
            builder.add_model_turn(tokenizer.encode(text, add_special_tokens=False), is_call=bool(calls))
            if calls:
                _add_results(builder, fmt, tokenizer, calls, results)
        out.append(builder.finish("answer"))
    return out


# ------------------------------------------------------------------ the tiny tokenizer's text

def tokenizer_texts(examples, corpus_path: str | None,
                    demonstrations: Mapping[str, list] = MappingProxyType({})) -> list[str]:
    """Text the demo's tiny BPE is trained on, as often as it occurs in the data: each
    example's system and user prompt, the solutions the SFT demonstrator may play (or the
    user's demonstration), and the corpus."""
    texts = []
    for ex in examples:
        texts += [system_prompt(style=style) for style in PROMPT_STYLES] + [user_prompt(ex)]
        if ex.id in demonstrations:
            texts += demonstrations[ex.id]
        elif family_of(ex):
            texts += [t["text"] for turns in solution_variants(ex) for t in turns if "text" in t]
        else:  # an example from elsewhere: its answer is the text the model writes
            texts += list(getattr(ex, "answers", ())) or [getattr(ex, "answer", "")]
    if corpus_path:
        texts += [p["text"] for p in jsonl.read_corpus(corpus_path)]
    return texts


def fc_tokenizer_texts(examples, functions) -> list[str]:
    """Function calling: each example's prompt as the Qwen2.5 template renders it, and the
    turns and result blocks of its SFT script (the text the tiny model will read and write)."""
    fmt, tools = JsonCallFormat(QWEN25), function_tools(functions)
    run = lambda calls: [tools[c.tool].run(c.argument, 10.0) for c in calls]  # noqa: E731
    texts = []
    for ex in examples:
        texts.append(render_template(QWEN25_CHAT_TEMPLATE, ex.messages, ex.tools, add_generation_prompt=True))
        for text, calls, results in fc_script(ex, fmt, run):
            texts.append(text)
            if calls:
                texts.append(fmt.wrap_results([r.text for r in results]))
    return texts


def fc_entities(examples) -> list[str]:
    """Values the tiny model copies into calls: the digit-free string argument values of the
    gold calls and the string enum values of the schemas (numbers are split into digits)."""
    out = set()
    for ex in examples:
        values = [v for c in ex.gold_calls for v in c["arguments"].values()]
        for entry in ex.tools:
            props = entry.get("function", entry).get("parameters", {}).get("properties", {})
            values += [v for p in props.values() if isinstance(p, dict) for v in p.get("enum", [])]
        out.update(v for v in values if isinstance(v, str) and v.strip() and not any(ch.isdigit() for ch in v))
    return sorted(out)
