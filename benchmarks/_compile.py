"""The `compile:` line each JAX benchmark prints just before its headline.

    compile: 9.12 s in 4 programs (trace 1.30, lower 0.62, compile 7.20; jit(train_step) 4.18, ...)

It counts every program our side makes in the benchmark's process (trace + lower + backend
compile, `tepo_jax.compile_log`), with no persistent cache: what a user's cold start pays for
these shapes. `benchmarks/report.py` puts the seconds in its table.

`time_sampler_calls` times a sampler's cold first call and its warm calls the same way for
every side (`benchmarks/tunix_step.py` and the Tunix peer, which imports only this module and
`tepo_jax.compile_log` from our tree).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from tepo_jax.compile_log import CompileLog


def start_compile_log() -> CompileLog:
    """A log that stays active for the rest of the process."""
    return CompileLog().__enter__()


def compile_line(log: CompileLog) -> str:
    return f"compile: {log.summary()}"


def time_sampler_calls(side: str, call: Callable[[int], int], warm_calls: int) -> dict:
    """`call(seed) -> tokens sampled`: its first call (wall and compile seconds, the programs
    printed), then `warm_calls` more; tokens/s = median tokens / median seconds of those."""
    with CompileLog() as first_compiles:
        t0 = time.perf_counter()
        call(0)
        first_s = time.perf_counter() - t0
    times, tokens = [], []
    for i in range(warm_calls):
        t0 = time.perf_counter()
        tokens.append(call(i + 1))
        times.append(time.perf_counter() - t0)
    print(f"{side}: first sampler call compiles {first_compiles.summary()}")
    return {"first_call_s": first_s, "first_call_compile_s": first_compiles.total_s,
            "tok_per_s": statistics.median(tokens) / statistics.median(times), "tokens": tokens}
