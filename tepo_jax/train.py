"""Training entry point: `python -m tepo_jax.train --config=configs/X.py[:VARIANT] [--config.a.b=v ...]`
(VARIANT picks one config of a family file such as configs/tpu_v5p.py; the file's docstring lists them).

Runs SFT, RL, or SFT then RL, as the config says. Every `train.checkpoint_every` steps, at the
end of a phase and on SIGTERM or SIGINT, an orbax checkpoint stores params, optimizer, step, RNG
and the data iterator; a restarted run resumes from the latest readable checkpoint with nothing
lost (on CPU the resumed run is bit-identical to an uninterrupted one, metrics.jsonl included).

Start-up refuses, each with one `error: ...` line and exit code 1, a bad config or override,
a config whose phases cannot fit the devices (`tepo_jax/sizing.py`, checked before the model is
allocated), and unreadable inputs (checkpoint, tokenizer, data files).

Exit codes: 0 done; 1 an error; 128 + signal (143 for SIGTERM, 130 for SIGINT) when a stop
signal ended the run early after its checkpoint: the run is not finished, and a scheduler
that restarts failed jobs (Kubernetes, a retry loop) restarts it and it resumes. A second
signal while the checkpoint is written aborts at once.

Multi-process (one process per host, `--coordinator_address/--num_processes/--process_id`,
`--distributed`, or found from the environment: multi-host TPU, SLURM, Open MPI, see
`multihost.cluster_detected`): the same config runs unchanged. Every process builds the global mesh and
train state, rolls out its share of each step's prompts on a sampler over its own devices,
and joins the others for the train step, the gathered trajectories and the checkpoints
(orbax, written collectively); process 0 alone writes metrics and trajectories. See
`tepo_jax/multihost.py` and docs/launch.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import signal
import sys
from typing import Optional

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from tepo_jax import experiment, hostmem, multihost, paths, policy
from tepo_jax.paths import PathError
from tepo_jax.checkpoints.hf import CheckpointError, load_hf, save_hf
from tepo_jax.checkpoints.safetensors_io import SafetensorsFormatError
from tepo_jax.checkpoints.train_state import PreemptionFlag, RunCheckpointer, abstract_like
from tepo_jax.cli import parse_config_flags
from tepo_jax.config import RL, SFT, ConfigError, validate
from tepo_jax.data.jsonl import JsonlError
from tepo_jax.evaluate import check_vocab
from tepo_jax.data.pipeline import DataSourceError, make_dataset
from tepo_jax.models.config import UnsupportedConfigError
from tepo_jax.plugins import merge, parts_from_config
from tepo_jax.rl import loop as rl_loop
from tepo_jax.rl.batch import sequence_length_buckets
from tepo_jax.rl.loss import LossConfig, policy_mismatch
from tepo_jax.rl.optim import OptimConfig, build_optimizer, build_schedule
from tepo_jax.rl.train_step import create_train_state, make_train_step, split_model
from tepo_jax.rollout.agent import AgentLoop
from tepo_jax.runlog import RunLog
from tepo_jax.sft.data import build_sft_trajectories
from tepo_jax.sft.trainer import check_seq_len, make_sft_step, sft_batch
from tepo_jax.models.decoder import build_abstract
from tepo_jax.sharding import MeshConfig, batch_sharding, initialize_distributed
from tepo_jax.sizing import GiB, MemoryBudgetError
from tepo_jax.tokenizer import TokenizerLoadError
from tepo_jax.tools import SandboxUnavailable

log = logging.getLogger("tepo_jax.train")


class UpdatesDiverged(RuntimeError):
    """Too many updates in a row were non-finite (skipped); the last good state is checkpointed."""


# Errors about the user's inputs (config, files, hardware): one line, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, SafetensorsFormatError, UnsupportedConfigError, TokenizerLoadError,
               JsonlError, DataSourceError, MemoryBudgetError, SandboxUnavailable, PathError,
               UpdatesDiverged)


class Preempted(Exception):
    """A stop signal ended the run early; the state of `step` is checkpointed."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} (checkpointed); "
                         "run the same command again to resume")
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's "ended by this signal": not finished, restart it


@dataclasses.dataclass
class Phase:
    """Where a run is: which phase, how many steps of it are done, the data iterator state."""

    name: str
    step: int = 0
    data_state: Optional[dict] = None


class Run:
    """One training run: its parts, its state, and the checkpoint it resumes from."""

    def __init__(self, config, parts=None):
        self.config, self.parts = config, parts   # parts: a user's reward/tools/data (plugins.py)
        self.global_step = 0  # checkpoint number: SFT steps + RL steps
        self.localize = None   # multi-process: global params -> the local sampler's mesh
        self.skipped_in_row = 0  # updates skipped for NaN/inf since the last applied one
        self._opened = []      # what close() releases, in reverse order
        try:
            self._start()
        except BaseException:
            self.close()  # a failed start (bad checkpoint, too big) leaves no handlers or threads behind
            raise

    def _start(self) -> None:
        c = self.config
        self.exp = self._open(self._setup(c, self.parts), "close")
        self.mesh = self.exp.mesh
        check_tokenizer_fits(c, self.exp.tokenizer)
        self.check_memory()
        self.log = self._open(RunLog(self.exp.workdir, tensorboard=c.log.tensorboard,
                                     wandb_project=c.log.wandb_project, wandb_config=c.to_dict()), "close")
        self.ckpt = self._open(RunCheckpointer(self.exp.workdir / "checkpoints", keep=c.train.keep_checkpoints),
                               "close")
        self.preempt = self._open(PreemptionFlag().install(), "uninstall")
        self.fingerprint = run_fingerprint(c, self.exp)   # stored with each checkpoint, checked on resume
        self.model = policy.build_model(c, self.mesh, self.exp.tokenizer)
        self.batch_sharding = batch_sharding(self.mesh)
        self.loss_cfg = LossConfig.from_config(c)

    def _open(self, part, release: str):
        self._opened.append(getattr(part, release))
        return part

    @staticmethod
    def _setup(config, parts=None) -> experiment.Experiment:
        """experiment.setup; with several processes, process 0 first (it writes the shared
        data, tokenizer and index files), the others once those exist."""
        if not multihost.is_multiprocess():
            return experiment.setup(config, parts)
        if jax.process_index() != 0:
            multihost_utils.sync_global_devices("tepo_jax.setup")
        exp = experiment.setup(config, parts)
        if jax.process_index() == 0:
            multihost_utils.sync_global_devices("tepo_jax.setup")
        return exp

    def check_memory(self) -> None:
        """Refuse (MemoryBudgetError), before the model is allocated, a config that cannot fit."""
        model_cfg = policy.target_model_config(self.config, len(self.exp.tokenizer))
        try:
            estimates = policy.check_config_fits(self.config, model_cfg, self.mesh)
        except MemoryBudgetError:
            raise
        except ValueError as e:  # the device's memory is unknown: nothing to compare with
            log.warning("memory check skipped: %s", e)
            return
        for phase, est in estimates.items():
            log.info("memory, %s phase: %.2f of %.2f GiB usable per device", phase, est.total / GiB, est.usable / GiB)

    def stop_requested(self) -> bool:
        """SIGTERM/SIGINT seen by any process (all processes stop at the same step)."""
        return multihost.any_process(self.preempt.requested)

    def preempted(self) -> Preempted:
        return Preempted(self.global_step, self.preempt.signum or signal.SIGTERM)

    # ---- state and checkpoints ----------------------------------------------------------------
    def new_state(self, phase: str, params=None):
        optimizer = build_optimizer(OptimConfig.for_sft(self.config) if phase == SFT else OptimConfig.for_rl(self.config))
        model_def, state, shardings = create_train_state(self.model, optimizer, self.mesh, seed=self.config.seed)
        if params is not None:
            state = state.replace(params=jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings.params))
        return model_def, optimizer, state, shardings

    def restore(self, state) -> Optional[tuple]:
        try:
            restored = self.ckpt.restore_latest(abstract_like(state), discard_unreadable=True)
        except CheckpointError as e:   # checkpoints of another run's shapes: say what changed
            saved = self.ckpt.newest_extra().get("config")
            changed = changed_settings(saved, self.config) if saved else []
            raise CheckpointError(f"{e}: use a new workdir, or move them away to start over. Settings "
                                  f"changed since: {'; '.join(changed) or 'none'}") from None
        if restored is None:
            self.log.truncate(0)  # rows of an earlier attempt that died before its first checkpoint
            return None
        step, state, extra = restored
        check_resumable(self.config, step, extra, self.fingerprint)
        self.global_step = step
        self.log.truncate(extra.get("metric_rows"))  # rows logged after this checkpoint come again
        log.info("resumed from checkpoint %d (phase %s, step %d)", step, extra["phase"], extra["phase_step"])
        return state, Phase(extra["phase"], extra["phase_step"], extra.get("data_state"))

    def save(self, state, phase: Phase) -> None:
        extra = {"phase": phase.name, "phase_step": phase.step, "data_state": phase.data_state,
                 "metric_rows": self.log.rows, "config": self.config.to_json(), "parts": self.fingerprint}
        self.ckpt.save(self.global_step, state, extra)

    def count_skipped(self, phase: Phase, metrics: dict, prefix: str) -> Optional[str]:
        """Track updates the train step skipped for a NaN/inf (`apply_update_if_finite`); past
        train.max_skipped_updates in a row, the reason to stop (`stop_diverged`)."""
        if not metrics.get(f"{prefix}update_skipped"):
            self.skipped_in_row = 0
            return None
        self.skipped_in_row += 1
        loss = metrics.get(f"{prefix}loss", metrics.get(f"{prefix}nll"))
        what = f"loss {loss}, gradient norm {metrics.get(f'{prefix}grad_norm')}"
        log.warning("%s step %d: non-finite update (%s): skipped, parameters unchanged",
                    phase.name, phase.step, what)
        if self.skipped_in_row <= self.config.train.max_skipped_updates:
            return None
        return (f"{phase.name} step {phase.step}: {self.skipped_in_row} updates in a row were non-finite "
                f"({what}) and skipped (config.train.max_skipped_updates={self.config.train.max_skipped_updates})")

    def stop_diverged(self, state, phase: Phase, reason: str):
        """Checkpoint the last good state (if the parameters are finite) and stop the run."""
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
        if finite:
            self.save(state, phase)
            raise UpdatesDiverged(f"{reason}; checkpoint {self.global_step} holds the parameters of the last "
                                  "applied update. Find the NaN's source (rewards, advantages, learning rate, "
                                  "data) before resuming")
        raise UpdatesDiverged(f"{reason}; the parameters themselves are non-finite (an earlier update "
                              "overflowed: is the learning rate sane?), so no checkpoint was written")

    # ---- phases -------------------------------------------------------------------------------
    def run(self) -> dict:
        mode = self.config.mode
        _, _, state, _ = self.new_state(SFT if mode != "rl" else RL)
        state, phase = self.restore(state) or (None, Phase(RL if mode == "rl" else SFT))
        params = state.params if state is not None else None
        if phase.name == SFT:
            params = self.sft(state, phase).params
            state, phase = None, Phase(RL)
        return self.rl(state, phase, params) if mode != "sft" else {}   # SFT alone evaluates nothing

    def sft(self, state, phase: Phase):
        c = self.config
        model_def, optimizer, fresh, shardings = self.new_state(SFT)
        state = state or fresh
        trajs = build_sft_trajectories(self.exp.train_examples, self.exp.tokenizer, self.exp.bridge,
                                       tools=self.exp.tools, fmt=self.exp.fmt,
                                       redundant_rate=c.sft.redundant_call_rate, seed=c.seed,
                                       tool_rates=c.sft.tool_rate.to_dict(), prompt_style=c.data.prompt,
                                       demonstrations=self.exp.parts.demonstrations,
                                       tool_descriptions=self.exp.parts.tool_descriptions)
        check_seq_len(trajs, c.sft.seq_len)   # before any step, not at the batch that holds the longest
        self.log.save_trajectories("sft_data", trajs[:64])
        step_fn = make_sft_step(model_def, optimizer, self.loss_cfg, self.mesh, shardings, self.batch_sharding)
        data = make_dataset(list(range(len(trajs))), seed=c.seed, batch_size=c.sft.batch_size).__iter__()
        if phase.data_state:
            data.set_state(phase.data_state)
        bar = self.log.progress(c.sft.steps, phase.step, "sft")
        stop = self.stop_requested()
        while phase.step < c.sft.steps and not stop:
            batch = sft_batch([trajs[i] for i in next(data)], c.sft.seq_len, experiment.batch_shards(self.mesh))
            state, metrics = step_fn(state, multihost.put_global(batch, self.batch_sharding))
            phase.step, self.global_step = phase.step + 1, self.global_step + 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self.log.write(phase.step, SFT, metrics)
            bar.update(1)
            bar.set_postfix(nll=f"{metrics['sft/nll']:.3f}")
            phase.data_state = data.get_state()
            diverged = self.count_skipped(phase, metrics, "sft/")
            if diverged:
                self.stop_diverged(state, phase, diverged)
            stop = self.stop_requested()
            if phase.step % c.train.checkpoint_every == 0 or phase.step == c.sft.steps or stop:
                self.save(state, phase)
        bar.close()
        if phase.step < c.sft.steps:
            raise self.preempted()
        self.export(model_def, state.params, self.exp.workdir / "sft_final")
        if multihost.is_multiprocess():  # the RL phase reads sft_final on every host
            multihost_utils.sync_global_devices("tepo_jax.sft_export")
        return state

    def export(self, model_def, params, path) -> None:
        """The policy as an HF checkpoint (+ tokenizer): loadable by transformers and by us.
        Every process calls it (save_hf gathers the arrays); process 0 writes."""
        save_hf(model_def.merge(params), path)
        if jax.process_index() == 0:
            with paths.staged(path) as local:  # transformers writes local files; gs:// gets a copy
                self.exp.tokenizer.save_pretrained(local)

    def reference_params(self, model_def):
        """The frozen KL reference: the policy RL started from, rebuilt the same way on resume."""
        if self.config.mode == "sft_then_rl":
            model = load_hf(self.exp.workdir / "sft_final", mesh=self.mesh)
        else:
            model = self.model
        return split_model(model)[1]

    def rl(self, state, phase: Phase, params) -> dict:
        c = self.config
        model_def, optimizer, fresh, shardings = self.new_state(RL, params)
        state = state or fresh
        rows = c.data.prompts_per_step * c.rollout.group_size
        step_fn = make_train_step(model_def, optimizer, self.loss_cfg, self.mesh, shardings, self.batch_sharding,
                                  micro_batches=c.train.micro_batches,
                                  schedule=build_schedule(OptimConfig.for_rl(c)), reference=c.loss.kl_coef > 0)
        ref_params = None
        if c.loss.kl_coef > 0:   # placed as the policy's params: the train step reads both
            ref_params = jax.device_put(self.reference_params(model_def), shardings.params)
        agent = self.agent(rows)
        warning = policy_mismatch(c)
        if warning:
            log.warning("%s", warning)
        step_cfg = rl_loop.RLStepConfig(
            advantage=rl_loop.advantage_config(c),
            rest=rl_loop.rest_config(c, c.train.steps), kl_coef=c.loss.kl_coef,
            row_multiple=experiment.batch_shards(self.mesh) * c.train.micro_batches,
            seq_buckets=sequence_length_buckets(128, c.rollout.cache_len),
            logprob_check_every=c.train.logprob_check_every)
        # One global prompt order on every process (example indices); each rolls out batch slots p::P.
        data = make_dataset(range(len(self.exp.train_examples)), seed=c.seed + 1,
                            batch_size=c.data.prompts_per_step).__iter__()
        if phase.data_state:
            data.set_state(phase.data_state)
        put = lambda b: multihost.put_global(b, self.batch_sharding)  # noqa: E731
        bar = self.log.progress(c.train.steps, phase.step, f"rl:{c.algo.advantage}")
        result = {}
        if phase.step == 0:
            result = self.evaluate(agent, model_def, state, 0)
        stop = self.stop_requested()
        while phase.step < c.train.steps and not stop:
            example_indices = next(data)
            slots = multihost.local_batch_slots(len(example_indices))
            state, metrics, trajs = rl_loop.rl_step(
                state, [self.exp.train_examples[example_indices[i]] for i in slots], phase.step, agent=agent,
                model_def=model_def, train_step=step_fn, put_batch=put, cfg=step_cfg,
                seed=c.seed, ref_params=ref_params, batch_slots=slots, localize=self.localize)
            phase.step, self.global_step = phase.step + 1, self.global_step + 1
            phase.data_state = data.get_state()
            self.log.write(phase.step, RL, metrics)
            if c.train.save_trajectories and phase.step % c.train.log_every == 0:
                self.log.save_trajectories(f"rl_{phase.step:06d}", trajs)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/score']:.2f}", calls=f"{metrics['tepo/calls_per_traj']:.2f}",
                            dH=f"{metrics['tepo/dh_mean']:.2f}")
            diverged = self.count_skipped(phase, metrics, "train/")
            if diverged:
                self.stop_diverged(state, phase, diverged)
            if phase.step % c.train.eval_every == 0 or phase.step == c.train.steps:
                result = self.evaluate(agent, model_def, state, phase.step)
            stop = self.stop_requested()
            if phase.step % c.train.checkpoint_every == 0 or phase.step == c.train.steps or stop:
                self.save(state, phase)
        bar.close()
        if phase.step < c.train.steps:
            raise self.preempted()
        return result or self.log.last_row("eval")  # a finished run, restarted, reports its last eval

    # ---- rollout parts ----------------------------------------------------------------------------
    def agent(self, slots: int) -> AgentLoop:
        """The rollout loop. Several processes: `slots` is the global row count; this process's
        sampler gets its share, on a mesh of its own devices (`multihost.local_mesh`)."""
        if not multihost.is_multiprocess():
            return experiment.make_agent(self.config, self.model, self.exp, slots)
        c = self.config
        self.localize = multihost.LocalParams(MeshConfig(c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
        graphdef, _ = nnx.split(build_abstract(self.model.cfg, self.localize.local))
        local_model = nnx.merge(graphdef, self.localize(nnx.state(self.model)))
        local_exp = dataclasses.replace(self.exp, mesh=self.localize.local)
        return experiment.make_agent(c, local_model, local_exp, -(-slots // multihost.process_count()))

    def evaluate(self, agent: AgentLoop, model_def, state, step: int) -> dict:
        if not self.exp.eval_examples:
            return {}
        params = rl_loop.sampler_state(model_def, state.params)
        agent.sampler.update_params(self.localize(params) if self.localize else params)
        slots = multihost.local_batch_slots(len(self.exp.eval_examples))
        trajs = agent.run([self.exp.eval_examples[i] for i in slots], seed=self.config.seed, group_size=1,
                          greedy=True, batch_slots=slots)
        trajs = multihost.gather_groups(trajs, slots)
        metrics = rl_loop.eval_metrics(trajs)
        self.log.write(step, "eval", metrics)
        self.log.save_trajectories(f"eval_{step:06d}", trajs)
        return metrics

    def close(self) -> None:
        while self._opened:
            self._opened.pop()()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_settings(saved_json: str, config) -> list[str]:
    """'field: saved -> now' for each setting that differs from a checkpoint's config snapshot."""
    saved, now = _flatten(json.loads(saved_json)), _flatten(json.loads(config.to_json()))
    shown = lambda d, k: repr(d[k]) if k in d else "(unset)"  # noqa: E731
    return [f"{k}: {shown(saved, k)} -> {shown(now, k)}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def callable_name(fn) -> str:
    """'module:qualname' of a function (of its class for a callable object)."""
    fn = inspect.unwrap(fn)
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(named, '__module__', '?')}:{named.__qualname__}"


def examples_hash(examples, demonstrations=None) -> str:
    """A digest of `examples` in order (and of their demonstrations): equal only for the same rows."""
    h = hashlib.sha256()
    for ex in examples:
        row = dataclasses.asdict(ex) if dataclasses.is_dataclass(ex) else ex
        turns = (demonstrations or {}).get(ex.id)
        h.update(json.dumps([row, turns], sort_keys=True, default=repr).encode() + b"\n")
    return h.hexdigest()[:16]


def run_fingerprint(config, exp: experiment.Experiment) -> dict:
    """What the config snapshot does not show of a run's parts: the reward (the user's function,
    else config.reward.fn, else the task's own), the tools with their descriptions, and digests
    of the train and eval examples. A Trainer marks its reward wrapper with the user's function
    (`__wrapped__`); a reward named by config.reward.fn is in the snapshot already."""
    reward = exp.parts.reward
    if reward is not None and hasattr(reward, "__wrapped__"):
        reward_name = callable_name(reward)
    else:
        reward_name = config.reward.fn or f"the {config.data.task} task's"
    return {"reward": reward_name,
            "tools": {name: exp.parts.tool_descriptions.get(name, "") for name in exp.tools},
            "train_data": examples_hash(exp.train_examples, exp.parts.demonstrations),
            "eval_data": examples_hash(exp.eval_examples)}


def check_same_parts(step: int, saved: Optional[dict], now: dict) -> None:
    """Refuse other training examples than checkpoint `step`'s (its data iterator state indexes
    them: it would resume at a position of another list), warn of another reward, tools or eval
    set. Checkpoints written before fingerprints were stored have none: nothing to compare."""
    if not saved:
        return
    if saved.get("train_data") != now["train_data"]:
        raise ConfigError(f"the training data differs from that of the workdir's checkpoint {step} (digest "
                          f"{saved.get('train_data')} -> {now['train_data']}): its data iterator position does "
                          "not fit the new examples; use a new workdir for new data")
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in ("reward", "tools", "eval_data")
               if saved.get(k) != now[k]]
    if changed:
        log.warning("resuming checkpoint %d with parts changed since it was written: %s", step, "; ".join(changed))


def check_resumable(config, step: int, extra: dict, fingerprint: Optional[dict] = None) -> None:
    """Resuming checkpoint `step` under `config`: refuse a mode that does not run the checkpoint's
    phase (it would go on with a phase the config no longer asks for), or other training data
    than the checkpoint's (`fingerprint`: `run_fingerprint`); warn of changed settings, reward,
    tools or eval data."""
    phase, mode = extra["phase"], config.mode
    if (phase == SFT and mode == "rl") or (phase == RL and mode == "sft"):
        raise ConfigError(f"config.mode={mode!r}: the workdir's checkpoint {step} is from the {phase} phase "
                          f"(step {extra['phase_step']}) of a run with mode "
                          f"{json.loads(extra.get('config', '{}')).get('mode', '?')!r}; use a new workdir, "
                          "or that mode to resume it")
    changed = changed_settings(extra["config"], config) if extra.get("config") else []
    if changed:
        log.warning("resuming checkpoint %d with settings changed since it was written: %s", step, "; ".join(changed))
    if fingerprint is not None:
        check_same_parts(step, extra.get("parts"), fingerprint)


def check_tokenizer_fits(config, tokenizer) -> None:
    """The tokenizer's ids index the policy's vocabulary (ConfigError otherwise, before the model
    is built): a token id past the model's rows is a NaN logprob in SFT (every update skipped)
    and an out-of-range prompt in the sampler. An HF checkpoint that carries its own tokenizer
    must also have the config's (the same ids must mean the same tokens)."""
    vocab = policy.target_model_config(config, len(tokenizer)).vocab_size
    if config.model.hf_checkpoint:
        try:
            check_vocab(vocab, tokenizer, paths.as_path(config.model.hf_checkpoint))
        except ValueError as e:
            raise ConfigError(f"config.tokenizer: {e}") from None
    elif len(tokenizer) > vocab:
        raise ConfigError(f"config.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model "
                          f"(config.model.preset={config.model.preset!r}) a vocabulary of {vocab}")


def startup_checks(config, parts=None) -> None:
    """What can be checked before any work (ConfigError): the config, the reward and tools it
    names by import path, the tools' names (with the user's `parts`), and once jax.distributed
    is up, that every process gets the same number of prompts per step."""
    validate(config, data_given=parts is not None and parts.train_examples is not None)
    experiment.check_user_tools(config, merge(parts_from_config(config), parts).tools)
    multihost.check_divisible(config.data.prompts_per_step)


def train(config, parts=None) -> dict:
    """Check `config`, run it (with a user's `parts`: plugins.UserParts), return the final
    evaluation metrics ({} when there is none: mode "sft", or no eval examples). Raises
    Preempted when a stop signal ended it early."""
    hostmem.retain_if_configured(config)   # before the checks start JAX
    startup_checks(config, parts)
    run = Run(config, parts)
    try:
        return run.run()
    finally:
        run.close()


_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file: configs/X.py, or "
                                          "configs/X.py:VARIANT for a family of configs",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "initialise jax.distributed from the environment "
                                 "(TPU pod metadata, SLURM) without explicit flags; on by itself where "
                                 "multihost.cluster_detected() sees several processes")


def _configure_logging() -> None:
    """Our INFO lines; only warnings from the libraries (orbax, jax, bm25s log a lot at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # absl may have set up the root logger already
    logging.getLogger("tepo_jax").setLevel(logging.INFO)


def _initialize_distributed() -> None:
    if _COORDINATOR.value or _NUM_PROCESSES.value:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value or multihost.cluster_detected():
        initialize_distributed()
    if jax.process_index() != 0:  # one log for the run: process 0's; the others only warn
        logging.getLogger("tepo_jax").setLevel(logging.WARNING)


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    if config is not None:
        hostmem.retain_if_configured(config)  # before JAX runs anything: see tepo_jax/hostmem.py
    _configure_logging()
    try:
        _initialize_distributed()
        if _CONFIG.value is None:
            raise ConfigError("--config=configs/<experiment>.py[:VARIANT] is required")
        result = train(_CONFIG.value)
    except Preempted as e:
        log.warning("%s", e)
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    if result:
        print("final eval: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(result.items()) if v is not None))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
