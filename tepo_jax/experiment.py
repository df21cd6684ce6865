"""A run's parts assembled from a validated config: mesh, data, tokenizer, tools and call
format (`setup`), and the rollout loop for a model (`make_agent`).

Each part builds itself from the config next to its own code (data/loading.py,
tokenizer.py, tools/from_config.py, policy.py, RolloutConfig / LossConfig / OptimConfig
`from_config`, TaskRewards.from_config, sizing.config_workloads); this module only wires them,
so that `train`, `evaluate` and the demo build a run the same way.

`data.task = "function_calling"` (docs/function_calling.md): the examples carry their own
functions and messages; tools = those functions, the call format = `JsonCallFormat` in the
tokenizer's dialect, and for the tiny model a tiny BPE whose template is Qwen2.5's.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from tepo_jax import paths
from tepo_jax.config import SFT
from tepo_jax.data.function_calling import FUNCTION_CALLING
from tepo_jax.data.loading import EVAL_SPLITS, examples_from_config, functions_from_config, read_examples
from tepo_jax.errors import ConfigError
from tepo_jax.models.decoder import BATCH_AXES
from tepo_jax.plugins import PluginError, UserParts, check_tool_names, merge, parts_from_config
from tepo_jax.rewards import TaskRewards
from tepo_jax.rl.loss import policy_temperature
from tepo_jax.rollout.agent import AgentLoop, RolloutConfig, encode_prompt
from tepo_jax.sampling.config import SamplerConfig
from tepo_jax.sampling.sampler import Sampler
from tepo_jax.sft.data import fc_entities, fc_tokenizer_texts, tokenizer_texts
from tepo_jax.sharding import MeshConfig, make_mesh
from tepo_jax.tokenizer import stop_token_ids, tokenizer_from_config
from tepo_jax.tools import ToolBridge
from tepo_jax.tools.format import CallFormat
from tepo_jax.tools.from_config import bridge_from_config, call_format, enabled_tools, function_bridge

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict
    workdir: epath.Path             # a local path or a URL (gs://bucket/run): tepo_jax/paths.py
    mesh: jax.sharding.Mesh
    tokenizer: object
    fmt: CallFormat                 # ToolFormat, or JsonCallFormat for function_calling
    tools: tuple[str, ...]
    train_examples: list
    eval_examples: list
    bridge: Optional[ToolBridge] = None
    parts: UserParts = UserParts()   # the user's reward, tools and demonstrations (plugins.py)

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.close()


def enable_compilation_cache(path: str) -> None:
    """Point JAX's persistent compilation cache at `path` ("" leaves JAX's own setting). It
    takes effect if nothing has been compiled in this process yet (JAX reads it once), which
    holds at the start of `python -m tepo_jax.train` / `evaluate`."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def setup(config, parts: Optional[UserParts] = None) -> Experiment:
    """The run's parts; `parts` (a user's reward, tools, data) add to those the config names by
    import path and replace the config's data when given."""
    parts = merge(parts_from_config(config), parts)
    check_user_tools(config, parts.tools)
    enable_compilation_cache(config.train.get("compilation_cache_dir", ""))
    paths.check_store(config.workdir)   # gs://: gcsfs installed, the bucket there (one line if not)
    workdir = paths.make_dir(config.workdir, f"config.workdir={config.workdir!r}")
    mesh = make_mesh(MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    train, evals, corpus = run_examples(config, parts)
    if config.data.task == FUNCTION_CALLING:
        functions = functions_from_config(config, train + evals)
        tokenizer = tokenizer_from_config(config, lambda: fc_tokenizer_texts(train, functions),
                                          function_calling=True, entities=fc_entities(train))
        tools, bridge = tuple(f.name for f in functions), function_bridge(config, functions)
    else:
        tokenizer = tokenizer_from_config(config, lambda: tokenizer_texts(train, corpus, parts.demonstrations))
        bridge = bridge_from_config(config, corpus, extra=parts.tools)
        tools = enabled_tools(config) + tuple(t.name for t in parts.tools)
    fmt = call_format(tokenizer, tools, function_calling=config.data.task == FUNCTION_CALLING)
    exp = Experiment(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, fmt=fmt,
                     tools=tools, train_examples=train, eval_examples=evals, bridge=bridge, parts=parts)
    if config.mode != SFT:   # SFT alone rolls nothing out (its length check is sft.seq_len's)
        try:
            check_prompts_fit(config, exp)
        except BaseException:
            exp.close()   # the bridge's workers and sandbox
            raise
    return exp


def check_user_tools(config, tools) -> None:
    """A user's tools (Trainer `tools=`, `config.tools.extra`) fit the run's call format: their
    names (PluginError, one line), and no such tools with function calling, whose functions
    are the JSON schemas its examples declare: a tag-format tool would be dropped unseen."""
    if tools and config.data.task == FUNCTION_CALLING:
        raise PluginError(f"tools {[t.name for t in tools]}: data.task='function_calling' calls only the "
                          "functions its examples declare (docs/function_calling.md); drop tools= / "
                          "config.tools.extra, or use data.task 'math', 'qa' or 'synthetic'")
    check_tool_names(tools, enabled_tools(config))


def run_examples(config, parts: UserParts) -> tuple[list, list, Optional[str]]:
    """(train, eval, search corpus): the user's train and eval rows each where given, config.data's
    otherwise. With the user's training rows, config.data's eval set is its `eval_path` file
    (math/qa); the synthetic task's generated eval set is another task's, so then none."""
    if parts.train_examples is None:
        train, evals, corpus = examples_from_config(config)
    else:
        train, corpus = parts.train_examples, config.tools.search_corpus or None
        evals = config_eval_examples(config) if parts.eval_examples is None else []
    if parts.eval_examples is not None:
        evals = parts.eval_examples
    elif parts.train_examples is not None and not evals and config.mode != SFT:
        log.warning("train_data without eval_data (and no config.data.eval_path): no evaluation will run, "
                    "and run() returns {}; pass eval_data=rows to evaluate")
    return train, evals, corpus


def config_eval_examples(config) -> list:
    """config.data's eval file (`data.eval_path`, read as data.task says) when it names one."""
    if config.data.eval_path and config.data.task in ("math", "qa"):
        return read_examples(config, config.data.eval_path, EVAL_SPLITS)
    return []


def check_prompts_fit(config, exp: Experiment) -> None:
    """Every train and eval prompt, encoded as the rollout encodes it, fits the rollout's KV
    cache (`rollout.cache_len` positions, the prompt and at least one new token): a ConfigError
    naming the example here, not the sampler's error mid-run when the example is first drawn.
    A prompt that fits but leaves less than `rollout.max_tokens` is a warning: its trajectories
    end early ("max_tokens") when the cache fills."""
    cache, budget = config.rollout.cache_len, config.rollout.max_tokens
    short = []   # (prompt tokens, example id) of prompts that leave less than max_tokens
    for example in [*exp.train_examples, *exp.eval_examples]:
        n = len(encode_prompt(exp.tokenizer, example, exp.tools, config.data.prompt, exp.parts.tool_descriptions))
        if n >= cache:
            raise ConfigError(f"config.rollout.cache_len={cache}: the prompt of example {example.id!r} is {n} "
                              f"tokens and does not fit; it needs cache_len >= {n + budget} (the prompt plus "
                              f"rollout.max_tokens={budget}), or a shorter question")
        if n + budget > cache:
            short.append((n, example.id))
    if short:
        n, example_id = max(short)
        log.warning("config.rollout.cache_len=%d: %d prompt(s) leave less than rollout.max_tokens=%d tokens "
                    "(longest: example %r, %d tokens); their trajectories end when the cache fills. "
                    "cache_len >= %d avoids it", cache, len(short), budget, example_id, n, n + budget)


def batch_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def make_agent(config, model, exp: Experiment, slots: int) -> AgentLoop:
    """The rollout loop for `model`: a sampler with `slots` slots (rounded to the batch shards)."""
    c = config
    shards = batch_shards(exp.mesh)
    slots = -(-slots // shards) * shards
    cfg = SamplerConfig.for_rollout(c.rollout.cache_len, slots, model=model.cfg, seed=c.seed,
                                    eos_ids=tuple(stop_token_ids(exp.tokenizer))[:8],
                                    policy_temperature=policy_temperature(c))
    sampler = Sampler(model, cfg, tokenizer=exp.tokenizer)
    return AgentLoop(sampler, exp.bridge, exp.tokenizer, exp.fmt, RolloutConfig.from_config(c), exp.tools,
                     rewards=TaskRewards.from_config(c, exp.fmt, custom=exp.parts.reward),
                     prompt_style=c.data.prompt, tool_descriptions=exp.parts.tool_descriptions)
