"""One sampled agent trajectory: exact token ids plus, per token, its kind, turn, ResT role and
the sampler's logprob/entropy. It is the single source for rewards, advantages, loss masks and
the entropy traces notebooks read (JSONL schema: docs/trajectory_schema.md).

Turn layout (docs/design.md, TEPO section): `r_0, call_1, obs_1, r_1, …, call_n, obs_n, r_n`.
  prompt tokens            -> turn 0
  r_k (REASONING/ANSWER)   -> turn k      (answer tokens live in the final segment r_n)
  call_k (TOOL_CALL)       -> turn k      (k-th call, 1-based, tags included)
  obs_k (TOOL_RESULT)      -> turn k
  unrun call (UNRUN_CALL)   -> turn n      (call text the rollout did not run, see below)
So turns never decrease along the sequence, and inside a turn k >= 1 the order is
call_k, obs_k, r_k.

UNRUN_CALL (ours): a call the model wrote but the rollout did not run (past rollout.max_calls,
out of token budget, or cut mid-call by the turn budget). docs/design.md ends r_k at the opening tag
of the next call, so these tokens are not part of r_n: they are model tokens (loss, the
outcome / final-segment advantage, ResT roles) but never enter a segment entropy H(r_k).
Counting them in H(r_n) would let the (usually low-entropy) call text pull H(r_n) down and
give trajectories that hit max_calls a spurious I_n = 1.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)   # version 1 files simply have no UNRUN_CALL tokens
FINISH_REASONS = ("answer", "eos", "max_tokens", "max_calls")


class TokenKind(enum.IntEnum):
    PROMPT = 0
    REASONING = 1
    TOOL_CALL = 2
    TOOL_RESULT = 3
    ANSWER = 4
    UNRUN_CALL = 5      # call text that was not run (module docstring); turn n



class TokenRole(enum.IntEnum):
    """ResT role of a token; NONE exactly on non-model (prompt / tool-result) tokens."""
    NONE = 0
    REASONING = 1
    FORMAT = 2          # structural tags: <answer>, </answer>, </python>, <tool_call>, ...
    TOOL_NAME = 3       # the part of a call that names the tool (an open tag like <python>)
    TOOL_ARGS = 4
    ANSWER_CONTENT = 5


MODEL_KINDS = (TokenKind.REASONING, TokenKind.TOOL_CALL, TokenKind.ANSWER, TokenKind.UNRUN_CALL)
SEGMENT_KINDS = (TokenKind.REASONING, TokenKind.ANSWER)   # the tokens that make up r_k


class TrajectoryError(ValueError):
    """A Trajectory whose arrays, spans or metadata disagree."""


@dataclasses.dataclass
class ToolCallRecord:
    name: str
    arguments: str
    result: str
    status: str                      # set by the tool bridge, e.g. 'ok', 'error', 'timeout'
    call_span: tuple[int, int]       # [start, end) token positions of call_k (TOOL_CALL)
    result_span: tuple[int, int]     # [start, end) of obs_k (TOOL_RESULT); may be empty
    turn: int                        # k, 1-based

    def __post_init__(self):
        self.call_span = (int(self.call_span[0]), int(self.call_span[1]))
        self.result_span = (int(self.result_span[0]), int(self.result_span[1]))
        self.turn = int(self.turn)


_ARRAY_DTYPES = {"token_ids": np.int32, "kinds": np.int8, "turns": np.int16,
                 "roles": np.int8, "logprobs": np.float32, "entropies": np.float32}


@dataclasses.dataclass
class Trajectory:
    token_ids: np.ndarray            # int32[T]
    kinds: np.ndarray                # int8[T]  TokenKind
    turns: np.ndarray                # int16[T]
    roles: np.ndarray                # int8[T]  TokenRole
    logprobs: np.ndarray             # float32[T], 0 on non-model tokens
    entropies: np.ndarray            # float32[T], 0 on non-model tokens
    tool_calls: list[ToolCallRecord]
    prompt_id: str
    group_id: int
    sample_index: int
    gold: list[str] | str
    task: str                        # 'qa' | 'math' (a key of the reward registry)
    finish_reason: str               # one of FINISH_REASONS
    final_text: str = ""             # decoded text of the last model turn; rewards read it
    reward: float | None = None      # filled after scoring (rewards.attach_reward)
    f1: float | None = None
    em: float | None = None
    malformed: bool | None = None
    extracted: str | None = None
    reward_parts: dict[str, float] | None = None   # the reward's parts (function calling), logged

    def __post_init__(self):
        # Accept lists (tests, JSON) and fix dtypes once, so every consumer sees one layout.
        for name, dtype in _ARRAY_DTYPES.items():
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_calls(self) -> int:
        return len(self.tool_calls)

    def model_mask(self) -> np.ndarray:
        return model_mask(self.kinds)

    def validate(self) -> "Trajectory":
        validate(self)
        return self


def model_mask(kinds: np.ndarray) -> np.ndarray:
    """bool[T]: tokens the policy sampled (REASONING | TOOL_CALL | ANSWER | UNRUN_CALL)."""
    return np.isin(kinds, np.array(MODEL_KINDS, dtype=np.int8))


def segment_mask(traj: Trajectory, k: int) -> np.ndarray:
    """bool[T]: the tokens of r_k (REASONING or ANSWER with turn k)."""
    return np.isin(traj.kinds, np.array(SEGMENT_KINDS, dtype=np.int8)) & (traj.turns == k)


def segment_entropies(traj: Trajectory) -> list[float]:
    """[H(r_0), ..., H(r_n)]: mean sampler entropy per segment; NaN for an empty segment."""
    out = []
    for k in range(traj.num_calls + 1):
        mask = segment_mask(traj, k)
        out.append(float(traj.entropies[mask].mean()) if mask.any() else math.nan)
    return out


def entropy_deltas(traj: Trajectory) -> list[float]:
    """[ΔH_1, ..., ΔH_n] with ΔH_k = H(r_k) - H(r_{k-1}); NaN when either segment is empty."""
    h = segment_entropies(traj)
    return [h[k] - h[k - 1] for k in range(1, len(h))]   # NaN propagates


def entropy_reducing(traj: Trajectory) -> list[int]:
    """[I_1, ..., I_n], I_k = 1[ΔH_k < 0]; 0 when ΔH_k is undefined (NaN < 0 is False)."""
    return [int(d < 0) for d in entropy_deltas(traj)]


# ----------------------------------------------------------------------------- validation

def _fail(msg: str):
    raise TrajectoryError(msg)


def _check_arrays(traj: Trajectory) -> None:
    T = len(traj)
    for name in _ARRAY_DTYPES:
        arr = getattr(traj, name)
        if arr.ndim != 1 or arr.shape[0] != T:
            _fail(f"{name} has shape {arr.shape}, expected ({T},) like token_ids")
    if not np.isin(traj.kinds, [int(k) for k in TokenKind]).all():
        _fail(f"kinds holds values outside TokenKind: {sorted(set(traj.kinds.tolist()))}")
    if not np.isin(traj.roles, [int(r) for r in TokenRole]).all():
        _fail(f"roles holds values outside TokenRole: {sorted(set(traj.roles.tolist()))}")
    model = model_mask(traj.kinds)
    if ((traj.roles == TokenRole.NONE) != ~model).any():
        bad = int(np.argmax((traj.roles == TokenRole.NONE) != ~model))
        _fail(f"token {bad}: role must be NONE exactly on non-model tokens")
    for name in ("logprobs", "entropies"):
        arr = getattr(traj, name)
        if (arr[~model] != 0).any():
            _fail(f"{name} must be 0 on prompt / tool-result tokens")
        if not np.isfinite(arr[model]).all():
            _fail(f"{name} has non-finite values on model tokens")
    if (traj.entropies < 0).any() or (traj.logprobs > 0).any():
        _fail("entropies must be >= 0 and logprobs <= 0")


def _check_turn_order(traj: Trajectory) -> None:
    kinds, turns = traj.kinds, traj.turns
    if len(traj) and (np.diff(turns.astype(np.int32)) < 0).any():
        _fail("turns must be non-decreasing along the sequence")
    if (turns < 0).any() or (len(traj) and turns.max() > traj.num_calls):
        _fail(f"turns must lie in [0, n={traj.num_calls}]")
    if ((kinds == TokenKind.PROMPT) != (np.arange(len(traj)) < np.sum(kinds == TokenKind.PROMPT))).any():
        _fail("PROMPT tokens must form a prefix of the sequence")
    if (turns[kinds == TokenKind.PROMPT] != 0).any():
        _fail("PROMPT tokens must have turn 0")
    for kind in (TokenKind.ANSWER, TokenKind.UNRUN_CALL):
        if (turns[kinds == kind] != traj.num_calls).any():
            _fail(f"{kind.name} tokens must belong to the last turn (n={traj.num_calls})")
    # Within a turn: call_k, then obs_k, then r_k  (kind rank must not decrease).
    # PROMPT, REASONING, TOOL_CALL, TOOL_RESULT, ANSWER, UNRUN_CALL
    rank = np.array([0, 3, 1, 2, 3, 3], dtype=np.int32)[kinds]
    for k in range(traj.num_calls + 1):
        r = rank[turns == k]
        if (np.diff(r) < 0).any():
            _fail(f"turn {k}: tokens must come in the order call, tool result, reasoning/answer")


def _span_positions(kinds: np.ndarray, turns: np.ndarray, kind: TokenKind, k: int) -> np.ndarray:
    return np.flatnonzero((kinds == kind) & (turns == k))


def _check_calls(traj: Trajectory) -> None:
    for i, call in enumerate(traj.tool_calls):
        if call.turn != i + 1:
            _fail(f"tool_calls[{i}].turn is {call.turn}, expected {i + 1}")
        for kind, span in ((TokenKind.TOOL_CALL, call.call_span),
                           (TokenKind.TOOL_RESULT, call.result_span)):
            pos = _span_positions(traj.kinds, traj.turns, kind, call.turn)
            if not np.array_equal(pos, np.arange(*span)):
                _fail(f"call {call.turn}: {kind.name} tokens at {pos.tolist()[:8]}... do not "
                      f"match span {span}")
        if call.call_span[1] <= call.call_span[0]:
            _fail(f"call {call.turn}: empty call span {call.call_span}")
    for kind, attr in ((TokenKind.TOOL_CALL, "call_span"), (TokenKind.TOOL_RESULT, "result_span")):
        covered = sum(getattr(c, attr)[1] - getattr(c, attr)[0] for c in traj.tool_calls)
        if covered != int(np.sum(traj.kinds == kind)):
            _fail(f"{kind.name} tokens outside every recorded call's {attr}")


def validate(traj: Trajectory) -> None:
    """Raise TrajectoryError naming the first inconsistency; return None when consistent."""
    _check_arrays(traj)
    _check_turn_order(traj)
    _check_calls(traj)
    if traj.finish_reason not in FINISH_REASONS:
        _fail(f"finish_reason {traj.finish_reason!r} not in {FINISH_REASONS}")
    if not isinstance(traj.task, str) or not traj.task:
        _fail("task must be a non-empty string")


# -------------------------------------------------------------------------- serialization

def to_json_dict(traj: Trajectory) -> dict[str, Any]:
    d = {"schema_version": SCHEMA_VERSION}
    for f in dataclasses.fields(traj):
        value = getattr(traj, f.name)
        if isinstance(value, np.ndarray):
            value = value.tolist()       # float32 -> python float is exact; back is exact too
        elif f.name == "tool_calls":
            value = [dataclasses.asdict(c) for c in value]
        d[f.name] = value
    return d


def from_json_dict(d: dict[str, Any]) -> Trajectory:
    version = d.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise TrajectoryError(f"schema_version {version!r}, this reader knows {READABLE_VERSIONS}")
    fields = {f.name for f in dataclasses.fields(Trajectory)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    kwargs["tool_calls"] = [ToolCallRecord(**c) for c in d["tool_calls"]]
    return Trajectory(**kwargs)


def to_jsonl_line(traj: Trajectory) -> str:
    return json.dumps(to_json_dict(traj), ensure_ascii=False, allow_nan=False)


def from_jsonl_line(line: str) -> Trajectory:
    return from_json_dict(json.loads(line))


def write_jsonl(path, trajs: Iterable[Trajectory], append: bool = False) -> None:
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for traj in trajs:
            f.write(to_jsonl_line(traj) + "\n")


def read_jsonl(path) -> list[Trajectory]:
    with open(path, encoding="utf-8") as f:
        return [from_jsonl_line(line) for line in f if line.strip()]


# ------------------------------------------------------------- roles / kinds from char spans

@dataclasses.dataclass(frozen=True)
class TagFormat:
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
    except json.JSONDecodeError:
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


def char_roles_and_kinds(text: str, fmt: TagFormat = TagFormat()) -> tuple[np.ndarray, np.ndarray]:
    """Per-character (TokenRole, TokenKind) of a model turn's text. Unclosed regions (a turn
    cut by the token budget) run to the end of the text."""
    roles = np.full(len(text), TokenRole.REASONING, dtype=np.int8)
    kinds = np.full(len(text), TokenKind.REASONING, dtype=np.int8)
    for tag in fmt.format_tags:
        for m in re.finditer(re.escape(tag), text):
            roles[m.start():m.end()] = TokenRole.FORMAT
    names = [re.escape(t) for t in fmt.tool_tags]
    if fmt.json_call_tag:
        names.append(re.escape(fmt.json_call_tag))
    names.append(re.escape(fmt.answer_tag))
    region = re.compile(r"<(%s)>(.*?)(</\1>|\Z)" % "|".join(names), re.DOTALL)
    for m in region.finditer(text):
        tag = m.group(1)
        (o0, o1), (c0, c1) = (m.start(), m.start(2)), (m.end(2), m.end())
        if tag == fmt.answer_tag:
            _paint(roles, kinds, o0, c1, TokenRole.FORMAT, TokenKind.ANSWER)
            roles[o1:c0] = TokenRole.ANSWER_CONTENT
        elif tag == fmt.json_call_tag:
            _paint(roles, kinds, o0, c1, TokenRole.FORMAT, TokenKind.TOOL_CALL)
            _paint_json_calls(roles, text, o1, c0)
        else:
            _paint(roles, kinds, o0, c1, TokenRole.TOOL_ARGS, TokenKind.TOOL_CALL)
            roles[o0:o1] = TokenRole.TOOL_NAME
            roles[c0:c1] = TokenRole.FORMAT
    if fmt.bare_json_call:
        _paint_bare_call(roles, kinds, text, fmt)
    return roles, kinds


def _paint_bare_call(roles, kinds, text, fmt):
    """Llama-3.1 calls: from `bare_call_start` to the end of the turn is the call (FORMAT
    scaffolding, prefix and end-of-turn token included), its JSON objects painted."""
    start = bare_call_start(text, fmt.call_prefixes)
    if start is None:
        return
    _paint(roles, kinds, start, len(text), TokenRole.FORMAT, TokenKind.TOOL_CALL)
    body = start
    for prefix in fmt.call_prefixes:
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
                          fmt: TagFormat = TagFormat()) -> np.ndarray:
    """int8[T] ResT roles of the tokens of one model turn.

    token_char_spans[i] = [start, end) of token i in `text` (the decoded turn). Rules: format
    tags -> FORMAT; a tag-format call's open tag -> TOOL_NAME, its body -> TOOL_ARGS, its close
    tag -> FORMAT; text inside <answer> -> ANSWER_CONTENT (tags FORMAT); other text ->
    REASONING. A token straddling two regions takes the role of its first character; a
    zero-width token (e.g. <|im_end|> decoded as "") is FORMAT. Tokens whose `kinds` entry is
    not a model kind get NONE, so the result can be written into Trajectory.roles directly.
    """
    char_roles, _ = char_roles_and_kinds(text, fmt)
    roles = _token_values(char_roles, token_char_spans, TokenRole.FORMAT)
    if kinds is not None:
        roles[~model_mask(np.asarray(kinds, dtype=np.int8))] = TokenRole.NONE
    return roles


def kinds_from_char_spans(token_char_spans: Sequence[tuple[int, int]], text: str,
                          fmt: TagFormat = TagFormat()) -> np.ndarray:
    """int8[T] TokenKind (REASONING / TOOL_CALL / ANSWER) of one model turn's tokens, by the
    same first-character rule as roles_from_char_spans; zero-width tokens are REASONING."""
    _, char_kinds = char_roles_and_kinds(text, fmt)
    return _token_values(char_kinds, token_char_spans, TokenKind.REASONING)
