"""Sandbox configuration and the command line that confines one untrusted Python run.

Layers (outermost first), each there because the one inside it has a gap:

1. bubblewrap (when present): no network, a minimal read-only view of the filesystem (system
   dirs, the interpreter, its venv; not /root, not the repo, not /home), a private size-capped
   tmpfs /tmp, new PID/IPC/UTS namespaces (killing bwrap kills everything inside), dies with
   its parent, new session (no terminal injection).
2. `prlimit`: CPU seconds, address space, processes, file size, set before anything runs.
   Done with the util-linux binary rather than `preexec_fn`, which is unsafe in the
   multi-threaded bridge.
3. A fresh unprivileged uid per concurrent run (when the host runs as root, as CI does):
   root ignores RLIMIT_NPROC, so without this a fork bomb is bounded only by the deadline.
   Unprivileged, the code also cannot read root-only files (/etc/shadow) or signal the host.
   Under bwrap the switch is done by `setpriv` inside the sandbox, so bwrap itself keeps the
   privileges it needs to set up mounts; without bwrap, Popen's `user=`/`group=` does it.

The process limit (RLIMIT_NPROC) must count one run's processes only. Linux (>= 5.14) counts
it per (user namespace, real uid) and exempts real uid 0, so (`nproc_scope`):
  "uid"    root: each run has its own uid (layer 3), nothing else runs as it;
  "userns" not root: each run gets its own user namespace — bwrap's `--unshare-user`, or
           util-linux `unshare --user` without bwrap — so the host's other processes of the
           same uid (the trainer's threads included) do not count;
  None     root without a dedicated uid, a kernel older than 5.14 (the count would be
           host-wide for the uid) or no user namespaces: the limit is left out, with a warning.

Three more layers close what the ones above leave open (issue 14; docs/tools.md has the table
of what enforces what, on root and non-root hosts):
4. A memory+pids cgroup per run (`cgroup.py`): RLIMIT_AS is per process and misses memfd,
   tmpfs and buffer pages; the cgroup counts all of a run's memory and processes together.
5. A seccomp filter (`seccomp.py`, via bwrap's `--seccomp FD`): no user/mount namespaces, no
   mounts, no ptrace/keyctl/bpf/io_uring. On the root path nothing else stops the dropped uid
   from creating a user namespace, gaining capabilities in it and mounting.
6. uids leased host-wide (`uidpool.py`): one run per uid on the host, across tools and
   processes, so one run's processes never count against another run's RLIMIT_NPROC.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from tepo_jax.tools import cgroup

# System directories the interpreter and its shared libraries need inside the sandbox.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/opt")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for the python tool. Defaults suit short model-written scripts."""

    python: str = sys.executable
    python_flags: Tuple[str, ...] = ("-I", "-u")  # isolated (no cwd/env paths), unbuffered
    timeout_s: float = 10.0          # wall-clock deadline; the whole sandbox is killed at it
    cpu_s: int = 10                  # RLIMIT_CPU per process
    memory_bytes: int = 1 << 30      # RLIMIT_AS per process
    max_processes: int = 32          # RLIMIT_NPROC: processes of one run (see nproc_scope)
    max_file_bytes: int = 16 << 20   # RLIMIT_FSIZE: largest file the code may write
    tmpfs_bytes: int = 64 << 20      # size of the private /tmp under bwrap
    max_output_chars: int = 4000     # what the model sees; the rest is cut with a marker
    max_capture_bytes: int = 1 << 20  # bytes read before the run is stopped as a flood
    use_bwrap: bool = True
    require_sandbox: bool = False    # True: refuse to run at all without bubblewrap
    drop_privileges: bool = True     # run as an unprivileged uid when we are root
    uid_base: int = 61000            # uids uid_base .. uid_base+uid_pool-1 are used
    uid_pool: int = 64               # concurrent runs beyond this wait for a free uid
    uid_lock_dir: str = "/run/tepo_jax/sandbox-uids"  # host-wide uid leases (one lock per uid)
    max_open_files: int = 256        # RLIMIT_NOFILE (not the host's, which may be huge)
    use_cgroup: bool = True          # a memory+pids cgroup per run where the host allows it
    use_seccomp: bool = True         # the seccomp filter under bwrap (see seccomp.py)
    extra_ro_binds: Tuple[str, ...] = ()  # more host paths visible read-only (e.g. data)
    env: Tuple[Tuple[str, str], ...] = (("PATH", "/usr/local/bin:/usr/bin:/bin"),
                                        ("HOME", "/tmp"), ("LANG", "C.UTF-8"),
                                        ("PYTHONDONTWRITEBYTECODE", "1"),
                                        ("MPLBACKEND", "Agg"))

    def __post_init__(self):
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t < math.inf:
            raise ValueError(f"SandboxConfig.timeout_s (the python tool's deadline, "
                             f"tools.python_timeout_s) must be a positive number of seconds, "
                             f"got {t!r}")


def find_bwrap() -> Optional[str]:
    """Path of a working bubblewrap binary, or None."""
    return shutil.which("bwrap")


def nproc_scope(cfg: SandboxConfig, bwrap: Optional[str], dedicated_uid: bool) -> Tuple[Optional[str], str]:
    """(scope, why): how RLIMIT_NPROC counts only one run's processes — "uid", "userns" or
    None (see the module docstring) — and, for None, why it cannot."""
    if dedicated_uid:
        return "uid", ""
    if os.geteuid() == 0:
        return None, "running as root without a dedicated uid (root ignores RLIMIT_NPROC)"
    if _kernel_version() < (5, 14):
        return None, "Linux < 5.14 counts RLIMIT_NPROC over every process of the uid"
    if not bwrap and not user_namespaces_work():
        return None, "no user namespace for the run (`unshare --user true` failed)"
    return "userns", ""


def _kernel_version() -> Tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def user_namespaces_work() -> bool:
    """Whether util-linux `unshare --user` can give a run its own user namespace here."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--user", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def prlimit_args(cfg: SandboxConfig, nproc: bool) -> List[str]:
    """The `prlimit` prefix applying the resource limits (RLIMIT_NPROC only if `nproc`: where
    it counts one run alone). Hard limits equal soft ones so code cannot raise them, except
    CPU: soft < hard gives SIGXCPU first (a clear "CPU limit" cause in the result) and SIGKILL
    a second later if the code ignores it."""
    limits = {"cpu": cfg.cpu_s, "as": cfg.memory_bytes, "fsize": cfg.max_file_bytes,
              "core": 0, "nofile": cfg.max_open_files}
    if nproc:
        limits["nproc"] = cfg.max_processes
    hard = dict(limits, cpu=cfg.cpu_s + 1)
    return ["prlimit"] + [f"--{k}={v}:{hard[k]}" for k, v in limits.items()] + ["--"]


def setpriv_args(uid: int) -> List[str]:
    """Drop to `uid` with no groups, no capabilities and no way to regain privileges."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def python_argv(cfg: SandboxConfig) -> List[str]:
    """The interpreter reading the program from stdin (no host file to bind or clean up)."""
    return [cfg.python, *cfg.python_flags, "-"]


def visible_paths(cfg: SandboxConfig) -> List[str]:
    """Host paths bound read-only into the sandbox: system dirs plus what the interpreter
    needs (its venv and its base installation, wherever they live)."""
    interp = os.path.realpath(cfg.python)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix,
                os.path.dirname(os.path.dirname(interp)),
                os.path.dirname(os.path.dirname(os.path.abspath(cfg.python)))}
    paths = [p for p in _SYSTEM_DIRS if os.path.lexists(p)]
    extra = sorted(p for p in prefixes | set(cfg.extra_ro_binds) if p and p != "/")
    return paths + [p for p in extra if not any(_is_under(p, s) for s in _SYSTEM_DIRS)]


def bwrap_args(cfg: SandboxConfig, bwrap: str, seccomp_fd: Optional[int] = None,
               proc_files: Mapping[str, int] = {}) -> List[str]:
    """The bubblewrap command prefix (everything before the confined command). `seccomp_fd`:
    an fd holding the compiled filter (seccomp.program_fd), inherited by bwrap;
    `proc_files`: /proc paths to replace, each with the contents of an inherited fd
    (`proc_overrides`)."""
    args = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if os.geteuid() == 0 and cfg.drop_privileges:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # setpriv drops them
    else:  # unprivileged bwrap: a user namespace, nobody inside
        args += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    # The private /tmp comes before the binds: bwrap mounts in order, so an interpreter or venv
    # that lives under /tmp (a clone in /tmp/x/.venv) is bound on top of it, not hidden by it.
    args += ["--size", str(cfg.tmpfs_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
    created = {"/", "/tmp"}
    for path in visible_paths(cfg):
        args += _bind_args(path, created)
    args += ["--proc", "/proc"]
    for path, fd in sorted(proc_files.items()):
        args += ["--perms", "0444", "--ro-bind-data", str(fd), path]  # bwrap makes it 0600
    args += ["--dev", "/dev", "--chdir", "/tmp", "--clearenv"]
    for key, value in cfg.env:
        args += ["--setenv", key, value]
    return args + ["--"]


def proc_overrides(cfg: SandboxConfig, host_meminfo: str) -> Dict[str, bytes]:
    """Contents for /proc files that would show the host inside the sandbox: /proc/meminfo
    gives the run's memory limit as total, free and available (code that sizes itself by it
    sees what it may use, not the host's RAM), every other size 0; /proc/1/cmdline, the
    sandbox's own bwrap command line, becomes just "bwrap"."""
    kib = cfg.memory_bytes >> 10
    lines = []
    for line in host_meminfo.splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemFree", "MemAvailable"):
            value = f"{kib} kB"
        elif key != "Hugepagesize":
            value = "0 kB" if value.strip().endswith("kB") else "0"
        else:
            value = value.strip()
        lines.append(f"{key + ':':<16}{value:>12}" if value.endswith("kB") or value.isdigit()
                     else f"{key}: {value}")
    return {"/proc/meminfo": ("\n".join(lines) + "\n").encode(),
            "/proc/1/cmdline": b"bwrap\0"}


def data_fd(data: bytes, name: str = "tepo-sandbox-data") -> int:
    """An fd at offset 0 holding `data` (a memfd: nothing on disk), for bwrap to read."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def _bind_args(path: str, created: set) -> List[str]:
    """Bind one host path read-only. Symlinked dirs (merged /usr: /bin -> usr/bin) become
    symlinks; parents are created 0755 explicitly, since bwrap would make them 0700 and the
    unprivileged uid could not traverse them."""
    if os.path.islink(path):
        return ["--symlink", os.readlink(path), path]
    args = []
    for parent in _ancestors(path):
        if parent not in created:
            created.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args + ["--ro-bind", path, path]


def _ancestors(path: str) -> List[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def path_traversable_by_others(path: str) -> bool:
    """True when every directory on the way to `path` is world-executable, i.e. an
    unprivileged uid could exec the interpreter without bubblewrap re-binding it."""
    real = os.path.realpath(path)
    return all(os.stat(d).st_mode & 0o001 for d in ["/"] + _ancestors(real)) and \
        bool(os.stat(real).st_mode & 0o001)


def command(cfg: SandboxConfig, bwrap: Optional[str], uid: Optional[int],
            nproc: Optional[str] = None, seccomp_fd: Optional[int] = None,
            cgroup_procs: Sequence[str] = (), proc_files: Mapping[str, int] = {}) -> List[str]:
    """The full argv: [join cgroups] [bwrap … | unshare --user] prlimit … [setpriv …] python
    -I -u -. `nproc` is the `nproc_scope`; "userns" without bwrap adds the `unshare --user`.
    `uid` is dropped to with setpriv, inside bwrap or (without it) after prlimit; either way
    after the cgroup join, which needs root's write access to cgroup.procs."""
    inner = prlimit_args(cfg, nproc is not None)
    if uid is not None:
        inner += setpriv_args(uid)
    argv = inner + python_argv(cfg)
    if bwrap:
        argv = bwrap_args(cfg, bwrap, seccomp_fd, proc_files) + argv
    elif nproc == "userns":
        argv = ["unshare", "--user", "--"] + argv
    return (cgroup.join_argv(list(cgroup_procs)) + argv) if cgroup_procs else argv


def missing_helpers(cfg: SandboxConfig, bwrap: Optional[str]) -> List[str]:
    """util-linux helpers the command needs but this host lacks (named in the error)."""
    needed = ["prlimit"]
    if os.geteuid() == 0 and cfg.drop_privileges:
        needed.append("setpriv")
    return [n for n in needed if shutil.which(n) is None]
