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

log = logging.getLogger(__name__)


class RunCheckpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory, keep: int = 3):
        self.directory = paths.absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

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
        """
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          extra=ocp.args.JsonRestore())
                restored = self._manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 — any read failure means "try the previous one"
                log.warning("checkpoint %d in %s is unreadable (%s: %s); falling back to an older one",
                            step, self.directory, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
                unreadable.append(step)
                continue
            if discard_unreadable:
                self._delete(unreadable)
            return step, restored["state"], dict(restored["extra"])
        return None

    def _delete(self, steps: list[int]) -> None:
        for step in steps:
            log.warning("deleting unreadable checkpoint %d in %s (this run writes that step again)",
                        step, self.directory)
            self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()


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
