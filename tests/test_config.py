"""Experiment configs: every shipped config validates; bad fields are one-line errors naming them."""
import glob
import importlib.util
import os

import ml_collections
import pytest

from tepo_jax.config import ConfigError, defaults, validate

CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_validate_and_document_themselves(path):
    module = load(path)
    doc = module.__doc__ or ""
    for heading in ("Command:", "Hardware:", "Runtime:"):
        assert heading in doc, f"{path} docstring lacks {heading}"
    validate(module.get_config())


def test_at_least_the_required_configs_exist():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    for adv in ("grpo", "tepo_sparse", "tepo_dense"):
        assert f"qwen25_7b_{adv}_v5p" in names and f"llama31_8b_{adv}_v5p" in names
    assert "demo_cpu" in names and "gpu_qwen25_0p5b" in names


def tiny():
    c = defaults()
    c.model.tiny = True
    return c


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.algo.update(advantage="ppo"), "config.algo.advantage"),
    (lambda c: c.rollout.update(group_size=1), "config.rollout.group_size"),
    (lambda c: c.loss.update(eps_low=1.5), "config.loss.eps_low"),
    (lambda c: c.rollout.update(max_tokens=4096), "config.rollout.max_tokens"),
    (lambda c: c.model.update(preset="Qwen2.5-0.5B"), "config.model"),
    (lambda c: c.train.update(micro_batches=3), "config.train.micro_batches"),
    (lambda c: c.data.update(task="qa"), "config.data.train_path"),
])
def test_invalid_values_name_the_field(mutate, field):
    c = tiny()
    mutate(c)
    with pytest.raises(ConfigError) as e:
        validate(c)
    message = str(e.value)
    assert message.startswith(field) and "\n" not in message


def test_unknown_field_is_an_error():
    c = tiny()
    c.rollout.groupsize = 8  # typo of group_size
    with pytest.raises(ConfigError, match=r"^config.rollout.groupsize: unknown field$"):
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
