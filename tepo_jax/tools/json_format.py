"""JSON function calls (Qwen2.5 / Hermes `<tool_call>{json}</tool_call>`, Llama-3.1 bare JSON).

A second `CallFormat` (tools/format.py) beside the tag format `ToolFormat`. The model
calls functions the way the chat templates render assistant tool calls:

  Qwen2.5   <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
            (several blocks per turn allowed; the turn ends with <|im_end|>)
  Llama-3.1 {"name": "get_weather", "parameters": {"city": "Paris"}}   (to the end of the
            turn, ends with <|eot_id|>; an optional <|python_tag|> prefix is accepted; the call
            starts at <|python_tag|> or at the first line that starts with `{`, so reasoning
            may come before it: ours, TEPO needs the r_k segments)

Both argument keys ("arguments", "parameters") are accepted in either dialect, and a block may
hold several JSON objects one after the other (ToolRL writes one call per line inside one
`<tool_call>` block).

Turn protocol (how the rollout must use this format):
- Stop: the sampler stops on the END-OF-TURN token (`<|im_end|>` / `<|eot_id|>`), not on
  `</tool_call>`, because several calls may follow each other in one turn and only the end of
  the turn says the model is done. `stop_strings` is that token (the sampler's stop ids hold it
  too); the stopping token is kept in the sampled ids (token-in, token-out).
- Parse: `parse_calls(turn_text)` gives every call of the turn in order (ToolCall, or
  ParseError for a malformed one). A turn with no call that ended (EOS or end-of-turn) is the
  final answer (`is_answer`).
- Run: all calls of the turn go to the bridge as one batch (`ToolBridge.run_batch`); a
  ParseError's message is that call's result.
- Insert: `wrap_results([r_1, …, r_m])` (in call order) is encoded once and appended as ONE
  tool-result block; its text equals what the chat template renders between the assistant's
  end-of-turn token and the next assistant header for m tool messages, so the inserted ids
  equal the template's ids.
- Reward: the reward reads every model turn (`scores_all_turns`), since the calls and the
  answer sit in different turns.
- TEPO: the whole multi-call block is one call_k (the TrajectoryBuilder marks everything from
  the first `<tool_call>` (Llama: the bare call's start) to the end of the turn as call_k,
  and the result block is obs_k), so
  ΔH_k compares the reasoning before and after the block.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from tepo_jax.tokenizer import render_chat
from tepo_jax.tools.base import (MAX_JSON_DEPTH, JSONDepthError, ParseError, ToolCall,
                                 check_json_depth, loads_model_json)
from tepo_jax.tools.format import CallOrError
from tepo_jax.tools.markup import CallMarkup, bare_call_start

# End-of-sequence markers a turn may end with, stripped before parsing.
_TURN_ENDS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


@dataclasses.dataclass(frozen=True)
class ChatDialect:
    """How one model family writes tool calls and sees tool results.

    result_prefix + result_separator.join(results) + result_suffix is the text the chat
    template renders after the assistant's end-of-turn token for consecutive tool messages,
    up to and including the next assistant header (`dialect_from_chat_template` derives these
    three strings from a tokenizer's template). json_encode_results: the template writes a
    tool message's content through `tojson` (Llama-3.1 does, for strings too).
    """

    name: str
    call_open: Optional[str]          # "<tool_call>", or None for bare JSON turns
    call_close: Optional[str]
    args_key: str                     # the key the template writes: arguments / parameters
    end_of_turn: str
    result_prefix: str
    result_separator: str
    result_suffix: str
    json_encode_results: bool = False
    call_prefixes: Tuple[str, ...] = ()  # accepted before a bare JSON call


QWEN25 = ChatDialect(
    name="qwen2.5", call_open="<tool_call>", call_close="</tool_call>", args_key="arguments",
    end_of_turn="<|im_end|>",
    result_prefix="\n<|im_start|>user\n<tool_response>\n",
    result_separator="\n</tool_response>\n<tool_response>\n",
    result_suffix="\n</tool_response><|im_end|>\n<|im_start|>assistant\n")

LLAMA31 = ChatDialect(
    name="llama3.1", call_open=None, call_close=None, args_key="parameters",
    end_of_turn="<|eot_id|>",
    result_prefix="<|start_header_id|>ipython<|end_header_id|>\n\n",
    result_separator="<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n",
    result_suffix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    json_encode_results=True, call_prefixes=("<|python_tag|>",))

DIALECTS = {d.name: d for d in (QWEN25, LLAMA31)}


def dialect_from_chat_template(tokenizer, base: ChatDialect) -> ChatDialect:
    """`base` with its result strings read off the tokenizer's own chat template.

    Renders a probe conversation (one call, then two tool messages holding sentinels) and cuts
    the text after the assistant's end-of-turn token at the sentinels.
    """
    call = {"type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}
    head = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "", "tool_calls": [call]}]
    tools = [{"type": "function", "function": {"name": "probe", "description": "p",
                                               "parameters": {"type": "object"}}}]
    s1, s2 = "@@RESULT_ONE@@", "@@RESULT_TWO@@"
    pre = render_chat(tokenizer, head, tools, add_generation_prompt=False)
    full = render_chat(tokenizer, head + [{"role": "tool", "content": s1},
                                          {"role": "tool", "content": s2}], tools)
    cut = pre.rfind(base.end_of_turn)
    if cut < 0 or not full.startswith(pre[:cut]):
        raise ValueError(f"chat template does not end the call turn with {base.end_of_turn!r}")
    post = full[cut + len(base.end_of_turn):]
    encode = json.dumps(s1) in post
    q1, q2 = (json.dumps(s1), json.dumps(s2)) if encode else (s1, s2)
    if post.count(q1) != 1 or post.count(q2) != 1:
        raise ValueError("chat template does not render tool messages verbatim")
    a, rest = post.split(q1)
    b, c = rest.split(q2)
    return dataclasses.replace(base, result_prefix=a, result_separator=b, result_suffix=c,
                               json_encode_results=encode)


@dataclasses.dataclass(frozen=True)
class JsonCallFormat:
    """JSON function-call format (see module docstring). Frozen: shared by rollout threads.

    functions: names the model may call (None: any name; the bridge still rejects unknown
      ones). An unknown name is a ParseError that lists the available functions.
    """

    dialect: ChatDialect = QWEN25
    functions: Optional[Tuple[str, ...]] = None
    max_calls_per_turn: int = 16
    max_argument_chars: int = 20_000
    max_json_depth: int = MAX_JSON_DEPTH  # deeper nesting is a ParseError, not a RecursionError

    scores_all_turns = True   # calls and answer are in different turns

    def __post_init__(self):
        if self.functions is not None:
            object.__setattr__(self, "functions", tuple(self.functions))

    # ---- the CallFormat protocol -------------------------------------------------------
    @property
    def stop_strings(self) -> Tuple[str, ...]:
        """The end-of-turn token: the turn is parsed only once the model has finished it."""
        return (self.dialect.end_of_turn,)

    def wrap_result(self, text: str) -> str:
        return self.wrap_results([text])

    def wrap_results(self, texts: Sequence[str]) -> str:
        """One tool-result block for all calls of a turn, in call order, as the template
        renders consecutive tool messages (plus the next assistant header)."""
        if not texts:
            raise ValueError("wrap_results needs at least one result")
        d = self.dialect
        items = [json.dumps(t, ensure_ascii=False) if d.json_encode_results else self._defang(t)
                 for t in texts]
        return d.result_prefix + d.result_separator.join(items) + d.result_suffix

    def is_answer(self, turn_text: str, ended: bool) -> bool:
        """A turn without calls is the answer when it ended (EOS / end-of-turn)."""
        return ended

    def call_arguments(self, calls: Sequence[CallOrError]) -> str:
        """The JSON list of the turn's well-formed calls ([{name, arguments}])."""
        return json.dumps(calls_as_dicts(calls), ensure_ascii=False)

    def markup(self) -> CallMarkup:
        """The `<tool_call>` blocks (Qwen2.5), or the bare JSON from `bare_call_start` on
        (Llama-3.1), the same rule `parse_calls` uses, so call_k always holds the calls that
        were parsed."""
        d = self.dialect
        return CallMarkup(tool_tags=(), json_call_tag=_tag_name(d.call_open),
                          format_tags=("<think>", "</think>", d.end_of_turn),
                          bare_json_call=d.call_open is None, call_prefixes=d.call_prefixes)

    def render_call(self, name: str, arguments: dict) -> str:
        """A call exactly as the chat template renders an assistant tool call (for SFT
        references and tests)."""
        d = self.dialect
        body = f'{{"name": "{name}", "{d.args_key}": {json.dumps(arguments, ensure_ascii=False)}}}'
        return f"{d.call_open}\n{body}\n{d.call_close}" if d.call_open else body

    # ---- parsing ----------------------------------------------------------------------
    def parse_calls(self, turn_text: str) -> List[CallOrError]:
        """Every call of one model turn, in order; [] for a turn without any call."""
        text = _strip_turn_end(turn_text)
        calls = self._tagged(text) if self.dialect.call_open else self._bare(text)
        if len(calls) > self.max_calls_per_turn:
            return [ParseError(f"{len(calls)} calls in one turn; the limit is "
                               f"{self.max_calls_per_turn}. {self._usage()}")]
        return calls

    def _tagged(self, text: str) -> List[CallOrError]:
        op, cl = self.dialect.call_open, self.dialect.call_close
        out: List[CallOrError] = []
        pos = 0
        while True:
            start = text.find(op, pos)
            stray = text.find(cl, pos)
            if stray >= 0 and (start < 0 or stray < start):
                out.append(ParseError(f"{cl} without an opening {op}. {self._usage()}"))
                pos = stray + len(cl)
                continue
            if start < 0:
                return out
            end = text.find(cl, start + len(op))
            if end < 0:
                out.append(ParseError(f"unclosed {op}: end each call with {cl}. {self._usage()}"))
                return out
            body = text[start + len(op):end]
            if op in body:
                out.append(ParseError(f"nested {op} inside a call; close each call with {cl} "
                                      f"before the next. {self._usage()}"))
            else:
                out.extend(self._calls_from_json(body))
            pos = end + len(cl)

    def _bare(self, text: str) -> List[CallOrError]:
        """Llama-3.1: the call starts at `<|python_tag|>` or at the first line starting with
        `{` (text before it is the turn's reasoning) and runs to the end of the turn."""
        start = bare_call_start(text, self.dialect.call_prefixes)
        if start is None:
            return []
        body = text[start:].strip()
        for prefix in self.dialect.call_prefixes:
            if body.startswith(prefix):
                body = body[len(prefix):].strip()
        if not body.startswith("{"):
            return []
        return self._calls_from_json(body, separators=";")

    def _calls_from_json(self, body: str, separators: str = "") -> List[CallOrError]:
        if len(body) > self.max_argument_chars:
            return [ParseError(f"call is {len(body)} chars; the limit is "
                               f"{self.max_argument_chars}")]
        try:
            values = _json_values(body, separators, self.max_json_depth)
        except JSONDepthError as e:
            return [ParseError(f"{e} in tool call. {self._usage()}")]
        except ValueError as e:
            return [ParseError(f"malformed JSON in tool call: {e}. {self._usage()}")]
        if not values:
            return [ParseError(f"empty tool call. {self._usage()}")]
        return [self._to_call(v) for v in values]

    def _to_call(self, obj: Any) -> CallOrError:
        if not isinstance(obj, dict):
            return ParseError(f"a tool call must be a JSON object, got {type(obj).__name__}. "
                              f"{self._usage()}")
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip():
            return ParseError(f'tool call without a "name" string. {self._usage()}')
        if self.functions is not None and name not in self.functions:
            return ParseError(f"unknown function {name!r}; available functions: "
                              f"{', '.join(self.functions) or 'none'}", tool=name)
        key = "arguments" if "arguments" in obj else "parameters"
        args = obj.get(key, {})
        if isinstance(args, str):  # OpenAI-style stringified arguments
            try:
                args = loads_model_json(args, self.max_json_depth)
            except JSONDepthError as e:
                return ParseError(f'"{key}" of {name}: {e}. {self._usage()}', tool=name)
            except ValueError:
                pass
        if not isinstance(args, dict):
            return ParseError(f'"{key}" of {name} must be a JSON object of argument names to '
                              f"values, got {type(args).__name__}. {self._usage()}", tool=name)
        return ToolCall(name, json.dumps(args, ensure_ascii=False))

    def _defang(self, text: str) -> str:
        """Tool output cannot fake the end of its block or a new turn: the family's
        end-of-turn token and result closing tag are broken up."""
        for marker in (self.dialect.end_of_turn, "</tool_response>"):
            text = text.replace(marker, marker[:2] + " " + marker[2:])
        return text

    def _usage(self) -> str:
        d = self.dialect
        example = self.render_call("<function-name>", {"<arg>": "<value>"}).replace("\n", " ")
        where = " (one call per block; several blocks per turn are allowed)" if d.call_open else ""
        return f"Call a function as {example}{where}; answer without a call when done."


def _tag_name(tag: Optional[str]) -> Optional[str]:
    return tag[1:-1] if tag else None


def _strip_turn_end(text: str) -> str:
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for end in _TURN_ENDS:
            if text.endswith(end):
                text, changed = text[: -len(end)].rstrip(), True
    return text


def _json_values(body: str, separators: str = "", max_depth: int = MAX_JSON_DEPTH) -> list:
    """All JSON values written one after another (whitespace or `separators` between).
    ValueError if they do not decode, JSONDepthError if they nest deeper than `max_depth`."""
    check_json_depth(body, max_depth)
    dec, out, i = json.JSONDecoder(), [], 0
    skip = " \t\r\n" + separators
    while True:
        while i < len(body) and body[i] in skip:
            i += 1
        if i >= len(body):
            return out
        try:
            value, i = dec.raw_decode(body, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{e.msg} at char {e.pos} of {body.strip()[:80]!r}") from None
        except RecursionError:  # under the limit only with a very deep caller stack
            raise JSONDepthError(max_depth) from None
        out.append(value)


def calls_as_dicts(calls: Iterable[CallOrError]) -> List[dict]:
    """[{name, arguments}] of the well-formed calls (for rewards and logs)."""
    return [{"name": c.tool, "arguments": json.loads(c.argument)}
            for c in calls if isinstance(c, ToolCall)]


def call_problem(call: Any) -> Optional[str]:
    """What is wrong with one gold call (a {name, arguments|parameters} object), or None."""
    if not isinstance(call, Mapping):
        return f"expected an object {{name, arguments}}, got {type(call).__name__}"
    if "name" not in call:
        return "missing 'name'"
    if not isinstance(call["name"], str):
        return f"'name' must be a string, got {type(call['name']).__name__}"
    if not call["name"].strip():
        return "'name' is empty"
    key = "arguments" if "arguments" in call else "parameters" if "parameters" in call else None
    args = call.get(key, {}) if key else {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return f"'{key}' is not valid JSON ({e.msg} at char {e.pos})"
    if not isinstance(args, dict):
        return f"'{key}' must be an object of argument names to values, got {type(args).__name__}"
    return None


def normalize_calls(calls: Any) -> list[dict]:
    """[{name, arguments}] from a list of call objects ("arguments" or "parameters"), one call
    object, its JSON string, a ToolRL gold string (`<tool_call>\n{json per line}\n</tool_call>`),
    or a list holding one such string (Trajectory.gold). Every call is checked first: a
    ValueError naming the call ("gold call 0: missing 'name'") instead of a KeyError from deep
    inside, and no call of a `<tool_call>` block dropped silently."""
    if isinstance(calls, (list, tuple)) and len(calls) == 1 and isinstance(calls[0], str):
        calls = calls[0]
    if isinstance(calls, str) and "<tool_call>" in calls:
        for i, c in enumerate(JsonCallFormat(QWEN25).parse_calls(calls.strip())):
            if not isinstance(c, ToolCall):
                raise ValueError(f"gold call {i}: {c.message.split('. Call a function')[0]}")
        return calls_as_dicts(JsonCallFormat(QWEN25).parse_calls(calls.strip()))
    if isinstance(calls, str):
        try:
            calls = json.loads(calls) if calls.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"gold calls: invalid JSON ({e.msg} at char {e.pos})") from None
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"gold calls: expected a list of {{name, arguments}} objects, got "
                         f"{type(calls).__name__}")
    for i, c in enumerate(calls):
        problem = call_problem(c)
        if problem:
            raise ValueError(f"gold call {i}: {problem}")
    out = []
    for c in calls:
        args = c.get("arguments", c.get("parameters", {}))
        out.append({"name": c["name"], "arguments": json.loads(args) if isinstance(args, str) else args})
    return out
