"""Evaluate a policy: `python -m tepo_jax.evaluate --config=configs/X.py --checkpoint=PATH`.

PATH is an HF checkpoint directory (config.json + safetensors, e.g. a run's `sft_final/`) or a
run's orbax checkpoint directory (`<workdir>/checkpoints`, the latest readable step is used).
Runs the agent greedily (or `--samples N` sampled rollouts per question) on the config's
held-out split and reports accuracy, F1, tool calls per question, tool failure rate and ΔH
statistics per tool; the trajectories, with per-token entropy, go to `--out`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from tepo_jax import experiment
from tepo_jax.checkpoints.hf import load_hf
from tepo_jax.checkpoints.train_state import RunCheckpointer, abstract_like
from tepo_jax.config import ConfigError, validate
from tepo_jax.rl import loop as rl_loop
from tepo_jax.rl.optim import build_optimizer
from tepo_jax.rl.train_step import create_train_state
from tepo_jax.rollout import trajectory as traj_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint dir or a run's checkpoints dir")
_SAMPLES = flags.DEFINE_integer("samples", 0, "0: one greedy rollout per question; N: N sampled ones")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train"], "which examples to run")
_LIMIT = flags.DEFINE_integer("limit", 0, "evaluate only the first N questions (0: all)")
_OUT = flags.DEFINE_string("out", None, "output dir (default: <workdir>/evaluate)")


def load_policy(config, checkpoint: str, mesh, tokenizer):
    """The policy at `checkpoint`: an HF directory, or the latest orbax step of a run."""
    path = Path(checkpoint)
    if (path / "config.json").exists():
        return load_hf(str(path), mesh=mesh)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint={checkpoint}: no such directory")
    model = experiment.build_model(config, mesh, tokenizer)
    optimizer = build_optimizer(experiment.optim_config(config, experiment.RL))
    model_def, state, _ = create_train_state(model, optimizer, mesh)
    restored = RunCheckpointer(str(path), keep=config.train.keep_checkpoints).restore_latest(abstract_like(state))
    if restored is None:
        raise FileNotFoundError(f"--checkpoint={checkpoint}: no readable checkpoint (neither config.json "
                                "nor orbax steps)")
    return model_def.merge(restored[1].params)


def evaluate(config, checkpoint: str, *, samples: int = 0, split: str = "eval", limit: int = 0,
             out: str | None = None) -> dict:
    validate(config)
    exp = experiment.setup(config)
    try:
        model = load_policy(config, checkpoint, exp.mesh, exp.tokenizer)
        examples = exp.eval_examples if split == "eval" else exp.train_examples
        examples = examples[:limit] if limit else examples
        agent = experiment.make_agent(config, model, exp, min(64, len(examples) * max(samples, 1)))
        trajs = agent.run(examples, seed=config.seed, group_size=max(samples, 1), greedy=samples == 0)
        metrics = rl_loop.eval_metrics(trajs)
        out_dir = Path(out or Path(config.workdir) / "evaluate")
        out_dir.mkdir(parents=True, exist_ok=True)
        traj_lib.write_jsonl(out_dir / "trajectories.jsonl", trajs)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics
    finally:
        exp.close()


def main(argv) -> None:
    del argv
    if _CONFIG.value is None or _CHECKPOINT.value is None:
        sys.exit("error: --config and --checkpoint are required")
    try:
        metrics = evaluate(_CONFIG.value, _CHECKPOINT.value, samples=_SAMPLES.value, split=_SPLIT.value,
                           limit=_LIMIT.value, out=_OUT.value)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        width = max(map(len, metrics))
        for k, v in sorted(metrics.items()):
            print(f"{k:<{width}}  {v:.4f}" if v == v else f"{k:<{width}}  n/a")


if __name__ == "__main__":
    app.run(main)
