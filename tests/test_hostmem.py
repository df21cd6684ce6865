"""retain_freed_memory: a freed large block is reused without page faults (glibc only).

Run in subprocesses: the setting is process-wide and must not leak into the test session.
"""
import os
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


def _probe_output(probe: str, *args: str) -> list[str]:
    """The words `probe` prints, run in a fresh process on one CPU device (as a CPU run has it,
    not the session's eight simulated ones)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", probe, *args], check=True, capture_output=True, text=True,
                          env=env).stdout.split()


def _second_touch_faults(mode: str) -> int:
    return int(_probe_output(_PROBE, mode)[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_block_is_reused_without_faults():
    pages = (256 << 20) // 4096
    assert _second_touch_faults("default") > pages // 2   # mmap'd afresh: every page faults again
    assert _second_touch_faults("retain") < pages // 100  # the same heap pages, already mapped


_XLA_PROBE = r"""
import resource, sys
if sys.argv[1] == "retain":
    from tepo_jax.hostmem import retain_freed_memory
    assert retain_freed_memory()
import jax, jax.numpy as jnp
x, w, v = jnp.ones((8192, 8)), jnp.ones((8, 8192)), jnp.ones((8192, 1))
step = jax.jit(lambda x, w, v: (x @ w) @ v)   # x @ w: a 256 MB temporary between two dots
faults = []
# The heap grows until the temporary fits its free space again, which takes a few calls (in 1
# of 12 runs of 6 calls, calls 1-5 faulted; in 14 runs of 12 calls, none past the 6th): the
# fewest faults of calls 7-12 is the settled heap's. Without the setting every call faults.
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[6:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_a_jitted_programs_temporaries_are_reused_without_faults():
    """The block that matters: XLA's temporaries of one execution, allocated and freed per call."""
    pages = (256 << 20) // 4096
    assert int(_probe_output(_XLA_PROBE, "default")[-1]) > pages // 2
    assert int(_probe_output(_XLA_PROBE, "retain")[-1]) < pages // 50


_RUN_PROBE = r"""
import sys
from tepo_jax import hostmem
from tepo_jax.config import defaults
config = defaults()
config.train.retain_freed_host_memory = sys.argv[1] == "on"
if sys.argv[2] == "started":
    import jax
    jax.devices()
print(hostmem.retain_if_configured(config))
import jax
print(jax.config.values["jax_cpu_enable_async_dispatch"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("setting, jax_state, applied", [("on", "fresh", True), ("off", "fresh", False),
                                                         ("on", "started", False)])
def test_a_run_retains_only_in_a_fresh_cpu_process_that_asks(setting, jax_state, applied):
    """The default config asks for it; a process whose JAX backend already runs is left alone."""
    assert _probe_output(_RUN_PROBE, setting, jax_state) == [str(applied), str(not applied)]
