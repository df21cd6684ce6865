"""Host memory: keep freed heap memory in the process, so jitted CPU steps stop page-faulting.

XLA's CPU runtime allocates each execution's temporaries as one buffer (1.7 GB for the
benchmark train step: the activations the backward pass reads) with `malloc` on its execution
thread, and frees it when the step ends. glibc serves a block that large with a fresh `mmap`
and gives it back with `munmap`, so every step touches ~430k new pages: 1–4 s of kernel time
per 3 s step on a 2-core VM (`getrusage` minor faults; `strace -e mmap,munmap` shows one
mmap/munmap pair of the temp size per step). The same holds for torch's large tensors.

`retain_freed_memory()` sets three glibc `mallopt` parameters so those blocks come from the
heap and stay there once freed: one arena for all threads (a non-main arena cannot hold a block
above 64 MB and falls back to mmap), no mmap-served blocks, no trimming of the heap top. The
next step reuses the same, already-mapped pages. The price: the process keeps its peak heap
(freed memory is reused by the process, not returned to the OS), which is what a long-running
training or sampling process wants anyway.

Call it once at the start of a process, before JAX (or torch) runs anything: threads that
already allocated stay on their own arenas. The benchmarks do; `python -m tepo_jax.train` does
with `--config.train.retain_freed_host_memory=True` when no accelerator plugin is installed
(`cpu_only_install`). It is off by default: for small models the one arena makes XLA's threads
contend for malloc (the kill -9 test's tiny run: 79 s with it, 68 s without), and on
TPU/GPU hosts the big buffers live on the device, and host memory (data, checkpoint staging) is
better returned to the OS.
It is a no-op returning False where glibc's `mallopt` is not available (macOS, musl).

The trade on the RL step of `benchmarks/rl_step.py` (hidden 256, 4 layers, vocab 32k, 8 rows of
191 tokens; 2-core VM, measured 2026-12-07): by default each warm step took ~107k minor faults
(~420 MB of fresh pages), with this none; its update fell from 0.75-0.85 to 0.66-0.69 s, while
compiles slowed (LLVM's threads share the one arena): the first step's compile took 7.5 and 8.0
s against 5.7-8.6 s in six default runs, and 7.3 and 6.3 s against 5.2 and 5.2 s on the
`--quick` model. Applied after the first step it does nothing (the threads keep their arenas),
and the mmap and trim settings alone leave the faults (a thread arena's emptied heap is
unmapped). glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` cut the faults to a few hundred but
made every other step twice as long (huge-page compaction). So it stays opt-in; that benchmark
measures the default.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see module docstring). True if applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 as the trim threshold is SIZE_MAX inside glibc: never trim (mallopt(3)).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied


def cpu_only_install() -> bool:
    """True when JAX can only run on the CPU here: no PJRT plugin (jax_cuda*, ROCm, ...) and no
    libtpu installed. Looks at installed packages only; JAX is not initialised."""
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))
