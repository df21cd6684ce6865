"""Host memory: keep freed heap memory in the process, so jitted CPU steps stop page-faulting.

XLA's CPU runtime allocates each execution's temporaries as one buffer (1.7 GB for the
benchmark train step: the activations the backward pass reads; ~420 MB for the RL step of
`benchmarks/rl_step.py`) with `malloc`, and frees it when the step ends. glibc serves a block
that large with a fresh `mmap` and gives it back with `munmap`, so every step touches every
page anew: ~430k minor faults, 1-4 s of kernel time per 3 s train step on a 2-core VM, and
~107k faults per RL step (`getrusage`; `strace -e mmap,munmap` shows one mmap/munmap pair of
the temp size per step). The same holds for torch's large tensors.

`retain_freed_memory()` makes those blocks come from the main heap and stay there once freed:
 - glibc: no mmap-served blocks (`M_MMAP_MAX` 0) and no trimming of the heap top
   (`M_TRIM_THRESHOLD` max), so a freed block is reused by the next step, its pages mapped;
 - JAX: CPU programs run on the calling thread (`jax_cpu_enable_async_dispatch` off). With
   async dispatch the temporaries are allocated from XLA's worker threads, and with the glibc
   settings alone a program's temporaries still faulted at every call (one CPU device, a 256 MB
   temporary: ~65k faults per call, 8 calls of 8; `tests/test_hostmem.py`); from the calling
   thread they come from the main heap, with no faults once it has settled (after one to five
   calls: until the heap has grown to fit the temporary in its free space again).
An earlier version instead limited glibc to one arena for all threads: the faults went too, but
XLA's compiler threads then contended for malloc (first RL step's compile 7.5-8.0 s against
5.7-8.6 s; the kill -9 test's tiny run 79 s against 68 s). The dispatch setting is read when
JAX's CPU backend starts, so `retain_if_configured` leaves a process whose backend runs alone.

On the RL step of `benchmarks/rl_step.py` (hidden 256, 4 layers, vocab 32k, 8 rows of 191
tokens; 2-core VM, 2026-12-07): faults per warm step ~107k -> under 2k, update 0.75-0.85 ->
0.66-0.71 s, first-step compile unchanged (6.6 and 6.1 s against 5.7-8.6 s). Synchronous
dispatch costs little there: the sampler reads each decode call's tokens before the next, and an
update needs the rollout before it (the rollout's sampler alone, medians of 8 calls in
alternated processes: 1194 and 1264 tok/s with it, 1286 and 1276 without, within this VM's
noise). A train step alone (`benchmarks/train_step.py --skip-peer`, 1.7 GB of temporaries) ran 8
steps with under 600 faults each; with torch's steps alternating in the same process the shared
heap still grew now and then (one or two steps of 110k-190k faults in two of three runs; the
one-arena version had one such run in five). glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` cut
the faults too but made every other step twice as long (huge-page compaction).

The price: the process keeps its peak heap (freed memory is reused by the process, not
returned to the OS), which is what a long-running training or sampling process wants anyway;
and a program no longer runs while Python prepares the next one. Call it once at the start of a
process, before JAX (or torch) runs anything. The benchmarks do, and a run does
(`retain_if_configured`: `python -m tepo_jax.train`, `Trainer.run()` / `.open()`) when no
accelerator plugin is installed (`cpu_only_install`) and no JAX backend has started yet
(`--config.train.retain_freed_host_memory=False` turns it off). On TPU/GPU hosts the big
buffers live on the device, and host memory (data, checkpoint staging) is better returned to
the OS. It is a no-op returning False where glibc's `mallopt` is not available (macOS, musl).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

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
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    if _applied:
        import jax   # importing does not start a backend; the flag is read when the CPU one starts

        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return _applied


def cpu_only_install() -> bool:
    """True when JAX can only run on the CPU here: no PJRT plugin (jax_cuda*, ROCm, ...) and no
    libtpu installed. Looks at installed packages only; JAX is not initialised."""
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def retain_if_configured(config) -> bool:
    """`retain_freed_memory()` where `config.train.retain_freed_host_memory` asks for it, JAX can
    only run on the CPU here and no JAX backend has started (the dispatch setting reaches only a
    CPU client started after it; a process already running JAX, a notebook's or a test
    session's, is left as it is). True if applied."""
    if not (config.train.get("retain_freed_host_memory") and cpu_only_install()):
        return False
    return not _jax_backend_started() and retain_freed_memory()


def _jax_backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge   # no public API says whether a backend has started
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return True   # unknown: leave a running process as it is
