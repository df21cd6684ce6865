"""Orbax checkpoints of a whole run: train state arrays plus a JSON record of everything else.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG key) and a JSON
`extra` dict (data iterator state, phase, config snapshot). Writes are atomic (orbax writes a
temporary directory and renames it), so a process killed mid-save leaves the previous
checkpoint intact. On restore the newest checkpoint is tried first; one that fails to read
(corrupt or truncated) is reported with a warning and the next older one is used. A resuming
run (`discard_unreadable=True`) then deletes the unreadable newer ones: it will write those
step numbers again, and orbax refuses to save over an existing step.

`directory` may be a URL (`gs://bucket/run/checkpoints`): orbax writes the array data with
tensorstore's own GCS driver and the rest through etils.epath (tepo_jax/paths.py).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from tepo_jax import paths
from tepo_jax.checkpoints.hf import CheckpointError

log = logging.getLogger(__name__)


class RunCheckpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory, keep: int = 3):
        self.directory = paths.absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        handlers = {"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        log.info("saved checkpoint %d to %s", step, self.directory)

    def restore_latest(self, abstract_state: Any, discard_unreadable: bool = False) -> Optional[tuple[int, Any, dict]]:
        """(step, state, extra) of the newest readable checkpoint, or None if there is none.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: arrays come back
        directly on those shardings. `discard_unreadable`: delete the unreadable checkpoints
        newer than the one returned (a run resuming from it; not a reader such as evaluate).
        Checkpoints that exist but none of which reads into `abstract_state` raise
        CheckpointError, and nothing is deleted: they hold another model's or optimizer's
        state (a changed config pointed at an old workdir), and starting afresh would
        overwrite that run's metrics and checkpoints.
        """
        unreadable, first_error = [], ""
        for step in reversed(self.all_steps()):
            try:
                _check_shapes(self._manager.item_metadata(step)["state"], abstract_state)
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          extra=ocp.args.JsonRestore())
                restored = self._manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 — any read failure means "try the previous one"
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                log.warning("checkpoint %d in %s is unreadable (%s); falling back to an older one",
                            step, self.directory, reason)
                unreadable.append(step)
                first_error = first_error or reason
                continue
            if discard_unreadable:
                self._delete(unreadable)
            return step, restored["state"], dict(restored["extra"])
        if unreadable:
            raise CheckpointError(
                f"{self.directory}: none of checkpoints {sorted(unreadable)} restores into this run's state "
                f"(checkpoint {unreadable[0]}: {first_error}); they are another model's or optimizer's, or "
                "damaged")
        return None

    def newest_extra(self) -> dict:
        """The JSON record of the newest checkpoint ({} if none or unreadable), arrays not read."""
        steps = self.all_steps()
        if not steps:
            return {}
        try:
            return dict(self._manager.restore(steps[-1], args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"])
        except Exception as e:  # noqa: BLE001 — only an aid to an error message
            log.warning("checkpoint %d's record is unreadable: %s", steps[-1], e)
            return {}

    def _delete(self, steps: list[int]) -> None:
        for step in steps:
            log.warning("deleting unreadable checkpoint %d in %s (this run writes that step again)",
                        step, self.directory)
            self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()


def _leaf_names(tree: Any) -> dict:
    """'params.layers.0.attn.q_proj' -> leaf; dict keys, attributes and indices alike (orbax's
    metadata tree has dicts where the state has dataclasses)."""
    def part(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {".".join(part(k) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(stored: Any, abstract_state: Any) -> None:
    """ValueError naming the arrays whose stored shape differs from this run's (a checkpoint of
    another model size), before orbax reads anything: its failing reads leave a wall of
    asyncio tracebacks behind. Arrays only one side has are left to orbax's own restore."""
    stored_leaves = _leaf_names(stored)
    diffs = [f"{name} {tuple(stored_leaves[name].shape)} stored, {tuple(leaf.shape)} in this run"
             for name, leaf in _leaf_names(abstract_state).items()
             if name in stored_leaves and tuple(getattr(stored_leaves[name], "shape", ())) != tuple(leaf.shape)]
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ValueError(f"array shapes differ: {diffs[0]}{more}")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


class PreemptionFlag:
    """Set by SIGTERM (TPU preemption, a scheduler's stop) or SIGINT (Ctrl-C, `launch/tpu.py
    stop`); the training loop checks it between steps, checkpoints and exits. The first signal
    puts the previous handlers back, so a second one acts at once (e.g. KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict = {}
        self.signum: Optional[int] = None

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._event.set()
        log.warning("%s: stopping after this step, with a checkpoint (send it again to abort)",
                    signal.Signals(signum).name)
        self.uninstall()

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()
