"""The `compile:` line each JAX benchmark prints just before its headline.

    compile: 9.12 s in 4 programs (trace 1.30, lower 0.62, compile 7.20; jit(train_step) 4.18, ...)

It counts every program our side makes in the benchmark's process (trace + lower + backend
compile, `tepo_jax.compile_log`), with no persistent cache: what a user's cold start pays for
these shapes. `benchmarks/report.py` puts the seconds in its table.
"""
from __future__ import annotations

from tepo_jax.compile_log import CompileLog


def start_compile_log() -> CompileLog:
    """A log that stays active for the rest of the process."""
    return CompileLog().__enter__()


def compile_line(log: CompileLog) -> str:
    return f"compile: {log.summary()}"
