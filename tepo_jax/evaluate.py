"""Evaluate a policy: `python -m tepo_jax.evaluate --config=configs/X.py[:VARIANT] --checkpoint=PATH`.

PATH is an HF checkpoint directory (config.json + safetensors, e.g. a run's `sft_final/`) or a
run's orbax checkpoint directory (`<workdir>/checkpoints`, the latest readable step is used).
Runs the agent greedily (or `--samples N` sampled rollouts per question) on the config's
held-out split and reports accuracy, F1, tool calls per question, tool failure rate and ΔH
statistics per tool (`eval/tepo/dh/<tool>`, `eval/tepo/dh_std/<tool>`, ...); the trajectories,
with per-token entropy, go to `--out` (default `<workdir>/evaluate/`) as `trajectories.jsonl`
next to `metrics.json`.

An HF directory that carries a tokenizer must agree with the config's tokenizer (the same
vocabulary) and with the model (no token id past the embedding table); otherwise it is a
one-line error saying which to fix, since token ids would mean different things. A tiny-model
run's orbax checkpoints are evaluated with the tokenizer that run built (`<workdir>/tokenizer`),
not one rebuilt in another workdir; a --config.tokenizer.path that differs from it is refused.
Bad flags and an output path that cannot be written are refused before any work is done.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from tepo_jax import experiment, paths, policy
from tepo_jax.checkpoints.hf import CheckpointError, load_hf
from tepo_jax.checkpoints.train_state import RunCheckpointer, abstract_like
from tepo_jax.cli import parse_config_flags
from tepo_jax.config import ConfigError, validate
from tepo_jax.data.function_calling import FUNCTION_CALLING
from tepo_jax.rl import loop as rl_loop
from tepo_jax.rl.optim import OptimConfig, build_optimizer
from tepo_jax.rl.train_step import create_train_state
from tepo_jax.rollout import trajectory as traj_lib
from tepo_jax.tokenizer import load_tokenizer, tiny_tokenizer_dir, tokenizer_source

HF, ORBAX = "hf", "orbax"
_TOKENIZER_FILES = (  # the files tepo_jax.tokenizer.load_tokenizer looks for
    "tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
OUTPUT_FILES = ("trajectories.jsonl", "metrics.json")


def check_counts(samples: int, limit: int) -> None:
    """ValueError (one line) for a negative count: as a slice it would silently take the
    questions from the end (--limit) or sample one rollout (--samples)."""
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all questions), got {limit}")
    if samples < 0:
        raise ValueError(f"--samples must be >= 0 (0: one greedy rollout per question), got {samples}")


def checkpoint_kind(checkpoint: str) -> str:
    """'hf' (a directory with config.json) or 'orbax' (a directory of numbered step dirs);
    anything else is a FileNotFoundError, raised before anything is built."""
    paths.check_store(checkpoint)   # gs://: gcsfs installed, the bucket there (one line if not)
    path = paths.as_path(checkpoint)
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"--checkpoint={checkpoint}: a file, not a checkpoint directory (an HF "
                                "export such as <workdir>/sft_final, or a run's <workdir>/checkpoints)")
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint={checkpoint}: no such directory")
    if (path / "config.json").is_file():
        return HF
    if any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        return ORBAX
    hint = f" (did you mean {path / 'checkpoints'}?)" if (path / "checkpoints").is_dir() else ""
    raise FileNotFoundError(f"--checkpoint={checkpoint}: neither an HF checkpoint (config.json) "
                            f"nor orbax step directories{hint}")


def check_vocab(model_vocab: int, tokenizer, checkpoint, source: str = "") -> None:
    """The config's tokenizer (`source`: where it comes from) fits the model, and equals the
    checkpoint's own tokenizer if the checkpoint carries one. ValueError (one line) otherwise."""
    if len(tokenizer) > model_vocab:
        raise ValueError(f"the config's tokenizer has {len(tokenizer)} tokens but the model at "
                         f"{checkpoint} has a vocabulary of {model_vocab}")
    if not any((checkpoint / f).is_file() for f in _TOKENIZER_FILES):
        return
    own = load_tokenizer(checkpoint)
    if len(own) > model_vocab:
        raise ValueError(f"{checkpoint}: its tokenizer has {len(own)} tokens but its model a "
                         f"vocabulary of {model_vocab}")
    check_same_tokenizer(own, checkpoint, tokenizer, source)


def check_same_tokenizer(own, own_dir, tokenizer, source: str = "") -> None:
    """ValueError (one line, naming both tokenizers) unless the config's `tokenizer` (from
    `source`) maps tokens to ids as `own`, the checkpoint's tokenizer at `own_dir`, does:
    otherwise every token id would mean another token."""
    if own.get_vocab() != tokenizer.get_vocab():
        where = f", {source}" if source else ""
        raise ValueError(f"{own_dir}: the checkpoint's tokenizer ({len(own)} tokens) differs from "
                         f"the config's{where} ({len(tokenizer)} tokens); evaluate with "
                         f"--config.tokenizer.path={own_dir}")


def _function_calling(config) -> bool:
    return config.data.task == FUNCTION_CALLING


def run_tokenizer_dir(config, checkpoint: str):
    """The tokenizer a tiny-model run built into its workdir (`<workdir>/tokenizer`;
    `tokenizer_fc` for function calling) when `checkpoint` is that run's
    `<workdir>/checkpoints`, else None (other runs load config.tokenizer.path or a built-in
    tokenizer, and save none next to their checkpoints)."""
    path = paths.as_path(checkpoint)
    if not config.model.tiny or path.name != "checkpoints":
        return None
    tok = tiny_tokenizer_dir(path.parent, _function_calling(config))
    return tok if (tok / "tokenizer.json").is_file() else None


def with_run_tokenizer(config, checkpoint: str):
    """`config`, or a copy that loads the run's own tokenizer (`run_tokenizer_dir`) when the
    config names none: a tiny tokenizer rebuilt in another workdir (another seed, other data)
    gives other ids to the same tokens. A config that names one is checked in load_policy."""
    run_tok = run_tokenizer_dir(config, checkpoint)
    if run_tok is None or config.tokenizer.path:
        return config
    config = copy.deepcopy(config)
    config.tokenizer.path = os.fspath(run_tok)
    return config


def output_dir(config, out: str | None):
    """The output directory (`out`, default <workdir>/evaluate), created now, before any work:
    PathError (one line) when a file is in the way or it cannot be written."""
    flag = f"--out={out}" if out else "output directory"
    paths.check_store(out or config.workdir)
    d = paths.make_dir(out or paths.as_path(config.workdir) / "evaluate", flag)
    for name in OUTPUT_FILES:
        if (d / name).is_dir():
            raise paths.PathError(f"{flag}: {d / name} is a directory, where the {name} file goes")
    return d


def load_policy(config, checkpoint: str, mesh, tokenizer):
    """The policy at `checkpoint`: an HF directory, or the latest orbax step of a run."""
    path = paths.as_path(checkpoint)
    if checkpoint_kind(checkpoint) == HF:
        model = load_hf(path, mesh=mesh)
        check_vocab(model.cfg.vocab_size, tokenizer, path, tokenizer_source(config, _function_calling(config)))
        return model
    run_tok = run_tokenizer_dir(config, checkpoint)
    if run_tok is not None:
        check_same_tokenizer(load_tokenizer(run_tok), run_tok, tokenizer, tokenizer_source(config, _function_calling(config)))
    model = policy.build_model(config, mesh, tokenizer)
    optimizer = build_optimizer(OptimConfig.for_rl(config))
    model_def, state, _ = create_train_state(model, optimizer, mesh)
    try:
        restored = RunCheckpointer(path, keep=config.train.keep_checkpoints).restore_latest(abstract_like(state))
    except CheckpointError as e:   # the checkpointer's own words, and evaluation's advice
        raise CheckpointError(f"--checkpoint={checkpoint}: {e}: evaluate with the config the run was "
                              "trained with (model size, vocabulary)") from None
    if restored is None:
        raise FileNotFoundError(f"--checkpoint={checkpoint}: no readable orbax checkpoint")
    return model_def.merge(restored[1].params)


def evaluate(config, checkpoint: str, *, samples: int = 0, split: str = "eval", limit: int = 0,
             out: str | None = None) -> dict:
    """Metrics of the policy at `checkpoint` on `split`; writes trajectories and metrics."""
    validate(config)
    check_counts(samples, limit)
    checkpoint_kind(checkpoint)   # a bad path fails here, before data, tools and model
    config = with_run_tokenizer(config, checkpoint)
    out_dir = output_dir(config, out)
    exp = experiment.setup(config)
    try:
        model = load_policy(config, checkpoint, exp.mesh, exp.tokenizer)
        examples = exp.eval_examples if split == "eval" else exp.train_examples
        examples = examples[:limit] if limit else examples
        if not examples:
            raise ValueError(f"no {split} examples to evaluate (config.data)")
        agent = experiment.make_agent(config, model, exp, min(64, len(examples) * max(samples, 1)))
        trajs = agent.run(examples, seed=config.seed, group_size=max(samples, 1), greedy=samples == 0)
        metrics = rl_loop.eval_metrics(trajs)
        traj_lib.write_jsonl(out_dir / "trajectories.jsonl", trajs)
        (out_dir / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=1))
        return metrics
    finally:
        exp.close()


def _json_ready(metrics: dict) -> dict:
    return {k: (None if v != v else v) for k, v in metrics.items()}   # JSON has no NaN


_FLAGS: dict = {}


def define_flags() -> None:
    """The CLI flags, defined only when run as a program: tepo_jax.train defines --config
    too, and a process (a test) may import both modules."""
    _FLAGS.update(
        config=config_flags.DEFINE_config_file("config", None, "experiment config: configs/X.py, or "
                                                "configs/X.py:VARIANT for a family of configs"),
        checkpoint=flags.DEFINE_string("checkpoint", None, "HF checkpoint dir or a run's checkpoints dir"),
        samples=flags.DEFINE_integer("samples", 0, "0: one greedy rollout per question; N: N sampled ones"),
        split=flags.DEFINE_enum("split", "eval", ["eval", "train"], "which examples to run"),
        limit=flags.DEFINE_integer("limit", 0, "evaluate only the first N questions (0: all)"),
        out=flags.DEFINE_string("out", None, "output dir (default: <workdir>/evaluate)"))


def main(argv) -> None:
    del argv
    f = {k: v.value for k, v in _FLAGS.items()}
    if f["config"] is None or f["checkpoint"] is None:
        sys.exit("error: --config and --checkpoint are required")
    try:
        metrics = evaluate(f["config"], f["checkpoint"], samples=f["samples"], split=f["split"],
                           limit=f["limit"], out=f["out"])
    except (ConfigError, OSError, ValueError) as e:   # CheckpointError, TokenizerLoadError: ValueErrors
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if jax.process_index() == 0:
        width = max(map(len, metrics))
        for k, v in sorted(metrics.items()):
            print(f"{k:<{width}}  {v:.4f}" if v == v else f"{k:<{width}}  n/a")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_config_flags)
