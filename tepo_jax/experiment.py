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
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from tepo_jax import paths
from tepo_jax.data.function_calling import FUNCTION_CALLING
from tepo_jax.data.loading import examples_from_config, functions_from_config
from tepo_jax.models.decoder import BATCH_AXES
from tepo_jax.plugins import UserParts, check_tool_names, merge, parts_from_config
from tepo_jax.rewards import TaskRewards
from tepo_jax.rollout.agent import AgentLoop, RolloutConfig
from tepo_jax.sampling.config import SamplerConfig
from tepo_jax.sampling.sampler import Sampler
from tepo_jax.sft.data import fc_entities, fc_tokenizer_texts, tokenizer_texts
from tepo_jax.sharding import MeshConfig, make_mesh
from tepo_jax.tokenizer import stop_token_ids, tokenizer_from_config
from tepo_jax.tools import ToolBridge
from tepo_jax.tools.format import CallFormat
from tepo_jax.tools.from_config import bridge_from_config, call_format, enabled_tools, function_bridge


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
    enable_compilation_cache(config.train.get("compilation_cache_dir", ""))
    paths.check_store(config.workdir)   # gs://: gcsfs installed, the bucket there (one line if not)
    workdir = paths.make_dir(config.workdir, f"config.workdir={config.workdir!r}")
    mesh = make_mesh(MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    if parts.train_examples is not None:
        train, evals, corpus = parts.train_examples, parts.eval_examples or [], config.tools.search_corpus or None
    else:
        train, evals, corpus = examples_from_config(config)
    if config.data.task == FUNCTION_CALLING:
        functions = functions_from_config(config, train + evals)
        tokenizer = tokenizer_from_config(config, lambda: fc_tokenizer_texts(train, functions),
                                          function_calling=True, entities=fc_entities(train))
        tools, bridge = tuple(f.name for f in functions), function_bridge(config, functions)
    else:
        check_tool_names(parts.tools, enabled_tools(config))
        tokenizer = tokenizer_from_config(config, lambda: tokenizer_texts(train, corpus, parts.demonstrations))
        bridge = bridge_from_config(config, corpus, extra=parts.tools)
        tools = enabled_tools(config) + tuple(t.name for t in parts.tools)
    fmt = call_format(tokenizer, tools, function_calling=config.data.task == FUNCTION_CALLING)
    return Experiment(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, fmt=fmt,
                      tools=tools, train_examples=train, eval_examples=evals, bridge=bridge, parts=parts)


def batch_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def make_agent(config, model, exp: Experiment, slots: int) -> AgentLoop:
    """The rollout loop for `model`: a sampler with `slots` slots (rounded to the batch shards)."""
    c = config
    shards = batch_shards(exp.mesh)
    slots = -(-slots // shards) * shards
    cfg = SamplerConfig.for_rollout(c.rollout.cache_len, slots, model=model.cfg, seed=c.seed,
                                    eos_ids=tuple(stop_token_ids(exp.tokenizer))[:8])
    sampler = Sampler(model, cfg, tokenizer=exp.tokenizer)
    return AgentLoop(sampler, exp.bridge, exp.tokenizer, exp.fmt, RolloutConfig.from_config(c), exp.tools,
                     rewards=TaskRewards.from_config(c, exp.fmt, custom=exp.parts.reward),
                     prompt_style=c.data.prompt, tool_descriptions=exp.parts.tool_descriptions)
