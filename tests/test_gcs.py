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


@pytest.mark.parametrize("store", ["silent", "refusing"])
def test_a_store_that_does_not_answer_is_one_line_within_the_deadline(store):
    # "silent" accepts connections and never answers; "refusing" is a closed port, which gcsfs
    # retries with backoff (~80 s, a traceback logged). In a fresh process: fsspec caches the
    # filesystem that the emulator fixture made.
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if store == "silent":
            listener.listen(8)
        else:
            listener.close()
        code = ("from tepo_jax import paths\n"
                "paths.STORE_CHECK_TIMEOUT_S = 3\n"
                "try:\n    paths.check_store('gs://bkt/run')\n"
                "except paths.PathError as e:\n    print(e)\n")
        env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("gs://bkt/run: no answer about bucket 'bkt' within 3 s"), out.stdout
    assert out.stdout.rstrip().endswith("; check the network and the credentials")
    if store == "refusing":   # the retried request's own error, first line only
        assert f"(last error: Cannot connect to host 127.0.0.1:{port}" in out.stdout
    assert "Traceback" not in out.stderr and out.stderr.strip() == "", out.stderr[-2000:]
    assert took < 15   # the interpreter's start and gcsfs' import, and the 3 s


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


# ---------------------------------------------------------------------------- end to end (slow)
# The kill -9 test of tests/test_train_driver.py with the interrupted run's workdir on gs://:
# SFT (real gradients, memorising 4 answers) then RL with rewards, both compared with the same
# run on local disk.


def _fresh(fn):
    """`fn` re-reading the store: another process writes it (gcsfs caches listings)."""
    def call(*args):
        forget_listings()
        return fn(*args)
    return call


@pytest.fixture(scope="module")
def runs(emulator, learning_run, tmp_path_factory):
    """(local workdir, gs:// workdir, ...): the run straight on local disk (shared with
    tests/test_train_driver.py), and on gs:// killed with SIGKILL mid-SFT, then resumed."""
    from test_train_driver import LEARNING, ROOT, SFT_STEPS, env, metric_rows, train_cmd, wait_for

    straight = learning_run
    broken = emulator.create_bucket(f"run-{uuid.uuid4().hex[:8]}") + "/run"
    run_env = dict(env(), **emulator.env)

    # The gs:// run also logs to W&B (offline: files under WANDB_DIR).
    wandb_dir = tmp_path_factory.mktemp("wandb")
    run_env = dict(run_env, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    cmd = train_cmd(broken, *LEARNING, "--config.log.wandb_project=tepo-test")
    rows = _fresh(metric_rows)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, "SFT step 21 on gs://", lambda: any(r["step"] > 20 for r in rows(broken)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = max(r["step"] for r in rows(broken))
    assert 20 < killed_after < SFT_STEPS

    done = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint 20" in done.stderr, done.stderr[-3000:]
    forget_listings()
    return straight, broken, ROOT, run_env, wandb_dir


@pytest.mark.slow
def test_sigkill_on_gcs_then_resume_equals_the_local_run_bit_for_bit(runs):
    from test_train_driver import RL_STEPS, SFT_STEPS, assert_training_moves, final_state, metric_rows

    straight, broken, _, _, _ = runs
    rows_a, rows_b = metric_rows(straight), metric_rows(broken)
    assert_training_moves(rows_a, RL_STEPS // 2)
    assert rows_a == rows_b  # every SFT, RL and eval row once, in order, equal
    step_a, state_a = final_state(straight)
    step_b, state_b = final_state(broken)
    assert step_a == step_b == SFT_STEPS + RL_STEPS
    assert [p for p, _ in state_a] == [p for p, _ in state_b] and len(state_a) > 0
    for (path, x), (_, y) in zip(state_a, state_b):
        np.testing.assert_array_equal(x, y, err_msg=path)  # params, optimizer, step, rng
    remote = paths.as_path(broken)
    files = sorted(p.name for p in (straight / "trajectories").iterdir())
    assert files == sorted(p.name for p in (remote / "trajectories").iterdir())
    for name in files:
        assert (straight / "trajectories" / name).read_bytes() == (remote / "trajectories" / name).read_bytes(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json"):   # the HF export
        assert (straight / "sft_final" / name).read_bytes() == (remote / "sft_final" / name).read_bytes(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (remote / "tensorboard").iterdir())


@pytest.mark.slow
def test_evaluate_and_the_pilot_study_read_a_gcs_workdir(runs, tmp_path):
    from tepo_jax.analysis import pilot
    from test_train_driver import LEARNING

    straight, broken, root, run_env, _ = runs
    args = [a for a in LEARNING if not a.startswith("--config.train.")]
    for workdir in (straight, broken):
        out = subprocess.run([sys.executable, "-m", "tepo_jax.evaluate", "--config=configs/demo_cpu.py",
                              f"--config.workdir={workdir}", *args, f"--checkpoint={workdir}/checkpoints",
                              f"--out={workdir}/evaluate"], cwd=root, env=run_env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    forget_listings()
    local, remote = straight / "evaluate", paths.as_path(broken) / "evaluate"
    assert json.loads((local / "metrics.json").read_text()) == json.loads((remote / "metrics.json").read_text())
    assert (local / "trajectories.jsonl").read_bytes() == (remote / "trajectories.jsonl").read_bytes()

    reports = []
    for workdir, out in ((straight, tmp_path / "pilot"), (broken, f"{broken}/pilot")):
        assert pilot.main(["--trajectories", f"{workdir}/trajectories", "--phase", "rl",
                           "--dataset", f"{workdir}/data/train.jsonl", "--tokenizer", f"{workdir}/tokenizer",
                           "--json", f"{out}.json", "--plot", f"{out}.png", "--n-boot", "50"]) == 0
        reports.append(json.loads(paths.as_path(f"{out}.json").read_text()))
        assert paths.as_path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    assert reports[0] == reports[1] and reports[0]["labels"]

    # The notebook's readers: runs found by a spec, their metrics and trajectories.
    from tepo_jax.analysis import traces
    from test_train_driver import metric_rows

    found = traces.discover_metrics(f"local={straight},remote={broken}")
    assert list(found) == ["local", "remote"] and os.fspath(found["remote"]) == f"{broken}/metrics.jsonl"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(traces.read_metrics(found["remote"], None)) == metric_rows(straight)
    remote_dir = traces.resolve_path(f"{broken}/trajectories")
    assert [f.name for f in pilot.trajectory_files(remote_dir, 2)] == \
        [f.name for f in pilot.trajectory_files(straight / "trajectories", 2)]


@pytest.mark.slow
def test_the_resumed_run_continues_its_wandb_run(runs):
    from test_wandb import as_wandb_rows, wandb_runs

    _, broken, _, _, wandb_dir = runs
    run_id = (paths.as_path(broken) / "wandb_run_id").read_text().strip()
    found = wandb_runs(wandb_dir, finished=False)   # the attempts' processes have exited
    assert [rid for rid, _ in found] == [run_id, run_id]   # the killed attempt and the resumed one
    expected = as_wandb_rows(paths.as_path(broken) / "metrics.jsonl")
    assert found[1][1] == expected[20:]   # from checkpoint 20's row count to the end, row by row


def test_a_checkpoint_killed_mid_write_on_gcs_is_ignored_and_written_again(bucket):
    # On GCS orbax marks a finished step with commit_success.txt (no rename on a store): a step
    # whose writer died has files but no marker.
    directory = f"{bucket}/ck"
    ckpt = RunCheckpointer(directory)
    state = {"w": jnp.ones(3)}
    ckpt.save(1, state, {"phase": "rl", "phase_step": 1})
    ckpt.close()
    for f in paths.files_under(f"{directory}/1"):
        rel = os.fspath(f)[len(f"{directory}/1/"):]
        if "commit_success" not in rel:
            paths.copy_file(f, f"{directory}/2/{rel}")
    forget_listings()
    ckpt = RunCheckpointer(directory)
    assert ckpt.all_steps() == [1]
    assert ckpt.restore_latest(abstract_like(state), discard_unreadable=True)[0] == 1
    ckpt.save(2, {"w": jnp.full(3, 5.0)}, {"phase": "rl", "phase_step": 2})
    step, restored, _ = RunCheckpointer(directory).restore_latest(abstract_like(state))
    assert step == 2
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(3, 5.0))
