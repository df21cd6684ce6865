"""A memory + pids cgroup per sandboxed run, so limits hold for the run as a whole.

RLIMIT_AS is per process and misses memory in no address space (memfd and tmpfs pages written
with write(), pipe and socket buffers): one run could hold several times its limit, and a run
that forks got N times it (issue 14). A cgroup counts every page its processes are charged
for, shmem included, and the OOM killer acts inside it, on the run, not on the trainer.

Where the controllers live (`detect`): cgroup v2 when the unified hierarchy has them, else
the v1 hierarchies that carry `memory` and `pids`. Run cgroups are made under the tool's own
cgroup (from /proc/self/cgroup), one per run, and removed after it:
  v1  <memory mount>/<own>/tepo-<pid>-<n>  memory.limit_in_bytes (+ memsw where swap counts)
      <pids mount>/<own>/tepo-<pid>-<n>    pids.max
  v2  <mount>/<own>/tepo-<pid>-<n>         memory.max, memory.swap.max=0, pids.max
A v2 parent may only enable controllers for its children while it holds no processes; when
the tool's cgroup holds this process alone, the process moves into a leaf `tepo-host` of it
first (the usual container practice). Otherwise, or without write access (not root, no
delegation), cgroups are reported missing and the per-process rlimits are all that apply.

The run's first process joins the cgroups itself before exec'ing the sandbox (`join_argv`),
so nothing it starts can be outside them.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import re
import signal
import threading
import time
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
_PREFIX = "tepo-"
_RUN_NAME = re.compile(r"tepo-(\d+)-\d+")  # tepo-<tool pid>-<n>
_counter = itertools.count()
_RMDIR_WAIT_S = 2.0  # killed processes leave a cgroup asynchronously


@dataclasses.dataclass(frozen=True)
class Host:
    """Where run cgroups are created: one base dir per hierarchy (v2: one for both)."""

    version: int
    bases: Dict[str, str]  # controller -> base directory

    def describe(self) -> str:
        return f"cgroup v{self.version} memory+pids under " + ", ".join(sorted(set(self.bases.values())))


# ---- detection (pure functions over the text of /proc files, then one probe) ---------------
def parse_mounts(mountinfo: str) -> Tuple[Optional[str], Dict[str, str]]:
    """(cgroup2 mount point or None, {v1 controller: mount point}) from /proc/self/mountinfo."""
    v2, v1 = None, {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mount_point, fstype, options = fields[4], rfields[0], rfields[2]
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in CONTROLLERS:
                    v1.setdefault(opt, mount_point)
    return v2, v1


def parse_own(proc_cgroup: str) -> Tuple[Optional[str], Dict[str, str]]:
    """(own v2 path, {v1 controller: own path}) from /proc/self/cgroup."""
    v2, v1 = None, {}
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            v2 = path
        for c in ctrls.split(","):
            if c in CONTROLLERS:
                v1[c] = path
    return v2, v1


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _join(mount: str, path: str) -> str:
    return os.path.join(mount, path.lstrip("/"))


def detect(proc: str = "/proc") -> Tuple[Optional[Host], str]:
    """(Host, "") where per-run cgroups work here, else (None, why not). Probes by creating
    and removing one cgroup, so the answer is what a run will actually get."""
    try:
        mounts = parse_mounts(_read(f"{proc}/self/mountinfo"))
        own = parse_own(_read(f"{proc}/self/cgroup"))
    except OSError as exc:
        return None, f"cannot read cgroup membership ({exc})"
    host, why = _v2_host(mounts[0], own[0])
    if host is None:
        host, why1 = _v1_host(mounts[1], own[1])
        why = f"{why}; {why1}" if host is None else ""
    if host is None:
        return None, why
    try:
        RunCgroup.create(host, 64 << 20, 8).remove()
    except OSError as exc:
        return None, f"{host.describe()}: cannot create a run cgroup ({exc})"
    sweep_stale(host)
    return host, ""


def sweep_stale(host: Host, proc: str = "/proc") -> List[str]:
    """Remove run cgroups left by tool processes that died (a SIGKILLed trainer cannot clean
    up; its runs die with it, via bwrap's --die-with-parent, but their cgroups stay). Only
    cgroups named after a pid that no longer exists are touched, and rmdir refuses any that
    still holds a process. Returns the removed paths."""
    removed = []
    for base in sorted(set(host.bases.values())):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            m = _RUN_NAME.fullmatch(name)
            if m is None or os.path.exists(f"{proc}/{m.group(1)}"):
                continue
            try:
                os.rmdir(os.path.join(base, name))
                removed.append(os.path.join(base, name))
            except OSError:
                pass
    if removed:
        log.info("removed %d run cgroup(s) left by dead processes", len(removed))
    return removed


def _v1_host(mounts: Dict[str, str], own: Dict[str, str]) -> Tuple[Optional[Host], str]:
    missing = [c for c in CONTROLLERS if c not in mounts or c not in own]
    if missing:
        return None, f"cgroup v1: no {'/'.join(missing)} hierarchy mounted"
    bases = {c: _join(mounts[c], own[c]) for c in CONTROLLERS}
    unwritable = [b for b in bases.values() if not os.access(b, os.W_OK)]
    if unwritable:
        return None, f"cgroup v1: {', '.join(unwritable)} not writable (needs root or delegation)"
    return Host(1, bases), ""


def _v2_host(mount: Optional[str], own: Optional[str]) -> Tuple[Optional[Host], str]:
    if mount is None or own is None:
        return None, "cgroup v2: not mounted"
    base = _join(mount, own)
    try:
        available = _read(os.path.join(base, "cgroup.controllers")).split()
    except OSError as exc:
        return None, f"cgroup v2: {exc}"
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        return None, f"cgroup v2: {'/'.join(missing)} controller not available in {base}"
    why = enable_v2_controllers(base)
    return (Host(2, {c: base for c in CONTROLLERS}), "") if not why else (None, f"cgroup v2: {why}")


def enable_v2_controllers(base: str) -> str:
    """Enable memory and pids for children of `base`; "" on success, else why not. When
    `base` holds processes (EBUSY: v2's no-internal-process rule) and this process is the
    only one, move it into the leaf `base/tepo-host` and try again."""
    ctl = os.path.join(base, "cgroup.subtree_control")
    try:
        if all(c in _read(ctl).split() for c in CONTROLLERS):
            return ""
        _write(ctl, " ".join(f"+{c}" for c in CONTROLLERS))
        return ""
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return f"cannot enable memory,pids in {ctl} ({exc.strerror})"
    procs = _read(os.path.join(base, "cgroup.procs")).split()
    if procs != [str(os.getpid())]:
        return (f"{base} holds other processes ({len(procs)}), so it cannot enable controllers "
                "for child cgroups; start the trainer in a cgroup of its own")
    leaf = os.path.join(base, "tepo-host")
    try:
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        _write(ctl, " ".join(f"+{c}" for c in CONTROLLERS))
    except OSError as exc:
        return f"cannot enable memory,pids in {ctl} after moving into {leaf} ({exc.strerror})"
    log.info("cgroup v2: moved this process into %s to enable memory,pids for run cgroups", leaf)
    return ""


# ---- one run --------------------------------------------------------------------------------
@dataclasses.dataclass
class RunCgroup:
    """The cgroup(s) of one run. `procs_files` are what the run's first process joins."""

    host: Host
    name: str
    dirs: List[str]  # still to be removed

    @classmethod
    def create(cls, host: Host, memory_bytes: int, max_pids: int) -> "RunCgroup":
        name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        dirs = sorted({os.path.join(b, name) for b in host.bases.values()})
        cg = cls(host, name, [])
        try:
            for d in dirs:
                os.mkdir(d)
                cg.dirs.append(d)
            for path, value in limit_writes(host, name, memory_bytes, max_pids):
                _write(path, value)
        except OSError:
            cg.remove()
            raise
        return cg

    @property
    def procs_files(self) -> List[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _dir_of(self, controller: str) -> str:
        return os.path.join(self.host.bases[controller], self.name)

    def oom_kills(self) -> int:
        """How many processes the OOM killer took inside this cgroup (its memory limit)."""
        d = self._dir_of("memory")
        try:
            text = _read(os.path.join(d, "memory.events" if self.host.version == 2
                                      else "memory.oom_control"))
        except OSError:
            return 0
        return _field(text, "oom_kill")

    def kill(self) -> None:
        """SIGKILL every process still in the run's cgroup (daemons that left the process
        group or the sandbox's PID namespace teardown included)."""
        if self.host.version == 2:
            try:
                _write(os.path.join(self._dir_of("pids"), "cgroup.kill"), "1")  # Linux >= 5.14
                return
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def pids(self) -> List[int]:
        out = set()
        for f in self.procs_files:
            try:
                out.update(int(p) for p in _read(f).split())
            except OSError:
                pass
        return sorted(out)

    def remove(self, wait_s: float = 0.0) -> bool:
        """rmdir the run's cgroups; True when all are gone. A cgroup with processes cannot be
        removed, so this polls for up to `wait_s` while killed processes exit."""
        deadline = time.monotonic() + wait_s
        while True:
            left = []
            for d in self.dirs:
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    left.append(d)
            self.dirs = left
            if not left or time.monotonic() >= deadline:
                return not left
            self.kill()
            time.sleep(0.005)


def limit_writes(host: Host, name: str, memory_bytes: int, max_pids: int) -> List[Tuple[str, str]]:
    """(file, value) pairs that set a run cgroup's limits. Swap is limited too, where the
    kernel accounts it, so a run cannot spill past its limit into swap."""
    mem = os.path.join(host.bases["memory"], name)
    pids = os.path.join(host.bases["pids"], name)
    if host.version == 2:
        writes = [(os.path.join(mem, "memory.max"), str(memory_bytes)),
                  (os.path.join(mem, "memory.swap.max"), "0"),
                  (os.path.join(pids, "pids.max"), str(max_pids))]
    else:
        writes = [(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes)),
                  (os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes)),
                  (os.path.join(pids, "pids.max"), str(max_pids))]
    return [(p, v) for p, v in writes if os.path.exists(p)]


def _field(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def join_argv(procs_files: List[str]) -> List[str]:
    """A /bin/sh prefix that writes its own pid into each cgroup.procs file, then execs the
    rest of the argv: the run is inside its cgroups before any of it runs (no race with a
    fork right after start, as moving the pid from here after Popen would have)."""
    script = ('for f; do [ "$f" = -- ] && break; echo $$ > "$f" || '
              '{ echo "tepo sandbox: cannot join cgroup $f" >&2; exit 125; }; shift; done; '
              'shift; exec "$@"')
    return ["/bin/sh", "-c", script, "sh", *procs_files, "--"]


# ---- leftovers ------------------------------------------------------------------------------
class Reaper:
    """Run cgroups that could not be removed at once (a process stuck exiting) are retried
    later instead of blocking the caller or leaking forever."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: List[RunCgroup] = []

    def release(self, cg: RunCgroup) -> None:
        cg.kill()
        if cg.remove(wait_s=_RMDIR_WAIT_S):
            self.retry()
            return
        log.warning("cgroup %s still busy; will retry removing it", cg.dirs)
        with self._lock:
            self._pending.append(cg)

    def retry(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        still = [cg for cg in pending if not cg.remove()]
        if still:
            with self._lock:
                self._pending.extend(still)
