"""The library entry point (docs/api.md): the example runs as written; rewards and tools named
by import path are used; bad ones are one-line errors; RL runs without any tool."""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tepo_jax.config import defaults
from tepo_jax.errors import ConfigError
from tepo_jax.plugins import PluginError, as_examples, as_reward, as_tool, parts_from_config
from tepo_jax.rollout.trajectory import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]


def doc_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def rl_rows(workdir: pathlib.Path, step: int) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["phase"] == "rl" and r["step"] == step)


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch):
    code = doc_example()
    assert len(code.strip().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "api_example"}
    exec(compile(code, "docs/api.md", "exec"), namespace)   # noqa: S102  (the docs, as a user runs them)
    closeness, calc = namespace["closeness"], namespace["calc"]
    run = tmp_path / "runs" / "api_example"
    trajs = read_jsonl(run / "trajectories" / "rl_000001.jsonl")
    assert len(trajs) == 2 * 4                               # prompts_per_step × group_size
    # The user's tool was called, through the bridge, and its result is what the model read.
    calls = [c for t in trajs for c in t.tool_calls]
    assert calls and all(c.name == "calc" for c in calls)
    for c in calls:
        if c.status == "ok":
            assert c.result == calc(c.arguments)
    assert any(c.status == "ok" for c in calls)
    # The user's reward is each trajectory's reward, and GRPO's advantages read it.
    rewards = [closeness(t.final_text, t.gold) for t in trajs]
    assert [t.reward for t in trajs] == pytest.approx(rewards)
    row = rl_rows(run, 1)
    assert row["adv/reward_mean"] == pytest.approx(np.mean(rewards), abs=1e-6)
    groups = [{t.reward for t in trajs if t.group_id == g} for g in {t.group_id for t in trajs}]
    if any(len(g) > 1 for g in groups):                      # a group with different rewards
        assert row["adv/zero_groups"] < 1.0 and row["adv/std"] > 0


def test_rl_without_tools_runs_plain_grpo_on_a_reward(tmp_path):
    from tepo_jax.api import Trainer
    c = defaults()
    c.workdir, c.mode, c.model.tiny, c.algo.advantage = str(tmp_path / "run"), "rl", True, "tepo_dense"
    c.tools.python = c.tools.search = False
    c.train.steps, c.data.prompts_per_step = 1, 2
    c.rollout.max_tokens, c.rollout.max_turn_tokens, c.rollout.cache_len = 24, 24, 128
    rows = [{"question": f"Name a number above {i}.", "answer": str(i + 1)} for i in range(4)]
    Trainer(c, reward=lambda text, gold: len(text) / 100.0, train_data=rows, eval_data=rows[:1]).run()
    trajs = read_jsonl(tmp_path / "run" / "trajectories" / "rl_000001.jsonl")
    assert all(t.num_calls == 0 for t in trajs)
    assert [t.reward for t in trajs] == pytest.approx([len(t.final_text) / 100.0 for t in trajs])
    assert rl_rows(tmp_path / "run", 1)["tepo/no_call_rate"] == 1.0


# ----------------------------------------------------------------------------- import paths

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mypkg_rewards.py").write_text(
        "def score(text, gold):\n    return 0.25\n\n"
        "def on_trajectory(traj):\n    return float(traj.num_calls)\n\n"
        "def three(a, b, c):\n    return 0.0\n\n"
        "def calc(expression):\n    '''adds numbers'''\n    return str(sum(map(int, expression.split('+'))))\n\n"
        "class Echo:\n    name = 'echo'\n    def run(self, argument, timeout):\n"
        "        from tepo_jax.tools.base import ToolResult, ToolStatus\n"
        "        return ToolResult(argument, ToolStatus.OK)\n\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mypkg_rewards"


def test_import_path_reward_and_tools_are_used(user_module):
    c = defaults()
    c.reward.fn = f"{user_module}:score"
    c.tools.extra = f"{user_module}:calc, {user_module}:Echo"
    parts = parts_from_config(c)
    assert parts.reward("anything", "gold", None).score == 0.25
    assert [t.name for t in parts.tools] == ["calc", "echo"]
    assert parts.tools[0].run("2+3", 1.0).text == "5"
    assert parts.tools[1].run("hi", 1.0).text == "hi"
    assert parts.tool_descriptions == {"calc": "adds numbers", "echo": ""}


def test_import_path_reward_reaches_the_rollout_scores(user_module, tmp_path):
    """Through the CLI: the trajectory-level reward from --config.reward.fn scores every
    trajectory (its value is the call count, which no built-in reward gives)."""
    out = subprocess.run(
        [sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
         f"--config.workdir={tmp_path / 'run'}", "--config.mode=rl", "--config.train.steps=1",
         "--config.data.n_train=8", "--config.data.n_eval=2", "--config.data.prompts_per_step=2",
         f"--config.reward.fn={user_module}:on_trajectory"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert out.returncode == 0, out.stderr[-2000:]
    trajs = read_jsonl(tmp_path / "run" / "trajectories" / "rl_000001.jsonl")
    assert [t.reward for t in trajs] == [float(t.num_calls) for t in trajs]


@pytest.mark.parametrize("field,value,needle", [
    ("reward.fn", "mypkg_rewards:missing", "has no 'missing'"),
    ("reward.fn", "no_such_pkg.mod:score", "cannot import 'no_such_pkg.mod'"),
    ("reward.fn", "mypkg_rewards", "expected package.module:NAME"),
    ("reward.fn", "mypkg_rewards:three", "takes 3 required arguments"),
    ("reward.fn", "mypkg_rewards:NOT_CALLABLE", "is not callable"),
    ("tools.extra", "mypkg_rewards:NOT_CALLABLE", "neither a tool"),
    ("tools.extra", "mypkg_rewards:three", "must take one argument"),
])
def test_a_bad_import_path_is_a_one_line_error(user_module, field, value, needle):
    c = defaults()
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(PluginError, match=re.escape(needle)) as e:
        parts_from_config(c)
    assert f"config.{field}" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_import_path_on_the_command_line_is_one_line(user_module, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tepo_jax.train", "--config=configs/demo_cpu.py",
         f"--config.workdir={tmp_path / 'run'}", "--config.reward.fn=mypkg_rewards:missing"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert errors[-1] == "error: config.reward.fn 'mypkg_rewards:missing': module 'mypkg_rewards' has no 'missing'"
    assert "Traceback" not in out.stderr


def test_python_objects_are_checked_when_given():
    with pytest.raises(PluginError, match="returned str"):
        as_reward(lambda text, gold: "1")("t", "g", None)
    assert as_reward(lambda traj: 2)("t", "g", None).score == 2.0
    tool = as_tool(lambda x: 1 / 0)
    result = tool.run("x", 1.0)
    assert result.status.value == "error" and "ZeroDivisionError" in result.text
    examples, demos = as_examples([{"question": "q", "answer": "1", "demonstration": ["<answer>1</answer>"]},
                                   {"question": "p", "answers": ["a"]}])
    assert [e.task for e in examples] == ["math", "qa"] and demos == {examples[0].id: ["<answer>1</answer>"]}
    with pytest.raises(PluginError, match=r"data\[0\]: missing field 'question'"):
        as_examples([{"answer": "1"}])
    with pytest.raises(ConfigError, match="no examples"):
        as_examples([])


def test_data_as_a_grain_dataset_or_a_jsonl_file(tmp_path):
    import grain
    from tepo_jax.api import Trainer
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    c = defaults()
    c.workdir, c.model.tiny = str(tmp_path / "run"), True
    with pytest.raises(ConfigError, match="config.tools.search_corpus"):   # your data brings no corpus
        Trainer(c, train_data=rows)
    c.tools.search = False
    trainer = Trainer(c, train_data=grain.MapDataset.source(rows))
    assert [e.answer for e in trainer.parts.train_examples] == [r["answer"] for r in rows]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", **r}) + "\n" for i, r in enumerate(rows)))
    with pytest.raises(PluginError, match="set it to 'math' or 'qa'"):
        Trainer(c, train_data=str(path))
    c.data.task = "math"
    assert [e.id for e in Trainer(c, train_data=str(path)).parts.train_examples] == [f"q{i}" for i in range(5)]
    with pytest.raises(PluginError, match="does not exist"):
        Trainer(c, train_data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(PluginError, match="expected a list of dicts"):
        Trainer(c, train_data=42)


@pytest.mark.parametrize("row,needle", [
    ({"question": "q", "answers": "paris"}, "train_data[0].answers: expected a list of strings, got str"),
    ({"question": "q", "answer": None}, "train_data[0].answer: expected a string, got None"),
    ({"question": "q", "answr": "1"},
     "train_data[0]: missing field 'answer' (math) or 'answers' (QA); unknown field 'answr' (did you mean 'answer'?)"),
    ({"question": "q", "task": "math"}, "train_data[0]: missing field 'answer' (task 'math')"),
    ({"question": ["q"], "answer": "1"}, "train_data[0].question: expected a string, got list"),
    ({"question": "q", "answers": ["a", 1]}, "train_data[0].answers: expected a list of strings, got int at [1]"),
    ({"question": "q", "answer": "1", "answers": ["1"]}, "train_data[0]: has both 'answer' (math) and 'answers' (QA)"),
    (["What is 2+2?"], "train_data[0]: expected a dict such as {'question': ..., 'answer': ...}, got list"),
    (None, "train_data[0]: expected a dict such as {'question': ..., 'answer': ...}, got NoneType"),
    ({"question": "q", "answer": "1", "demonstration": ["The answer is 1."]},
     "train_data[0].demonstration: the last turn ('The answer is 1.') has no <answer>…</answer>"),
])
def test_bad_rows_name_the_row_and_the_field(row, needle):
    with pytest.raises(PluginError) as e:
        as_examples([row], "train_data")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_rows_and_jsonl_lines_share_one_check(tmp_path):
    from tepo_jax.data import jsonl
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": "paris"}) + "\n")
    with pytest.raises(jsonl.JsonlError, match=r"qa\.jsonl:1: field 'answers': expected a list of strings, got str"):
        jsonl.read_jsonl(path, "qa")
    examples, _ = as_examples([{"question": "q", "answers": ["paris", "Paris"]}, {"question": "r", "answer": 7}])
    assert examples[0].gold == ["paris", "Paris"] and examples[1].gold == ["7"]
    with pytest.raises(PluginError, match=r"data\[1\]: id 'a' is also the id of data\[0\]"):
        as_examples([{"id": "a", "question": "q", "answer": "1"}, {"id": "a", "question": "r", "answer": "2"}])


class _Traj:
    prompt_id = "train_data-0"


def _score(fn, examples=None):
    rows = [{"question": "What is the capital of France, the country?", "answers": ["paris"]}]
    examples = examples if examples is not None else as_examples(rows, "train_data")[0]
    return as_reward(fn, examples=[examples])("text", ["paris"], _Traj())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -np.inf, np.float32("nan")])
def test_a_non_finite_reward_names_the_reward_and_the_example(value):
    def my_reward(text, gold):
        return value
    with pytest.raises(PluginError) as e:
        _score(my_reward)
    msg = str(e.value)
    assert "reward test_a_non_finite_reward_names_the_reward_and_the_example.<locals>.my_reward returned" in msg
    assert "finite" in msg and "example 'train_data-0' ('What is the capital" in msg


def test_a_non_finite_reward_result_field_is_refused():
    from tepo_jax.rewards.base import RewardResult
    bad = RewardResult(score=1.0, f1=1.0, em=1.0, malformed=False, extracted=None, parts={"fmt": float("nan")})
    with pytest.raises(PluginError, match=r"RewardResult whose parts\['fmt'\] is nan"):
        _score(lambda text, gold: bad)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(1), np.array(0.5), 1, 0.5])
def test_numpy_numbers_are_rewards(value):
    result = _score(lambda text, gold: value)
    assert type(result.score) is float and result.score == float(value)
    json.dumps(result.score)


def test_jax_and_torch_scalars_are_rewards_and_their_arrays_and_bools_are_not():
    import jax.numpy as jnp
    import torch

    for value in (jnp.float32(0.25), jnp.asarray(0.25), torch.tensor(0.25)):
        result = _score(lambda text, gold: value)
        assert type(result.score) is float and result.score == 0.25
    for value, name in ((jnp.asarray([0.25, 0.5]), "ArrayImpl"), (jnp.asarray(True), "bool"),
                        (torch.tensor(True), "bool")):
        with pytest.raises(PluginError, match=rf"returned {name}; it must return a float"):
            _score(lambda text, gold: value)
    with pytest.raises(PluginError, match="finite"):
        _score(lambda text, gold: jnp.float32(jnp.nan))


@pytest.mark.parametrize("value,name", [(True, "bool"), (np.bool_(True), "bool"), (None, "NoneType"), ("1", "str")])
def test_a_reward_of_the_wrong_type_names_its_type(value, name):
    with pytest.raises(PluginError, match=rf"returned {name}; it must return a float or a RewardResult \(on example"):
        _score(lambda text, gold: value)


def test_a_reward_that_raises_names_the_reward_and_the_example():
    def broken(text, gold):
        return 1 / 0
    with pytest.raises(PluginError) as e:
        _score(broken)
    assert "reward test_a_reward_that_raises_names_the_reward_and_the_example.<locals>.broken raised " \
           "ZeroDivisionError: division by zero (on example 'train_data-0' ('What is the capital" in str(e.value)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
