"""Everything a run needs, built once from a validated config: mesh, tokenizer, data, tools,
model, optimizer and loss settings, and the rollout loop.

Kept apart from the loops (sft/trainer.py, rl/loop.py) so that `train`, `evaluate` and the
demo build their parts the same way.

`data.task = "function_calling"` (docs/function_calling.md): the synthetic function-calling
task (or JSONL examples at data.train_path in data.layout), tools = the examples' functions
(`function_tools`; for JSONL data schema-only tools built from the examples' schemas, which
validate and answer "ok"), fmt = `JsonCallFormat` in the tokenizer's dialect, prompts = each
example's messages with its tool schemas (the rollout's `encode_prompt`), and for the tiny
model a tiny BPE whose template is Qwen2.5's (`build_tiny_fc_tokenizer`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from tepo_jax.checkpoints.hf import load_hf, load_hf_config
from tepo_jax.config import ConfigError
from tepo_jax.data import jsonl, synthetic
from tepo_jax.data.function_calling import (FUNCTION_CALLING, make_function_calling,
                                            read_function_calling, synthetic_functions)
from tepo_jax.data.pipeline import DataSourceError
from tepo_jax.data.prompts import PROMPT_STYLES, system_prompt, user_prompt
from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import BATCH_AXES, Decoder
from tepo_jax.models.presets import preset
from tepo_jax.rewards.function_calling import task_rewards
from tepo_jax.rl.loss import LossConfig
from tepo_jax.rl.optim import OptimConfig
from tepo_jax.rollout.agent import AgentLoop, RolloutConfig
from tepo_jax.sampling.config import SamplerConfig
from tepo_jax.sampling.sampler import Sampler
from tepo_jax.sharding import MeshConfig, create_sharded_model, make_mesh
from tepo_jax.sizing import MemoryBudgetError, Workload, check_fits
from tepo_jax.tokenizer import load_tokenizer, stop_token_ids
from tepo_jax.tools import PythonTool, SandboxConfig, ToolBridge, ToolFormat
from tepo_jax.tools.functions import FunctionTool, function_from_schema, function_tools
from tepo_jax.tools.json_format import LLAMA31, QWEN25, JsonCallFormat, dialect_from_chat_template

log = logging.getLogger(__name__)
SFT, RL = "sft", "rl"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    tokenizer: object
    fmt: ToolFormat                 # or JsonCallFormat for data.task = function_calling
    tools: tuple[str, ...]
    train_examples: list
    eval_examples: list
    bridge: Optional[ToolBridge] = None

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.close()


# ----------------------------------------------------------------------------- data

def synthetic_data_dir(config) -> Path:
    return Path(config.workdir) / "data"


def load_examples(config) -> tuple[list, list, Optional[str]]:
    """(train, eval, corpus JSONL path or None) for the configured task."""
    if config.data.task == FUNCTION_CALLING:
        return (*load_function_calling(config), None)
    if config.data.task == "synthetic":
        try:
            paths = synthetic.write_synthetic(synthetic_data_dir(config), seed=config.seed, n_train=config.data.n_train,
                                              n_eval=config.data.n_eval, mix=config.data.mix.to_dict())
        except ValueError as e:  # a family asked for more distinct questions than it has
            raise ConfigError(f"config.data.n_train / n_eval / mix: {e}") from None
        corpus = str(paths["corpus"]) if config.tools.search else None
        return jsonl.read_records(paths["train"]), jsonl.read_records(paths["eval"]), corpus
    train = read_examples(config, config.data.train_path, TRAIN_SPLITS)
    evals = read_examples(config, config.data.eval_path, EVAL_SPLITS) if config.data.eval_path else []
    return train, evals, config.tools.search_corpus or None


# A tfds data dir holds the dataset of the task's builder (tepo_jax/data/tfds_builders.py);
# train_path reads its train split, eval_path the first of these splits it has.
TFDS_DATASETS = {"math": "math_jsonl", "qa": "qa_jsonl"}
TRAIN_SPLITS, EVAL_SPLITS = ("train",), ("eval", "validation", "test")


def read_examples(config, path: str, splits: tuple[str, ...]) -> list:
    """math/qa examples from a JSONL file (in data.layout) or a prepared tfds data dir."""
    if os.path.isdir(path):
        return tfds_examples(path, TFDS_DATASETS[config.data.task], splits)
    layout = config.data.task if config.data.layout == "auto" else config.data.layout
    return jsonl.read_jsonl(path, layout=layout)


def tfds_examples(data_dir: str, name: str, splits: tuple[str, ...]) -> list:
    from tepo_jax.data import tfds_builders  # noqa: F401  (registers the builders with tfds)
    from tepo_jax.data.pipeline import tfds_source
    from tepo_jax.data.records import from_dict

    return [from_dict(row) for row in tfds_source(data_dir, name, splits)]


def load_function_calling(config) -> tuple[list, list]:
    """JSONL examples (data.train_path / eval_path), or the synthetic task: n_train examples
    from `seed`, n_eval from `seed + 1` with every question seen in training left out."""
    if config.data.train_path:
        layout = FUNCTION_CALLING if config.data.layout == "auto" else config.data.layout
        train = read_function_calling(config.data.train_path, layout)
        evals = read_function_calling(config.data.eval_path, layout) if config.data.eval_path else []
        return train, evals
    train = make_function_calling(config.data.n_train, seed=config.seed)
    seen = {ex.question for ex in train}
    pool = make_function_calling(3 * config.data.n_eval, seed=config.seed + 1, id_prefix="fc-eval")
    return train, [ex for ex in pool if ex.question not in seen][: config.data.n_eval]


def fc_functions(config, examples) -> list[FunctionTool]:
    """The functions the model may call: the synthetic APIs, or (JSONL data) a schema-only
    tool per distinct function name in the examples, the first schema seen winning."""
    if not config.data.train_path:
        return synthetic_functions()
    out = {}
    for ex in examples:
        for entry in ex.tools:
            tool = function_from_schema(entry)
            out.setdefault(tool.name, tool)
    return list(out.values())


def fc_format(tokenizer) -> JsonCallFormat:
    """JSON calls in the tokenizer's family (Llama-3.1 if it has <|eot_id|>, else Qwen2.5),
    with the result strings read off its own chat template."""
    base = LLAMA31 if "<|eot_id|>" in tokenizer.get_vocab() else QWEN25
    return JsonCallFormat(dialect_from_chat_template(tokenizer, base))


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_texts(examples, corpus_path: Optional[str]) -> list[str]:
    """Text the demo's tiny BPE is trained on, as often as it occurs in the data: each
    example's system and user prompt, the solutions the SFT demonstrator may play, and the
    corpus."""
    texts = []
    for ex in examples:
        texts += [system_prompt(style=style) for style in PROMPT_STYLES] + [user_prompt(ex)]
        texts += [t["text"] for turns in synthetic.solution_variants(ex) for t in turns if "text" in t]
    if corpus_path:
        texts += [p["text"] for p in jsonl.read_corpus(corpus_path)]
    return texts


def fc_tokenizer_texts(examples, functions) -> list[str]:
    """Function calling: each example's prompt as the Qwen2.5 template renders it, and the
    turns and result blocks of its SFT script (the text the tiny model will read and write)."""
    from tepo_jax.sft.data import fc_script
    from tepo_jax.testing.chat_templates import QWEN25_CHAT_TEMPLATE
    from tepo_jax.tiny_tokenizer import render_template

    fmt, tools = JsonCallFormat(QWEN25), function_tools(functions)
    run = lambda calls: [tools[c.tool].run(c.argument, 10.0) for c in calls]  # noqa: E731
    texts = []
    for ex in examples:
        texts.append(render_template(QWEN25_CHAT_TEMPLATE, ex.messages, ex.tools, add_generation_prompt=True))
        for text, calls, results in fc_script(ex, fmt, run):
            texts.append(text)
            if calls:
                texts.append(fmt.wrap_results([r.text for r in results]))
    return texts


def fc_entities(examples) -> list[str]:
    """Values the tiny model copies into calls: the digit-free string argument values of the
    gold calls and the string enum values of the schemas (numbers are split into digits)."""
    out = set()
    for ex in examples:
        values = [v for c in ex.gold_calls for v in c["arguments"].values()]
        for entry in ex.tools:
            props = entry.get("function", entry).get("parameters", {}).get("properties", {})
            values += [v for p in props.values() if isinstance(p, dict) for v in p.get("enum", [])]
        out.update(v for v in values if isinstance(v, str) and v.strip() and not any(ch.isdigit() for ch in v))
    return sorted(out)


# The demo tokenizer's numbers below this are one token each (Llama 3 cuts digit runs into
# chunks of up to three digits): a 2-layer model copies a number as one token, which it learns
# in a few hundred SFT steps; digit by digit it had not learned to copy after 800.
TINY_NUMBER_TOKENS = 1000


def build_tokenizer(config, examples, corpus_path, functions=None):
    from tepo_jax.testing.tokenizers import cached_tokenizer_dir  # offline builders
    from tepo_jax.tiny_tokenizer import build_tiny_fc_tokenizer, build_tiny_tokenizer

    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    if config.model.tiny and config.data.task == FUNCTION_CALLING:
        out = Path(config.workdir) / "tokenizer_fc"
        if not (out / "tokenizer.json").exists():
            build_tiny_fc_tokenizer(fc_tokenizer_texts(examples, functions), out,
                                    entities=fc_entities(examples))
        return load_tokenizer(out)
    if config.model.tiny:
        out = Path(config.workdir) / "tokenizer"
        if not (out / "tokenizer.json").exists():
            build_tiny_tokenizer(tokenizer_texts(examples, corpus_path), out, word_split=False,
                                 number_tokens=TINY_NUMBER_TOKENS)
        return load_tokenizer(out)
    name = {"qwen2.5": "qwen2.5", "llama3": "llama3.1"}[config.tokenizer.builtin]
    return load_tokenizer(cached_tokenizer_dir(name))


# ----------------------------------------------------------------------------- tools

def build_bridge(config, corpus_path: Optional[str]) -> ToolBridge:
    tools = {}
    if config.tools.python:
        tools["python"] = PythonTool(SandboxConfig(timeout_s=config.tools.python_timeout_s,
                                                   require_sandbox=config.tools.require_sandbox,
                                                   max_output_chars=config.tools.max_result_chars))
    if config.tools.search:
        tools["search"] = _search_tool(config, corpus_path)
    return ToolBridge(tools, max_workers=config.tools.max_workers,
                      default_timeout=config.tools.python_timeout_s + 1)


def _search_tool(config, corpus_path):
    from tepo_jax.tools.search import BM25Index, LocalSearch, RemoteSearch, build_index

    kw = dict(top_k=config.tools.search_top_k, max_chars=config.tools.max_result_chars)
    if config.tools.search_backend == "remote":
        return RemoteSearch(config.tools.search_url, **kw)
    index_dir = config.tools.search_index or str(Path(config.workdir) / "search_index")
    built = os.path.exists(os.path.join(index_dir, "params.index.json"))
    if config.tools.search_index and not built:
        raise DataSourceError(f"{index_dir}: no bm25 index here (params.index.json); config.tools.search_index")
    if not built:
        if not corpus_path:  # validate() requires one; kept for callers that skip it
            raise ConfigError("config.tools.search_corpus: the local search backend needs a corpus or an index")
        build_index(jsonl.read_corpus(corpus_path), index_dir)
    return LocalSearch(BM25Index.load(index_dir), **kw)


# ----------------------------------------------------------------------------- model

def model_config(config, vocab_size: int) -> ModelConfig:
    dtype, param_dtype = _DTYPES[config.model.dtype], _DTYPES[config.model.param_dtype]
    if config.model.preset:
        return preset(config.model.preset, dtype=dtype, param_dtype=param_dtype)
    m = config.model
    return ModelConfig(family="qwen2", vocab_size=vocab_size, hidden_size=m.tiny_hidden,
                       intermediate_size=4 * m.tiny_hidden, num_layers=m.tiny_layers,
                       num_heads=m.tiny_heads, num_kv_heads=m.tiny_kv_heads,
                       head_dim=m.tiny_hidden // m.tiny_heads, qkv_bias=True,
                       tie_word_embeddings=True, rope_theta=10_000.0,
                       max_position_embeddings=config.rollout.cache_len, dtype=dtype,
                       param_dtype=param_dtype)


# The tiny BPE's vocabulary is at most this big (tiny_tokenizer: 1024 / 2048 merges + tags).
TINY_VOCAB_BOUND = 4096


def target_model_config(config, vocab_size: Optional[int] = None) -> ModelConfig:
    """The policy's shape without allocating it: the HF checkpoint's config.json, the preset,
    or the tiny model (its vocabulary: `vocab_size`, else an upper bound)."""
    if config.model.hf_checkpoint:
        return load_hf_config(config.model.hf_checkpoint, dtype=_DTYPES[config.model.dtype],
                              param_dtype=_DTYPES[config.model.param_dtype])
    return model_config(config, vocab_size or TINY_VOCAB_BOUND)


def workloads(config) -> dict[str, Workload]:
    """What each phase of a run puts on the devices, for `sizing.check_fits`, per phase run.

    Worst cases: every packed row as long as the cache (SFT: sft.seq_len); one micro-batch of
    rows at a time; the sampler's slots for all trajectories of a step. The driver keeps the
    initial model beside the train state (one frozen copy); an sft_then_rl run with a KL term
    also loads the SFT result as the reference (a second one)."""
    c, chunk = config, loss_config(config).seq_chunk
    out = {}
    if c.mode != "rl":
        out[SFT] = Workload(batch=c.sft.batch_size, seq_len=c.sft.seq_len, remat=c.model.remat,
                            logits_chunk=chunk, frozen_params=1)
    if c.mode != "sft":
        rows = c.data.prompts_per_step * c.rollout.group_size
        frozen = 1 + int(c.mode == "sft_then_rl" and c.loss.kl_coef > 0)
        out[RL] = Workload(batch=-(-rows // c.train.micro_batches), seq_len=c.rollout.cache_len,
                           slots=rows, cache_len=c.rollout.cache_len, remat=c.model.remat,
                           logits_chunk=chunk, frozen_params=frozen)
    return out


def check_memory(config, model_cfg: ModelConfig, mesh, device_memory=None, device_kind=None) -> dict:
    """{phase: MemoryEstimate}; MemoryBudgetError (naming the phase) if a phase cannot fit."""
    out = {}
    for phase, workload in workloads(config).items():
        try:
            out[phase] = check_fits(model_cfg, mesh, workload, device_memory, device_kind=device_kind)
        except MemoryBudgetError as e:
            raise MemoryBudgetError(f"{phase} phase: {e}") from None
    return out


def build_model(config, mesh, tokenizer) -> Decoder:
    """The initial policy: an HF checkpoint, or a random preset / tiny model, on `mesh`."""
    if config.model.hf_checkpoint:
        return load_hf(config.model.hf_checkpoint, mesh=mesh, dtype=_DTYPES[config.model.dtype],
                       param_dtype=_DTYPES[config.model.param_dtype], remat=config.model.remat)
    cfg = model_config(config, len(tokenizer))
    return create_sharded_model(cfg, mesh, seed=config.seed, remat=config.model.remat)


# ----------------------------------------------------------------------------- all together

def enable_compilation_cache(path: str) -> None:
    """Point JAX's persistent compilation cache at `path` ("" leaves JAX's own setting). It
    takes effect if nothing has been compiled in this process yet (JAX reads it once), which
    holds at the start of `python -m tepo_jax.train` / `evaluate`."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def setup(config) -> Experiment:
    enable_compilation_cache(config.train.get("compilation_cache_dir", ""))
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    train, evals, corpus = load_examples(config)
    if config.data.task == FUNCTION_CALLING:
        return _setup_function_calling(config, workdir, mesh, train, evals)
    tokenizer = build_tokenizer(config, train, corpus)
    tools = tuple(t for t in ("python", "search") if config.tools[t])
    bridge = build_bridge(config, corpus)
    return Experiment(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                      fmt=ToolFormat(tools=tools), tools=tools, train_examples=train,
                      eval_examples=evals, bridge=bridge)


def _setup_function_calling(config, workdir, mesh, train, evals) -> Experiment:
    functions = fc_functions(config, train + evals)
    tokenizer = build_tokenizer(config, train, None, functions)
    bridge = ToolBridge(function_tools(functions), max_workers=config.tools.max_workers,
                        default_timeout=config.tools.python_timeout_s + 1)
    return Experiment(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                      fmt=fc_format(tokenizer), tools=tuple(f.name for f in functions),
                      train_examples=train, eval_examples=evals, bridge=bridge)


# ----------------------------------------------------------------------------- training parts

def batch_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def optim_config(config, phase: str) -> OptimConfig:
    if phase == SFT:
        return OptimConfig(learning_rate=config.sft.lr, schedule=config.sft.schedule,
                           warmup_steps=config.sft.steps // 10,
                           total_steps=max(config.sft.steps, 1), weight_decay=config.optim.weight_decay,
                           max_grad_norm=config.optim.clip_norm)
    return OptimConfig(learning_rate=config.optim.lr, schedule=config.optim.schedule,
                       warmup_steps=config.optim.warmup_steps, total_steps=max(config.train.steps, 1),
                       b1=config.optim.b1, b2=config.optim.b2, weight_decay=config.optim.weight_decay,
                       max_grad_norm=config.optim.clip_norm)


def loss_config(config) -> LossConfig:
    return LossConfig(eps_low=config.loss.eps_low, eps_high=config.loss.eps_high, kl_coef=config.loss.kl_coef,
                      seq_chunk=config.loss.seq_chunk or None, vocab_chunk=config.loss.vocab_chunk or None)


def make_agent(config, model, exp: Experiment, slots: int) -> AgentLoop:
    """The rollout loop for `model`: a sampler with `slots` slots (rounded to the batch shards)."""
    c = config
    shards = batch_shards(exp.mesh)
    slots = -(-slots // shards) * shards
    buckets = tuple(sorted({max(64, c.rollout.cache_len // 4), max(64, c.rollout.cache_len // 2), c.rollout.cache_len}))
    sampler = Sampler(model, SamplerConfig(max_slots=slots, cache_buckets=buckets, steps_per_call=16,
                                           eos_ids=tuple(stop_token_ids(exp.tokenizer))[:8], seed=c.seed),
                      tokenizer=exp.tokenizer)
    rollout = RolloutConfig(group_size=c.rollout.group_size, max_calls=c.rollout.max_calls,
                            max_tokens=c.rollout.max_tokens, max_turn_tokens=c.rollout.max_turn_tokens,
                            temperature=c.rollout.temperature, top_p=c.rollout.top_p, top_k=c.rollout.top_k)
    return AgentLoop(sampler, exp.bridge, exp.tokenizer, exp.fmt, rollout, exp.tools,
                     rewards=task_rewards(c, exp.fmt), prompt_style=c.data.prompt)
