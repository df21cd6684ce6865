"""Run a benchmark with the CPU's vector kernels capped to AVX2 + FMA, as on a host without AVX-512.

    python -m benchmarks.cap_isa benchmarks.train_step [its arguments]

Why: the ratios move with the kernels a host's vector extensions select, and a user's host may
have no AVX-512 (issue 18 saw train_step 0.74 on an AVX2-only EPYC, 1.2-1.3 here). This asks
one question on any AVX-512 host: how much of that is the instruction set, on the same cores?

What it caps, in this process, before anything is compiled:
  - XLA's generated code (fusions): `--xla_cpu_max_isa=AVX2`.
  - XLA's dots. They run in YNNPACK kernels that YNNPACK picks at run time from the CPU's
    features, which `xla_cpu_max_isa` does not reach (measured: the dots' speed and kernels did
    not change with it). YNNPACK caches those features in one word, the static of
    `ynn::get_supported_arch_flags()`; this sets that word to the host's own features up to
    FMA3 before the first dot, so the FMA3 kernels run (checked with `perf record`:
    `ynn::dot_fp32_6x16x1_1x8x1_fma3` instead of `ynn::dot_fp32_5x64x1_1x16x1_avx512`).
  - torch: `ATEN_CPU_CAPABILITY=avx2`, `MKL_ENABLE_INSTRUCTIONS=AVX2`, `ONEDNN_MAX_CPU_ISA=AVX2`.
What it cannot: the core is the same (clock, caches, FMA ports, memory bandwidth, SMT siblings),
and an AVX2-only host is usually an older core as well. A benchmark that runs its parts in child
processes (tunix_step) starts them through `module_command`, which runs them under this cap too.
`python -m benchmarks.report --kernels avx2` runs every benchmark so.

It needs Linux on x86-64, `nm` (binutils) and a jaxlib whose `libjax_common.so` keeps YNNPACK's
symbols. Before capping, it calls YNNPACK's own feature probe and checks its bits against
/proc/cpuinfo, so a jaxlib whose feature word is laid out differently stops here with an error
instead of running with a wrong cap. The benchmark's host line then ends with "kernels capped to
AVX2+FMA".

Measured (2-core AMD EPYC VM with AVX-512, Zen 4 class; jax 0.10.2, torch 2.13), ratios of
`python -m benchmarks.report` at 21:39 UTC, then `--kernels avx2` at 21:48 (RESULTS.md and
RESULTS-avx2.md): forward 1.01 -> 0.99, rl_step 7.11 -> 5.78, sampler 2.46 -> 1.48 (ours 874 ->
582 tok/s, transformers 356 -> 395), tools 2.60 -> 2.86, train_step 1.29 -> 1.32, tunix_step
2.36 -> 1.80 (ours 1.60 -> 1.97 s/step, Tunix 3.77 -> 3.54). What loses is our decode: the
sampler alone (`--skip-peer --skip-memory`, batch 32) gave 811 tok/s native, 681 with only
YNNPACK capped, 795 with only XLA's codegen capped, 555 with both. The train step keeps its
ratio: on these cores the instruction set is not what made it 0.74 on the AVX2 host.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import runpy
import shutil
import struct
import subprocess
import sys

from benchmarks._host import cpu_flags

CAP_MARK = "TEPO_BENCH_KERNEL_CAP"  # read by benchmarks._host.host_line
CAP_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
XLA_CAP_FLAG = "--xla_cpu_max_isa=AVX2"

LIBRARY = "libjax_common.so"
FEATURE_WORD = "_ZZN3ynn24get_supported_arch_flagsEvE5flags"      # the cached word
FEATURE_GUARD = "_ZGVZN3ynn24get_supported_arch_flagsEvE5flags"   # its "initialised" guard
FEATURE_PROBE = "_ZZN3ynn24get_supported_arch_flagsEvENK3$_0clEv"  # the lambda that fills it

# YNNPACK's x86 feature bits (ynnpack/base/arch.h), by /proc/cpuinfo flag. Bits 14-16 (AMX)
# also need the kernel's permission, so they are left out of the layout check.
YNN_BITS = {"sse2": 0, "ssse3": 1, "sse4_1": 2, "avx": 3, "f16c": 4, "avx2": 5, "fma": 6,
            "avx512f": 7, "avx512bw": 8, "avx512vl": 9, "avx512dq": 10, "avx512_bf16": 11,
            "avx512_fp16": 12, "avx512_vnni": 13}
CHECKED_BITS = (1 << 14) - 1
UP_TO_FMA3 = (1 << (YNN_BITS["fma"] + 1)) - 1


def _fail(why: str):
    raise SystemExit(f"cap_isa: {why}")


def expected_feature_word(flags: set[str]) -> int:
    """YNNPACK's feature word for bits 0-13, from /proc/cpuinfo's flags (SSE2 is x86-64's base)."""
    return sum(1 << bit for flag, bit in YNN_BITS.items() if flag == "sse2" or flag in flags)


def _first_load_vaddr(path: str) -> int:
    """The page-aligned virtual address of an ELF-64 file's first loadable segment (0 for most
    shared libraries): what its mapping at file offset 0 stands for."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:5] != b"\x7fELF\x02":
            _fail(f"{path} is not a 64-bit ELF file")
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, _, _, p_vaddr = struct.unpack_from("<IIQQ", table, i * phentsize)
        if p_type == 1:  # PT_LOAD
            return p_vaddr & ~0xFFF
    _fail(f"{path} has no loadable segment")


def _mapped_library(name: str) -> tuple[str, int]:
    """(path, load bias) of a shared library mapped into this process: a symbol's address in
    memory is its `nm` value plus the bias."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith("/" + name) and int(fields[2], 16) == 0:
                return fields[5], int(fields[0].split("-")[0], 16) - _first_load_vaddr(fields[5])
    _fail(f"{name} is not loaded (is jaxlib installed?)")


def _symbol_addresses(path: str, names: tuple[str, ...]) -> dict[str, int]:
    listing = subprocess.run(["nm", path], capture_output=True, text=True, check=False).stdout
    found = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] in names:
            found[fields[2]] = int(fields[0], 16)
    missing = [n for n in names if n not in found]
    if missing:
        _fail(f"{path} has no symbol {missing[0]} (this jaxlib strips YNNPACK's symbols or has "
              "no YNNPACK): cannot cap its kernels")
    return found


class FeatureWord:
    """YNNPACK's cached CPU-feature word inside the loaded jaxlib (import jax first)."""

    def __init__(self):
        path, bias = _mapped_library(LIBRARY)
        addresses = _symbol_addresses(path, (FEATURE_WORD, FEATURE_GUARD, FEATURE_PROBE))
        self.word = ctypes.c_uint64.from_address(bias + addresses[FEATURE_WORD])
        self.guard = ctypes.c_uint8.from_address(bias + addresses[FEATURE_GUARD])
        # The probe is a captureless lambda's call operator: its `this` is never read (NULL).
        self._probe = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)(bias + addresses[FEATURE_PROBE])

    @property
    def initialised(self) -> bool:
        return self.guard.value != 0

    def probe(self) -> int:
        """What YNNPACK reads from the CPU, without setting its cache."""
        return self._probe(None)

    def cap(self, mask: int) -> int:
        """Set the cache to the host's features within `mask`, before YNNPACK reads it."""
        if self.initialised:
            _fail("YNNPACK already chose its kernels in this process; cap before the first computation")
        native = self.probe()
        expected = expected_feature_word(cpu_flags())
        if native & CHECKED_BITS != expected:
            _fail(f"YNNPACK's feature word {native:#x} does not match /proc/cpuinfo's {expected:#x} "
                  "under the layout this script knows: this jaxlib lays it out differently")
        self.word.value = native & mask
        self.guard.value = 1  # the Itanium C++ ABI's "initialised" byte: YNNPACK now reads our word
        return native


def why_unavailable() -> str | None:
    """Why this host cannot run under the cap, or None when it can."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"runs on Linux x86-64 only (this is {platform.system()} {platform.machine()})"
    if not {"avx2", "fma"} <= cpu_flags():
        return "this CPU has no AVX2 + FMA to cap to"
    if shutil.which("nm") is None:
        return "needs `nm` (binutils) to find YNNPACK's feature word"
    return None


def cap_to_avx2() -> tuple[int, int]:
    """Cap XLA's codegen, YNNPACK's dots and torch's kernels to AVX2 + FMA in this process.
    Call before jax computes anything and before torch is imported. Returns (native, capped)."""
    why = why_unavailable()
    if why:
        _fail(why)
    if "torch" in sys.modules:
        _fail("torch is already imported; its kernel choice cannot be capped any more")
    os.environ.update(CAP_ENV)
    if XLA_CAP_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_CAP_FLAG}".strip()
    import jax  # noqa: F401  (loads libjax_common.so; XLA reads XLA_FLAGS at its first use)
    word = FeatureWord()
    native = word.cap(UP_TO_FMA3)
    os.environ[CAP_MARK] = "AVX2+FMA"
    return native, word.word.value


def module_command(python: str, module: str) -> list[str]:
    """`python -m module`, under this cap when the calling process runs under it: for a
    benchmark whose parts run in child processes (tunix_step)."""
    return [python, "-m", "benchmarks.cap_isa", module] if os.environ.get(CAP_MARK) else [python, "-m", module]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _fail("usage: python -m benchmarks.cap_isa MODULE [its arguments], e.g. benchmarks.train_step")
    module, rest = argv[0], argv[1:]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if not found:
        _fail(f"no module named {module} (run from the repository root, e.g. benchmarks.train_step)")
    native, capped = cap_to_avx2()
    print(f"cap_isa: YNNPACK features {native:#x} -> {capped:#x}, XLA {XLA_CAP_FLAG}, "
          f"torch ATEN_CPU_CAPABILITY=avx2", file=sys.stderr)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
