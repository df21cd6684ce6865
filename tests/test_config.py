"""Experiment configs: every shipped config validates, documents commands that work, and gets
through start-up (a preflight) up to the point where it needs its real files and hardware;
bad fields are one-line errors naming them."""
import glob
import importlib.util
import json
import os
import shlex

import jax
import ml_collections
import pytest

from tepo_jax import cli, experiment, multihost, policy, sizing
from tepo_jax.config import ConfigError, defaults, validate
from tepo_jax.models.config import to_hf_config
from tepo_jax.models.presets import preset
from tepo_jax.sharding import MeshConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
PLACEHOLDER = "/path/to/"


def load(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launcher(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_commands(doc: str, prefix: str) -> list[list[str]]:
    """argv of each docstring line (after its `Heading:`) that starts with `prefix`."""
    out = []
    for line in doc.splitlines():
        text = line.split(":", 1)[1].strip() if line[:1].isupper() and ":" in line else line.strip()
        if text.startswith(prefix):
            out.append(shlex.split(text))
    return out


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_validate_and_document_themselves(path):
    module = load(path)
    doc = module.__doc__ or ""
    for heading in ("Command:", "Hardware:", "Runtime:"):
        assert heading in doc, f"{path} docstring lacks {heading}"
    validate(module.get_config())
    name = os.path.relpath(path, ROOT)
    (train,) = doc_commands(doc, "python -m tepo_jax.train")
    assert f"--config={name}" in train, f"{path}: the Command: line runs another config"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_docstring_launch_and_size_commands_work(path, capsys, monkeypatch):
    """Every `python launch/X.py ...` line runs with --dry-run; every `tepo_jax size` line fits."""
    monkeypatch.chdir(ROOT)
    doc, name = load(path).__doc__, os.path.relpath(path, ROOT)
    if "launch/" in doc or "_v5p" in name or name.startswith("configs/gpu_"):
        assert doc_commands(doc, "python launch/"), f"{path}: names a launcher but gives no launch command"
    for argv in doc_commands(doc, "python launch/"):
        script = os.path.splitext(os.path.basename(argv[1]))[0]
        rest = argv[2:]
        cut = rest.index("--") if "--" in rest else len(rest)
        assert launcher(script).main(rest[:cut] + ["--dry-run"] + rest[cut:]) == 0, argv
        assert name in capsys.readouterr().out
    for argv in doc_commands(doc, "tepo_jax size"):
        assert cli.main(argv[1:]) == 0, f"{path}: {shlex.join(argv)} does not fit:\n{capsys.readouterr().out}"


def test_at_least_the_required_configs_exist():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    for adv in ("grpo", "tepo_sparse", "tepo_dense"):
        assert f"qwen25_7b_{adv}_v5p" in names and f"llama31_8b_{adv}_v5p" in names
    assert "demo_cpu" in names and "gpu_qwen25_0p5b" in names


# ---------------------------------------------------------------------------- preflight

def _size_args(doc: str):
    """The parsed `tepo_jax size` line of a docstring, or None."""
    lines = doc_commands(doc, "tepo_jax size")
    return cli.build_parser().parse_args(lines[0][1:]) if lines else None


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stand_in_data(layout: str, path):
    """Two rows in `layout`, as the real datasets have them."""
    if layout == "musique":
        para = {"title": "Ada", "paragraph_text": "Ada was born in Lyon.", "is_supporting": True}
        rows = [{"id": f"m{i}", "question": "Where was Ada born?", "answer": "Lyon", "answer_aliases": [],
                 "paragraphs": [para]} for i in range(2)]
    elif layout == "gsm8k":
        rows = [{"question": f"What is {i} + 1?", "answer": f"{i} plus 1.\n#### {i + 1}"} for i in range(2)]
    else:
        raise AssertionError(f"no stand-in data for layout {layout!r}: add one")
    return _write_jsonl(path, rows)


def _stand_in_checkpoint(model: str, path):
    """config.json of the named preset: what the model's shape is read from before loading."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_hf_config(preset(model))))
    return str(path)


def with_stand_in_files(config, size_args, tmp_path):
    """`config` with every /path/to/ placeholder replaced by a small file of the same kind."""
    from tepo_jax.builtin_tokenizers import cached_tokenizer_dir
    config = ml_collections.ConfigDict(config.to_dict())
    config.workdir = str(tmp_path / "run")
    model = size_args.model if size_args else None
    stand_ins = {
        "model.hf_checkpoint": lambda: _stand_in_checkpoint(model, tmp_path / "hf"),
        "tokenizer.path": lambda: str(cached_tokenizer_dir(
            "llama3.1" if preset(model).family == "llama" else "qwen2.5")),
        "data.train_path": lambda: _stand_in_data(config.data.layout, tmp_path / "train.jsonl"),
        "data.eval_path": lambda: _stand_in_data(config.data.layout, tmp_path / "eval.jsonl"),
        "tools.search_corpus": lambda: _write_jsonl(tmp_path / "corpus.jsonl", [
            {"id": "p0", "title": "Ada", "text": "Ada was born in Lyon."}]),
    }
    for group, fields in config.items():
        for key, value in (fields.items() if isinstance(fields, ml_collections.ConfigDict) else ()):
            if isinstance(value, str) and value.startswith(PLACEHOLDER):
                name = f"{group}.{key}"
                assert name in stand_ins, f"placeholder config.{name}: add a stand-in to this test"
                assert model or name not in ("model.hf_checkpoint", "tokenizer.path"), \
                    "a config with a placeholder checkpoint needs a `Size:` line naming its --model"
                config[group][key] = stand_ins[name]()
    return validate(config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_pass_preflight(path, tmp_path):
    """validate -> experiment.setup (data, tokenizer, tools: what crashed when a config named no
    search corpus) on stand-in files -> the model's shape from its config.json -> the memory
    check on the hardware of the `Size:` line (else this machine). It stops where the real run
    allocates the model."""
    module = load(path)
    size_args = _size_args(module.__doc__)
    config = with_stand_in_files(module.get_config(), size_args, tmp_path)
    exp = experiment.setup(config)
    try:
        assert exp.train_examples and set(exp.tools) == set(exp.bridge.tools)  # every enabled tool was built
        model_cfg = policy.target_model_config(config, len(exp.tokenizer))
        devices = size_args.devices if size_args else jax.device_count()
        mesh = sizing.abstract_mesh(MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor), devices)
        estimates = policy.check_config_fits(config, model_cfg, mesh, device_kind=size_args and size_args.device_kind)
        assert set(estimates) == set(policy.config_workloads(config))
    finally:
        exp.close()


# ---------------------------------------------------------------------------- rules

def tiny():
    c = defaults()
    c.model.tiny = True
    return c


def qa_without_corpus(c):
    c.data.update(task="qa", train_path="/data/musique.jsonl")


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.algo.update(advantage="ppo"), "config.algo.advantage"),
    (lambda c: c.rollout.update(group_size=1), "config.rollout.group_size"),
    (lambda c: c.loss.update(eps_low=1.5), "config.loss.eps_low"),
    (lambda c: c.rollout.update(max_tokens=4096), "config.rollout.max_tokens"),
    (lambda c: c.model.update(preset="Qwen2.5-0.5B"), "config.model"),
    (lambda c: c.train.update(micro_batches=3), "config.train.micro_batches"),
    (lambda c: c.data.update(task="qa"), "config.data.train_path"),
    (lambda c: c.train.update(eval_every=0), "config.train.eval_every=0"),
    (lambda c: c.train.update(checkpoint_every=0), "config.train.checkpoint_every=0"),
    (lambda c: c.train.update(log_every=0), "config.train.log_every=0"),
    (lambda c: c.data.update(prompts_per_step=0), "config.data.prompts_per_step=0"),
    (lambda c: c.sft.update(steps=-1), "config.sft.steps=-1"),
    (lambda c: c.sft.update(batch_size=0), "config.sft.batch_size=0"),
    (lambda c: c.sft.update(redundant_call_rate=1.5), "config.sft.redundant_call_rate=1.5"),
    (lambda c: c.sft.update(redundant_call_rate=-0.1), "config.sft.redundant_call_rate=-0.1"),
    (lambda c: c.data.update(layout="gsm9k"), "config.data.layout='gsm9k'"),
    (lambda c: c.data.update(task="function_calling", layout="gsm8k"), "config.data.layout='gsm8k'"),
    (lambda c: c.tools.update(python=False), "config.tools.python"),
    (lambda c: c.tools.update(search=False), "config.tools.search"),
    (lambda c: c.tools.update(search_backend="remote"), "config.tools.search_url"),
    (qa_without_corpus, "config.tools.search_corpus"),
    (lambda c: c.data.mix.update(product=-1.0), "config.data.mix.product=-1.0"),
    (lambda c: c.data.mix.update(product=0.0, small_product=0.0, lookup=0.0, in_context=0.0), "config.data.mix"),
    (lambda c: c.sft.tool_rate.update(lookup=1.5), "config.sft.tool_rate.lookup=1.5"),
    (lambda c: c.data.update(prompt="tiny"), "config.data.prompt='tiny'"),
    (lambda c: c.data.mix.update(multihop=1.0) or c.tools.update(search=False), "config.tools.search"),
])
def test_invalid_values_name_the_field(mutate, field):
    c = tiny()
    mutate(c)
    with pytest.raises(ConfigError) as e:
        validate(c)
    message = str(e.value)
    assert message.startswith(field) and "\n" not in message, message


@pytest.mark.parametrize("mutate", [
    lambda c: (qa_without_corpus(c), c.tools.update(search_corpus="/data/wiki.jsonl")),
    lambda c: (qa_without_corpus(c), c.tools.update(search_index="/data/bm25")),
    lambda c: (qa_without_corpus(c), c.tools.update(search=False)),
    lambda c: (qa_without_corpus(c), c.tools.update(search_backend="remote", search_url="http://r:8000")),
    lambda c: (c.data.update(task="math", train_path="/data/gsm8k.jsonl", layout="gsm8k"), c.tools.update(search=False)),
    lambda c: c.data.update(task="function_calling", layout="bfcl"),
    lambda c: (c.data.mix.update(lookup=0.0, in_context=0.0), c.tools.update(search=False)),
    lambda c: c.sft.update(steps=0, redundant_call_rate=1.0),
])
def test_valid_neighbours_of_the_rules_pass(mutate):
    c = tiny()
    mutate(c)
    validate(c)


def test_unknown_field_is_an_error_with_the_closest_name():
    c = tiny()
    c.rollout.groupsize = 8  # typo of group_size
    with pytest.raises(ConfigError, match=r"^config.rollout.groupsize: unknown field "
                                          r"\(did you mean config.rollout.group_size\?\)$"):
        validate(c)
    c = tiny()
    c.rollout.qwerty = 8  # nothing close
    with pytest.raises(ConfigError, match=r"^config.rollout.qwerty: unknown field$"):
        validate(c)


def test_wrong_type_is_an_error():
    d = tiny().to_dict()  # ConfigDict itself refuses the assignment; a config built from a dict doesn't
    d["train"]["steps"] = "ten"
    c = ml_collections.ConfigDict(d)
    with pytest.raises(ConfigError, match=r"config.train.steps: expected int"):
        validate(c)


def test_unknown_group_is_an_error():
    c = tiny()
    c.extra = ml_collections.ConfigDict({"x": 1})
    with pytest.raises(ConfigError, match="config.extra: unknown field"):
        validate(c)


def test_prompts_per_step_must_split_over_the_processes():
    multihost.check_divisible(6, count=3)
    with pytest.raises(ConfigError, match=r"^config.data.prompts_per_step=4: must be a multiple of the "
                                          r"process count 3"):
        multihost.check_divisible(4, count=3)


def test_a_synthetic_family_too_small_for_the_split_is_a_config_error(tmp_path):
    c = tiny()
    c.workdir = str(tmp_path)
    c.data.n_train = 5000                # small_product has 720 distinct questions in all
    c.data.mix.update(product=0.0, lookup=0.0, in_context=0.0)
    validate(c)
    with pytest.raises(ConfigError, match=r"^config.data.n_train / n_eval / mix: the synthetic family "
                                          r"'small_product' has 720 distinct questions"):
        experiment.setup(c)
