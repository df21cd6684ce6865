"""Assemble a Trajectory turn by turn from exact token ids (token-in, token-out).

Both the RL rollout (sampled turns) and the SFT data generator (reference turns) build their
trajectories here, so the two agree on kinds, turn indices and roles.

A model turn is given as the token ids the policy produced; its text is only *decoded* (to
find the call and to label tokens), never re-encoded. Each token's character span in the turn
text ends where the decoded prefix ending with it ends (read from short windows, in linear
time: `token_char_spans`), so labels follow the real token boundaries. A tool result is given
as the ids the rollout inserted (the encoded wrapped result).

Turn indices follow docs/design.md: r_j (reasoning/answer of model turn j) has turn j; the call
that ends model turn j is call_{j+1}, its tokens and its result obs_{j+1} have turn j+1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from tepo_jax.rollout.trajectory import TokenKind, TokenRole, ToolCallRecord, Trajectory
from tepo_jax.tools.markup import CallMarkup, kinds_from_char_spans, roles_from_char_spans


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(turn text, [start, end) of each token in it).

    Token i ends where the decoded prefix ids[:i + 1] ends; a token that ends inside a
    multi-byte character gets the characters decoded once the character completes. Decoding
    every prefix is quadratic in the turn length (Qwen2.5 tokenizer: 94-128 ms of host time per
    trajectory for a 1024-token turn, 1.5-1.9 s for a 4096-token one), so each token's text is
    read from the decode of a short window instead (`_window_spans`, linear: 6-7 and 23-29 ms). Where the windows do not add up
    to the whole turn's decode (a tokenizer whose decode of a window is not its part of the
    whole, e.g. spaces cleaned up across the window's edge), every prefix is decoded.
    """
    ids = [int(i) for i in ids]
    text = _decode(tokenizer, ids)
    spans = _window_spans(tokenizer, ids, text)
    return text, spans if spans is not None else _prefix_spans(tokenizer, ids)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def _prefix_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """The spans by their definition: one decode of every prefix (quadratic)."""
    spans, prev = [], 0
    for i in range(len(ids)):
        text = _decode(tokenizer, ids[: i + 1])
        # A partial UTF-8 sequence decodes to U+FFFD; it is counted when the character completes.
        end = len(text.rstrip("\ufffd")) if i + 1 < len(ids) else len(text)
        spans.append((prev, max(prev, end)))
        prev = max(prev, end)
    return spans


def _window_spans(tokenizer, ids: list[int], text: str) -> Optional[list[tuple[int, int]]]:
    """The spans of `_prefix_spans` from decodes of short windows, or None where the windows'
    text does not add up to `text` (the whole turn's decode).

    Incremental detokenisation: the window runs from the second-to-last point where the text
    ended on a whole character (`start`) to the current token; the text the tokens after the
    last such point (`done`) add is the window's decode past the decode of [start, done). One
    token of context before `done` lets a decoder see its neighbour (a SentencePiece word start
    keeps its space; a window that starts a text drops it, in both decodes alike).
    """
    spans, prev = [], 0
    emitted = 0                        # length of the text of ids[:done], checked against `text`
    start = done = 0
    before = ""                        # decode of ids[start:done]
    pending = ""
    for i in range(len(ids)):
        window = _decode(tokenizer, ids[start: i + 1])
        if not window.startswith(before):
            return None
        pending = window[len(before):]
        whole = pending.rstrip("\ufffd")
        end = emitted + (len(whole) if i + 1 < len(ids) else len(pending))
        spans.append((prev, max(prev, end)))
        prev = max(prev, end)
        if pending and whole == pending:   # ends on a whole character: the next window starts here
            if not text.startswith(pending, emitted):
                return None
            emitted += len(pending)
            start, done, before, pending = done, i + 1, _decode(tokenizer, ids[done: i + 1]), ""
    if text[emitted:] != pending or prev != len(text):
        return None
    return spans


class TrajectoryBuilder:
    """Accumulates one trajectory: prompt, then alternating model turns and tool results."""

    def __init__(self, prompt_ids: Sequence[int], *, tokenizer, markup: CallMarkup = CallMarkup(), **meta):
        self.tokenizer, self.markup, self.meta = tokenizer, markup, meta
        n = len(prompt_ids)
        self._ids = list(map(int, prompt_ids))
        self._kinds = [int(TokenKind.PROMPT)] * n
        self._turns = [0] * n
        self._roles = [int(TokenRole.NONE)] * n
        self._logprobs = [0.0] * n
        self._entropies = [0.0] * n
        self.calls: list[ToolCallRecord] = []
        self.last_text = ""
        self.model_tokens = 0

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def add_model_turn(self, ids: Sequence[int], logprobs: Optional[Sequence[float]] = None,
                       entropies: Optional[Sequence[float]] = None, *, is_call: bool) -> str:
        """Append one model turn; `is_call` says it ends in a tool call. Returns its text."""
        text, spans = token_char_spans(self.tokenizer, ids)
        kinds = kinds_from_char_spans(spans, text, self.markup)
        kinds = _normalise_turn_kinds(kinds, is_call)
        roles = roles_from_char_spans(spans, text, kinds, self.markup)
        j = self.num_calls
        turns = np.where(kinds == TokenKind.TOOL_CALL, j + 1, j)
        n = len(ids)
        self._ids += list(map(int, ids))
        self._kinds += kinds.tolist()
        self._turns += turns.tolist()
        self._roles += roles.tolist()
        self._logprobs += list(logprobs) if logprobs is not None else [0.0] * n
        self._entropies += list(entropies) if entropies is not None else [0.0] * n
        self.model_tokens += n
        self.last_text = text
        if is_call:
            self._pending_call_start = len(self._ids) - int(np.sum(kinds == TokenKind.TOOL_CALL))
        return text

    def add_tool_result(self, name: str, arguments: str, result_text: str, status: str,
                        result_ids: Sequence[int]) -> None:
        """Append the result of the call that ended the last model turn."""
        call_end = len(self._ids)
        k = self.num_calls + 1
        n = len(result_ids)
        self._ids += list(map(int, result_ids))
        self._kinds += [int(TokenKind.TOOL_RESULT)] * n
        self._turns += [k] * n
        self._roles += [int(TokenRole.NONE)] * n
        self._logprobs += [0.0] * n
        self._entropies += [0.0] * n
        self.calls.append(ToolCallRecord(name=name, arguments=arguments, result=result_text,
                                         status=status, call_span=(self._pending_call_start, call_end),
                                         result_span=(call_end, call_end + n), turn=k))

    def finish(self, finish_reason: str) -> Trajectory:
        traj = Trajectory(token_ids=self._ids, kinds=self._kinds, turns=self._turns, roles=self._roles,
                          logprobs=self._logprobs, entropies=self._entropies, tool_calls=list(self.calls),
                          finish_reason=finish_reason, final_text=self.last_text, **self.meta)
        return traj.validate()


def _normalise_turn_kinds(kinds: np.ndarray, is_call: bool) -> np.ndarray:
    """One call per turn, at its end: everything from the first call token on is the call.

    A call turn holds no answer (ANSWER -> REASONING). A call turn whose text has no call
    tokens (possible only with an unusual tokenisation) marks its last token as the call, so
    the call span is non-empty. A turn whose call is not run (past max_calls, out of budget,
    or cut mid-call) marks the same range UNRUN_CALL, answer tokens kept: these are model
    tokens with loss, but r_n ends where the call starts, so they stay out of H(r_n).
    """
    kinds = kinds.copy()
    call = np.flatnonzero(kinds == TokenKind.TOOL_CALL)
    if not is_call:
        if call.size:
            tail = kinds[call[0]:]
            tail[tail != TokenKind.ANSWER] = TokenKind.UNRUN_CALL
        return kinds
    kinds[kinds == TokenKind.ANSWER] = TokenKind.REASONING
    start = call[0] if call.size else len(kinds) - 1
    kinds[start:] = TokenKind.TOOL_CALL
    return kinds
