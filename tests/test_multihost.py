"""Multi-process runs: 2 CPU processes × 2 devices equal 1 process × 4 devices, bit for bit.

The 2-process run goes through `launch/local.py` (coordinator on 127.0.0.1, gloo collectives);
each process rolls out its half of every step's prompts on its own 2-device sampler, and the
processes train one model on the global 4-device mesh. The single-process run has the same
global mesh. Compared: final params, optimizer state and RNG (bit-exact), per-step metrics of
both phases, and the trajectory files (sampled tokens, logprobs, entropies; byte-equal).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_train_driver import ROOT, TINY_RL

# SFT (2 steps, real gradients) then RL (2 steps) with the KL term, so that the SFT export,
# the reference model and every multi-process path of both phases run.
CONFIG = [a for a in TINY_RL if not a.startswith(("--config.mode=", "--config.train.steps="))] + [
    "--config.mode=sft_then_rl", "--config.train.steps=2", "--config.sft.steps=2",
    "--config.sft.batch_size=4", "--config.sft.seq_len=512", "--config.loss.kl_coef=0.01"]


def _env(devices: int) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return e


def _run(cmd, env, what):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{what} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _final_state(workdir: Path):
    """The newest checkpoint's state as numpy (restored onto this process's one device)."""
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    path = workdir / "checkpoints" / str(step) / "state"
    ckpt = ocp.StandardCheckpointer()
    meta = ckpt.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), meta)
    return step, jax.tree.map(np.asarray, ckpt.restore(path, abstract))


def _metrics(workdir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    _run([sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process", "2",
          "--port", "0", "--timeout", "800", "--", "--config=configs/demo_cpu.py",
          f"--config.workdir={multi}", *CONFIG], _env(1), "2-process run")
    _run([sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py", f"--config.workdir={single}",
          *CONFIG], _env(4), "1-process run")

    step_m, m = _final_state(multi)
    step_s, s = _final_state(single)
    assert step_m == step_s == 4  # 2 SFT + 2 RL checkpoints
    leaves_m, leaves_s = jax.tree.leaves(m), jax.tree.leaves(s)
    assert len(leaves_m) == len(leaves_s) > 0
    for a, b in zip(leaves_m, leaves_s):
        np.testing.assert_array_equal(a, b)  # params, optimizer moments, step, RNG: bit-exact

    rows_m, rows_s = _metrics(multi), _metrics(single)
    assert [(r["phase"], r["step"]) for r in rows_m] == [(r["phase"], r["step"]) for r in rows_s]
    assert [r["phase"] for r in rows_m].count("rl") == 2
    assert rows_m == rows_s  # per-step losses, rewards, TEPO metrics, eval metrics
    sft_nll = [r["sft/nll"] for r in rows_m if r["phase"] == "sft"]
    assert len(sft_nll) == 2 and sft_nll[0] > 0  # real gradients went through the 2-process step

    files_m = sorted(p.name for p in (multi / "trajectories").iterdir())
    files_s = sorted(p.name for p in (single / "trajectories").iterdir())
    assert files_m == files_s and any(f.startswith("rl_") for f in files_m)
    for name in files_m:  # process 0 writes the gathered global batch: the same file
        assert (multi / "trajectories" / name).read_bytes() == (single / "trajectories" / name).read_bytes(), name
