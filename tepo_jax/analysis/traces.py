"""Data behind the plots, kept apart from matplotlib so it can be tested and reused:
the per-token entropy trace of one trajectory (spans, segment means, ΔH per call), the
metrics.jsonl series of training runs, and where a run's files are on disk.

The training driver (`tepo_jax.runlog`) writes under its workdir `trajectories/` with
`rl_XXXXXX.jsonl` (RL rollouts of a step), `eval_XXXXXX.jsonl` (greedy held-out rollouts) and
`sft_data.jsonl`, and `metrics.jsonl` (one `{"step", "phase", <metric>: float}` object per
line; eval rows name their metrics `eval/...`); `make demo` writes one such workdir per
algorithm under `runs/demo/<algo>/`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tepo_jax import paths
from tepo_jax.rollout.trajectory import (MODEL_KINDS, TokenKind, Trajectory, entropy_deltas,
                                         segment_entropies, segment_mask)

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- one trajectory


@dataclasses.dataclass(frozen=True)
class Span:
    start: int          # [start, end) token positions
    end: int
    kind: str           # 'call' | 'result'
    tool: str
    turn: int           # k


@dataclasses.dataclass(frozen=True)
class Segment:
    turn: int           # k of r_k
    start: int          # first and one-past-last position of r_k's tokens
    end: int
    mean: float         # H(r_k)


@dataclasses.dataclass(frozen=True)
class EntropyTrace:
    positions: np.ndarray     # int[T'] token positions from the first non-prompt token on
    entropy: np.ndarray       # float[T'] H_t on model tokens, NaN elsewhere
    kinds: np.ndarray         # int8[T'] TokenKind
    spans: list[Span]         # calls and tool results, in order
    segments: list[Segment]   # non-empty r_k with their mean entropy
    deltas: list[float]       # ΔH_k per call (NaN when undefined)
    tools: list[str]          # tool name per call


def entropy_trace(traj: Trajectory, include_prompt: bool = False) -> EntropyTrace:
    """The series `plot_entropy_trace` draws for one trajectory."""
    start = 0 if include_prompt else int(np.sum(traj.kinds == TokenKind.PROMPT))
    pos = np.arange(start, len(traj))
    model = np.isin(traj.kinds, np.array(MODEL_KINDS, dtype=np.int8))
    ent = np.where(model, traj.entropies.astype(np.float64), np.nan)[start:]
    spans = []
    for c in traj.tool_calls:
        spans.append(Span(c.call_span[0], c.call_span[1], "call", c.name, c.turn))
        if c.result_span[1] > c.result_span[0]:
            spans.append(Span(c.result_span[0], c.result_span[1], "result", c.name, c.turn))
    means = segment_entropies(traj)
    segments = []
    for k, h in enumerate(means):
        idx = np.flatnonzero(segment_mask(traj, k))
        if idx.size:
            segments.append(Segment(k, int(idx[0]), int(idx[-1]) + 1, float(h)))
    return EntropyTrace(pos, ent, traj.kinds[start:], spans, segments,
                        [float(d) for d in entropy_deltas(traj)],
                        [c.name for c in traj.tool_calls])


def pick_trajectory(trajs: Sequence[Trajectory], min_calls: int = 1) -> int:
    """Index of a trajectory worth plotting: the most calls with a defined ΔH (at least
    `min_calls` if any has them), ties to the earliest; 0 when none has a call."""
    if not trajs:
        raise ValueError("no trajectories")
    scores = [sum(not math.isnan(d) for d in entropy_deltas(t)) for t in trajs]
    best = int(np.argmax(scores))
    return best if scores[best] >= min_calls else 0


# ----------------------------------------------------------------------------- metrics


def read_metrics(path: str | os.PathLike, phase: str | None = "rl") -> list[dict]:
    """Rows of a metrics.jsonl (of `phase`, or all when None), in file order. Rows without a
    phase count as 'rl'. A malformed line is an error naming file and line."""
    rows = []
    with paths.as_path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with a 'step'")
            if not _is_step(row["step"]):
                raise ValueError(f"{path}:{lineno}: 'step' must be a whole number, got {row['step']!r}")
            if phase is None or row.get("phase", "rl") == phase:
                rows.append(row)
    return rows


def _is_step(v) -> bool:
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))


def metric_series(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over rows that hold a finite number for it, sorted by step;
    a step logged twice (e.g. after a resume) keeps its last value."""
    last: dict[int, float] = {}
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            last[int(row["step"])] = float(v)
    steps = np.array(sorted(last), dtype=np.int64)
    return steps, np.array([last[s] for s in steps], dtype=np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over up to `window` points (same length as `values`)."""
    if window <= 1 or values.size == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


# ----------------------------------------------------------------------------- files on disk


def resolve_path(path: str | os.PathLike) -> Path:
    """`path` as given when it exists, else relative to the repository root (notebooks run
    with notebooks/ as their working directory), else as given; a URL (gs://...) as given."""
    if paths.is_remote(path):
        return paths.as_path(path)
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def discover_metrics(spec: str | os.PathLike) -> dict[str, Path]:
    """label -> metrics.jsonl from a spec: entries separated by ',' , each `label=path` or a
    path. A file is used as is (label: its parent directory's name); a directory with a
    metrics.jsonl is one run; any other directory contributes every `*/metrics.jsonl` under it
    (label: the subdirectory, e.g. runs/demo -> grpo, tepo_sparse, ...). An entry that is
    not there, or a directory with no metrics.jsonl, is a FileNotFoundError naming it."""
    out: dict[str, Path] = {}
    for entry in [e.strip() for e in str(spec).split(",") if e.strip()]:
        label, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        p = resolve_path(path)
        if p.is_file():
            out[label or p.parent.name] = p
        elif (p / "metrics.jsonl").is_file():
            out[label or p.name] = p / "metrics.jsonl"
        elif p.is_dir():
            found = sorted(p.glob("*/metrics.jsonl"))
            if not found:
                raise FileNotFoundError(f"{path}: no metrics.jsonl in {p} or its subdirectories")
            for f in found:
                out[f"{label}/{f.parent.name}" if label else f.parent.name] = f
        else:
            also = "" if os.fspath(p) == path else f" (nor {p})"
            raise FileNotFoundError(f"{path}: no such metrics file or run directory{also}")
    return out
