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


def config_names(path) -> list[str]:
    """What `--config` takes for a file: configs/X.py, or configs/X.py:VARIANT for each variant of a family."""
    name, variants = os.path.relpath(path, ROOT), getattr(load(path), "VARIANTS", None)
    return [f"{name}:{v}" for v in variants] if variants is not None else [name]


CONFIGS = [c for path in CONFIG_FILES for c in config_names(path)]  # every config a user can run


def file_of(config: str) -> str:
    return os.path.join(ROOT, config.split(":", 1)[0])


def launcher(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_commands(doc: str, prefix: str, config: str = None) -> list[list[str]]:
    """argv of each docstring line (after its `Heading:`) that starts with `prefix` (and, given
    `config`, runs that config: `--config=CONFIG` or `--config CONFIG`)."""
    out = []
    for line in doc.splitlines():
        text = line.split(":", 1)[1].strip() if line[:1].isupper() and ":" in line else line.strip()
        if text.startswith(prefix):
            argv = shlex.split(text)
            if config is None or cli.config_arg(argv) == config:
                out.append(argv)
    return out


COMMANDS = ("python -m tepo_jax.train", "python launch/", "tepo_jax size")


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_configs_validate_and_document_themselves(config):
    doc = load(file_of(config)).__doc__ or ""
    for heading in ("Command:", "Hardware:", "Runtime:"):
        assert heading in doc, f"{config}: docstring lacks {heading}"
    validate(cli.load_config_file(os.path.join(ROOT, config)))
    assert len(doc_commands(doc, "python -m tepo_jax.train", config)) == 1, \
        f"{config}: the docstring needs one `python -m tepo_jax.train --config={config}` line"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_docstring_commands_run_configs_of_their_file(path):
    """No docstring line runs another file's config, or a variant that does not exist."""
    doc, names = load(path).__doc__ or "", set(config_names(path))
    for prefix in COMMANDS:
        for argv in doc_commands(doc, prefix):
            assert cli.config_arg(argv) in names, f"{path}: {shlex.join(argv)} runs none of {sorted(names)}"


@pytest.mark.parametrize("config", CONFIGS)
def test_docstring_launch_and_size_commands_work(config, capsys, monkeypatch):
    """Every `python launch/X.py ...` line runs with --dry-run and passes the config, variant
    included, to the job; every `tepo_jax size` line fits."""
    monkeypatch.chdir(ROOT)
    doc = load(file_of(config)).__doc__
    launches = doc_commands(doc, "python launch/", config)
    if "launch/" in doc or config.startswith(("configs/tpu_", "configs/gpu_")):
        assert launches, f"{config}: names a launcher but gives no launch command for it"
    for argv in launches:
        script = os.path.splitext(os.path.basename(argv[1]))[0]
        rest = argv[2:]
        cut = rest.index("--") if "--" in rest else len(rest)
        assert launcher(script).main(rest[:cut] + ["--dry-run"] + rest[cut:]) == 0, argv
        assert f"--config={config}" in capsys.readouterr().out
    sizes = doc_commands(doc, "tepo_jax size", config)
    if config.startswith(("configs/tpu_", "configs/gpu_")):
        assert len(sizes) == 1, f"{config}: needs one `tepo_jax size --config {config}` line"
    for argv in sizes:
        assert cli.main(argv[1:]) == 0, f"{config}: {shlex.join(argv)} does not fit:\n{capsys.readouterr().out}"


def test_at_least_the_required_configs_exist():
    for model in ("qwen25_7b", "llama31_8b"):
        for adv in ("grpo", "tepo_sparse", "tepo_dense"):
            assert f"configs/tpu_v5p.py:{model}_{adv}" in CONFIGS
    for config in ("configs/demo_cpu.py", "configs/function_calling_cpu.py", "configs/gpu_qwen25.py:0p5b",
                   "configs/gpu_qwen25.py:1p5b"):
        assert config in CONFIGS


# ---------------------------------------------------------------------------- families

# The eight files that the two families replaced, frozen from them when they were deleted: what
# each set on top of defaults() (shared by the family, then its own). A family must build exactly
# these configs.
OLD_POD = dict(
    mode="rl",
    model=dict(dtype="bfloat16", param_dtype="float32", remat=True),
    mesh=dict(data=1, fsdp=-1, tensor=1),
    data=dict(task="qa", train_path="/path/to/musique_train.jsonl", eval_path="/path/to/musique_dev.jsonl",
              layout="musique", prompts_per_step=64),
    tools=dict(search_corpus="/path/to/wiki18_passages.jsonl"),
    rollout=dict(group_size=8, max_calls=5, max_tokens=4096, max_turn_tokens=1024, cache_len=8192),
    optim=dict(lr=1e-6, warmup_steps=10),
    train=dict(steps=300, micro_batches=8, eval_every=20, checkpoint_every=10))
OLD_GPU = dict(
    mode="rl",
    model=dict(dtype="bfloat16", param_dtype="float32", remat=True),
    mesh=dict(data=1, fsdp=-1, tensor=1),
    data=dict(task="math", train_path="/path/to/gsm8k_train.jsonl", eval_path="/path/to/gsm8k_test.jsonl",
              layout="gsm8k", prompts_per_step=16),
    tools=dict(search=False),
    rollout=dict(group_size=8, max_calls=5, max_tokens=1536, max_turn_tokens=512, cache_len=2048),
    algo=dict(advantage="tepo_sparse"),
    optim=dict(lr=1e-6, warmup_steps=10),
    train=dict(steps=200, micro_batches=8, eval_every=20, checkpoint_every=10))


def _own(workdir, checkpoint, advantage=None):
    own = dict(workdir=workdir, model=dict(hf_checkpoint=f"/path/to/{checkpoint}"),
               tokenizer=dict(path=f"/path/to/{checkpoint}"))
    return {**own, "algo": dict(advantage=advantage)} if advantage else own


OLD_FILES = {  # deleted file: (the config that replaces it, the family's fields, the file's own)
    **{f"{model}_{adv}_v5p.py": (f"configs/tpu_v5p.py:{model}_{adv}", OLD_POD,
                                 # workdir: a shared mount before gs:// workdirs (issue 17)
                                 _own(f"gs://BUCKET/tepo_jax/{model}_{adv}_v5p", checkpoint, adv))
       for model, checkpoint in (("qwen25_7b", "Qwen2.5-7B-Instruct"), ("llama31_8b", "Llama-3.1-8B-Instruct"))
       for adv in ("grpo", "tepo_sparse", "tepo_dense")},
    "gpu_qwen25_0p5b.py": ("configs/gpu_qwen25.py:0p5b", OLD_GPU,
                           _own("runs/gpu_qwen25_0p5b", "Qwen2.5-0.5B-Instruct")),
    "gpu_qwen25_1p5b.py": ("configs/gpu_qwen25.py:1p5b", OLD_GPU,
                           _own("runs/gpu_qwen25_1p5b", "Qwen2.5-1.5B-Instruct")),
}


def _set(c, fields: dict):
    for key, value in fields.items():
        if isinstance(value, dict):
            _set(c[key], value)
        else:
            c[key] = value


@pytest.mark.parametrize("old", sorted(OLD_FILES))
def test_families_build_exactly_the_configs_they_replaced(old):
    config, family, own = OLD_FILES[old]
    expected = defaults()
    _set(expected, family)
    _set(expected, own)
    assert cli.load_config_file(os.path.join(ROOT, config)).to_dict() == expected.to_dict()
    assert not os.path.exists(os.path.join(ROOT, "configs", old)), f"configs/{old} is back: a variant of {config}"


def test_every_variant_is_frozen_above():
    assert sorted(c for c in CONFIGS if ":" in c) == sorted(config for config, _, _ in OLD_FILES.values())


@pytest.mark.parametrize("arg, message", [
    ("configs/tpu_v5p.py", "configs/tpu_v5p.py is a family of configs: pass --config configs/tpu_v5p.py:VARIANT, "
                           "VARIANT one of qwen25_7b_grpo, qwen25_7b_tepo_sparse, qwen25_7b_tepo_dense, "
                           "llama31_8b_grpo, llama31_8b_tepo_sparse, llama31_8b_tepo_dense"),
    ("configs/tpu_v5p.py:", "configs/tpu_v5p.py is a family of configs: pass --config configs/tpu_v5p.py:VARIANT"),
    ("configs/tpu_v5p.py:qwen25_7b_tepo_sprase", "configs/tpu_v5p.py: unknown variant 'qwen25_7b_tepo_sprase' (did "
                                                 "you mean qwen25_7b_tepo_sparse?); the variants are qwen25_7b_grpo, "),
    ("configs/gpu_qwen25.py:7b", "configs/gpu_qwen25.py: unknown variant '7b'; the variants are 0p5b, 1p5b"),
    ("configs/demo_cpu.py:tiny", "configs/demo_cpu.py has no variants: pass --config configs/demo_cpu.py without "
                                 "':tiny'"),
    ("configs/no_such.py:x", "configs/no_such.py: no such config file"),
])
def test_a_wrong_variant_is_one_line_naming_the_variants(arg, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError) as e:
        cli.load_config_file(arg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def parse_config_flag(argv: list[str]):
    """`argv` parsed as tepo_jax.train and tepo_jax.evaluate parse theirs: the same ml_collections
    flag, in a FlagValues of its own."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=["prog", *argv])
    cli.parse_config_flags(["prog", *argv], flag_values=fv)
    return fv.config


def test_config_flag_takes_a_variant_with_overrides_on_top(monkeypatch):
    monkeypatch.chdir(ROOT)
    c = parse_config_flag(["--config=configs/tpu_v5p.py:llama31_8b_grpo", "--config.train.steps=3",
                           "--config.algo.advantage=tepo_dense"])
    assert (c.train.steps, c.algo.advantage, c.workdir) == (3, "tepo_dense", "gs://BUCKET/tepo_jax/llama31_8b_grpo_v5p")
    assert c.model.hf_checkpoint == "/path/to/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("argv, message", [
    (["--config=configs/tpu_v5p.py"], "error: configs/tpu_v5p.py is a family of configs"),
    (["--config", "configs/gpu_qwen25.py:2b"], "error: configs/gpu_qwen25.py: unknown variant '2b'; "
                                              "the variants are 0p5b, 1p5b"),
    (["--config=configs/gpu_qwen25.py:1p5b", "--config.rollout.groupsize=8"],
     "error: config.rollout.groupsize: unknown field (did you mean config.rollout.group_size?)"),
])
def test_config_flag_errors_are_one_line(argv, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        parse_config_flag(argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), e.value


def test_size_takes_a_variant(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["size", "--config", "configs/gpu_qwen25.py:1p5b", "--model", "Qwen2.5-1.5B", "--devices", "1",
                     "--device-kind", "h200"]) == 0
    assert capsys.readouterr().out.startswith("configs/gpu_qwen25.py:1p5b: 1.")
    assert cli.main(["size", "--config", "configs/gpu_qwen25.py", "--devices", "1"]) == 2
    assert capsys.readouterr().err == ("error: configs/gpu_qwen25.py is a family of configs: pass --config "
                                       "configs/gpu_qwen25.py:VARIANT, VARIANT one of 0p5b, 1p5b\n")


# ---------------------------------------------------------------------------- preflight

def _size_args(doc: str, config: str):
    """The parsed `tepo_jax size` line of a docstring for `config`, or None."""
    lines = doc_commands(doc, "tepo_jax size", config)
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


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass_preflight(name, tmp_path):
    """validate -> experiment.setup (data, tokenizer, tools: what crashed when a config named no
    search corpus) on stand-in files -> the model's shape from its config.json -> the memory
    check on the hardware of the `Size:` line (else this machine). It stops where the real run
    allocates the model."""
    size_args = _size_args(load(file_of(name)).__doc__, name)
    config = with_stand_in_files(cli.load_config_file(os.path.join(ROOT, name)), size_args, tmp_path)
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
    (lambda c: c.loss.update(tempered_policy=True) or c.rollout.update(temperature=0.0), "config.loss.tempered_policy"),
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


def _demo_config():
    return load(os.path.join(ROOT, "configs", "demo_cpu.py")).get_config()


def _set_fields(c, fields: dict):
    for dotted, value in fields.items():
        *groups, key = dotted.split(".")
        node = c
        for g in groups:
            node = node[g]
        node[key] = value


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", float("inf"), "config.optim.lr=inf: must be a finite number"),
    ("algo.alpha", float("nan"), "config.algo.alpha=nan: must be a finite number"),
    ("algo.no_call_scale", float("-inf"), "config.algo.no_call_scale=-inf: must be a finite number"),
    ("optim.lr", 1e30, "config.optim.lr=1e+30: must be in (0, 1]"),
    ("sft.lr", -1.0, "config.sft.lr=-1.0: must be in (0, 1]"),
    ("rollout.top_k", -3, "config.rollout.top_k=-3: must be >= 0"),
    ("rollout.max_turn_tokens", 0, "config.rollout.max_turn_tokens=0: must be >= 1"),
    ("tools.max_workers", 0, "config.tools.max_workers=0: must be >= 1"),
    ("tools.python_timeout_s", 0.0, "config.tools.python_timeout_s=0.0: must be > 0"),
    ("tools.search_top_k", -1, "config.tools.search_top_k=-1: must be >= 1"),
    ("data.n_train", 0, "config.data.n_train=0: must be >= 1"),
    ("mesh.data", 0, "config.mesh.data=0: must be >= 1"),
    ("mesh.fsdp", 0, "config.mesh.fsdp=0: must be >= 1, or -1"),
    ("optim.b2", 2.0, "config.optim.b2=2.0: must be in [0, 1)"),
    ("optim.warmup_steps", -5, "config.optim.warmup_steps=-5: must be >= 0"),
    ("seed", -1, "config.seed=-1: must be >= 0"),
    ("workdir", " ", "config.workdir=' ': must name a directory"),
    ("model.tiny_layers", 0, "config.model.tiny_layers=0: must be >= 1"),
    ("model.tiny_hidden", 130, "config.model.tiny_hidden=130: must be tiny_heads=4 × an even head size"),
    ("model.tiny_kv_heads", 3, "config.model.tiny_kv_heads=3: must divide tiny_heads=4"),
    ("train.max_skipped_updates", -1, "config.train.max_skipped_updates=-1: must be >= 0"),
])
def test_out_of_range_fields_are_refused_naming_them(field, value, message):
    c = _demo_config()
    _set_fields(c, {field: value})
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("temperature, top_p, tempered, warns", [
    (1.0, 1.0, False, False), (0.0, 1.0, False, False), (0.7, 1.0, False, True), (0.7, 1.0, True, False),
    (1.0, 0.9, False, True), (0.7, 0.9, True, True), (1.0, 1.0, True, False)])
def test_a_run_is_warned_when_it_does_not_sample_the_policy_it_trains(temperature, top_p, tempered, warns):
    from tepo_jax.rl.loss import policy_mismatch
    c = tiny()
    c.rollout.update(temperature=temperature, top_p=top_p)
    c.loss.tempered_policy = tempered
    validate(c)
    message = policy_mismatch(c)
    assert bool(message) == warns, message
    if warns and not tempered:
        assert "loss.tempered_policy=True" in message


def test_an_unknown_preset_is_a_config_error_with_the_closest_name():
    c = _demo_config()
    _set_fields(c, {"model.tiny": False, "model.preset": "Qwen2.5-0.5b"})
    with pytest.raises(ConfigError, match=r"config.model.preset='Qwen2.5-0.5b': unknown model \(did you mean "
                                          r"'Qwen2.5-0.5B'\?\)"):
        validate(c)
