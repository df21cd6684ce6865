"""The training driver: SFT learns; a run killed with SIGKILL mid-SFT and stopped with SIGTERM
mid-RL, then resumed, equals an uninterrupted run (state, metric rows, trajectory files); a
corrupt checkpoint falls back to the previous one; bad configs, overrides and input files are
one line before any work; a config that cannot fit is refused before the model is allocated."""
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

from tepo_jax import paths
from tepo_jax.checkpoints.train_state import PreemptionFlag, RunCheckpointer, abstract_like
from tepo_jax.runlog import RunLog

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a test: tiny model, few prompts, short rollouts.
TINY_RL = ["--config.mode=rl", "--config.model.tiny_hidden=32", "--config.data.n_train=16",
           "--config.data.n_eval=2", "--config.data.prompts_per_step=2", "--config.rollout.group_size=2",
           "--config.rollout.max_tokens=24", "--config.rollout.max_turn_tokens=12",
           "--config.rollout.cache_len=512", "--config.train.steps=3", "--config.train.checkpoint_every=1",
           "--config.train.eval_every=100", "--config.optim.lr=1e-2"]

# SFT on 4 examples until the tiny model has memorised their answers (nll 7 -> 0.4), then RL on
# the same prompts: samples of a group now differ in reward, so advantages and gradients are
# nonzero in RL too (at RL lr 1e-2 one step wrecked the memorised answers: every later group
# scored 0 and every gradient was 0). Checkpoints every 2 steps: SFT 2..40, RL 42..46.
SFT_STEPS, RL_STEPS, EVERY = 40, 6, 2
LEARNING = ["--config.mode=sft_then_rl", "--config.model.tiny_hidden=32", "--config.model.tiny_layers=2",
            "--config.model.tiny_heads=4", "--config.model.tiny_kv_heads=2", "--config.data.n_train=4",
            "--config.data.n_eval=2", "--config.data.prompts_per_step=2", "--config.rollout.group_size=4",
            "--config.rollout.max_calls=3", "--config.rollout.max_tokens=96", "--config.rollout.max_turn_tokens=48",
            "--config.rollout.cache_len=512", "--config.algo.advantage=tepo_sparse", "--config.optim.lr=1e-3",
            f"--config.sft.steps={SFT_STEPS}", "--config.sft.batch_size=4", "--config.sft.lr=3e-2",
            "--config.sft.seq_len=512", "--config.sft.redundant_call_rate=0.0",
            f"--config.train.steps={RL_STEPS}", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.eval_every=100", "--config.train.keep_checkpoints=3"]


def train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
            f"--config.workdir={workdir}", *overrides]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)  # one device, as a user's run
    return e


def final_state(workdir):
    """(step, [(path, array)]) of the newest checkpoint: params, opt_state, step, rng.
    `workdir` may be a URL (gs://...), as every helper here."""
    mngr = ocp.CheckpointManager(paths.absolute(workdir) / "checkpoints")
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = jax.tree_util.tree_flatten_with_path(restored["state"])[0]
    return step, [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in leaves]


def metric_rows(workdir) -> list[dict]:
    """Every row of metrics.jsonl in file order (duplicates kept), without wall times."""
    path = paths.as_path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines if x.strip()]


def checkpoint_steps(workdir) -> list[int]:
    d = paths.as_path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def wait_for(proc, what, condition, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before {what}"
    assert condition(), f"timed out waiting for {what}"


def start(workdir):
    return subprocess.Popen(train_cmd(workdir, *LEARNING), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def assert_training_moves(rows, stopped_at):
    """The comparison means something: SFT and RL steps both before and after the
    interruptions changed the parameters through real gradients, and RL earned reward."""
    sft = [r["sft/nll"] for r in rows if r["phase"] == "sft"]
    assert sft[-1] < 0.2 * sft[0], sft
    grads = {r["step"]: r["train/grad_norm"] for r in rows if r["phase"] == "rl"}
    assert any(g > 0 for s, g in grads.items() if s <= stopped_at), grads
    assert any(g > 0 for s, g in grads.items() if s > stopped_at), grads
    assert max(r["reward/score"] for r in rows if r["phase"] == "rl") > 0


@pytest.mark.slow
def test_sigkill_mid_sft_and_sigterm_mid_rl_then_resume_equal_uninterrupted(tmp_path, learning_run):
    straight, broken = learning_run, tmp_path / "broken"

    # 1. SIGKILL mid-SFT, once a row past checkpoint 20 is logged: no chance to save anything.
    proc = start(broken)
    wait_for(proc, "SFT step 21", lambda: any(r["step"] > 20 for r in metric_rows(broken)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 2. Resume; SIGTERM once RL checkpoint 2 (global 42) exists: it finishes the step it is in,
    #    checkpoints it and exits with 128 + SIGTERM.
    proc = start(broken)
    wait_for(proc, "RL checkpoint 2", lambda: SFT_STEPS + 2 in checkpoint_steps(broken))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "resumed from checkpoint" in stderr and "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    stopped_at = max(r["step"] for r in metric_rows(broken) if r["phase"] == "rl")
    assert checkpoint_steps(broken)[-1] == SFT_STEPS + stopped_at  # the step it was in, not an older one
    assert 3 <= stopped_at < RL_STEPS

    # 3. Resume to the end.
    done = subprocess.run(train_cmd(broken, *LEARNING), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    rows_a, rows_b = metric_rows(straight), metric_rows(broken)
    assert_training_moves(rows_a, stopped_at)
    assert rows_a == rows_b  # every SFT, RL and eval row once, in order, equal (rewards included)
    step_a, state_a = final_state(straight)
    step_b, state_b = final_state(broken)
    assert step_a == step_b == SFT_STEPS + RL_STEPS
    assert [p for p, _ in state_a] == [p for p, _ in state_b]
    assert any("opt_state" in p for p, _ in state_a) and any("params" in p for p, _ in state_a)
    for (path, x), (_, y) in zip(state_a, state_b):
        np.testing.assert_array_equal(x, y, err_msg=path)  # bit-exact on CPU: params, optimizer, step, rng
    files = sorted(p.name for p in (straight / "trajectories").iterdir())
    assert files == sorted(p.name for p in (broken / "trajectories").iterdir())
    assert f"rl_{RL_STEPS:06d}.jsonl" in files and "eval_000000.jsonl" in files
    for name in files:
        assert (straight / "trajectories" / name).read_bytes() == (broken / "trajectories" / name).read_bytes(), name


# ---------------------------------------------------------------------------- checkpoints

def test_corrupt_latest_checkpoint_falls_back_with_a_warning_and_is_replaced(tmp_path, caplog):
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=3)
    states = [{"w": jnp.full((4, 3), float(i)), "step": jnp.asarray(i)} for i in (1, 2)]
    for i, s in zip((1, 2), states):
        ckpt.save(i, s, {"phase": "rl", "phase_step": i})
    ckpt.close()
    # Corrupt step 2: truncate every data file it wrote.
    for f in (tmp_path / "ckpt" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[:3])
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"))
    assert ckpt.restore_latest(abstract_like(states[0]))[0] == 1  # a reader keeps step 2 on disk
    assert ckpt.all_steps() == [1, 2]
    with caplog.at_level(logging.WARNING):
        step, state, extra = ckpt.restore_latest(abstract_like(states[0]), discard_unreadable=True)
    assert step == 1 and extra["phase_step"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 3)))
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint 2" in m and "unreadable" in m for m in messages)
    assert any("deleting unreadable checkpoint 2" in m for m in messages)
    # The resumed run reaches step 2 again and saves it: no StepAlreadyExistsError.
    again = {"w": jnp.full((4, 3), 7.0), "step": jnp.asarray(2)}
    ckpt.save(2, again, {"phase": "rl", "phase_step": 2})
    step, state, _ = RunCheckpointer(str(tmp_path / "ckpt")).restore_latest(abstract_like(again))
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 7.0))


def test_keeps_the_last_k_checkpoints(tmp_path):
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=2)
    for i in range(1, 6):
        ckpt.save(i, {"w": jnp.full((2,), float(i))}, {"phase": "rl", "phase_step": i})
    assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["4", "5"]
    step, state, _ = ckpt.restore_latest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert step == 5 and float(state["w"][0]) == 5.0


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert RunCheckpointer(str(tmp_path / "none")).restore_latest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


def test_metric_rows_are_cut_back_to_a_checkpoints_count(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.write(step, "sft", {"sft/nll": float(step)})
    assert log.rows == 5
    log.truncate(3)  # a checkpoint saw 3 rows; the attempt that died wrote 2 more
    again = RunLog(tmp_path, tensorboard=False)
    assert log.rows == again.rows == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    again.truncate(None)  # a checkpoint from before rows were counted: keep everything
    assert again.rows == 3


def _tensorboard_scalars(logdir) -> dict:
    """{tag: [(step, value), ...]} over every events file in `logdir`, read as TFRecords."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(logdir)):
        data, i = open(os.path.join(logdir, name), "rb").read(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, round(v.simple_value, 6)))
    return out


def test_tensorboard_is_cut_back_with_the_rows_and_tags_carry_their_phase_once(tmp_path):
    # An attempt killed after logging rows its last checkpoint did not see; the resumed run
    # logs those steps again (here with other values, as on an accelerator they may be).
    log = RunLog(tmp_path)
    for step in range(1, 6):
        log.write(step, "rl", {"reward/score": float(step)})
        log.write(step, "eval", {"eval/accuracy": step / 10})
    log.close()
    again = RunLog(tmp_path)
    again.truncate(6)   # the checkpoint of step 3
    for step in (4, 5):
        again.write(step, "rl", {"reward/score": step + 0.5})
        again.write(step, "eval", {"eval/accuracy": step / 10 + 0.05})
    again.close()
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {
        "rl/reward/score": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 5.5)],
        "eval/accuracy": [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.45), (5, 0.55)]}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_ask_for_a_checkpoint(signum):
    previous = signal.getsignal(signum)
    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert flag.requested and flag.signum == signum
        assert signal.getsignal(signum) == previous  # a second signal acts as it did before
    finally:
        flag.uninstall()
        signal.signal(signum, previous)


def test_a_second_sigint_aborts_at_once():
    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        flag.uninstall()


# ---------------------------------------------------------------------------- one-line errors

def run_driver(tmp_path, *overrides):
    return subprocess.run(train_cmd(tmp_path / "w", *overrides), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(out, expected: str):
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {expected}"), out.stderr[-2000:]


@pytest.mark.parametrize("override, field", [
    ("--config.rollout.group_size=1", "config.rollout.group_size=1"),
    ("--config.algo.advantage=ppo", "config.algo.advantage='ppo'"),
    ("--config.train.micro_batches=3", "config.train.micro_batches=3"),
    ("--config.train.checkpoint_every=0", "config.train.checkpoint_every=0"),
])
def test_config_errors_are_one_line_before_anything_compiles(tmp_path, override, field):
    t0 = time.time()
    out = run_driver(tmp_path, override)
    assert_one_line_error(out, field)
    assert not (tmp_path / "w").exists()  # nothing was built
    assert time.time() - t0 < 60


@pytest.mark.parametrize("override, message", [
    ("--config.rollout.groupsize=8", "config.rollout.groupsize: unknown field "
                                     "(did you mean config.rollout.group_size?)"),
    ("--config.train.steps=ten", "flag --config.train.steps=ten: invalid literal for int()"),
])
def test_a_bad_override_is_exactly_one_line(tmp_path, override, message):
    out = run_driver(tmp_path, override)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith(f"error: {message}"), out.stderr


@pytest.mark.parametrize("config, message", [
    ("configs/no_such.py", "configs/no_such.py: no such config file"),
    ("configs/tpu_v5p.py", "configs/tpu_v5p.py is a family of configs: pass --config configs/tpu_v5p.py:VARIANT, "
                           "VARIANT one of qwen25_7b_grpo, qwen25_7b_tepo_sparse, qwen25_7b_tepo_dense, "
                           "llama31_8b_grpo, llama31_8b_tepo_sparse, llama31_8b_tepo_dense"),
])
def test_a_missing_config_file_or_variant_is_one_line(config, message):
    out = subprocess.run([sys.executable, "-m", "tepo_jax.train", f"--config={config}"], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == f"error: {message}"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from tepo_jax.builtin_tokenizers import cached_tokenizer_dir
    return str(cached_tokenizer_dir("qwen2.5"))


SMALL = ["--config.mode=rl", "--config.data.n_train=8", "--config.data.n_eval=2"]


def test_a_malformed_data_file_is_one_line_naming_file_and_line(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n{"question": "2+2?", "answer": \n')
    out = run_driver(tmp_path, *SMALL, "--config.data.task=math", f"--config.data.train_path={data}",
                     "--config.data.layout=gsm8k", "--config.tools.search=False")
    assert_one_line_error(out, f"{data}:2: invalid JSON")


def test_a_bad_tokenizer_path_is_one_line(tmp_path):
    out = run_driver(tmp_path, *SMALL, f"--config.tokenizer.path={tmp_path / 'no_tokenizer'}")
    assert_one_line_error(out, f"tokenizer directory not found: '{tmp_path / 'no_tokenizer'}'")


def test_a_bad_hf_checkpoint_is_one_line(tmp_path, qwen_tokenizer):
    (tmp_path / "ckpt").mkdir()  # no config.json, no safetensors
    out = run_driver(tmp_path, *SMALL, "--config.model.tiny=False", f"--config.model.hf_checkpoint={tmp_path / 'ckpt'}",
                     f"--config.tokenizer.path={qwen_tokenizer}")
    assert_one_line_error(out, f"{tmp_path / 'ckpt' / 'config.json'}: not found")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_training(tmp_path, qwen_tokenizer):
    """The built-in Qwen2.5 tokenizer (151,665 ids) with a 1,024-row model: SFT used to skip
    every update on NaN losses and exit 0; now it is one line before the model is built."""
    from tepo_jax.testing.hf_models import make_tiny_hf_checkpoint
    make_tiny_hf_checkpoint(str(tmp_path / "small"), "qwen2", vocab_size=1024, seed=0)
    out = run_driver(tmp_path, *SMALL, "--config.mode=sft", "--config.model.tiny=False",
                     f"--config.model.hf_checkpoint={tmp_path / 'small'}", f"--config.tokenizer.path={qwen_tokenizer}")
    assert_one_line_error(out, f"config.tokenizer: the config's tokenizer has 151665 tokens but the model at "
                               f"{tmp_path / 'small'} has a vocabulary of 1024")
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_config_that_cannot_fit_is_refused_before_the_model_is_allocated(tmp_path, qwen_tokenizer):
    t0 = time.time()
    out = run_driver(tmp_path, *SMALL, "--config.model.tiny=False", "--config.model.preset=Qwen2.5-72B",
                     f"--config.tokenizer.path={qwen_tokenizer}")
    assert_one_line_error(out, "rl phase: needs ")
    assert "largest part is" in out.stderr.splitlines()[-1]
    assert time.time() - t0 < 120  # 72B random params were never created


# ---------------------------------------------------------------------------- data and SFT

def test_math_and_qa_read_a_tfds_data_dir(tmp_path):
    from tepo_jax.data import loading
    from tepo_jax.config import defaults
    from tepo_jax.data import jsonl, tfds_builders
    from tepo_jax.data.pipeline import DataSourceError
    from tepo_jax.data.records import QAExample

    train = [QAExample(f"q{i}", f"question {i}?", (f"a{i}",), source="mine") for i in range(5)]
    evals = [QAExample("e0", "held out?", ("b",), source="mine")]
    jsonl.write_jsonl(tmp_path / "train.jsonl", train)
    jsonl.write_jsonl(tmp_path / "dev.jsonl", evals)
    tfds_builders.build(tfds_builders.QaJsonl, tmp_path / "tfds",
                        splits={"train": tmp_path / "train.jsonl", "validation": tmp_path / "dev.jsonl"})
    c = defaults()
    c.data.task, c.data.train_path, c.data.eval_path = "qa", str(tmp_path / "tfds"), str(tmp_path / "tfds")
    got_train, got_eval, _ = loading.examples_from_config(c)
    assert sorted(got_train, key=lambda e: e.id) == train and got_eval == evals
    c.data.task = "math"  # no math_jsonl dataset in that directory
    with pytest.raises(DataSourceError, match=f"^{tmp_path / 'tfds'}: no prepared tfds dataset 'math_jsonl'"):
        loading.examples_from_config(c)


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


# ------------------------------------------------------- resuming a workdir under another config

def test_a_workdir_of_another_model_or_phase_is_refused_and_left_as_it_was(tmp_path):
    """Checkpoints that do not fit the config (another model size) or a mode that does not run
    their phase: one line naming what differs, and the run's metrics and checkpoints untouched
    (a fresh start there would cut metrics.jsonl to nothing and collide with the old steps)."""
    first = run_driver(tmp_path, *TINY_RL, "--config.train.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    workdir = tmp_path / "w"
    metrics_before = (workdir / "metrics.jsonl").read_bytes()
    steps_before = checkpoint_steps(workdir)
    assert steps_before == [1, 2] and len(metric_rows(workdir)) >= 2
    bigger = run_driver(tmp_path, *TINY_RL, "--config.train.steps=2", "--config.model.tiny_hidden=64")
    assert_one_line_error(bigger, f"{workdir / 'checkpoints'}: none of checkpoints [1, 2] restores")
    last = bigger.stderr.strip().splitlines()[-1]
    assert "array shapes differ: params.embed" in last and "model.tiny_hidden: 32 -> 64" in last, last
    sft_only = run_driver(tmp_path, *TINY_RL, "--config.train.steps=2", "--config.mode=sft")
    assert_one_line_error(sft_only, "config.mode='sft': the workdir's checkpoint 2 is from the rl phase")
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before
    assert checkpoint_steps(workdir) == steps_before
    longer = run_driver(tmp_path, *TINY_RL, "--config.train.steps=3")   # a changed setting: said, then run
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "settings changed since it was written: train.steps: 2 -> 3" in longer.stderr
    assert [r["step"] for r in metric_rows(workdir) if r["phase"] == "rl"] == [1, 2, 3]


def test_non_finite_updates_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, monkeypatch):
    """Every SFT loss NaN (a stand-in for a NaN from data or rewards): each update is skipped,
    the parameters stay finite, and past train.max_skipped_updates in a row the run saves them
    and stops with an error naming the step and the setting."""
    from configs.demo_cpu import get_config
    from tepo_jax.sft import trainer
    from tepo_jax.train import UpdatesDiverged, train
    real_loss = trainer.sft_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * jnp.nan, metrics

    monkeypatch.setattr(trainer, "sft_loss", nan_loss)
    c = get_config()
    c.workdir, c.mode = str(tmp_path / "nan"), "sft"
    c.data.n_train, c.data.n_eval = 8, 2
    c.sft.steps, c.sft.batch_size, c.model.tiny_hidden = 6, 4, 32
    c.train.checkpoint_every, c.train.max_skipped_updates = 100, 2
    with pytest.raises(UpdatesDiverged, match=r"^sft step 3: 3 updates in a row were non-finite \(loss .*, "
                                              r"gradient norm nan\) and skipped \(config.train."
                                              r"max_skipped_updates=2\); checkpoint 3 holds the parameters"):
        train(c)
    rows = metric_rows(tmp_path / "nan")
    assert [r["sft/update_skipped"] for r in rows] == [1.0, 1.0, 1.0]
    step, leaves = final_state(tmp_path / "nan")
    assert step == 3 and all(np.isfinite(x).all() for _, x in leaves)
    assert dict(leaves)["['step']"] == 0     # no optimizer update was applied


@pytest.mark.parametrize("inside", ["", "sub"])
def test_a_workdir_that_is_a_file_is_one_line(tmp_path, inside):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    workdir = afile / inside if inside else afile
    out = subprocess.run([sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
                          f"--config.workdir={workdir}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert_one_line_error(out, f"config.workdir='{workdir}': {afile} is a file, not a directory")
    assert afile.read_text() == "not a directory"


def test_an_sft_seq_len_shorter_than_a_trajectory_is_one_line_before_any_step(tmp_path):
    out = run_driver(tmp_path, *SMALL, "--config.mode=sft", "--config.sft.seq_len=16")
    assert_one_line_error(out, "config.sft.seq_len=16 is shorter than an SFT trajectory (")
    assert not metric_rows(tmp_path / "w")     # no step ran
