"""The evaluation CLI on a real (tiny) run: a short SFT run through the training driver, then
`python -m tepo_jax.evaluate` on its HF export and on its orbax checkpoints; the reported
metrics, the trajectories file, one-line errors, and the tokenizer/vocab checks."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tepo_jax import evaluate as ev
from tepo_jax.rl import loop as rl_loop
from tepo_jax.rl.tepo_metrics import call_tools
from tepo_jax.rollout.trajectory import model_mask, read_jsonl

ROOT = Path(__file__).resolve().parents[1]

# 40 SFT steps on 4 examples: enough for the tiny model to make tool calls on them (greedy).
RUN = {"mode": "sft", "model.tiny_hidden": 32, "data.n_train": 4, "data.n_eval": 2,
       "sft.steps": 40, "sft.batch_size": 4, "sft.lr": 2e-2, "sft.redundant_call_rate": 0.0,
       "sft.seq_len": 512, "rollout.max_tokens": 96, "rollout.max_turn_tokens": 48,
       "rollout.cache_len": 512, "train.checkpoint_every": 20}
REPORTED = ("eval/accuracy", "eval/f1", "eval/calls_per_question", "eval/tool_failure_rate")


def flags(workdir):
    return ["--config=configs/demo_cpu.py", f"--config.workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in RUN.items())]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)  # one device, as a user's run
    return e


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)


def config(workdir):
    from configs.demo_cpu import get_config
    c = get_config()
    c.workdir = str(workdir)
    c.update_from_flattened_dict(RUN)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval") / "run"
    out = run_cli("tepo_jax.train", *flags(workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (workdir / "sft_final" / "tokenizer.json").exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
    return workdir


def check_outputs(metrics, out_dir):
    """Reported keys, and trajectories.jsonl that reproduces the metrics when read back."""
    for k in REPORTED:
        assert 0.0 <= metrics[k] < math.inf, k
    trajs = read_jsonl(out_dir / "trajectories.jsonl")
    assert len(trajs) == 4                                   # one greedy rollout per question
    tools = {name for t in trajs for c in t.tool_calls for name in call_tools(c)}
    assert tools and metrics["eval/calls_per_question"] > 0, "the SFT'd model makes no calls"
    for tool in tools:                                       # ΔH statistics per tool
        for stat in ("dh", "dh_std", "frac_reducing", "calls"):
            assert f"eval/tepo/{stat}/{tool}" in metrics, (stat, tool)
    np.testing.assert_equal(rl_loop.eval_metrics(trajs), metrics)   # NaN == NaN here
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved == {k: (None if v != v else v) for k, v in metrics.items()}
    for t in trajs:                                          # per-token entropy on model tokens
        model = model_mask(t.kinds)
        assert t.entropies[model].min() >= 0 and t.entropies[model].mean() > 0.01
        assert not t.entropies[~model].any()
    return trajs


@pytest.fixture(scope="module")
def hf_eval(run):
    """`python -m tepo_jax.evaluate` on the run's sft_final: (completed process, out dir)."""
    out_dir = run / "eval_hf"
    out = run_cli("tepo_jax.evaluate", *flags(run), f"--checkpoint={run / 'sft_final'}",
                  "--split=train", f"--out={out_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return out, out_dir


def test_cli_on_the_hf_export(hf_eval):
    out, out_dir = hf_eval
    printed = dict(line.split() for line in out.stdout.strip().splitlines())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(printed) == set(metrics)
    for k in REPORTED:
        assert float(printed[k]) == pytest.approx(metrics[k], abs=1e-4)
    check_outputs({k: math.nan if v is None else v for k, v in metrics.items()}, out_dir)


def test_orbax_checkpoints_give_the_policy_of_the_export(run, hf_eval, tmp_path):
    # The latest orbax step (40) holds the params sft_final was exported from: the same
    # greedy rollouts (this process has 8 CPU devices, the CLI had one).
    metrics = ev.evaluate(config(run), str(run / "checkpoints"), split="train", out=str(tmp_path))
    trajs = check_outputs(metrics, tmp_path)
    hf_trajs = read_jsonl(hf_eval[1] / "trajectories.jsonl")
    assert [t.token_ids.tolist() for t in trajs] == [t.token_ids.tolist() for t in hf_trajs]
    hf = json.loads((hf_eval[1] / "metrics.json").read_text())
    for k in REPORTED:
        assert metrics[k] == hf[k], k


def test_bad_checkpoint_is_one_line_error(run, tmp_path):
    out = run_cli("tepo_jax.evaluate", *flags(run), f"--checkpoint={tmp_path / 'nope'}")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == f"error: --checkpoint={tmp_path / 'nope'}: no such directory", out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    # a run's workdir instead of its checkpoints dir: caught before anything is built
    with pytest.raises(FileNotFoundError, match="did you mean .*checkpoints"):
        ev.checkpoint_kind(str(run))
    assert ev.checkpoint_kind(str(run / "sft_final")) == ev.HF
    assert ev.checkpoint_kind(str(run / "checkpoints")) == ev.ORBAX


def test_a_wrong_config_variant_is_one_line_error(tmp_path):
    out = run_cli("tepo_jax.evaluate", "--config=configs/gpu_qwen25.py:7b", f"--checkpoint={tmp_path}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("error: configs/gpu_qwen25.py: unknown variant '7b'; "
                                  "the variants are 0p5b, 1p5b"), out.stderr[-2000:]


def test_tokenizer_of_the_checkpoint_must_match(run, tmp_path):
    from tepo_jax.tiny_tokenizer import build_tiny_tokenizer
    from tepo_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "sft_final")
    vocab = len(tok)
    ev.check_vocab(vocab, tok, run / "sft_final")                 # the export agrees
    with pytest.raises(ValueError, match=f"{vocab} tokens but the model .* vocabulary of {vocab - 1}"):
        ev.check_vocab(vocab - 1, tok, run / "sft_final")
    # an export whose tokenizer is another one: evaluate refuses, naming the fix
    other = tmp_path / "other"
    shutil.copytree(run / "sft_final", other)
    for f in other.glob("*token*"):
        f.unlink()
    build_tiny_tokenizer(["a completely different corpus of words"] * 50, other, vocab_size=300)
    with pytest.raises(ValueError, match=f"differs from the config's.*tokenizer.path={other}"):
        ev.evaluate(config(run), str(other), split="train", out=str(tmp_path / "o"))


# ----------------------------------------------------------------------------- bad input, before work


@pytest.fixture
def no_setup(monkeypatch):
    """Fails a test that gets as far as building the experiment (data, tokenizer, tools)."""
    def boom(*a, **k):
        raise AssertionError("experiment.setup ran: the input was not checked first")
    monkeypatch.setattr(ev.experiment, "setup", boom)


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")   # an HF checkpoint by its layout; never loaded here
    return d


def test_negative_counts_are_refused(hf_dir, tmp_path, no_setup):
    c = config(tmp_path / "wd")
    with pytest.raises(ValueError, match="^--limit must be >= 0 .*got -126$"):
        ev.evaluate(c, str(hf_dir), limit=-126)
    with pytest.raises(ValueError, match="^--samples must be >= 0 .*got -3$"):
        ev.evaluate(c, str(hf_dir), samples=-3)


def test_an_unwritable_out_is_refused_before_any_work(hf_dir, tmp_path, no_setup):
    afile = tmp_path / "afile"
    afile.write_text("x")
    c = config(tmp_path / "wd")
    for out in (afile / "sub", afile):
        with pytest.raises(ValueError, match=f"^--out={out}: {afile} is a file, not a directory$"):
            ev.evaluate(c, str(hf_dir), out=str(out))
    (tmp_path / "o" / "metrics.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="metrics.json is a directory"):
        ev.evaluate(c, str(hf_dir), out=str(tmp_path / "o"))
    assert ev.output_dir(c, str(tmp_path / "new" / "dir")).is_dir()          # created, nested
    assert ev.output_dir(c, None) == tmp_path / "wd" / "evaluate"


def test_a_file_as_checkpoint_is_named_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="a file, not a checkpoint directory"):
        ev.checkpoint_kind(str(f))


def test_cli_negative_limit_is_one_line_error(tmp_path):
    out = run_cli("tepo_jax.evaluate", *flags(tmp_path / "wd"), f"--checkpoint={tmp_path}", "--limit=-126")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: --limit must be >= 0 (0: all questions), got -126"
    assert not (tmp_path / "wd").exists()


# ----------------------------------------------------------------------------- a run's orbax tokenizer


def test_orbax_checkpoints_are_evaluated_with_the_runs_tokenizer(run, hf_eval, tmp_path):
    """From another workdir (whose tiny tokenizer would be rebuilt, possibly with other ids),
    the run's own tokenizer is used: nothing is rebuilt and the rollouts are the run's."""
    other = tmp_path / "other"
    c = config(other)
    assert ev.run_tokenizer_dir(c, str(run / "checkpoints")) == run / "tokenizer"
    assert ev.run_tokenizer_dir(c, str(run / "sft_final")) is None
    metrics = ev.evaluate(c, str(run / "checkpoints"), split="train", limit=1, out=str(tmp_path / "o"))
    assert not (other / "tokenizer").exists() and c.tokenizer.path == ""   # the caller's config untouched
    trajs = read_jsonl(tmp_path / "o" / "trajectories.jsonl")
    hf_trajs = read_jsonl(hf_eval[1] / "trajectories.jsonl")
    assert len(trajs) == 1 and trajs[0].token_ids.tolist() == hf_trajs[0].token_ids.tolist()
    assert metrics["eval/calls_per_question"] == float(trajs[0].num_calls)


def test_orbax_checkpoints_refuse_another_tokenizer(run, tmp_path):
    """A --config.tokenizer.path with the same tokens under other ids (as a tiny tokenizer rebuilt
    with another seed has) is refused, naming both tokenizers."""
    other = tmp_path / "tok"
    shutil.copytree(run / "tokenizer", other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [t for t in vocab if t.isalpha() and len(t) > 2][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    c = config(run)
    c.tokenizer.path = str(other)
    with pytest.raises(ValueError, match=f"^{run / 'tokenizer'}: the checkpoint's tokenizer .* differs "
                                         f"from the config's, {other} .*tokenizer.path={run / 'tokenizer'}$"):
        ev.evaluate(c, str(run / "checkpoints"), split="train", out=str(tmp_path / "o"))


def test_orbax_checkpoints_of_another_model_size(run, tmp_path):
    c = config(run)
    c.model.tiny_hidden = 16
    with pytest.raises(ValueError) as e:
        ev.evaluate(c, str(run / "checkpoints"), split="train", out=str(tmp_path / "o"))
    msg = str(e.value)
    assert msg.startswith(f"--checkpoint={run / 'checkpoints'}: {run / 'checkpoints'}: none of checkpoints")
    assert msg.endswith("evaluate with the config the run was trained with (model size, vocabulary)")
    assert "shapes differ" in msg and "new workdir" not in msg and len(msg.splitlines()) == 1
