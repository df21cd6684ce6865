"""How long JAX spends making programs: trace, lower and compile seconds per jitted function.

JAX reports each stage of every compile through `jax.monitoring` (event durations carrying the
function's name); `CompileLog` listens to them, so any code run while it is installed is
accounted for, the sampler's and the train step's alike, with no change to the code measured:

    with CompileLog() as compiles:
        first_step()
    print(compiles.total_s, compiles.by_function())

A persistent-cache hit skips the backend compile, so a warm cache shows trace and lower time
only; benchmarks measure the cold start with the cache off.
"""
from __future__ import annotations

import collections
import threading

from jax import monitoring

# The three stages of making one program (jax/_src/dispatch.py names them).
STAGES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}

_active: list["CompileLog"] = []
_lock = threading.Lock()
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    stage = STAGES.get(event)
    if stage is None:
        return
    name = str(kwargs.get("fun_name", "?"))
    with _lock:
        for log in _active:
            log.seconds[(name, stage)] += duration
            if stage == "compile":
                log.programs += 1


def _install() -> None:
    # jax.monitoring has no way to remove a listener: one module-level listener serves every log.
    global _installed
    if not _installed:
        monitoring.register_event_duration_secs_listener(_listener)
        _installed = True


class CompileLog:
    """Seconds per (function, stage) recorded while active (a context manager; nests)."""

    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()
        self.programs = 0   # backend compiles (one per new program; cache hits not counted)

    def __enter__(self) -> "CompileLog":
        _install()
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)

    @property
    def total_s(self) -> float:
        return float(sum(self.seconds.values()))

    def stage_s(self, stage: str) -> float:
        return float(sum(s for (_, st), s in self.seconds.items() if st == stage))

    def by_function(self) -> dict[str, float]:
        """Total seconds per function name, largest first."""
        per = collections.Counter()
        for (name, _), s in self.seconds.items():
            per[name] += s
        return dict(per.most_common())

    def summary(self, top: int = 4) -> str:
        """One line: total, the three stages, the costliest functions."""
        funcs = ", ".join(f"{n} {s:.2f}" for n, s in list(self.by_function().items())[:top])
        return (f"{self.total_s:.2f} s in {self.programs} programs (trace {self.stage_s('trace'):.2f}, "
                f"lower {self.stage_s('lower'):.2f}, compile {self.stage_s('compile'):.2f}; {funcs})")
