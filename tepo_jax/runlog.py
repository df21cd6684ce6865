"""Run outputs: metrics to JSONL and TensorBoard, trajectories to disk, a progress bar.

Only process 0 writes (multi-host runs call this on every host; the others get no-ops).
`metrics.jsonl` holds one object per line: {"step", "phase", ...metric: float}; the notebooks
and the demo's plot read it. A checkpoint records how many rows were written (`rows`); a run
resumed from it cuts the file back to that many (`truncate`), so rows logged after the
checkpoint by the interrupted attempt are not doubled when the resumed run logs them again. Trajectories go to `trajectories/<phase>_<step>.jsonl` in the
schema of docs/trajectory_schema.md.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
from tqdm.auto import tqdm

from tepo_jax.rollout import trajectory as traj_lib


def _clean(metrics: Mapping[str, float]) -> dict:
    out = {}
    for k, v in metrics.items():
        v = float(v)
        out[k] = None if math.isnan(v) or math.isinf(v) else v  # JSON has no NaN
    return out


class RunLog:
    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        self.rows = len(self._read_lines())  # rows in metrics.jsonl (process 0; 0 elsewhere)
        if self.enabled:
            (self.workdir / "trajectories").mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    @property
    def metrics_path(self) -> Path:
        return self.workdir / "metrics.jsonl"

    def _read_lines(self) -> list[str]:
        if not self.enabled or not self.metrics_path.exists():
            return []
        return [line for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write(self, step: int, phase: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "phase": phase, **_clean(metrics)}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "phase") and v is not None:
                    self._tb.add_scalar(f"{phase}/{k}", v, step)
            self._tb.flush()

    def last_row(self, phase: str) -> dict:
        """The metrics of the last logged row of `phase` ({} if none), without step/phase."""
        rows = [json.loads(line) for line in self._read_lines()]
        rows = [r for r in rows if r["phase"] == phase]
        if not rows:
            return {}
        return {k: (math.nan if v is None else v) for k, v in rows[-1].items() if k not in ("step", "phase")}

    def truncate(self, rows: Optional[int]) -> None:
        """Keep the first `rows` rows (a checkpoint's count); None (an older checkpoint) keeps all."""
        lines = self._read_lines()
        if rows is None or len(lines) <= rows:
            return
        self.metrics_path.write_text("".join(line + "\n" for line in lines[:rows]))
        self.rows = rows

    def save_trajectories(self, name: str, trajs: Sequence) -> Optional[Path]:
        if not self.enabled:
            return None
        path = self.workdir / "trajectories" / f"{name}.jsonl"
        traj_lib.write_jsonl(path, trajs)
        return path

    def progress(self, total: int, initial: int, desc: str):
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.enabled,
                    dynamic_ncols=True, mininterval=1.0)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
