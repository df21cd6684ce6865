"""config.train.compilation_cache_dir: the driver's setup points JAX's persistent compilation
cache there (a resumed run loads its compiled steps instead of compiling them again)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """
import sys
import jax, jax.numpy as jnp
from tepo_jax.experiment import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))
"""


def run(cache_dir: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", PROGRAM, cache_dir], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_compiled_programs_land_in_the_configured_dir_and_are_reused(tmp_path):
    cache = tmp_path / "xla"
    first = run(str(cache))
    assert cache.is_dir(), "the compilation cache dir was not created"
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    assert run(str(cache)) == first                       # a second process reads, same result
    assert sorted(p.name for p in cache.iterdir()) == entries   # ... and adds no new program

