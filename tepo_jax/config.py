"""Experiment configuration: the defaults every `configs/*.py` starts from, and validation.

A config file's `get_config()` returns `defaults()` with some fields changed and no logic.
`validate(config)` runs at start-up, before anything compiles: an unknown field, a wrong type
or an inconsistent combination is a one-line `ConfigError` naming the field.

Defaults marked "paper" follow TEPO (arXiv 2602.02050); "ours" are our choices where the
paper is silent (docs/design.md).
"""
from __future__ import annotations

import difflib
import math
from typing import Any

import ml_collections

from tepo_jax.errors import ConfigError

ADVANTAGES = ("grpo", "tepo_sparse", "tepo_dense")   # the one list (rl/advantages.AdvantageKind)
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")   # (rl/loss.AggMode)
MODES = ("sft", "rl", "sft_then_rl")
SFT, RL = "sft", "rl"                     # the phases a mode runs
TASKS = ("synthetic", "math", "qa", "function_calling")
_ROLES = ("reasoning", "format", "tool_name", "tool_args", "answer_content")   # ResT roles
# The tool each synthetic family calls (tepo_jax/data/synthetic.py FAMILIES; a test keeps
# the two in step without importing the data modules here).
_FAMILY_TOOLS = {"product": "python", "small_product": "python", "lookup": "search",
                 "in_context": "search", "big_arithmetic": "python", "multihop": "search"}


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "sft_then_rl"            # sft | rl | sft_then_rl
    c.workdir = "runs/default"        # checkpoints, metrics, trajectories, plots; or gs://bucket/run

    c.model = ml_collections.ConfigDict()
    c.model.preset = ""               # an HF model name, e.g. "Qwen2.5-0.5B" (random init)
    c.model.hf_checkpoint = ""        # or an HF checkpoint directory (config.json + safetensors)
    c.model.tiny = False              # or the tiny random model the CPU demo uses
    c.model.tiny_hidden = 64
    c.model.tiny_layers = 2
    c.model.tiny_heads = 4
    c.model.tiny_kv_heads = 2
    c.model.dtype = "float32"         # compute dtype (bfloat16 on accelerators)
    c.model.param_dtype = "float32"
    c.model.remat = False

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""             # HF tokenizer directory; empty: built offline (below)
    c.tokenizer.builtin = "qwen2.5"   # qwen2.5 | llama3, built from the quicktok vocabularies

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1                  # -1: all remaining devices
    c.mesh.tensor = 1

    c.data = ml_collections.ConfigDict()
    c.data.task = "synthetic"         # synthetic | math | qa | function_calling
    c.data.train_path = ""            # JSONL file or tfds data dir for math/qa
    c.data.eval_path = ""
    c.data.layout = "auto"            # JSONL field layout (gsm8k, hotpotqa, musique, ...)
    c.data.n_train = 512              # synthetic task sizes
    c.data.n_eval = 64
    # Synthetic task: relative weight of each family (tepo_jax/data/synthetic.py; 0 = unused).
    c.data.mix = ml_collections.ConfigDict(dict(
        product=1.0, small_product=1.5, lookup=1.0, in_context=1.0, big_arithmetic=0.0, multihop=0.0))
    c.data.prompts_per_step = 4       # prompts per RL step (each sampled group_size times)
    c.data.prompt = "full"            # tag-format system prompt: full | short (one line; tiny models)

    c.tools = ml_collections.ConfigDict()
    c.tools.python = True
    c.tools.search = True
    c.tools.python_timeout_s = 5.0
    c.tools.require_sandbox = False   # refuse to run python without bubblewrap
    c.tools.python_memory_mb = 1024   # one run's memory, all its processes (cgroup; docs/tools.md)
    c.tools.python_max_processes = 32
    c.tools.sandbox_cgroup = True     # a memory+pids cgroup per run where the host allows it
    c.tools.search_backend = "local"  # local | remote
    c.tools.search_url = ""           # retrieval server for the remote backend
    c.tools.search_index = ""         # bm25s index directory for the local backend
    c.tools.search_corpus = ""        # or a JSONL corpus to index at start-up
    c.tools.search_top_k = 3
    c.tools.max_workers = 8
    c.tools.max_result_chars = 600
    c.tools.extra = ""                # your tools by import path, comma-separated (docs/api.md)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.group_size = 4          # G samples per prompt
    c.rollout.max_calls = 3           # tool calls per trajectory
    c.rollout.max_tokens = 384        # model tokens per trajectory
    c.rollout.max_turn_tokens = 96    # model tokens per turn
    c.rollout.cache_len = 1024        # KV cache length per slot
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0               # 0: off

    c.algo = ml_collections.ConfigDict()
    c.algo.advantage = "tepo_sparse"  # grpo | tepo_sparse | tepo_dense
    c.algo.alpha = 0.5                # dense bonus weight α (paper: a hyper-parameter; 0.5 ours)
    c.algo.no_call_scale = 1.0        # sparse reward for n = 0 calls: F1·c (ours)
    c.algo.adv_eps = 1e-6             # (ours; tunix and TRL use 1e-6 / 1e-4)
    c.algo.adv_std = "population"     # population (ddof 0; ours) | sample (ddof 1, as tunix and TRL)
    c.algo.adv_scale_by_std = True    # GRPO's (v − mean)/std; False: mean-only (Dr. GRPO)
    # Ours, not a field: a call written but not run (past rollout.max_calls or the budget) is
    # UNRUN_CALL: it carries loss and the final segment's advantage but never enters H(r_n).
    c.algo.rest = False               # ResT token re-weighting (combinable with any advantage)
    c.algo.rest_entropy_roles = False # ResT roles from token entropy instead of spans
    # ResT role weights move from rest_start to rest_end along rest_schedule over
    # rest_total_steps (0: train.steps), then are normalised to mean 1 over model tokens.
    # All weights are ours: the ResT paper's exact values were not verified offline.
    c.algo.rest_schedule = "linear"   # constant | linear | cosine
    c.algo.rest_total_steps = 0
    c.algo.rest_start = ml_collections.ConfigDict(dict(
        reasoning=1.0, format=2.0, tool_name=2.0, tool_args=1.0, answer_content=1.0))
    c.algo.rest_end = ml_collections.ConfigDict(dict(
        reasoning=1.5, format=0.5, tool_name=0.5, tool_args=1.5, answer_content=1.5))
    c.algo.rest_entropy_quantile = 0.8  # entropy roles: "high" = above this batch quantile
    c.algo.rest_entropy_start = ml_collections.ConfigDict(dict(low=2.0, high=1.0))
    c.algo.rest_entropy_end = ml_collections.ConfigDict(dict(low=0.5, high=1.5))

    c.loss = ml_collections.ConfigDict()
    c.loss.eps_low = 0.2
    c.loss.eps_high = 0.28            # clip-higher (ours; DAPO's default)
    c.loss.kl_coef = 0.0              # β for k3 KL to the frozen initial policy
    # The trained policy. False (ours): the model's temperature-1 distribution, whatever
    # rollout.temperature draws at. True (TRL's and verl's convention): softmax(logits / T) at
    # T = rollout.temperature, in the sampler's recorded logprobs and entropies (so TEPO's
    # entropies too), the ratio, the reference KL and the logprob check. docs/design.md, Loss.
    c.loss.tempered_policy = False
    # token_mean (ours) | seq_mean_token_mean (Tunix/TRL GRPO) | seq_mean_token_sum_norm
    # (Dr. GRPO, constant L = rollout.max_tokens); rl/loss.py, docs/design.md.
    c.loss.agg_mode = "token_mean"
    c.loss.seq_chunk = 256            # positions per chunk of the train logprob pass; 0: all at once
    c.loss.vocab_chunk = 0            # vocabulary chunk inside it; 0: whole vocabulary

    # Function-calling reward (rewards/function_calling.py): ToolRL's static ranges, or the
    # ranges ResT trains with (ToolRL's SCHEDULEREWARD), which move with the RL step.
    c.reward = ml_collections.ConfigDict()
    c.reward.fn = ""                  # your reward by import path, pkg.module:fn (docs/api.md)
    c.reward.fc_schedule = "off"      # off: format [0, 1], correctness [-3, 3] | rest: scheduled
    c.reward.fc_schedule_steps = 150  # T of the schedule (ToolRL/ResT: 150)
    c.reward.fc_require_think = False # ToolRL/ResT require <think>…</think>; ours need not

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"     # constant | cosine
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100               # RL steps
    c.train.micro_batches = 1
    c.train.eval_every = 25
    c.train.checkpoint_every = 25
    c.train.logprob_check_every = 1   # log the sampler-vs-trainer logprob diff every N RL steps; 0 never (free either way)
    c.train.keep_checkpoints = 3
    # A step whose loss, gradients or update hold a NaN/inf leaves the parameters as they were;
    # after more than this many such steps in a row the run checkpoints and stops.
    c.train.max_skipped_updates = 3
    c.train.log_every = 1
    c.train.save_trajectories = True
    # CPU only: glibc keeps freed heap blocks for reuse and JAX runs CPU programs on the calling
    # thread, so a step's temporaries stop page-faulting (tepo_jax/hostmem.py: the train_step
    # benchmark's 1.7 GB, 1-4 s of faults per step; the RL step's ~420 MB, ~0.1 s per step).
    # Applied by a run of a fresh process on a CPU-only install; False returns freed memory to
    # the OS and keeps async dispatch.
    c.train.retain_freed_host_memory = True
    # XLA's persistent compilation cache: a resumed or repeated run loads its compiled steps
    # instead of compiling them again (the kill -9 test's tiny run: 62 s -> 40 s per launch).
    # Keyed by the program, the compile options and the backend; "" turns it off. Keep it on a
    # local disk per machine type: a cache shared between different CPUs may not fit them all.
    c.train.compilation_cache_dir = "~/.cache/tepo_jax/xla"

    # Run outputs besides metrics.jsonl (tepo_jax/runlog.py). W&B: "" off; a project name logs
    # every metrics row there too, from process 0, one W&B run per workdir across resumes.
    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True
    c.log.wandb_project = ""

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 100
    c.sft.batch_size = 8
    c.sft.lr = 1e-3
    c.sft.schedule = "cosine"         # cosine | constant, after a warmup of 10% of the steps
    c.sft.redundant_call_rate = 0.3   # share of SFT tool solutions with a redundant/useless call
    # Synthetic task: how often the SFT demonstrator uses a tool, per family (else it answers
    # directly, and right). Ours: the demonstrator does small products in its head, which the
    # model cannot imitate, and searches for half the facts the question states; that leaves
    # RL a behaviour to fix and TEPO-sparse calls to cut (docs/demo.md).
    c.sft.tool_rate = ml_collections.ConfigDict(dict(
        product=1.0, small_product=0.2, lookup=1.0, in_context=0.5, big_arithmetic=1.0, multihop=1.0))
    c.sft.seq_len = 256
    return c


# Field -> (predicate, message). Checked in order; the first failure is the error.
_RULES: list[tuple[str, Any, str]] = [
    ("mode", lambda v: v in MODES, f"must be one of {MODES}"),
    ("algo.advantage", lambda v: v in ADVANTAGES, f"must be one of {ADVANTAGES}"),
    ("data.task", lambda v: v in TASKS, f"must be one of {TASKS}"),
    ("data.prompt", lambda v: v in ("full", "short"), "must be full or short"),
    ("model.dtype", lambda v: v in ("float32", "bfloat16", "float16"), "must be float32, bfloat16 or float16"),
    ("model.param_dtype", lambda v: v in ("float32", "bfloat16"), "must be float32 or bfloat16"),
    ("rollout.group_size", lambda v: v >= 2, "must be >= 2: group normalisation needs 2+ samples"),
    ("rollout.max_calls", lambda v: v >= 0, "must be >= 0"),
    ("rollout.temperature", lambda v: v >= 0, "must be >= 0"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("loss.eps_low", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("loss.eps_high", lambda v: v >= 0, "must be >= 0"),
    ("loss.kl_coef", lambda v: v >= 0, "must be >= 0"),
    ("loss.agg_mode", lambda v: v in LOSS_AGG_MODES, f"must be one of {LOSS_AGG_MODES}"),
    ("optim.lr", lambda v: 0 < v <= 1, "must be in (0, 1] (AdamW's step size)"),
    ("optim.schedule", lambda v: v in ("constant", "cosine"), "must be constant or cosine"),
    ("sft.schedule", lambda v: v in ("constant", "cosine"), "must be constant or cosine"),
    ("train.steps", lambda v: v >= 0, "must be >= 0"),
    ("train.micro_batches", lambda v: v >= 1, "must be >= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, "must be >= 1"),
    ("train.max_skipped_updates", lambda v: v >= 0, "must be >= 0 (0: stop at the first NaN update)"),
    ("train.eval_every", lambda v: v >= 1, "must be >= 1 (steps between evaluations)"),
    ("train.checkpoint_every", lambda v: v >= 1, "must be >= 1 (steps between checkpoints)"),
    ("train.log_every", lambda v: v >= 1, "must be >= 1 (steps between trajectory dumps)"),
    ("data.prompts_per_step", lambda v: v >= 1, "must be >= 1"),
    ("sft.steps", lambda v: v >= 0, "must be >= 0"),
    ("sft.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("sft.redundant_call_rate", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("tools.search_backend", lambda v: v in ("local", "remote"), "must be local or remote"),
    ("tools.python_memory_mb", lambda v: v >= 64, "must be at least 64"),
    ("train.logprob_check_every", lambda v: v >= 0, "must be >= 0 (0: never)"),
    ("tools.python_max_processes", lambda v: v >= 1, "must be at least 1"),
    ("tokenizer.builtin", lambda v: v in ("qwen2.5", "llama3"), "must be qwen2.5 or llama3"),
    ("algo.adv_std", lambda v: v in ("population", "sample"), "must be population or sample"),
    ("algo.adv_eps", lambda v: v >= 0, "must be >= 0"),
    ("algo.rest_schedule", lambda v: v in ("constant", "linear", "cosine"), "must be constant, linear or cosine"),
    ("algo.rest_total_steps", lambda v: v >= 0, "must be >= 0 (0: train.steps)"),
    ("algo.rest_entropy_quantile", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("loss.seq_chunk", lambda v: v >= 0, "must be >= 0 (0: no chunking)"),
    ("loss.vocab_chunk", lambda v: v >= 0, "must be >= 0 (0: no chunking)"),
    ("reward.fc_schedule", lambda v: v in ("off", "rest"), "must be off or rest"),
    ("reward.fc_schedule_steps", lambda v: v >= 1, "must be >= 1"),
    ("seed", lambda v: v >= 0, "must be >= 0"),
    ("workdir", lambda v: bool(v.strip()), "must name a directory"),
    ("mesh.data", lambda v: v >= 1, "must be >= 1"),
    ("mesh.fsdp", lambda v: v == -1 or v >= 1, "must be >= 1, or -1 (all remaining devices)"),
    ("mesh.tensor", lambda v: v >= 1, "must be >= 1"),
    ("data.n_train", lambda v: v >= 1, "must be >= 1"),
    ("data.n_eval", lambda v: v >= 0, "must be >= 0"),
    ("rollout.max_tokens", lambda v: v >= 1, "must be >= 1"),
    ("rollout.max_turn_tokens", lambda v: v >= 1, "must be >= 1"),
    ("rollout.top_k", lambda v: v >= 0, "must be >= 0 (0: off)"),
    ("tools.python_timeout_s", lambda v: v > 0, "must be > 0 (seconds)"),
    ("tools.max_workers", lambda v: v >= 1, "must be >= 1"),
    ("tools.search_top_k", lambda v: v >= 1, "must be >= 1"),
    ("tools.max_result_chars", lambda v: v >= 1, "must be >= 1"),
    ("optim.warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optim.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("sft.lr", lambda v: 0 < v <= 1, "must be in (0, 1] (AdamW's step size)"),
    ("sft.seq_len", lambda v: v >= 1, "must be >= 1"),
]
_RULES += [(f"model.tiny_{f}", lambda v: v >= 1, "must be >= 1") for f in ("hidden", "layers", "heads", "kv_heads")]
_RULES += [(f"data.mix.{f}", lambda v: v >= 0, "must be >= 0 (a family weight)") for f in _FAMILY_TOOLS]
_RULES += [(f"sft.tool_rate.{f}", lambda v: 0 <= v <= 1, "must be in [0, 1]") for f in _FAMILY_TOOLS]
_RULES += [(f"algo.{group}.{name}", lambda v: v >= 0, "must be >= 0 (a ResT weight)")
           for group, names in (("rest_start", _ROLES), ("rest_end", _ROLES),
                                ("rest_entropy_start", ("low", "high")),
                                ("rest_entropy_end", ("low", "high")))
           for name in names]


def _get(c, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def _unknown(name: str, key: str, known) -> str:
    """`config.a.b: unknown field`, with the closest known name when one is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean config.{name[:-len(key)]}{close[0]}?)" if close else ""
    return f"config.{name}: unknown field{hint}"


def unknown_field(config, dotted: str) -> str:
    """The message for the first part of `dotted` ('rollout.groupsize') that `config` lacks,
    or '' when the whole path exists."""
    node, parts = config, dotted.split(".")
    for i, key in enumerate(parts):
        name = ".".join(parts[:i + 1])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config.{name}: unknown field (config.{'.'.join(parts[:i])} is not a group of fields)"
        if key not in node:
            return _unknown(name, key, node.keys())
        node = node[key]
    return ""


def _check_known_fields(config, reference, prefix="") -> None:
    for key in config.keys():
        name = prefix + key
        if key not in reference:
            raise ConfigError(_unknown(name, key, reference.keys()))
        value, default = config[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{name}: expected a group of fields, got {value!r}")
            _check_known_fields(value, default, name + ".")
        elif isinstance(default, bool) != isinstance(value, bool) or (
                not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int))):
            raise ConfigError(f"config.{name}: expected {type(default).__name__}, got {value!r}")


def _check_finite(config, prefix="") -> None:
    """Every number is finite: a NaN or inf setting (a learning rate, a reward scale) would turn
    the first update's parameters into NaN, silently."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{prefix}{key}={value!r}: must be a finite number")


def _check_model(m) -> None:
    sources = [bool(m.preset), bool(m.hf_checkpoint), bool(m.tiny)]
    if sum(sources) != 1:
        raise ConfigError("config.model: set exactly one of preset, hf_checkpoint, tiny")
    if m.preset:
        from tepo_jax.models.presets import PRESETS
        if m.preset not in PRESETS:
            close = difflib.get_close_matches(m.preset, list(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(PRESETS))}"
            raise ConfigError(f"config.model.preset={m.preset!r}: unknown model{hint}")
    if m.tiny:
        if m.tiny_hidden % m.tiny_heads or (m.tiny_hidden // m.tiny_heads) % 2:
            raise ConfigError(f"config.model.tiny_hidden={m.tiny_hidden}: must be tiny_heads={m.tiny_heads} "
                              "× an even head size (rotary embeddings rotate pairs)")
        if m.tiny_heads % m.tiny_kv_heads:
            raise ConfigError(f"config.model.tiny_kv_heads={m.tiny_kv_heads}: must divide "
                              f"tiny_heads={m.tiny_heads}")


def _check_consistency(c, data_given: bool = False) -> None:
    _check_model(c.model)
    if c.rollout.max_turn_tokens > c.rollout.max_tokens:
        raise ConfigError("config.rollout.max_turn_tokens: larger than rollout.max_tokens")
    if c.loss.tempered_policy and c.rollout.temperature == 0:
        raise ConfigError("config.loss.tempered_policy: needs rollout.temperature > 0 (the policy is "
                          "softmax(logits / rollout.temperature); 0 is greedy decoding)")
    if c.rollout.max_tokens >= c.rollout.cache_len:
        raise ConfigError("config.rollout.max_tokens: must be smaller than rollout.cache_len "
                          "(the prompt and tool results also live in the cache)")
    if not data_given:  # a user's data (tepo_jax.api) replaces config.data's source
        _check_data(c)
    _check_tools(c, data_given)
    batch = c.data.prompts_per_step * c.rollout.group_size
    if batch % c.train.micro_batches:
        raise ConfigError(f"config.train.micro_batches={c.train.micro_batches}: does not divide the "
                          f"{batch} trajectories of a step (prompts_per_step × group_size)")


def known_layouts(task: str) -> tuple[str, ...]:
    """The data.layout values `task` can read (besides 'auto'); imported here, not at the top,
    so that reading a config stays free of the data modules."""
    if task == "function_calling":
        from tepo_jax.data.function_calling import LAYOUTS
    else:
        from tepo_jax.data.jsonl import LAYOUTS
    return tuple(sorted(LAYOUTS))


def _check_data(c) -> None:
    if c.data.task in ("math", "qa") and not c.data.train_path:
        raise ConfigError(f"config.data.train_path: required for data.task={c.data.task!r}")
    layouts = known_layouts(c.data.task)
    if c.data.layout != "auto" and c.data.layout not in layouts:
        raise ConfigError(f"config.data.layout={c.data.layout!r}: not a layout of data.task="
                          f"{c.data.task!r}; one of {('auto',) + layouts}")


def _check_tools(c, data_given: bool = False) -> None:
    t = c.tools
    if c.data.task == "synthetic" and not data_given:
        if not any(w > 0 for w in c.data.mix.values()):
            raise ConfigError("config.data.mix: no synthetic family has a positive weight")
        for family, weight in c.data.mix.items():
            tool = _FAMILY_TOOLS[family]
            if weight > 0 and not t[tool]:
                raise ConfigError(f"config.tools.{tool}: the synthetic family {family!r} needs it "
                                  f"(or set config.data.mix.{family}=0)")
    if t.search and t.search_backend == "remote" and not t.search_url:
        raise ConfigError("config.tools.search_url: required for the remote search backend")
    # The synthetic task writes its own corpus (a user's data does not); function calling does
    # not use these tools.
    if (t.search and t.search_backend == "local" and (c.data.task in ("math", "qa") or data_given)
            and not (t.search_index or t.search_corpus)):
        raise ConfigError("config.tools.search_corpus: the local search backend needs a JSONL corpus "
                          "(or tools.search_index, or tools.search=False)")


def validate(config: ml_collections.ConfigDict, data_given: bool = False) -> ml_collections.ConfigDict:
    """Raise ConfigError (one line, naming the field) unless `config` is usable; `data_given`:
    the examples come from the caller (tepo_jax.api), not from config.data."""
    _check_known_fields(config, defaults())
    _check_finite(config)
    for field, ok, message in _RULES:
        value = _get(config, field)
        if not ok(value):
            raise ConfigError(f"config.{field}={value!r}: {message}")
    _check_consistency(config, data_given)
    return config
