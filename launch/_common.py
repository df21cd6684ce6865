"""Shared by the launch scripts: print-or-run commands, and run a group of processes.

No JAX import: these scripts run on the machine you submit from.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from typing import Mapping, Optional, Sequence

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COORDINATOR_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the exact commands (one per line, shell-quoted) instead of running them")


def check_config(config: str, root: str, shipped: bool = False, runs_here: bool = False) -> None:
    """Refuse, with one `error: ...` line and before anything starts, a config that this checkout
    loads and finds wrong: a missing file under `root` is left alone (it may exist only where the
    job runs), but a missing or unknown variant of a family file (configs/X.py:VARIANT) is not.
    `shipped`: the job runs in a copy of `root` (a tarball of this checkout), so a relative
    config missing here is missing there too (an absolute one may name a shared mount).
    `runs_here`: the job runs on this machine, from `root`, so a missing file is missing for it.
    Where this machine lacks the project's requirements, the job's own start-up checks it."""
    path = config.split(":", 1)[0]
    local = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.isfile(local):
        if runs_here:
            raise SystemExit(f"error: --config {path}: no such file (looked in {root})")
        if shipped and not os.path.isabs(path):
            raise SystemExit(f"error: --config {path}: no such file in this checkout ({root}), which is what "
                             "the workers get without --git-url")
        return
    if REPO_DIR not in sys.path:
        sys.path.append(REPO_DIR)
    try:
        from tepo_jax.cli import load_config_file
        load_config_file(local + config[len(path):])
    except ImportError:
        return
    except ValueError as e:
        raise SystemExit(f"error: {str(e).replace(local, path)}")  # the path as the user wrote it


def port_arg(text: str) -> int:
    """argparse type of a coordinator --port: 1-65535, or 0 for a free one."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535 (or 0: a free port), got {port}")
    return port


def config_flag(args: Sequence[str]) -> Optional[str]:
    """The config that `args` (a job's arguments) name with `--config=X` or `--config X`, if any
    ('' when `--config` ends them)."""
    for i, a in enumerate(args):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config":
            return args[i + 1] if i + 1 < len(args) else ""
    return None


def render(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None) -> str:
    """One shell-quoted line; environment variables as an `env K=V ...` prefix."""
    prefix = ["env"] + [f"{k}={v}" for k, v in env.items()] if env else []
    return shlex.join(prefix + list(cmd))


class Runner:
    """Runs commands one after another, or prints them with --dry-run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, check: bool = True) -> int:
        if self.dry_run:
            print(render(cmd, env), flush=True)
            return 0
        print(f"+ {render(cmd, env)}", file=sys.stderr, flush=True)
        rc = subprocess.call(list(cmd), env={**os.environ, **(env or {})})
        if check and rc:
            raise SystemExit(rc)
        return rc

    def output(self, cmd: Sequence[str]) -> str:
        if self.dry_run:
            print(render(cmd), flush=True)
            return ""
        return subprocess.run(list(cmd), check=True, capture_output=True, text=True).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coordinator_flags(address: str, num_processes: int, process_id: int) -> list[str]:
    return [f"--coordinator_address={address}", f"--num_processes={num_processes}",
            f"--process_id={process_id}"]


_PRINT_LOCK = threading.Lock()


def _pump(stream, prefix: str, sink) -> None:
    """Copy whole lines from a child's pipe to `sink`, each with the child's [i] prefix.

    stdout and stderr get a pipe each, so a child's stderr line never lands inside one of its
    stdout lines (gloo and XLA print from their own threads while Python prints).
    """
    for line in iter(stream.readline, ""):
        with _PRINT_LOCK:
            sink.write(prefix + line)
            sink.flush()


def run_group(cmds: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], dry_run: bool,
              timeout: Optional[float] = None) -> int:
    """Start every command at once, prefix their output with [i], wait for all.

    The first failure stops the others (each by its own pid) and its exit code is returned.
    """
    if dry_run:
        for cmd, env in zip(cmds, envs):
            print(render(cmd, env), flush=True)
        return 0
    procs, pumps = [], []
    for i, (cmd, env) in enumerate(zip(cmds, envs)):
        p = subprocess.Popen(list(cmd), env={**os.environ, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(p)
        for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            pumps.append(threading.Thread(target=_pump, args=(stream, f"[{i}] ", sink), daemon=True))
            pumps[-1].start()
    rc = _wait_all(procs, timeout)
    for t in pumps:
        t.join(timeout=5)
    return rc


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait_all(procs, timeout: Optional[float]) -> int:
    import time
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"launch: process {i} exited with {code}; stopping the others", file=sys.stderr)
                _stop(procs)
                return code if code > 0 else 128 - code  # killed by signal -code
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: timeout after {timeout}s; stopping all processes", file=sys.stderr)
                _stop(procs)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
