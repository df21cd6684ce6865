"""Run outputs: metrics to JSONL and TensorBoard, trajectories to disk, a progress bar.

Only process 0 writes (multi-host runs call this on every host; the others get no-ops).
`metrics.jsonl` holds one object per line: {"step", "phase", ...metric: float}; the notebooks
and the demo's plot read it. A checkpoint records how many rows were written (`rows`); a run
resumed from it cuts the file back to that many (`truncate`), so rows logged after the
checkpoint by the interrupted attempt are not doubled when the resumed run logs them again.
Trajectories go to `trajectories/<phase>_<step>.jsonl` in the schema of
docs/trajectory_schema.md.

The workdir may be a URL (`gs://bucket/run`, tepo_jax/paths.py). Locally a row is appended
to metrics.jsonl; an object store has no append, so there the file is rewritten whole at each
row, one upload, which a kill leaves either before or after that row (never a torn file).
The cost is the file's size per row (a few MB after thousands of steps, once per step).
TensorBoard events: tensorboardX writes them to a local directory, and on a store each flush
uploads the events file whole (one upload, as metrics.jsonl). Events cannot be cut back, so
when `truncate` drops rows (an attempt killed without a checkpoint of its last rows), the events
are rebuilt from the rows kept: TensorBoard would otherwise show both attempts' values at the
steps logged twice. A tag is `phase/metric`, or the metric's own name when it already starts
with its phase (`eval/accuracy`, not `eval/eval/accuracy`).
Weights & Biases (`config.log.wandb_project`) gets the same rows, from process 0, in one W&B
run per workdir: its id is stored in `wandb_run_id` there, so a resumed run continues it.
W&B writes its local run file every second (WANDB_FLUSH_S, not its default 15 s), so a killed
attempt's W&B file holds its run id and all but about its last second of rows.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence

import jax
from etils import epath
from tqdm.auto import tqdm

from tepo_jax import paths
from tepo_jax.errors import ConfigError
from tepo_jax.rollout import trajectory as traj_lib


def _clean(metrics: Mapping[str, float]) -> dict:
    out = {}
    for k, v in metrics.items():
        v = float(v)
        out[k] = None if math.isnan(v) or math.isinf(v) else v  # JSON has no NaN
    return out


class RunLog:
    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, wandb_project: str = "",
                 wandb_config: Optional[dict] = None):
        self.workdir = paths.as_path(workdir)
        self.enabled = jax.process_index() == 0
        self._rewrite = paths.is_remote(self.workdir)  # an object store: no append (module doc)
        self._tb = self._wandb = None
        self._lines = self._read_lines()
        self.rows = len(self._lines)  # rows in metrics.jsonl (process 0; 0 elsewhere)
        if self.enabled:
            (self.workdir / "trajectories").mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = TensorBoard(self.workdir / "tensorboard")
            if wandb_project:
                self._wandb = open_wandb(self.workdir, wandb_project, wandb_config)

    @property
    def metrics_path(self) -> epath.Path:
        return self.workdir / "metrics.jsonl"

    def _read_lines(self) -> list[str]:
        if not self.enabled or not self.metrics_path.exists():
            return []
        return [line for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write(self, step: int, phase: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "phase": phase, **_clean(metrics)}
        line = json.dumps(row)
        self._lines.append(line)
        if self._rewrite:
            paths.write_atomic(self.metrics_path, "".join(x + "\n" for x in self._lines))
        else:
            with self.metrics_path.open("a") as f:
                f.write(line + "\n")
        values = _tags(row)
        if self._tb is not None:
            self._tb.write(values, step)
        if self._wandb is not None:
            # W&B's step must grow, and rows of several phases share a step number: W&B's
            # step is the row's index in metrics.jsonl, the run's step a field. A resumed run
            # logs the rows after its checkpoint again under the same W&B steps.
            self._wandb.log({**values, f"{phase}/step": int(step)}, step=self.rows)
        self.rows += 1

    def last_row(self, phase: str) -> dict:
        """The metrics of the last logged row of `phase` ({} if none), without step/phase."""
        rows = [json.loads(line) for line in self._read_lines()]
        rows = [r for r in rows if r["phase"] == phase]
        if not rows:
            return {}
        return {k: (math.nan if v is None else v) for k, v in rows[-1].items() if k not in ("step", "phase")}

    def truncate(self, rows: Optional[int]) -> None:
        """Keep the first `rows` rows (a checkpoint's count); None (an older checkpoint) keeps all.
        TensorBoard's events are rebuilt from the rows kept (module doc)."""
        lines = self._read_lines()
        if rows is None or len(lines) <= rows:
            return
        paths.write_atomic(self.metrics_path, "".join(line + "\n" for line in lines[:rows]))
        self._lines, self.rows = lines[:rows], rows
        if self._tb is not None:
            self._tb.rebuild([json.loads(line) for line in self._lines])

    def save_trajectories(self, name: str, trajs: Sequence) -> Optional[epath.Path]:
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
        if self._wandb is not None:
            self._wandb.finish()


def _tags(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's values under their TensorBoard / W&B tags (module doc); None left out."""
    phase = row["phase"]
    return {(k if k.startswith(phase + "/") else f"{phase}/{k}"): v for k, v in row.items()
            if k not in ("step", "phase") and v is not None}


class TensorBoard:
    """tensorboardX's SummaryWriter into `logdir`; on a store (gs://...) it writes a local
    directory whose files are uploaded at each flush (tensorboardX's own gs:// writer would
    need google-cloud-storage credentials of its own, and uploads again when collected)."""

    def __init__(self, logdir: epath.Path):
        from tensorboardX import SummaryWriter

        self._writer_class = SummaryWriter
        self.remote = logdir if paths.is_remote(logdir) else None
        self.local = tempfile.mkdtemp(prefix="tepo_jax-tb-") if self.remote else os.fspath(logdir)
        self.writer = SummaryWriter(self.local)

    def rebuild(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replace every events file (every attempt's) by one holding exactly `rows`."""
        self.writer.close()
        for directory in [paths.as_path(self.local)] + ([self.remote] if self.remote is not None else []):
            for f in directory.iterdir() if directory.exists() else ():
                if f.name.startswith(EVENTS_PREFIX):
                    f.unlink()
        self.writer = self._writer_class(self.local)
        for row in rows:
            for k, v in _tags(row).items():
                self.writer.add_scalar(k, v, row["step"])
        self.writer.flush()
        self._upload()

    def write(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.remote is not None:
            for name in os.listdir(self.local):
                paths.copy_file(os.path.join(self.local, name), self.remote / name)

    def close(self) -> None:
        self.writer.close()
        self._upload()
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


EVENTS_PREFIX = "events.out.tfevents"

WANDB_ID_FILE = "wandb_run_id"


def open_wandb(workdir: epath.Path, project: str, config: Optional[dict]) -> Any:
    """The workdir's W&B run: the id in `workdir/wandb_run_id` (written by the first attempt),
    resumed, so every attempt of a run logs into one W&B run. wandb is imported only here."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("config.log.wandb_project is set but wandb is not installed "
                              "(pip install wandb)") from None
    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    if not id_file.exists():
        paths.write_atomic(id_file, run_id + "\n")
    # W&B's own files (offline runs, logs) stay local: the workdir may be a bucket.
    return wandb.init(project=project, id=run_id, resume="allow", config=config,
                      name=os.path.basename(os.fspath(workdir).rstrip("/")) or None,
                      settings=_wandb_settings(wandb))


# Seconds between W&B's writes of the run to its local `.wandb` file. W&B's default, 15 s, lets
# a run killed (preempted, OOM) within 15 s of its last write lose those rows from W&B, and a
# run killed in its first 15 s leave a file without even its run id.
WANDB_FLUSH_S = 1.0


def _wandb_settings(wandb) -> Any:
    """W&B settings with WANDB_FLUSH_S where this wandb release has the setting (an internal,
    `x_` one, so it is checked rather than assumed)."""
    fields = getattr(wandb.Settings, "model_fields", {})
    if "x_transaction_log_flush_interval" in fields:
        return wandb.Settings(x_transaction_log_flush_interval=WANDB_FLUSH_S)
    return wandb.Settings()
