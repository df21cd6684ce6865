"""Tool-call formats: how calls, results and answers look in the model's text.

A format is any object with the `CallFormat` protocol below. The agent loop, the SFT data
builder and the bridge use only that protocol, so a new format (another chat family's call
syntax) is one new class and no rollout change. Two ship: `ToolFormat` here, and
`JsonCallFormat` (tools/json_format.py) for Qwen2.5 / Llama-3.1 JSON function calls.

`ToolFormat` is the default, the tag format of the TEPO/ARPO line of work:
`<python>code</python>`, `<search>query</search>`, results as `<result>…</result>`, and the
final answer as `<answer>…</answer>`. One call per turn.

Parsing contract: `parse_calls(turn_text)` looks at one whole model turn, which must include
the stop string the sampler stopped on (token-in, token-out: the rollout keeps the sampled
closing tag), and returns its calls in order: ToolCall, or ParseError for a malformed one
(its message becomes the result the model sees); [] for a turn without a call.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import List, Protocol, Sequence, Tuple, Union, runtime_checkable

from tepo_jax.tools.base import AnswerTurn, ParseError, ParsedTurn, ToolCall, ToolResult, ToolStatus
from tepo_jax.tools.markup import CallMarkup

CallOrError = Union[ToolCall, ParseError]


@runtime_checkable
class CallFormat(Protocol):
    """What the rollout, the SFT data and the bridge need from a tool-call format."""

    # True when the reward reads every model turn (function calls and the answer sit in
    # different turns), False when it reads the last turn only (`<answer>` is there).
    scores_all_turns: bool

    @property
    def stop_strings(self) -> Tuple[str, ...]:
        """Where the sampler ends a turn so the host can parse it."""
        ...

    def parse_calls(self, turn_text: str) -> List[CallOrError]:
        """Every call of one model turn, in order; [] for a turn without a call."""
        ...

    def is_answer(self, turn_text: str, ended: bool) -> bool:
        """Whether a turn without calls is the final answer; `ended`: the turn stopped on
        EOS or a stop string (not on the token budget)."""
        ...

    def wrap_results(self, texts: Sequence[str]) -> str:
        """ONE result block holding the results of one turn's calls, in call order."""
        ...

    def call_arguments(self, calls: Sequence[CallOrError]) -> str:
        """The arguments of one turn's calls as the trajectory records them (call_k)."""
        ...

    def markup(self) -> CallMarkup:
        """Where calls, tool names, arguments and answers lie in this format's text."""
        ...


def encode_results(tokenizer, fmt: CallFormat, texts: Sequence[str]) -> List[int]:
    """Token ids of `fmt.wrap_results(texts)`, the result block of one call turn, as the
    rollout and the SFT data both append it.

    The block's own markup (a chat template's `<|im_start|>user` …) stays real special tokens,
    but the result texts are always plain text: a tool, a corpus passage or printed output
    holding "<|im_end|>" must not end the turn for real. A block whose results hold no
    special token's text is encoded in one piece, exactly as it always was.
    """
    block = fmt.wrap_results(texts)
    specials = _special_tokens(tokenizer)
    if not any(s in t for t in texts for s in specials):
        return tokenizer.encode(block, add_special_tokens=False)
    inside = _result_spans(fmt, texts, block)
    special_ids = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials)))
    # A fast tokenizer encodes the text between added tokens piece by piece anyway, so cutting
    # the block at its own special tokens and encoding the pieces changes nothing else.
    ids: List[int] = []
    at = 0
    for m in re.finditer("|".join(re.escape(s) for s in specials), block):
        if not any(a < m.end() and m.start() < b for a, b in inside):   # the format's own
            ids += _plain_ids(tokenizer, block[at:m.start()], specials, special_ids)
            ids.append(special_ids[m.group()])
            at = m.end()
    return ids + _plain_ids(tokenizer, block[at:], specials, special_ids)


def _result_spans(fmt: CallFormat, texts: Sequence[str], block: str) -> List[Tuple[int, int]]:
    """Where each result's text (as the format writes it: defanged, JSON-quoted) lies in
    `block` = `fmt.wrap_results(texts)`, found from the block of placeholder results."""
    mark = _unused_char([*texts, block])
    holder = re.compile(f"{mark}\\d+{mark}")
    markup = holder.split(fmt.wrap_results([f"{mark}{k}{mark}" for k in range(len(texts))]))
    before, after = holder.split(fmt.wrap_results([f"{mark}0{mark}"]))
    written = [fmt.wrap_results([t])[len(before):-len(after) or None] for t in texts]
    spans, at = [], len(markup[0])
    for text, following in zip(written, markup[1:]):
        spans.append((at, at + len(text)))
        at += len(text) + len(following)
    if "".join(x for pair in zip(markup, written + [""]) for x in pair) != block:
        raise ValueError(f"{type(fmt).__name__}.wrap_results does not write each result on its "
                         "own between fixed markup; cannot tell its special tokens from a result's")
    return spans


def _special_tokens(tokenizer) -> List[str]:
    """The tokenizer's special tokens (control tokens: <|im_end|>, <|eot_id|>, …), longest
    first, so a split on them prefers the longest match as the tokenizer does. Non-special
    added tokens (<tool_call>, a tiny tokenizer's <result>) are ordinary text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in added.values() if getattr(t, "special", False)}
    names |= set(getattr(tokenizer, "all_special_tokens", ()))
    return sorted((n for n in names if n), key=len, reverse=True)


def _unused_char(texts: Sequence[str]) -> str:
    """A private-use character none of `texts` holds (a marker nothing else can produce)."""
    for code in range(0xE000, 0xF900):
        if not any(chr(code) in t for t in texts):
            return chr(code)
    raise ValueError("tool results use every private-use character")  # 6400 distinct: absurd


def _plain_ids(tokenizer, text: str, specials: Sequence[str], special_ids: dict) -> List[int]:
    """`text` encoded with any special token's text in it as ordinary characters:
    split_special_tokens, which fast and slow transformers tokenizers take. Should a special
    id come out all the same (a tokenizer that ignores the option; or the option, which is
    state of a shared fast tokenizer, switched back by another thread meanwhile), each special
    token's text is encoded as its first character and the rest, neither of them a token."""
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if not set(special_ids.values()).intersection(ids):
        return ids
    ids, at = [], 0
    for m in re.finditer("|".join(re.escape(s) for s in specials), text):
        for piece in (text[at:m.start()], m.group()[:1], m.group()[1:]):
            ids += tokenizer.encode(piece, add_special_tokens=False) if piece else []
        at = m.end()
    return ids + (tokenizer.encode(text[at:], add_special_tokens=False) if text[at:] else [])


def call_record(fmt: CallFormat, calls: Sequence[CallOrError],
                results: Sequence[ToolResult]) -> tuple[str, str, str, str]:
    """(name, arguments, result text, status) of the ONE ToolCallRecord of a call turn: names
    joined by "," (a malformed call without a name is "invalid"), the format's arguments, the
    result text itself for one call else the JSON list of result texts, status the first
    non-ok one."""
    names = ",".join(c.tool or "invalid" if isinstance(c, ParseError) else c.tool for c in calls)
    texts = [r.text for r in results]
    result_text = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
    bad = [r.status.value for r in results if r.status is not ToolStatus.OK]
    return names, fmt.call_arguments(calls), result_text, bad[0] if bad else ToolStatus.OK.value


# What a tag name (a tool's, the answer's, the result's) may be; the parser reads tags with it.
TAG_NAME = re.compile(r"[A-Za-z_][\w\-]*")
# A closing tag at the very end of the turn, e.g. "</python>" -> "python".
_TRAILING_CLOSE = re.compile(rf"</({TAG_NAME.pattern})>\s*$")
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
        names = list(self.tools) + list(self.reserved_tags)
        if len(set(names)) != len(names):
            raise ValueError(f"tag names must be distinct, got {names}")
        for name in names:
            if not TAG_NAME.fullmatch(name):
                raise ValueError(f"invalid tag name {name!r}")

    @property
    def reserved_tags(self) -> Tuple[str, ...]:
        """The format's own tags, which no tool may be named."""
        return (self.answer_tag, self.result_tag)

    scores_all_turns = False   # the answer is in the last turn

    # ---- the CallFormat protocol -------------------------------------------------------
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

    def wrap_results(self, texts: Sequence[str]) -> str:
        if not texts:
            raise ValueError("wrap_results needs at least one result")
        return "".join(self.wrap_result(t) for t in texts)

    def parse_calls(self, turn_text: str) -> List[CallOrError]:
        """The turn's call (one at most in this format), or [] for an answer or plain text."""
        parsed = self.parse(turn_text)
        return [parsed] if isinstance(parsed, (ToolCall, ParseError)) else []

    def is_answer(self, turn_text: str, ended: bool) -> bool:
        """A turn ending in `</answer>` (after its opening tag) is the answer."""
        return isinstance(self.parse(turn_text), AnswerTurn)

    def call_arguments(self, calls: Sequence[CallOrError]) -> str:
        """The call's argument text ("" for a malformed call)."""
        return "\n".join(c.argument for c in calls if isinstance(c, ToolCall))

    def markup(self) -> CallMarkup:
        return CallMarkup(tool_tags=self.tools, answer_tag=self.answer_tag)

    # ---- parsing ----------------------------------------------------------------------
    def parse(self, turn_text: str) -> ParsedTurn:
        """The call, answer, ParseError or None (plain text) at the END of one model turn."""
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
