"""Run every benchmark and write one markdown table (`make bench`).

Each `benchmarks/NAME.py` (all but this file and private `_*.py`) runs as a subprocess
`python -m benchmarks.NAME` with a per-benchmark timeout; `--quick` is passed through to the
benchmarks whose `--help` lists it. A benchmark's LAST stdout line is its headline:

    NAME: ours X UNIT, peer Y UNIT, ratio R

and a JAX benchmark prints `compile: S s in N programs (...)` before it (benchmarks/_compile.py):
our side's cold-start compile seconds, a column of the table.
A benchmark that exits non-zero, times out, or prints no such line is a row with that
status, never a crash of the report. One markdown block (the command, the date, the
machine: CPU model, cores, jax/torch versions, jax backend and devices; then the table) goes
to stdout and to `benchmarks/RESULTS.md` (`--out`), ready to embed in the README.

    python -m benchmarks.report [--quick] [--timeout S] [--only NAME ...] [--out FILE]
        [--kernels native|avx2]

`--kernels avx2` runs each benchmark under `benchmarks/cap_isa.py` (XLA's, YNNPACK's and torch's
kernels capped to AVX2 + FMA, as on a host without AVX-512) and writes
`benchmarks/RESULTS-avx2.md` unless `--out` says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks._host import cpu_model, vector_extensions

BENCH_DIR = Path(__file__).resolve().parent
PACKAGE = "benchmarks"
HEADLINE = re.compile(r"^\s*(?P<name>[^:]+?):\s*ours\s+(?P<ours>\S+)\s+(?P<ours_unit>.+?),"
                      r"\s*peer\s+(?P<peer>\S+)\s+(?P<peer_unit>.+?),\s*ratio\s+(?P<ratio>\S+)"
                      r"\s*$")
COMPILE = re.compile(r"^compile:\s*(?P<seconds>[0-9.]+) s in (?P<programs>\d+) programs")


@dataclasses.dataclass
class Result:
    module: str
    status: str                  # 'ok' | 'failed (rc N)' | 'timeout (S s)' | 'no headline'
    name: str = ""
    ours: str = ""
    peer: str = ""
    ratio: str = ""
    seconds: float = 0.0
    compile: str = ""            # our compile seconds and programs, from the `compile:` line
    detail: str = ""             # last stderr/stdout lines when not ok
    quick: bool = False


# Runners of other benchmarks, not benchmarks themselves.
RUNNERS = ("report", "cap_isa")


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Module names of the benchmarks in `bench_dir` (sorted; not the runners, not `_*`)."""
    return sorted(p.stem for p in Path(bench_dir).glob("*.py")
                  if p.stem not in RUNNERS and not p.stem.startswith("_"))


def parse_headline(stdout: str) -> dict | None:
    """The headline fields of the last non-empty stdout line, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    m = HEADLINE.match(lines[-1]) if lines else None
    if not m:
        return None
    g = m.groupdict()
    return {"name": g["name"].strip(), "ours": f"{g['ours']} {g['ours_unit'].strip()}",
            "peer": f"{g['peer']} {g['peer_unit'].strip()}", "ratio": g["ratio"]}


def parse_compile(stdout: str) -> str:
    """'9.1 s, 4 programs' from the last `compile:` line, or '' when there is none."""
    found = [m for m in map(COMPILE.match, stdout.splitlines()) if m]
    if not found:
        return ""
    return f"{float(found[-1]['seconds']):.1f} s, {found[-1]['programs']} programs"


def _run(argv: Sequence[str], cwd: Path, timeout: float, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def accepts_quick(module: str, package: str, cwd: Path, env: dict,
                  bench_dir: Path = BENCH_DIR) -> bool:
    """True when the module mentions --quick and its --help lists it."""
    src = Path(bench_dir) / f"{module}.py"
    if "--quick" not in src.read_text(encoding="utf-8", errors="replace"):
        return False
    try:
        out = _run([sys.executable, "-m", f"{package}.{module}", "--help"], cwd, 120, env)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and "--quick" in out.stdout


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:]


def run_benchmark(module: str, *, quick: bool = False, timeout: float = 600.0,
                  package: str = PACKAGE, bench_dir: Path = BENCH_DIR,
                  cwd: Path | None = None, kernels: str = "native") -> Result:
    """Run one benchmark as `python -m package.module` and turn its outcome into a Result."""
    cwd = Path(cwd) if cwd else Path(bench_dir).parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    use_quick = quick and accepts_quick(module, package, cwd, env, bench_dir)
    runner = ["-m", "benchmarks.cap_isa"] if kernels == "avx2" else ["-m"]
    argv = [sys.executable, *runner, f"{package}.{module}"] + (["--quick"] if use_quick else [])
    t0 = time.monotonic()
    try:
        out = _run(argv, cwd, timeout, env)
    except subprocess.TimeoutExpired as exc:
        so = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Result(module, f"timeout ({timeout:g} s)", seconds=time.monotonic() - t0,
                      detail=_tail(so), quick=use_quick)
    secs = time.monotonic() - t0
    if out.returncode != 0:
        return Result(module, f"failed (rc {out.returncode})", seconds=secs,
                      detail=_tail(out.stderr or out.stdout), quick=use_quick)
    head = parse_headline(out.stdout)
    if head is None:
        return Result(module, "no headline", seconds=secs, detail=_tail(out.stdout, 1),
                      quick=use_quick)
    return Result(module, "ok", seconds=secs, quick=use_quick, compile=parse_compile(out.stdout), **head)


# ----------------------------------------------------------------------------- machine


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def jax_backend(timeout: float = 120) -> str:
    """`backend (device kinds)`, asked in a subprocess so this process never holds the
    accelerator the benchmarks need."""
    code = ("import jax; d = jax.devices(); "
            "print(jax.default_backend(), len(d), 'x', d[0].device_kind)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return "unknown (timed out)"
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else f"unavailable ({_tail(out.stderr, 1)})"


def machine_info() -> dict[str, str]:
    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "vector extensions": vector_extensions(),
            "python": platform.python_version(), "jax": _version("jax"),
            "jaxlib": _version("jaxlib"), "torch": _version("torch"),
            "jax backend": jax_backend(), "platform": platform.platform()}


# ----------------------------------------------------------------------------- report


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ") or "—"


def format_markdown(results: Sequence[Result], machine: dict[str, str], command: str,
                    quick: bool = False) -> str:
    """One self-contained markdown block: heading, command, date, machine, the table, and
    the failures (if any) with their last output lines."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["### Benchmark results", "",
             f"- Command: `{command}`",
             f"- Date: {now}",
             "- Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()), "",
             "| benchmark | ours | peer | ratio | our compile | status |", "|---|---|---|---|---|---|"]
    for r in results:
        label = r.name or r.module
        if r.name and r.name != r.module:
            label = f"{r.name} ({r.module})"
        status = r.status + (", quick" if r.quick else "") + f", {r.seconds:.0f} s"
        lines.append(f"| {_cell(label)} | {_cell(r.ours)} | {_cell(r.peer)} | "
                     f"{_cell(r.ratio)} | {_cell(r.compile)} | {_cell(status)} |")
    lines += ["", "Each row is one `benchmarks/NAME.py`, run as a subprocess; ours and the peer "
                  "are measured in the same run on this machine, and the ratio is ours vs the "
                  "peer as the benchmark's docstring defines it; our compile is the seconds JAX spent "
                  "making our programs in that run (trace, lower, compile; no persistent cache)."]
    if quick:
        lines += ["", "`--quick`: the benchmarks marked quick ran at smoke-test sizes; their "
                      "figures are not comparable with a full `make bench` run."]
    notes = [r for r in results if r.status != "ok" and r.detail]
    if notes:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r.module}`: {r.status}: `{_cell(r.detail)}`" for r in notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, *, bench_dir: Path = BENCH_DIR,
         package: str = PACKAGE) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick where accepted")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per benchmark")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark module names")
    ap.add_argument("--out", default=None, help="default benchmarks/RESULTS.md (RESULTS-avx2.md with --kernels avx2)")
    ap.add_argument("--kernels", choices=("native", "avx2"), default="native",
                    help="avx2: cap every benchmark's kernels to AVX2 + FMA (benchmarks/cap_isa.py)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    modules = discover(bench_dir)
    if args.only:
        unknown = sorted(set(args.only) - set(modules))
        if unknown:
            ap.error(f"unknown benchmarks {unknown}; found {modules}")
        modules = [m for m in modules if m in args.only]
    results = []
    for m in modules:
        print(f"[bench] {m} ...", file=sys.stderr, flush=True)
        results.append(run_benchmark(m, quick=args.quick, timeout=args.timeout,
                                     package=package, bench_dir=bench_dir, kernels=args.kernels))
        print(f"[bench] {m}: {results[-1].status} ({results[-1].seconds:.0f} s)",
              file=sys.stderr, flush=True)
    command = " ".join(["python -m benchmarks.report", *argv])
    machine = machine_info()
    if args.kernels == "avx2":
        machine["kernels"] = "capped to AVX2+FMA (benchmarks/cap_isa.py)"
    text = format_markdown(results, machine, command, quick=args.quick)
    out = args.out or str(Path(bench_dir) / ("RESULTS-avx2.md" if args.kernels == "avx2" else "RESULTS.md"))
    Path(out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
