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
