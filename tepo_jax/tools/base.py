"""Plain data types shared by the tool parsers, the tools and the bridge.

Tools know nothing of JAX: everything here is host-side Python, so the rollout can hand
parsed calls to a thread pool while the accelerator keeps decoding.
"""
from __future__ import annotations

import dataclasses
import enum
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
    for bad input (return an ERROR result instead); the bridge still guards both."""

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
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def model_text(text: str) -> str:
    """Text safe to show the model: CRLF becomes LF, other control characters U+FFFD."""
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n"))
