"""Tool-call formats: how calls, results and answers look in the model's text.

A format is any object with `parse`, `stop_strings` and `wrap_result` (the `CallFormat`
protocol); the bridge and the rollout only use that protocol, so a Qwen-style
`<tool_call>{json}</tool_call>` format can be added as another class without touching them.

`ToolFormat` is the default, the tag format of the TEPO/ARPO line of work:
`<python>code</python>`, `<search>query</search>`, results as `<result>…</result>`, and the
final answer as `<answer>…</answer>`.

Parsing contract: `parse(turn_text)` looks only at the END of one model turn, which must
include the stop string the sampler stopped on (token-in, token-out: the rollout keeps the
sampled closing tag). It returns a ToolCall, an AnswerTurn, a ParseError whose message
becomes the tool result the model sees, or None for a turn without any call or answer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Protocol, Tuple, runtime_checkable

from tepo_jax.tools.base import AnswerTurn, ParseError, ParsedTurn, ToolCall


@runtime_checkable
class CallFormat(Protocol):
    """What the rollout and the bridge need from a tool-call format."""

    def parse(self, turn_text: str) -> ParsedTurn:
        ...

    @property
    def stop_strings(self) -> Tuple[str, ...]:
        ...

    def wrap_result(self, text: str) -> str:
        ...


# A closing tag at the very end of the turn, e.g. "</python>" -> "python".
_TRAILING_CLOSE = re.compile(r"</([A-Za-z_][\w\-]*)>\s*$")
_CODE_FENCE = re.compile(r"^\s*```[\w+\-]*[ \t]*\n(.*?)\n?```\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """The default tag format. Frozen: one instance is shared by every rollout thread."""

    tools: Tuple[str, ...] = ("python", "search")
    answer_tag: str = "answer"
    result_tag: str = "result"
    max_argument_chars: int = 20_000
    strip_code_fences: bool = True  # models often wrap code in ```python fences

    def __post_init__(self):
        names = list(self.tools) + [self.answer_tag, self.result_tag]
        if len(set(names)) != len(names):
            raise ValueError(f"tag names must be distinct, got {names}")
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][\w\-]*", name):
                raise ValueError(f"invalid tag name {name!r}")

    # ---- what the sampler and the rollout use ------------------------------------------
    @property
    def stop_strings(self) -> Tuple[str, ...]:
        """Closing tags of every tool and of the answer: the sampler stops on these so the
        host can run the call (or end the episode) right after the model closes it."""
        return tuple(_close(t) for t in self.tools) + (_close(self.answer_tag),)

    def wrap_result(self, text: str) -> str:
        """Wrap a tool result for insertion after the call. A closing result tag inside the
        text is defanged so tool output cannot fake the end of its own result block."""
        close = _close(self.result_tag)
        safe = text.replace(close, f"</ {self.result_tag}>")
        return f"\n{_open(self.result_tag)}\n{safe}\n{close}\n"

    # ---- parsing ----------------------------------------------------------------------
    def parse(self, turn_text: str) -> ParsedTurn:
        """Parse the call (or answer) at the end of one model turn; see module docstring."""
        match = _TRAILING_CLOSE.search(turn_text)
        if match is None:
            return self._unclosed_error(turn_text)
        name, close_at = match.group(1), match.start()
        if name == self.answer_tag:
            return self._parse_answer(turn_text, close_at)
        if name not in self.tools:
            if _open(name) in turn_text[:close_at]:
                return ParseError(f"unknown tool {name!r}; available tools: "
                                  f"{', '.join(self.tools)}. {self._usage()}", tool=name)
            return self._unclosed_error(turn_text)
        return self._parse_tool(turn_text, name, close_at)

    def _parse_answer(self, text: str, close_at: int) -> ParsedTurn:
        start = text.rfind(_open(self.answer_tag), 0, close_at)
        if start < 0:
            return ParseError(f"{_close(self.answer_tag)} without an opening "
                              f"{_open(self.answer_tag)}. {self._usage()}")
        return AnswerTurn(text[start + len(_open(self.answer_tag)):close_at].strip())

    def _parse_tool(self, text: str, name: str, close_at: int) -> ParsedTurn:
        # The call starts at the first opening tag after the previous closing tag of the same
        # tool, so a stray second opening tag is caught as nesting instead of ignored.
        prev_close = text.rfind(_close(name), 0, close_at)
        start = text.find(_open(name), prev_close + 1 if prev_close >= 0 else 0, close_at)
        if start < 0:
            return ParseError(f"{_close(name)} without an opening {_open(name)}. "
                              f"{self._usage()}", tool=name)
        argument = text[start + len(_open(name)):close_at]
        nested = self._first_tag_in(argument)
        if nested:
            return ParseError(f"nested tag {nested} inside {_open(name)}…{_close(name)}; "
                              f"write one call at a time. {self._usage()}", tool=name)
        return self._check_argument(name, argument)

    def _check_argument(self, name: str, argument: str) -> ParsedTurn:
        if self.strip_code_fences:
            fenced = _CODE_FENCE.match(argument)
            argument = fenced.group(1) if fenced else argument
        if not argument.strip():
            return ParseError(f"empty argument in {_open(name)}{_close(name)}. "
                              f"{self._usage()}", tool=name)
        if len(argument) > self.max_argument_chars:
            return ParseError(f"argument of {name} is {len(argument)} chars; the limit is "
                              f"{self.max_argument_chars}", tool=name)
        # Code keeps its indentation; only the surrounding blank lines go.
        return ToolCall(name, argument.strip("\n") if name == "python" else argument.strip())

    def _first_tag_in(self, argument: str) -> str:
        """The first tool/answer/result tag inside an argument, or ''."""
        for tag in self.tools + (self.answer_tag, self.result_tag):
            for marker in (_open(tag), _close(tag)):
                if marker in argument:
                    return marker
        return ""

    def _unclosed_error(self, text: str) -> ParsedTurn:
        """No known closing tag at the end: an opening tag left open is an error (the model
        ran out of tokens or forgot the tag); anything else is a plain turn (None)."""
        last_open, last_tag = -1, ""
        for tag in self.tools + (self.answer_tag,):
            at = text.rfind(_open(tag))
            if at > last_open and text.find(_close(tag), at) < 0:
                last_open, last_tag = at, tag
        if last_open < 0:
            return None
        return ParseError(f"unclosed tag {_open(last_tag)}: end it with {_close(last_tag)}. "
                          f"{self._usage()}", tool=last_tag if last_tag in self.tools else "")

    def _usage(self) -> str:
        calls = ", ".join(f"{_open(t)}…{_close(t)}" for t in self.tools)
        return f"Call a tool as {calls}; give the final answer as " \
               f"{_open(self.answer_tag)}…{_close(self.answer_tag)}."


def _open(tag: str) -> str:
    return f"<{tag}>"


def _close(tag: str) -> str:
    return f"</{tag}>"
