"""Where the calls, tool names, arguments and answers lie in a model turn's text.

The call grammar the TrajectoryBuilder paints tokens with: per character, a TokenKind
(REASONING / TOOL_CALL / ANSWER) and a ResT TokenRole, for the tag format (`<python>…</python>`),
the Qwen2.5 `<tool_call>{json}</tool_call>` blocks and Llama-3.1 bare JSON calls. A call
format (tools/format.py, tools/json_format.py) says which of these its text uses with
`markup()`. The token labels themselves (TokenKind, TokenRole) are defined here, below the
rollout, so tools/ never imports rollout/ (docs/design.md, layout); `rollout.trajectory`
re-exports them for the record.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
from typing import Sequence

import numpy as np

from tepo_jax.tools.base import MAX_JSON_DEPTH, json_depth


class TokenKind(enum.IntEnum):
    PROMPT = 0
    REASONING = 1
    TOOL_CALL = 2
    TOOL_RESULT = 3
    ANSWER = 4
    UNRUN_CALL = 5      # call text the rollout did not run (rollout/trajectory.py); turn n


class TokenRole(enum.IntEnum):
    """ResT role of a token; NONE exactly on non-model (prompt / tool-result) tokens."""
    NONE = 0
    REASONING = 1
    FORMAT = 2          # structural tags: <answer>, </answer>, </python>, <tool_call>, ...
    TOOL_NAME = 3       # the part of a call that names the tool (an open tag like <python>)
    TOOL_ARGS = 4
    ANSWER_CONTENT = 5


MODEL_KINDS = (TokenKind.REASONING, TokenKind.TOOL_CALL, TokenKind.ANSWER, TokenKind.UNRUN_CALL)


def model_mask(kinds: np.ndarray) -> np.ndarray:
    """bool[T]: tokens the policy sampled (REASONING | TOOL_CALL | ANSWER | UNRUN_CALL)."""
    return np.isin(kinds, np.array(MODEL_KINDS, dtype=np.int8))


@dataclasses.dataclass(frozen=True)
class CallMarkup:
    """How tool calls and answers are written in model text.

    tool_tags: tag formats where the tag names the tool: `<python>code</python>`. The open
      tag is TOOL_NAME (it is the tool choice), the content TOOL_ARGS, the close tag FORMAT.
    json_call_tag: hermes/Qwen style `<tool_call>{"name": ..., "arguments": ...}</tool_call>`:
      every JSON object in the block is a call; its name's string value is TOOL_NAME, its
      arguments (or parameters) value TOOL_ARGS, the tags and the JSON scaffolding (braces,
      keys, quotes around the name) FORMAT.
    bare_json_call: Llama-3.1 style untagged calls: the call starts at the first of
      `call_prefixes` (`<|python_tag|>`) in the turn, else at the first line that starts with
      `{` (`bare_call_start`), and runs to the end of the turn; painted like a JSON block.
    """
    tool_tags: tuple[str, ...] = ("python", "search")
    json_call_tag: str | None = "tool_call"
    answer_tag: str = "answer"
    format_tags: tuple[str, ...] = ("<think>", "</think>")
    bare_json_call: bool = False
    call_prefixes: tuple[str, ...] = ()


_DECODER = json.JSONDecoder()
_BLANK = re.compile(r"[\s;]*")          # between JSON values; Llama separates calls with ';'
_BARE_CALL_LINE = re.compile(r"^[ \t]*\{", re.MULTILINE)
ARG_KEYS = ("arguments", "parameters")


def bare_call_start(text: str, prefixes: Sequence[str] = ()) -> int | None:
    """Start of a bare-JSON call in a turn: the first call prefix, else the start of the first
    line whose first non-blank character is `{`; None when the turn holds neither. The
    rollout's parser (tools/json_format.py) and the role painter both use this one rule."""
    hits = [i for i in (text.find(p) for p in prefixes) if i >= 0]
    if hits:
        return min(hits)
    m = _BARE_CALL_LINE.search(text)
    return m.start() if m else None


def _decode(body: str, i: int):
    """(value, end) of the JSON value starting at body[i]; (None, None) if it does not decode
    (e.g. text cut by the token budget)."""
    try:
        return _DECODER.raw_decode(body, i)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: see _paint_json_calls
        return None, None


def json_object_members(body: str, i: int) -> tuple[list[tuple[str, int, int]], int]:
    """([(key, value start, value end)], end) of the JSON object opening at body[i] == '{'.

    Exact character spans of every top-level value, read with json.JSONDecoder. A cut object
    yields the members read so far; a value that does not decode runs to the end of `body`,
    and so does the object.
    """
    members, n = [], len(body)
    i = _BLANK.match(body, i + 1).end()
    while i < n and body[i] != "}":
        key, j = _decode(body, i)
        if j is None or not isinstance(key, str):
            return members, n
        j = _BLANK.match(body, j).end()
        if j >= n or body[j] != ":":
            return members, n
        v0 = _BLANK.match(body, j + 1).end()
        _, v1 = _decode(body, v0)
        members.append((key, v0, n if v1 is None else v1))
        if v1 is None:
            return members, n
        i = _BLANK.match(body, v1).end()
        if i < n and body[i] == ",":
            i = _BLANK.match(body, i + 1).end()
    return members, min(i + 1, n)


def _paint(roles, kinds, start, end, role, kind):
    roles[start:end] = role
    kinds[start:end] = kind


def _paint_json_calls(roles, text, body_start, body_end):
    """Inside a JSON call body (already FORMAT): walk every JSON object one after another and
    mark each one's name value (TOOL_NAME, quotes excluded) and arguments value (TOOL_ARGS)."""
    body = text[body_start:body_end]
    if json_depth(body, stop_above=MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return  # the parser refuses it too (a ParseError): all FORMAT, no RecursionError
    i = _BLANK.match(body, 0).end()
    while i < len(body) and body[i] == "{":
        members, i = json_object_members(body, i)
        for key, v0, v1 in members:
            a, b = body_start + v0, body_start + v1
            if key == "name" and body[v0:v0 + 1] == '"':
                closed = v1 - v0 >= 2 and body[v1 - 1] == '"'
                roles[a + 1:b - 1 if closed else b] = TokenRole.TOOL_NAME
            elif key in ARG_KEYS:
                roles[a:b] = TokenRole.TOOL_ARGS
        i = _BLANK.match(body, i).end()


def char_roles_and_kinds(text: str, markup: CallMarkup = CallMarkup()) -> tuple[np.ndarray, np.ndarray]:
    """Per-character (TokenRole, TokenKind) of a model turn's text. Unclosed regions (a turn
    cut by the token budget) run to the end of the text."""
    roles = np.full(len(text), TokenRole.REASONING, dtype=np.int8)
    kinds = np.full(len(text), TokenKind.REASONING, dtype=np.int8)
    for tag in markup.format_tags:
        for m in re.finditer(re.escape(tag), text):
            roles[m.start():m.end()] = TokenRole.FORMAT
    names = [re.escape(t) for t in markup.tool_tags]
    if markup.json_call_tag:
        names.append(re.escape(markup.json_call_tag))
    names.append(re.escape(markup.answer_tag))
    # A region ends at its close tag, or, unclosed, where the same tag opens again (as
    # rewards.extract reads answers) or at the end of the text.
    region = re.compile(r"<(%s)>((?:(?!<\1>).)*?)(</\1>|(?=<\1>)|\Z)" % "|".join(names), re.DOTALL)
    for m in region.finditer(text):
        tag = m.group(1)
        (o0, o1), (c0, c1) = (m.start(), m.start(2)), (m.end(2), m.end())
        if tag == markup.answer_tag:
            _paint(roles, kinds, o0, c1, TokenRole.FORMAT, TokenKind.ANSWER)
            roles[o1:c0] = TokenRole.ANSWER_CONTENT
        elif tag == markup.json_call_tag:
            _paint(roles, kinds, o0, c1, TokenRole.FORMAT, TokenKind.TOOL_CALL)
            _paint_json_calls(roles, text, o1, c0)
        else:
            _paint(roles, kinds, o0, c1, TokenRole.TOOL_ARGS, TokenKind.TOOL_CALL)
            roles[o0:o1] = TokenRole.TOOL_NAME
            roles[c0:c1] = TokenRole.FORMAT
    if markup.bare_json_call:
        _paint_bare_call(roles, kinds, text, markup)
    return roles, kinds


def _paint_bare_call(roles, kinds, text, markup):
    """Llama-3.1 calls: from `bare_call_start` to the end of the turn is the call (FORMAT
    scaffolding, prefix and end-of-turn token included), its JSON objects painted."""
    start = bare_call_start(text, markup.call_prefixes)
    if start is None:
        return
    _paint(roles, kinds, start, len(text), TokenRole.FORMAT, TokenKind.TOOL_CALL)
    body = start
    for prefix in markup.call_prefixes:
        if text.startswith(prefix, start):
            body = start + len(prefix)
    _paint_json_calls(roles, text, body, len(text))


def _token_values(char_values: np.ndarray, spans: Sequence[tuple[int, int]],
                  empty_value: int) -> np.ndarray:
    # A token takes the value of its FIRST character (a token straddling "\n<python>" is
    # reasoning); a zero-width token (special token decoded to "") gets `empty_value`.
    out = np.empty(len(spans), dtype=np.int8)
    for i, (start, end) in enumerate(spans):
        out[i] = char_values[start] if end > start and start < len(char_values) else empty_value
    return out


def roles_from_char_spans(token_char_spans: Sequence[tuple[int, int]], text: str,
                          kinds: Sequence[int] | None = None,
                          markup: CallMarkup = CallMarkup()) -> np.ndarray:
    """int8[T] ResT roles of the tokens of one model turn.

    token_char_spans[i] = [start, end) of token i in `text` (the decoded turn). Rules: format
    tags -> FORMAT; a tag-format call's open tag -> TOOL_NAME, its body -> TOOL_ARGS, its close
    tag -> FORMAT; text inside <answer> -> ANSWER_CONTENT (tags FORMAT); other text ->
    REASONING. A token straddling two regions takes the role of its first character; a
    zero-width token (e.g. <|im_end|> decoded as "") is FORMAT. Tokens whose `kinds` entry is
    not a model kind get NONE, so the result can be written into Trajectory.roles directly.
    """
    char_roles, _ = char_roles_and_kinds(text, markup)
    roles = _token_values(char_roles, token_char_spans, TokenRole.FORMAT)
    if kinds is not None:
        roles[~model_mask(np.asarray(kinds, dtype=np.int8))] = TokenRole.NONE
    return roles


def kinds_from_char_spans(token_char_spans: Sequence[tuple[int, int]], text: str,
                          markup: CallMarkup = CallMarkup()) -> np.ndarray:
    """int8[T] TokenKind (REASONING / TOOL_CALL / ANSWER) of one model turn's tokens, by the
    same first-character rule as roles_from_char_spans; zero-width tokens are REASONING."""
    _, char_kinds = char_roles_and_kinds(text, markup)
    return _token_values(char_kinds, token_char_spans, TokenKind.REASONING)
