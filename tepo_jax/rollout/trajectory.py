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
import json
import math
from typing import Any, Iterable

import numpy as np

from tepo_jax import paths
from tepo_jax.rewards.base import RewardResult
# The token labels and the call grammar live below the rollout (tools/markup.py); the record
# re-exports the labels, which every consumer of a trajectory reads.
from tepo_jax.tools.markup import MODEL_KINDS, TokenKind, TokenRole, model_mask  # noqa: F401

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)   # version 1 files simply have no UNRUN_CALL tokens
FINISH_REASONS = ("answer", "eos", "max_tokens", "max_calls")
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
    reward: float | None = None      # filled after scoring (attach_reward)
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


def segment_mask(traj: Trajectory, k: int) -> np.ndarray:
    """bool[T]: the tokens of r_k (REASONING or ANSWER with turn k)."""
    return np.isin(traj.kinds, np.array(SEGMENT_KINDS, dtype=np.int8)) & (traj.turns == k)


def segment_entropies(traj: Trajectory) -> list[float]:
    """[H(r_0), ..., H(r_n)]: mean sampler entropy per segment; NaN for an empty segment.
    Means in float64: float32 sums of the same values in another order differ by an ulp, which
    would make ΔH of two equal segments a tiny negative and count the call as reducing."""
    out = []
    for k in range(traj.num_calls + 1):
        mask = segment_mask(traj, k)
        out.append(float(traj.entropies[mask].mean(dtype=np.float64)) if mask.any() else math.nan)
    return out


def entropy_deltas(traj: Trajectory) -> list[float]:
    """[ΔH_1, ..., ΔH_n] with ΔH_k = H(r_k) - H(r_{k-1}); NaN when either segment is empty."""
    h = segment_entropies(traj)
    return [h[k] - h[k - 1] for k in range(1, len(h))]   # NaN propagates


def entropy_reducing(traj: Trajectory) -> list[int]:
    """[I_1, ..., I_n], I_k = 1[ΔH_k < 0]; 0 when ΔH_k is undefined (NaN < 0 is False)."""
    return [int(d < 0) for d in entropy_deltas(traj)]


def attach_reward(traj: Trajectory, result: RewardResult) -> Trajectory:
    """A copy of `traj` with its reward fields (and the reward's parts, if any) filled from
    `result` (arrays are shared)."""
    parts = {k: float(v) for k, v in result.parts.items()} or None
    return dataclasses.replace(traj, reward=result.score, f1=result.f1, em=result.em,
                               malformed=result.malformed, extracted=result.extracted,
                               reward_parts=parts)


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
        bad = np.flatnonzero(model & ~np.isfinite(arr))
        if bad.size:
            _fail(f"{name} has non-finite values on model tokens (token {int(bad[0])}: {arr[bad[0]]})")
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


_TRAJECTORY_FIELDS = {f.name: f for f in dataclasses.fields(Trajectory)}
_REQUIRED_FIELDS = tuple(name for name, f in _TRAJECTORY_FIELDS.items()
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(ToolCallRecord))


def _tool_call(i: int, c: Any) -> ToolCallRecord:
    if not isinstance(c, dict):
        _fail(f"tool_calls[{i}] is a {type(c).__name__}, expected an object")
    missing = [k for k in _CALL_FIELDS if k not in c]
    if missing:
        _fail(f"tool_calls[{i}] has no field {missing[0]!r}")
    try:
        return ToolCallRecord(**{k: c[k] for k in _CALL_FIELDS})
    except (TypeError, ValueError, IndexError, KeyError) as e:
        _fail(f"tool_calls[{i}]: bad span or turn ({e})")


def from_json_dict(d: dict[str, Any]) -> Trajectory:
    """The trajectory a `to_json_dict` object holds, validated: TrajectoryError (one line,
    naming the field) for another shape, a missing field or arrays that disagree."""
    if not isinstance(d, dict):
        _fail(f"expected a JSON object, got a {type(d).__name__}")
    version = d.get("schema_version")
    if version not in READABLE_VERSIONS:
        _fail(f"schema_version {version!r}, this reader knows {READABLE_VERSIONS}")
    missing = [k for k in _REQUIRED_FIELDS if k not in d]
    if missing:
        _fail(f"missing field {missing[0]!r}")
    kwargs = {k: v for k, v in d.items() if k in _TRAJECTORY_FIELDS}
    for name, dtype in _ARRAY_DTYPES.items():
        try:
            kwargs[name] = np.asarray(d[name], dtype=dtype)
        except (TypeError, ValueError, OverflowError) as e:
            _fail(f"{name}: expected a list of numbers ({(str(e) or type(e).__name__).splitlines()[0]})")
    if not isinstance(d["tool_calls"], list):
        _fail(f"tool_calls is a {type(d['tool_calls']).__name__}, expected a list")
    kwargs["tool_calls"] = [_tool_call(i, c) for i, c in enumerate(d["tool_calls"])]
    return Trajectory(**kwargs).validate()


def to_jsonl_line(traj: Trajectory) -> str:
    return json.dumps(to_json_dict(traj), ensure_ascii=False, allow_nan=False)


def from_jsonl_line(line: str) -> Trajectory:
    """One validated trajectory; TrajectoryError (one line) for a line that is not one."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        _fail(f"invalid JSON ({e.msg} at column {e.colno})")
    return from_json_dict(d)


def write_jsonl(path, trajs: Iterable[Trajectory], append: bool = False) -> None:
    """`path` may be a URL (gs://...). An object store has no append: `append` there reads
    the object and writes it back whole."""
    path = paths.as_path(path)
    text = "".join(to_jsonl_line(traj) + "\n" for traj in trajs)
    if append and paths.is_remote(path):
        text = (path.read_text(encoding="utf-8") if path.exists() else "") + text
        append = False
    with path.open("a" if append else "w", encoding="utf-8") as f:
        f.write(text)


def read_jsonl(path) -> list[Trajectory]:
    """The trajectories of a JSONL file, each validated. A malformed line is a TrajectoryError
    `PATH:LINE: problem` (a missing file: FileNotFoundError)."""
    out = []
    with paths.as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    out.append(from_jsonl_line(line))
            except UnicodeDecodeError:
                raise TrajectoryError(f"{path}:{lineno}: not UTF-8 text") from None
            except TrajectoryError as e:
                raise TrajectoryError(f"{path}:{lineno}: {e}") from None
    return out
