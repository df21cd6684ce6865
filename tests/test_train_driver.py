"""The training driver: SFT learns, kill -9 and resume equals an uninterrupted run, a corrupt
checkpoint falls back to the previous one, and config errors are one line before any work."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tepo_jax.checkpoints.train_state import RunCheckpointer, abstract_like

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a test: tiny model, few prompts, short rollouts.
TINY_RL = ["--config.mode=rl", "--config.model.tiny_hidden=32", "--config.data.n_train=16",
           "--config.data.n_eval=2", "--config.data.prompts_per_step=2", "--config.rollout.group_size=2",
           "--config.rollout.max_tokens=24", "--config.rollout.max_turn_tokens=12",
           "--config.rollout.cache_len=512", "--config.train.steps=3", "--config.train.checkpoint_every=1",
           "--config.train.eval_every=100", "--config.optim.lr=1e-2"]


def train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
            f"--config.workdir={workdir}", *overrides]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)  # one device, as a user's run
    return e


def final_state(workdir):
    """The newest checkpoint's arrays, restored as numpy."""
    mngr = ocp.CheckpointManager(str(Path(workdir) / "checkpoints"))
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, jax.tree.map(np.asarray, restored["state"])


def rl_losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if r["phase"] == "rl"}


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(straight, *TINY_RL), cwd=ROOT, env=env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *TINY_RL), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "checkpoints").glob("1")):
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # mid step 2: no chance to save anything
    proc.wait()
    resumed = subprocess.run(train_cmd(killed, *TINY_RL), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint" in resumed.stderr

    step_a, a = final_state(straight)
    step_b, b = final_state(killed)
    assert step_a == step_b == 3
    leaves_a, leaves_b = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # bit-exact on CPU
    np.testing.assert_array_equal(a["rng"], b["rng"])
    assert rl_losses(straight) == rl_losses(killed)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=3)
    states = [{"w": jnp.full((4, 3), float(i)), "step": jnp.asarray(i)} for i in (1, 2)]
    for i, s in zip((1, 2), states):
        ckpt.save(i, s, {"phase": "rl", "phase_step": i})
    # Corrupt step 2: truncate every data file it wrote.
    for f in (tmp_path / "ckpt" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[:3])
    with caplog.at_level(logging.WARNING):
        step, state, extra = RunCheckpointer(str(tmp_path / "ckpt")).restore_latest(abstract_like(states[0]))
    assert step == 1 and extra["phase_step"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 3)))
    assert any("checkpoint 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert RunCheckpointer(str(tmp_path / "none")).restore_latest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


@pytest.mark.parametrize("override, field", [
    ("--config.rollout.group_size=1", "config.rollout.group_size=1"),
    ("--config.algo.advantage=ppo", "config.algo.advantage='ppo'"),
    ("--config.train.micro_batches=3", "config.train.micro_batches=3"),
])
def test_config_errors_are_one_line_before_anything_compiles(tmp_path, override, field):
    t0 = time.time()
    out = subprocess.run(train_cmd(tmp_path / "w", override), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {field}"), out.stderr[-1000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was built
    assert time.time() - t0 < 60


def test_sft_loss_goes_down(tmp_path):
    from tepo_jax.train import train
    from configs.demo_cpu import get_config
    c = get_config()
    c.workdir, c.mode = str(tmp_path / "sft"), "sft"
    c.data.n_train, c.data.n_eval = 32, 2
    c.sft.steps, c.sft.batch_size, c.sft.lr = 12, 4, 2e-2
    c.model.tiny_hidden = 32
    c.train.checkpoint_every = 100
    train(c)
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    nll = [r["sft/nll"] for r in rows if r["phase"] == "sft"]
    assert len(nll) == 12
    assert np.mean(nll[-3:]) < 0.8 * np.mean(nll[:3]), nll
    # The SFT result is exported as an HF checkpoint with its tokenizer.
    assert (tmp_path / "sft" / "sft_final" / "config.json").exists()
    assert (tmp_path / "sft" / "sft_final" / "tokenizer.json").exists()
