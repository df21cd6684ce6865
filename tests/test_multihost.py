"""Multi-process runs: 2 CPU processes × 2 devices give the result of 1 process × 4 devices.

The 2-process run goes through `launch/local.py` (coordinator on 127.0.0.1, gloo collectives);
each process rolls out its half of every step's prompts on its own 2-device sampler, and the
processes train one model on the global 4-device mesh, the same global mesh as the
single-process run. Compared: final params (float32 rounding of the cross-process reductions:
~1e-7, and up to ~1e-3·lr on the rare elements AdamW's ε amplifies), step and RNG (exact), every logged metric of both phases, and every trajectory file
(identical token ids, kinds, rewards; logprobs and entropies to float tolerance). The
2-process run writes to one gs:// workdir on a local GCS emulator, as a pod's workers do.

Not bit-exact: the gradient all-reduce over 2 processes (gloo) sums in another order than
over 4 devices of one process (SFT step 1 nll: 6.9075212 vs 6.9075208). A pure-RL run of this
tiny config (zero rewards, so zero gradients) is bit-identical, trajectories included.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tepo_jax import paths
from tepo_jax.testing.gcs import forget_listings
from test_train_driver import ROOT, TINY_RL

# SFT (2 steps, real gradients) then RL (2 steps) with the KL term, so that the SFT export,
# the reference model and every multi-process path of both phases run.
CONFIG = [a for a in TINY_RL if not a.startswith(("--config.mode=", "--config.train.steps="))] + [
    "--config.mode=sft_then_rl", "--config.train.steps=2", "--config.sft.steps=2",
    "--config.sft.batch_size=4", "--config.sft.seq_len=512"]


def _env(devices: int) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return e


def _run(cmd, env, what):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{what} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _final_state(workdir):
    """The newest checkpoint's state as numpy (restored onto this process's one device);
    `workdir` may be gs://... (as in every helper here)."""
    workdir = paths.as_path(workdir)
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    path = workdir / "checkpoints" / str(step) / "state"
    ckpt = ocp.StandardCheckpointer()
    meta = ckpt.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), meta)
    return step, jax.tree.map(np.asarray, ckpt.restore(path, abstract))


def _metrics(workdir) -> list[dict]:
    rows = [json.loads(x) for x in (paths.as_path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture
def gcs_bucket():
    """A bucket on a local GCS emulator (tepo_jax/testing/gcs.py), this process pointed at it."""
    from tepo_jax.testing.gcs import GcsEmulator

    with GcsEmulator() as gcs:
        old = gcs.apply()
        try:
            yield gcs.create_bucket("multi"), gcs.env
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, gcs_bucket):
    # The 2 processes share one gs:// workdir, as the workers of a TPU slice do; the 1-process
    # run writes to local disk. Checkpoints (orbax, collectively), metrics, trajectories and
    # the SFT export go to the bucket.
    bucket, gcs_env = gcs_bucket
    multi, single = f"{bucket}/run", tmp_path / "single"
    _run([sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process", "2",
          "--port", "0", "--timeout", "800", "--", "--config=configs/demo_cpu.py",
          f"--config.workdir={multi}", *CONFIG], dict(_env(1), **gcs_env), "2-process run")
    forget_listings()
    assert (paths.as_path(multi) / "sft_final" / "model.safetensors").exists()
    _run([sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py", f"--config.workdir={single}",
          *CONFIG], _env(4), "1-process run")

    step_m, m = _final_state(multi)
    step_s, s = _final_state(single)
    assert step_m == step_s == 4  # 2 SFT + 2 RL checkpoints
    np.testing.assert_array_equal(m["step"], s["step"])
    np.testing.assert_array_equal(m["rng"], s["rng"])
    leaves_m, leaves_s = jax.tree.leaves(m["params"]), jax.tree.leaves(s["params"])
    assert len(leaves_m) == len(leaves_s) > 0
    # The reduction order moves parameters by ~2e-7. AdamW's first step, lr·g/(|g| + ε), amplifies
    # that where the step-1 gradient is within a few ε = 1e-8 of 0: such an element moves by up
    # to ~1e-3·lr (SFT lr 1e-3). Measured: max 1.7e-7 on a 2-core AVX-512 host; on a 2-core AVX2
    # host 2 of 88,832 elements above 1e-6 (1.4e-6 and 1.8e-6, each one of a kind in its matrix,
    # step-1 gradient ≈ −3e-8 from its Adam moments), the rest below 2.2e-7. A sharding or
    # all-reduce bug moves many elements by ~lr.
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(leaves_m, leaves_s)])
    scale = np.concatenate([np.abs(b).ravel() for b in leaves_s])
    beyond = diff > 1e-6 + 1e-5 * scale
    assert beyond.mean() < 1e-4 and diff.max() < 1e-5, (int(beyond.sum()), diff.size, float(diff.max()))

    rows_m, rows_s = _metrics(multi), _metrics(single)
    assert [(r["phase"], r["step"]) for r in rows_m] == [(r["phase"], r["step"]) for r in rows_s]
    assert [r["phase"] for r in rows_m].count("rl") == 2
    for a, b in zip(rows_m, rows_s):  # per-step losses, rewards, TEPO and eval metrics
        assert a.keys() == b.keys()
        for k in a:
            if not isinstance(a[k], float) or not isinstance(b[k], float):
                assert a[k] == b[k], (a["phase"], a["step"], k)  # phase, step, None (NaN)
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{a['phase']} {a['step']} {k}")
    sft_nll = [r["sft/nll"] for r in rows_m if r["phase"] == "sft"]
    assert len(sft_nll) == 2 and sft_nll[0] > 0  # real gradients went through the 2-process step

    files_m = sorted(p.name for p in (paths.as_path(multi) / "trajectories").iterdir())
    files_s = sorted(p.name for p in (single / "trajectories").iterdir())
    assert files_m == files_s and any(f.startswith("rl_") for f in files_m)
    for name in files_m:  # process 0 writes the gathered global batch, in single-process order
        tm, ts = _trajectories(paths.as_path(multi) / "trajectories" / name), _trajectories(single / "trajectories" / name)
        assert len(tm) == len(ts) > 0
        for a, b in zip(tm, ts):
            for k in ("logprobs", "entropies"):
                np.testing.assert_allclose(a.pop(k), b.pop(k), rtol=1e-5, atol=1e-5, err_msg=f"{name} {k}")
            assert a == b, name  # token ids, kinds, tool calls, group ids, rewards


def _trajectories(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("env, several", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, False),                      # a single-host slice
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, True),  # a multi-host slice (GKE)
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "8"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": ""}, False),
])
def test_the_driver_finds_a_multi_process_environment(env, several):
    from tepo_jax.multihost import cluster_detected
    assert cluster_detected(env) is several
