"""The library entry point: train on your own reward, tools and data in a few lines (docs/api.md).

    from tepo_jax.api import Trainer
    trainer = Trainer(config, reward=my_reward, tools=[my_tool], train_data=rows)
    metrics = trainer.run()            # SFT and/or RL as config.mode says, then the final eval

`python -m tepo_jax.train` and `make demo` run the same `tepo_jax.train.train(config, parts)`;
a Trainer only adds the Python objects (tepo_jax/plugins.py says what each may be). The
parts of a run, for a loop of your own, are `Trainer.open()`: a `tepo_jax.train.Run` with the
experiment (`.exp`: tokenizer, tools, call format, examples), the policy (`.model`) and the
rollout loop (`.agent(slots)`); `tepo_jax.rl.loop.rl_step` is one RL step over them.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, Sequence

import ml_collections

from tepo_jax import hostmem, paths
from tepo_jax.config import defaults
from tepo_jax.data.loading import EVAL_SPLITS, TRAIN_SPLITS, read_examples
from tepo_jax.plugins import PluginError, UserParts, as_examples, as_reward, as_tool
from tepo_jax.train import Run, startup_checks, train


class Trainer:
    """A run of `config` (default: `tepo_jax.config.defaults()`) with your parts.

    reward: fn(text, gold) or fn(trajectory) -> float | RewardResult, for every example.
    tools: Tool objects, classes, or plain one-argument functions (called as <name>arg</name>).
    train_data / eval_data: lists of dicts ({"question", "answer"} or {"question", "answers"},
      optionally "demonstration": the model turns SFT learns from), any indexable dataset of
      them (a grain MapDataset), or a JSONL file / tfds data dir read as config.data.task and
      config.data.layout say. Each is used whenever given, independently of the other; None
      keeps config.data's: its examples for train_data, and for eval_data its eval set, except
      that with your own train_data that is only a math/qa `config.data.eval_path` file (the
      synthetic task's eval questions are another task's): without one no evaluation runs (a
      warning says so) and `run()` returns {}.
    Tool names, the config, and the reward's and tools' shapes are checked here (PluginError /
    ConfigError, one line); every prompt's length against rollout.cache_len when the run opens.
    """

    def __init__(self, config: Optional[ml_collections.ConfigDict] = None, *,
                 reward: Optional[Callable] = None, tools: Sequence[Any] = (),
                 train_data: Optional[Sequence] = None, eval_data: Optional[Sequence] = None):
        self.config = config if config is not None else defaults()
        hostmem.retain_if_configured(self.config)   # first: a fresh process on a CPU-only install
        train_examples, demos = self._examples(train_data, "train_data", TRAIN_SPLITS)
        eval_examples, _ = self._examples(eval_data, "eval_data", EVAL_SPLITS)
        self.parts = UserParts(reward=_marked(as_reward(reward, examples=(train_examples, eval_examples)), reward)
                               if reward is not None else None,
                               tools=tuple(as_tool(t, f"tools[{i}]") for i, t in enumerate(tools)),
                               train_examples=train_examples, eval_examples=eval_examples,
                               demonstrations=demos)
        startup_checks(self.config, self.parts)   # a bad config is an error here, not later

    def _examples(self, data, where: str, splits: tuple[str, ...]) -> tuple[Optional[list], dict]:
        """None (keep config.data), a JSONL file or tfds data dir (read as config.data.task /
        layout say), or rows."""
        if data is None:
            return None, {}
        if isinstance(data, (str, os.PathLike)):
            if not paths.as_path(data).exists():  # a local path or a URL (gs://...)
                raise PluginError(f"{where}: {os.fspath(data)!r} does not exist")
            if self.config.data.task not in ("math", "qa"):
                raise PluginError(f"{where}: a file is read as config.data.task says; set it to 'math' or "
                                  f"'qa' (it is {self.config.data.task!r})")
            return read_examples(self.config, os.fspath(data), splits), {}
        return as_examples(data, where)

    def run(self) -> dict:
        """Train as `config.mode` says (resuming from the workdir's checkpoints), then return
        the final evaluation metrics (`eval/...`): {} with no eval examples, and for mode "sft",
        which evaluates nothing (its policy is in <workdir>/sft_final)."""
        return train(self.config, self.parts)

    def open(self) -> Run:
        """The run's parts without running it, for a loop of your own; call `.close()` after."""
        return Run(self.config, self.parts)


def _marked(wrapper: Callable, fn: Callable) -> Callable:
    """The reward wrapper named as the user's `fn` (`__wrapped__`, module, qualname): how a
    checkpoint's record names the reward, to tell a resumed run it changed (train.run_fingerprint)."""
    return functools.update_wrapper(wrapper, fn, updated=())
