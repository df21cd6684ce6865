"""retain_freed_memory: a freed large block is reused without page faults (glibc only).

Run in subprocesses: the setting is process-wide and must not leak into the test session.
"""
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, resource, sys
if sys.argv[1] == "retain":
    from tepo_jax.hostmem import retain_freed_memory
    assert retain_freed_memory() and retain_freed_memory()  # a second call is a no-op
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 256 << 20
def touch():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_touch_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_block_is_reused_without_faults():
    pages = (256 << 20) // 4096
    assert _second_touch_faults("default") > pages // 2   # mmap'd afresh: every page faults again
    assert _second_touch_faults("retain") < pages // 100  # the same heap pages, already mapped

