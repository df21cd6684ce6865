"""XLA options of our jitted programs (`jax.jit(..., compiler_options=program_options())`).

On CPU, LLVM's optimisation level 1 instead of XLA's default 2: the matmuls and convolutions
run in library kernels that the level does not touch, and what LLVM compiles (the fusions
around them) loses nothing we could measure, while the cold start gains a third. Measured on
a 2-core AVX2 EPYC (`python -m benchmarks.rl_step`, hidden 256, 4 layers, vocab 32k):
train-step compile 11.1 -> 7.5 s, prefill 1.7 -> 0.7 s, decode 2.9 -> 2.4 s per window, the
warm step within run-to-run spread (2.67 vs 2.76 s update; 308 vs 295 tok/s decode).

A level given in XLA_FLAGS (`--xla_backend_optimization_level=N`) or in
TEPO_JAX_CPU_OPT_LEVEL wins; accelerators keep XLA's defaults.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

CPU_OPT_LEVEL = 1
_FLAG = "xla_backend_optimization_level"


def program_options(backend: Optional[str] = None) -> Optional[dict]:
    """compiler_options for jax.jit on `backend` (default: JAX's default backend); None: XLA's own."""
    if (backend or jax.default_backend()) != "cpu" or _FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    level = os.environ.get("TEPO_JAX_CPU_OPT_LEVEL", str(CPU_OPT_LEVEL))
    if not level.isdigit():
        raise ValueError(f"TEPO_JAX_CPU_OPT_LEVEL must be an integer 0-3, got {level!r}")
    return {_FLAG: int(level)}
