"""Runs on cloud storage: every path of a run may be gs://, tested against a local GCS emulator
(tepo_jax/testing/gcs.py starts `gcp-storage-emulator` on a free port of 127.0.0.1).

Fast: the path helpers, metrics.jsonl / trajectories / TensorBoard through RunLog, orbax
checkpoints with the corrupt-latest fallback, and the one-line errors (no bucket, no gcsfs).
Slow (`make test-slow`): SFT then RL with a gs:// workdir, killed with SIGKILL mid-run and
resumed, equals the same run on local disk bit for bit; the evaluate CLI and the pilot study
read that workdir from gs://.
"""
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import uuid

import jax.numpy as jnp
import numpy as np
import pytest

from tepo_jax import paths
from tepo_jax.checkpoints.train_state import RunCheckpointer, abstract_like
from tepo_jax.runlog import RunLog
from tepo_jax.testing.gcs import GcsEmulator, forget_listings

# Checked without importing gcsfs: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when imported,
# and the fixture sets it first (tepo_jax/testing/gcs.py).
for _package in ("gcsfs", "gcp_storage_emulator"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def emulator():
    with GcsEmulator() as gcs:
        old = gcs.apply()
        try:
            yield gcs
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def bucket(emulator):
    """A fresh, empty bucket: gs://<name>."""
    return emulator.create_bucket(f"b-{uuid.uuid4().hex[:12]}")


# ---------------------------------------------------------------------------- paths


def test_paths_round_trip_through_the_store(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    paths.copy_tree(src, f"{bucket}/dir")
    with paths.local_copy(f"{bucket}/dir") as local:
        assert (tmp_path / "x").exists() is False and os.path.isdir(local) and local != str(src)
        assert open(os.path.join(local, "a.txt")).read() == "alpha"
        assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == (src / "sub" / "b.bin").read_bytes()
    assert not os.path.exists(local)  # the download is removed
    with paths.staged(f"{bucket}/out") as local:
        open(os.path.join(local, "f.json"), "w").write("{}")
    assert paths.as_path(f"{bucket}/out/f.json").read_text() == "{}"
    paths.write_atomic(f"{bucket}/w.txt", "one")
    paths.write_atomic(f"{bucket}/w.txt", "two")
    assert paths.as_path(f"{bucket}/w.txt").read_text() == "two"
    # Local paths are the path itself: no copy.
    with paths.local_copy(src) as local:
        assert local == str(src)


def test_a_missing_bucket_or_backend_is_one_line(emulator, monkeypatch):
    with pytest.raises(paths.PathError, match=r"bucket 'no-such-bucket' does not exist"):
        paths.check_store("gs://no-such-bucket/run")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    with pytest.raises(paths.PathError, match=r"gs:// paths need the gcsfs package"):
        paths.check_store("gs://any/run")
    with pytest.raises(paths.PathError, match="unsupported scheme"):
        paths.check_store("ftp://host/run")
    paths.check_store("/local/dir")  # nothing to check


def test_the_driver_refuses_a_missing_bucket_in_one_line(emulator):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
                          "--config.workdir=gs://no-such-bucket/run"], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("error: gs://no-such-bucket/run: bucket 'no-such-bucket' does "
                                                   "not exist (create it first, e.g. `gcloud storage buckets "
                                                   "create gs://no-such-bucket`)")
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- run outputs


def _rows(log: RunLog, rows):
    for step, phase, metrics in rows:
        log.write(step, phase, metrics)


ROWS = [(1, "sft", {"sft/nll": 2.5}), (2, "sft", {"sft/nll": 1.25}), (0, "eval", {"eval/f1": float("nan")}),
        (1, "rl", {"reward/score": 0.5}), (2, "rl", {"reward/score": 0.75})]


def test_metrics_on_gcs_equal_local_and_are_cut_back_on_resume(bucket, tmp_path):
    local, remote = RunLog(tmp_path / "run"), RunLog(f"{bucket}/run")
    _rows(local, ROWS)
    _rows(remote, ROWS)
    local.close()
    remote.close()
    metrics = paths.as_path(f"{bucket}/run/metrics.jsonl")
    assert metrics.read_bytes() == (tmp_path / "run" / "metrics.jsonl").read_bytes()
    events = [p.name for p in paths.as_path(f"{bucket}/run/tensorboard").iterdir()]
    assert len(events) == 1 and events[0].startswith("events.out.tfevents"), events
    assert paths.as_path(f"{bucket}/run/tensorboard/{events[0]}").stat().length > 100

    # A resumed attempt: its checkpoint saw 3 rows; the 2 logged after it come again.
    again = RunLog(f"{bucket}/run", tensorboard=False)
    assert again.rows == 5
    again.truncate(3)
    assert again.rows == 3 and len(metrics.read_text().splitlines()) == 3
    _rows(again, ROWS[3:])
    assert metrics.read_bytes() == (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert again.last_row("rl") == {"reward/score": 0.75}


def test_trajectories_on_gcs_equal_local(bucket, tmp_path):
    from test_trajectory import TWO_CALLS, build
    from tepo_jax.rollout import trajectory as traj_lib

    trajs = [build(TWO_CALLS), build([("r", [0.3]), ("ans", [0.7])], sample_index=1)]
    log = RunLog(f"{bucket}/run", tensorboard=False)
    path = log.save_trajectories("rl_000001", trajs)
    assert os.fspath(path) == f"{bucket}/run/trajectories/rl_000001.jsonl"
    traj_lib.write_jsonl(tmp_path / "t.jsonl", trajs)
    assert paths.as_path(path).read_bytes() == (tmp_path / "t.jsonl").read_bytes()
    traj_lib.write_jsonl(path, trajs[:1], append=True)   # no append on a store: read and rewrite
    traj_lib.write_jsonl(tmp_path / "t.jsonl", trajs[:1], append=True)
    assert paths.as_path(path).read_bytes() == (tmp_path / "t.jsonl").read_bytes()
    assert [traj_lib.to_jsonl_line(t) for t in traj_lib.read_jsonl(path)] == \
        [traj_lib.to_jsonl_line(t) for t in trajs + trajs[:1]]


def test_checkpoints_on_gcs_fall_back_from_a_corrupt_latest(bucket, caplog):
    directory = f"{bucket}/run/checkpoints"
    ckpt = RunCheckpointer(directory, keep=3)
    states = [{"w": jnp.full((4, 3), float(i)), "step": jnp.asarray(i)} for i in (1, 2)]
    for i, s in zip((1, 2), states):
        ckpt.save(i, s, {"phase": "rl", "phase_step": i})
    ckpt.close()
    assert ckpt.all_steps() == [1, 2]
    # Corrupt step 2: truncate every array data file it wrote (objects are replaced whole).
    forget_listings()
    data = [f for f in paths.files_under(f"{directory}/2")
            if f.suffix != ".json" and f.stat().length > 3 and "commit_success" not in f.name]
    assert data, "no array data found in the checkpoint"
    for f in data:
        f.write_bytes(f.read_bytes()[:3])
    forget_listings()
    ckpt = RunCheckpointer(directory)
    with caplog.at_level(logging.WARNING):
        step, state, extra = ckpt.restore_latest(abstract_like(states[0]), discard_unreadable=True)
    assert step == 1 and extra["phase_step"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 3)))
    assert any("deleting unreadable checkpoint 2" in r.getMessage() for r in caplog.records)
    again = {"w": jnp.full((4, 3), 7.0), "step": jnp.asarray(2)}
    ckpt.save(2, again, {"phase": "rl", "phase_step": 2})
    step, state, _ = RunCheckpointer(directory).restore_latest(abstract_like(again))
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 7.0))
