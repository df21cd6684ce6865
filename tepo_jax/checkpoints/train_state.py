"""Orbax checkpoints of a whole run: train state arrays plus a JSON record of everything else.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG key) and a JSON
`extra` dict (data iterator state, phase, config snapshot). Writes are atomic (orbax writes a
temporary directory and renames it), so a process killed mid-save leaves the previous
checkpoint intact. On restore the newest checkpoint is tried first; one that fails to read
(corrupt or truncated) is reported with a warning and the next older one is used.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class RunCheckpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
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

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """(step, state, extra) of the newest readable checkpoint, or None if there is none.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: arrays come back
        directly on those shardings.
        """
        for step in reversed(self.all_steps()):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          extra=ocp.args.JsonRestore())
                restored = self._manager.restore(step, args=args)
                return step, restored["state"], dict(restored["extra"])
            except Exception as e:  # noqa: BLE001 — any read failure means "try the previous one"
                log.warning("checkpoint %d in %s is unreadable (%s: %s); falling back to an older one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        return None

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


class PreemptionFlag:
    """Set by SIGTERM (TPU preemption, job stop); the training loop checks it between steps."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()
