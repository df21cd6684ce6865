"""The host line every benchmark prints first: CPU model, cores and vector extensions.

XLA's CPU backend and torch pick kernels by the CPU's vector extensions, and the ratios move
with them (an AVX2-only host is not an AVX-512 one), so a figure without them cannot be
compared with another machine's.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# The extensions that change which matmul kernels run, in /proc/cpuinfo's names.
VECTOR_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"),
                ("avx512_vnni", "AVX-512-VNNI"), ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"))


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown", flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> set[str]:
    """/proc/cpuinfo's flags of the first CPU; empty off Linux."""
    return _cpuinfo()[1]


def vector_extensions() -> str:
    """e.g. 'AVX2 FMA' or 'AVX2 FMA AVX-512 AVX-512-BF16 AMX'; 'unknown' off Linux."""
    _, flags = _cpuinfo()
    if not flags:
        return "unknown"
    found = [name for flag, name in VECTOR_FLAGS if flag in flags]
    return " ".join(found) if found else "none of AVX2/AVX-512/AMX"


def host_line() -> str:
    line = f"host: {cpu_model()}, {os.cpu_count()} cores, vector extensions: {vector_extensions()}"
    cap = os.environ.get("TEPO_BENCH_KERNEL_CAP")  # set by benchmarks.cap_isa
    return f"{line}, kernels capped to {cap}" if cap else line
