"""Every JAX benchmark runs end to end at smoke size and ends with its headline and our
compile seconds, as `make bench` reads them (benchmarks/report.py): a benchmark that rots
(an API it calls changes, its last line moves) fails here, not on the day someone measures.
The peers (TRL, transformers' generate, Tunix) are skipped where a benchmark allows it: their
speed is not the point here, and TRL and Tunix are benchmark-only requirements."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "rl_step": ["--quick", "--skip-peer"],
    "train_step": ["--quick", "--skip-peer"],
    "sampler": ["--quick", "--skip-peer"],
    "tunix_step": ["--quick", "--skip-peer", "--steps", "2"],
    "forward": ["--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "2",
                "--kv-heads", "1", "--vocab", "512", "--batch", "1", "--seq", "32",
                "--repeats", "1", "--warmup", "1"],
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs_and_ends_with_its_headline(name):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *SMOKE[name]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    head = report.parse_headline(out.stdout)
    assert head is not None and head["name"] == name, out.stdout[-1000:]
    assert float(head["ours"].split()[0]) > 0
    assert out.stdout.splitlines()[0].startswith("host: ") and "vector extensions" in out.stdout.splitlines()[0]
    seconds, programs = report.parse_compile(out.stdout).split(" s, ")
    assert float(seconds) > 0 and int(programs.split()[0]) >= 1


# A dot, checked against numpy, then YNNPACK's cached feature word as benchmarks.cap_isa finds it.
_KERNEL_PROBE = '''
import numpy as np
import jax
import jax.numpy as jnp

from benchmarks import cap_isa
from benchmarks._host import host_line

rng = np.random.default_rng(0)
a, b = rng.standard_normal((256, 192), dtype=np.float32), rng.standard_normal((192, 128), dtype=np.float32)
out = np.asarray(jax.jit(jnp.matmul)(a, b))
np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
word = cap_isa.FeatureWord()
print(host_line())
print("feature word", int(word.initialised), word.word.value)
'''


def _feature_word_run(tmp_path, *prefix):
    (tmp_path / "kernel_probe.py").write_text(_KERNEL_PROBE)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    out = subprocess.run([sys.executable, *prefix, "kernel_probe"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    host, word = out.stdout.splitlines()[-2:]
    initialised, value = word.split()[-2:]
    return host, initialised == "1", int(value)


def test_cap_isa_caps_the_dot_kernels_to_avx2(tmp_path):
    """Uncapped, the word cap_isa reads is the one YNNPACK filled for the dot (so the address is
    right) and matches /proc/cpuinfo; under cap_isa the dot still agrees with numpy, YNNPACK read
    our word, and nothing past FMA3 is left in it."""
    from benchmarks import cap_isa
    from benchmarks._host import cpu_flags
    if cap_isa.why_unavailable():
        pytest.skip(cap_isa.why_unavailable())
    expected = cap_isa.expected_feature_word(cpu_flags())

    host, initialised, native = _feature_word_run(tmp_path, "-m")
    assert initialised and native & cap_isa.CHECKED_BITS == expected, (hex(native), hex(expected))
    assert "capped" not in host

    host, initialised, capped = _feature_word_run(tmp_path, "-m", "benchmarks.cap_isa")
    assert initialised and capped == native & cap_isa.UP_TO_FMA3 == expected & 0x7F, (hex(capped), hex(native))
    assert host.endswith("kernels capped to AVX2+FMA"), host
