"""Weights & Biases as a second sink of the run's metrics (config.log.wandb_project), in W&B's
offline mode: the history W&B recorded, read back from its own run files, equals
metrics.jsonl row by row, and a resumed run (a new RunLog on the same workdir) logs into the
same W&B run id."""
import json
import struct
import time
from pathlib import Path

import pytest

from tepo_jax.runlog import WANDB_ID_FILE, RunLog

pytest.importorskip("wandb")


def wandb_records(path: Path):
    """The protobuf Records of a `.wandb` file: W&B's header (':W&B', magic, version), then a
    LevelDB log (32 KiB blocks; records of crc, length, type; FULL or FIRST..MIDDLE..LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, chunk, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a run's `.wandb` file once W&B has written its last one ('exit').

    `wandb.finish()` can return before W&B's service process has flushed the file (seen once
    in a full test run on a loaded 2-core VM: the resumed run's file held no record yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no 'exit' record after {timeout_s:.0f} s, records "
                                 f"{[r.WhichOneof('record_type') for r in records]}")
        time.sleep(0.2)


def wandb_runs(wandb_dir: Path, finished: bool = True) -> list[tuple[str, list[dict]]]:
    """(run id, history rows without W&B's own _ keys) of each offline run, oldest first.
    `finished`: every run was closed in this process; wait for W&B to finish writing it (runs of
    processes that have exited, some killed, are read as they are)."""
    out = []
    for run_file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for r in (finished_records(run_file) if finished else wandb_records(run_file)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_")} | {"_step": row["_step"]})
        out.append((run_id, rows))
    return out


def as_wandb_rows(metrics_file: Path) -> list[dict]:
    """metrics.jsonl in the form RunLog logs it to W&B: '<phase>/<metric>' keys (a metric that
    starts with its phase, 'sft/nll', as it is), the run's step as '<phase>/step', W&B's step =
    the row's index, None (NaN) left out."""
    rows = []
    for i, line in enumerate(metrics_file.read_text().splitlines()):
        row = json.loads(line)
        phase, step = row.pop("phase"), row.pop("step")
        tag = lambda k: k if k.startswith(phase + "/") else f"{phase}/{k}"  # noqa: E731
        rows.append({tag(k): v for k, v in row.items() if v is not None} | {f"{phase}/step": step, "_step": i})
    return rows


def test_wandb_history_equals_metrics_jsonl_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    log = RunLog(workdir, tensorboard=False, wandb_project="tepo-test", wandb_config={"seed": 3})
    for step in (1, 2, 3):
        log.write(step, "sft", {"sft/nll": 1.0 / step, "sft/grad_norm": 0.5 * step})
    log.write(0, "eval", {"eval/accuracy": 0.25, "eval/f1": float("nan")})  # NaN: null in JSON, absent in W&B
    log.close()
    run_id = (workdir / WANDB_ID_FILE).read_text().strip()

    # The resumed attempt: a checkpoint saw 3 rows, the 4th is logged again, then more.
    again = RunLog(workdir, tensorboard=False, wandb_project="tepo-test")
    again.truncate(3)
    again.write(0, "eval", {"eval/accuracy": 0.25, "eval/f1": float("nan")})
    again.write(1, "rl", {"reward/score": 0.5, "train/grad_norm": 2.0})
    again.close()

    runs = wandb_runs(tmp_path)
    assert [rid for rid, _ in runs] == [run_id, run_id]   # one W&B run across the resume
    expected = as_wandb_rows(workdir / "metrics.jsonl")
    assert len(expected) == 5
    first, second = runs[0][1], runs[1][1]
    assert first == expected[:4]
    assert second == expected[3:]   # the resumed attempt starts at the checkpoint's row count
    assert first + second[1:] == expected


def test_a_running_attempt_has_its_run_and_rows_on_disk_within_seconds(tmp_path, monkeypatch):
    """W&B writes a run's `.wandb` file every WANDB_FLUSH_S seconds (its default is 15 s), so
    an attempt killed soon after logging (a preemption, an OOM kill) leaves its run id and its
    rows on disk, and the resumed attempt can be matched to it. Read while the run is open; W&B
    holds a step's row until the next step, so the first of two rows is the one to find."""
    import time

    from tepo_jax.runlog import WANDB_FLUSH_S

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    log = RunLog(workdir, tensorboard=False, wandb_project="tepo-test")
    try:
        log.write(1, "sft", {"sft/nll": 0.5})
        log.write(2, "sft", {"sft/nll": 0.25})
        run_id = (workdir / WANDB_ID_FILE).read_text().strip()
        # The run's own file (W&B keeps the WANDB_DIR of its first run in a process).
        run_file = Path(log._wandb.settings.sync_file)
        deadline, run, rows = time.monotonic() + 5 * WANDB_FLUSH_S, None, []
        while time.monotonic() < deadline and not rows:
            time.sleep(0.2)
            if run_file.exists() and run_file.stat().st_size > 7:
                records = list(wandb_records(run_file))
                run = next((r.run.run_id for r in records if r.WhichOneof("record_type") == "run"), None)
                rows = [r for r in records if r.WhichOneof("record_type") == "history"]
        assert run == run_id and rows, (run, len(rows))
        first = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rows[0].history.item}
        expected = as_wandb_rows(workdir / "metrics.jsonl")[0]
        assert {k: v for k, v in first.items() if not k.startswith("_")} == \
            {k: v for k, v in expected.items() if not k.startswith("_")}
    finally:
        log.close()
