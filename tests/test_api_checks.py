"""A Trainer's parts are used as given and checked before work: eval rows without train rows
are the ones evaluated, train rows alone say that nothing is evaluated; a prompt longer than
the rollout's cache, a bad tool name, or tools in a function-calling run are one line before
any model is built; a resumed workdir refuses other training data and warns of another
reward, tools or eval set."""
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from tepo_jax import experiment, train
from tepo_jax.api import Trainer
from tepo_jax.config import defaults
from tepo_jax.errors import ConfigError
from tepo_jax.plugins import PluginError, as_examples
from tepo_jax.rollout.agent import encode_prompt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def closeness(text, gold):
    return 1.0 if gold[0] in text else 0.0


def calc(expression: str) -> str:
    """evaluates an arithmetic expression"""
    return str(eval(expression, {"__builtins__": {}}))


ROWS = [{"question": f"What is {a} * {b}?", "answer": str(a * b)} for a, b in [(17, 23), (31, 12), (45, 19)]]


def tiny(tmp_path, **fields):
    c = defaults()
    c.workdir, c.mode, c.model.tiny, c.algo.advantage = str(tmp_path / "run"), "rl", True, "grpo"
    c.model.tiny_hidden, c.model.tiny_layers, c.model.tiny_heads, c.model.tiny_kv_heads = 32, 1, 2, 1
    c.tools.python = c.tools.search = False
    c.data.prompt, c.data.n_train, c.data.n_eval = "short", 4, 2
    c.data.mix.lookup = c.data.mix.in_context = 0.0   # the synthetic families that need search
    c.train.steps, c.data.prompts_per_step, c.rollout.group_size = 1, 2, 2
    c.rollout.max_tokens, c.rollout.max_turn_tokens, c.rollout.cache_len = 16, 8, 256
    c.log.tensorboard = False
    for key, value in fields.items():
        group, name = key.split("__")
        c[group][name] = value
    return c


def opened(config, **parts):
    """experiment.setup (data, tokenizer, tools; no model) on a Trainer's parts, closed after."""
    exp = experiment.setup(config, Trainer(config, **parts).parts)
    exp.close()
    return exp


# ----------------------------------------------------------------------------- data

def test_eval_rows_without_train_rows_are_the_ones_evaluated(tmp_path):
    c = tiny(tmp_path, tools__python=True)   # the synthetic task's arithmetic needs python
    exp = opened(c, eval_data=[{"question": "MY QUESTION?", "answer": "7"}])
    assert [e.question for e in exp.eval_examples] == ["MY QUESTION?"]
    assert len(exp.train_examples) == c.data.n_train     # training stays config.data's


def test_train_rows_alone_warn_that_nothing_is_evaluated(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "tepo_jax"):
        exp = opened(tiny(tmp_path), reward=closeness, tools=[calc], train_data=ROWS)
    assert exp.eval_examples == []
    assert "train_data without eval_data" in caplog.text and "no evaluation will run" in caplog.text


def test_train_rows_keep_config_datas_eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"id": "e0", "question": "What is 2 * 3?", "answer": "6"}\n')
    exp = opened(tiny(tmp_path, data__task="math", data__eval_path=str(path)), train_data=ROWS)
    assert [e.id for e in exp.eval_examples] == ["e0"]


# ----------------------------------------------------------------------------- prompt length

def test_a_prompt_longer_than_the_cache_is_one_line_at_setup(tmp_path):
    long_row = {"id": "long-one", "question": "What is 2 * 3? " + "7 " * 400, "answer": "6"}
    with pytest.raises(ConfigError) as e:
        opened(tiny(tmp_path), train_data=ROWS, eval_data=[long_row])
    msg = str(e.value)
    assert "config.rollout.cache_len=256" in msg and "'long-one'" in msg and "\n" not in msg
    tokens = int(msg.split(" is ")[1].split()[0])
    assert tokens > 256 and f"cache_len >= {tokens + 16}" in msg


def test_a_prompt_that_leaves_less_than_max_tokens_is_a_warning(tmp_path, caplog):
    c = tiny(tmp_path)
    rows = [*ROWS, {"id": "wordy", "question": "Please, what is 17 * 23 times 2?", "answer": "782"}]
    base = opened(c, train_data=rows, eval_data=rows)
    lengths = {e.id: len(encode_prompt(base.tokenizer, e, base.tools, c.data.prompt)) for e in base.train_examples}
    assert max(lengths, key=lengths.get) == "wordy" and sorted(lengths.values())[-2] < lengths["wordy"]
    c.rollout.cache_len = lengths["wordy"] + 8     # every prompt fits; 8 of max_tokens=16 do not
    with caplog.at_level(logging.WARNING, "tepo_jax"):
        opened(c, train_data=rows, eval_data=rows)
    assert "leave less than rollout.max_tokens=16" in caplog.text
    assert f"(longest: example 'wordy', {lengths['wordy']} tokens)" in caplog.text


# ----------------------------------------------------------------------------- tools

class Named:
    def __init__(self, name):
        self.name = name

    def run(self, argument, timeout):
        raise AssertionError("never called")


def test_a_bad_tool_name_is_refused_when_the_trainer_is_built(tmp_path):
    c = tiny(tmp_path)
    with pytest.raises(PluginError, match="tool name 'my tool'"):
        Trainer(c, tools=[Named("my tool")], train_data=ROWS)
    with pytest.raises(PluginError, match="tool name 'calc' is used twice"):
        Trainer(c, tools=[calc, Named("calc")], train_data=ROWS)
    assert not (tmp_path / "run").exists()   # before anything was built


def test_tools_in_a_function_calling_run_are_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import function_calling_cpu
    finally:
        sys.path.remove(str(ROOT / "configs"))
    c = function_calling_cpu.get_config()
    c.workdir = str(tmp_path / "run")
    with pytest.raises(PluginError, match=r"tools \['calc'\]: data.task='function_calling'"):
        Trainer(c, reward=closeness, tools=[calc])


def test_a_bad_tool_name_on_the_command_line_is_one_line(tmp_path):
    (tmp_path / "badtools.py").write_text(
        "class Spaced:\n    name = 'my tool'\n    def run(self, argument, timeout):\n        return None\n")
    out = subprocess.run(
        [sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
         f"--config.workdir={tmp_path / 'run'}", "--config.tools.extra=badtools:Spaced"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: tool name 'my tool'"), out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- resuming

def always_one(text, gold):
    return 1.0


def fingerprint(tmp_path, reward=closeness, tools=(calc,), rows=ROWS, evals=ROWS[:1]):
    c = tiny(tmp_path)
    return train.run_fingerprint(c, opened(c, reward=reward, tools=list(tools), train_data=rows, eval_data=evals))


def test_the_fingerprint_names_the_reward_and_tools_and_digests_the_data(tmp_path):
    fp = fingerprint(tmp_path)
    assert fp["reward"] == f"{__name__}:closeness"
    assert fp["tools"] == {"calc": "evaluates an arithmetic expression"}
    assert fp["train_data"] == train.examples_hash(as_examples(ROWS, "train_data")[0])
    assert fp["train_data"] != train.examples_hash(as_examples(ROWS[::-1], "train_data")[0])   # order counts
    assert fp["eval_data"] != fingerprint(tmp_path, evals=ROWS[1:2])["eval_data"]


def test_resuming_with_other_training_data_is_refused(tmp_path):
    extra = {"phase": "rl", "phase_step": 1, "parts": fingerprint(tmp_path)}
    now = fingerprint(tmp_path, rows=ROWS[:2])
    with pytest.raises(ConfigError, match="training data differs .* use a new workdir") as e:
        train.check_resumable(tiny(tmp_path), 1, extra, now)
    assert "\n" not in str(e.value)


def test_resuming_with_another_reward_tools_or_eval_set_is_said_once(tmp_path, caplog):
    extra = {"phase": "rl", "phase_step": 1, "parts": fingerprint(tmp_path)}
    now = fingerprint(tmp_path, reward=always_one, tools=[Named("lookup")], evals=ROWS[1:])
    with caplog.at_level(logging.WARNING, "tepo_jax"):
        train.check_resumable(tiny(tmp_path), 1, extra, now)
    said = [r.getMessage() for r in caplog.records if "parts changed" in r.getMessage()]
    assert len(said) == 1
    assert f"reward: '{__name__}:closeness' -> '{__name__}:always_one'" in said[0]
    assert "tools: {'calc': " in said[0] and "-> {'lookup': ''}" in said[0] and "eval_data: " in said[0]


def test_a_checkpoint_without_a_fingerprint_still_resumes(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "tepo_jax"):
        train.check_resumable(tiny(tmp_path), 1, {"phase": "rl", "phase_step": 1}, fingerprint(tmp_path))
    assert "parts changed" not in caplog.text


def test_a_resumed_trainer_run_refuses_new_rows_and_leaves_the_workdir(tmp_path):
    """End to end: the fingerprint is stored with the checkpoint and read back on resume."""
    c = tiny(tmp_path)
    Trainer(c, reward=closeness, tools=[calc], train_data=ROWS, eval_data=ROWS[:1]).run()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    c.train.steps = 2
    with pytest.raises(ConfigError, match="training data differs from that of the workdir's checkpoint 1"):
        Trainer(c, reward=closeness, tools=[calc], train_data=ROWS[:2], eval_data=ROWS[:1]).run()
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics
