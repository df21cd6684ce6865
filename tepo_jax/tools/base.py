"""Plain data types shared by the tool parsers, the tools and the bridge.

Tools know nothing of JAX: everything here is host-side Python, so the rollout can hand
parsed calls to a thread pool while the accelerator keeps decoding.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
from typing import Optional, Protocol, Union, runtime_checkable


class ToolStatus(str, enum.Enum):
    """Outcome of one tool call. A str enum so it serialises and logs as its name."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    PARSE_ERROR = "parse_error"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: the tool's name and its raw argument text.

    `timeout` overrides the bridge's default deadline for this call only.
    """

    tool: str
    argument: str
    timeout: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class AnswerTurn:
    """The model's turn ended with a final answer instead of a tool call."""

    answer: str


@dataclasses.dataclass(frozen=True)
class ParseError:
    """A malformed call. `message` is shown to the model as the tool result, so it says
    what was wrong and how the call should look."""

    message: str
    tool: str = ""


ParsedTurn = Union[ToolCall, AnswerTurn, ParseError, None]


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call produced: the text the model will see, the status and the wall time."""

    text: str
    status: ToolStatus
    latency_s: float = 0.0
    tool: str = ""

    @property
    def ok(self) -> bool:
        return self.status is ToolStatus.OK


@runtime_checkable
class Tool(Protocol):
    """A host-side tool. `run` must return within about `timeout` seconds and must not raise
    for bad input (return an ERROR result instead); the bridge still guards both.

    The bridge cleans every result's text (`result_text`) and cuts it to its
    `max_result_chars` (config `tools.max_result_chars`), unless the tool has a class
    attribute `caps_own_results = True` (the built-ins, which cut their output their own way).
    """

    name: str

    def run(self, argument: str, timeout: float) -> ToolResult:
        ...


def truncate(text: str, max_chars: int) -> str:
    """Keep the first `max_chars` characters and say visibly how many were dropped, so the
    model knows its output was cut rather than silently incomplete."""
    if max_chars < 0 or len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}…[truncated {len(text) - max_chars} chars]"


# C0 controls but tab and newline, DEL, and C1 controls: NUL and ESC sequences in a tool's
# output would reach the trajectory text (and any terminal or log that shows it) verbatim.
# Lone surrogates (a Python str can hold "\ud800", e.g. from json.loads('"\\ud800"')) are not
# UTF-8 at all: the tokenizer raises on them, which would stop training mid-run.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def model_text(text: str) -> str:
    """Text safe to show the model and to tokenize: CRLF becomes LF; other control characters
    and lone surrogates become U+FFFD. Idempotent, so text cleaned twice is cleaned once."""
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n"))


def result_text(text: str, max_chars: int = -1) -> str:
    """A tool's output as the model reads it: cleaned (`model_text`), then cut to `max_chars`
    (< 0: no cap). The bridge applies this to every result (tools/bridge.py)."""
    return truncate(model_text(text), max_chars)


# ---- JSON written by the model -------------------------------------------------------------
# json.loads recurses once per nesting level, so "[[[[…" a few thousand deep raises
# RecursionError (how deep depends on the caller's stack, too). Model-written JSON is checked
# against this explicit limit first, so too much nesting is an ordinary, predictable ValueError
# that the formats turn into a ParseError the model reads.
MAX_JSON_DEPTH = 64
# A string runs to its closing quote or, unclosed, to the end of the text (json stops there
# anyway): every match attempt that starts succeeds, so the scan is linear.
_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)


class JSONDepthError(ValueError):
    """Model-written JSON nested deeper than the limit."""

    def __init__(self, limit: int):
        super().__init__(f"JSON nested too deeply (limit {limit} levels)")
        self.limit = limit


def json_depth(text: str, stop_above: int = -1) -> int:
    """Deepest nesting of `[` / `{` in `text`, brackets inside JSON strings not counted: a
    bound on the depth json.loads recurses to on `text` (or on any JSON value inside it).
    Stops counting once the depth exceeds `stop_above` (when >= 0)."""
    depth = deepest = 0
    for m in _JSON_STRING_OR_BRACKET.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if 0 <= stop_above < deepest:
                    break
        elif c == "]" or c == "}":
            depth = max(depth - 1, 0)
    return deepest


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise JSONDepthError if JSON in `text` nests deeper than `limit`."""
    if json_depth(text, stop_above=limit) > limit:
        raise JSONDepthError(limit)


def loads_model_json(text: str, limit: int = MAX_JSON_DEPTH):
    """json.loads for model-written text: any failure, too deep nesting included, is a
    ValueError (JSONDepthError for the nesting), never a RecursionError."""
    check_json_depth(text, limit)
    try:
        return json.loads(text)
    except RecursionError:  # not expected under the limit; a deep caller stack, say
        raise JSONDepthError(limit) from None
