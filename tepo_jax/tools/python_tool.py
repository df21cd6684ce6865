"""The python tool: runs model-written code in a sandbox and returns what it printed.

See `sandbox.py` for the isolation layers. This module runs one confined process: it feeds
the program on stdin, reads stdout/stderr in bounded chunks until exit, the wall-clock
deadline, or the output cap, then kills whatever is left and turns the outcome into a
ToolResult. No call can hang the caller: every wait in here is bounded by the deadline.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional

from tepo_jax.tools import cgroup, sandbox, seccomp
from tepo_jax.tools.base import ToolResult, ToolStatus, model_text, result_text, truncate
from tepo_jax.tools.sandbox import SandboxConfig
from tepo_jax.tools.uidpool import UidPool

log = logging.getLogger(__name__)

_CHUNK = 64 << 10        # bytes per read/write syscall
_STDERR_KEEP = 64 << 10  # only the tail of stderr matters (the last error line)
_SIGNAL_CAUSES = {"SIGXCPU": ": CPU time limit exceeded",
                  "SIGXFSZ": ": file size limit exceeded"}
_EXIT_GRACE_S = 0.2      # after exit, how long grandchildren may hold the pipes open


class SandboxUnavailable(RuntimeError):
    """`require_sandbox=True` and no working bubblewrap was found."""


@dataclasses.dataclass
class RawRun:
    """What came back from one process, before it is turned into model-facing text."""

    stdout: bytes
    stderr_tail: bytes
    returncode: Optional[int]
    timed_out: bool
    flooded: bool
    oom_kills: int = 0   # processes the run's memory cgroup killed at its limit


class PythonTool:
    """`run(code, timeout)` executes `code` in a fresh sandboxed interpreter."""

    # It cuts stdout to `max_output_chars` itself, before the failure line it appends, so the
    # model always reads why a run failed: the bridge's whole-result cap must not cut that off.
    caps_own_results = True

    def __init__(self, config: SandboxConfig = SandboxConfig(), name: str = "python"):
        self.name = name
        self.config = config
        self.bwrap = sandbox.find_bwrap() if config.use_bwrap else None
        if self.bwrap is None:
            self._no_sandbox()
        missing = sandbox.missing_helpers(config, self.bwrap)
        if missing:
            raise SandboxUnavailable(f"python tool needs {', '.join(missing)} (util-linux) "
                                     "on PATH to apply resource limits")
        self._uids = self._uid_pool()
        self.nproc, why = sandbox.nproc_scope(config, self.bwrap, self._uids is not None)
        if self.nproc is None:
            log.warning("python tool: no process limit (RLIMIT_NPROC): %s; a fork bomb is stopped "
                        "only by the deadline%s", why, " and the PID namespace" if self.bwrap else "")
        self.cgroups, cg_why = _cgroup_host() if config.use_cgroup else (None, "disabled by config")
        self._reaper = cgroup.Reaper()
        self._proc_overrides = sandbox.proc_overrides(config, _host_meminfo())
        self.seccomp, sc_why = _seccomp_program() if self.bwrap and config.use_seccomp else \
            (None, "disabled by config" if self.bwrap else "needs bubblewrap")
        self.mode = ("bwrap" if self.bwrap else "limits-only") + \
            (f"+uid{config.uid_base}.." if self._uids else "") + \
            (f"+nproc/{self.nproc}" if self.nproc else "") + \
            (f"+cgroup{self.cgroups.version}" if self.cgroups else "") + \
            ("+seccomp" if self.seccomp else "")
        _log_protections(self.mode, {"cgroup (run memory+pids)": cg_why, "seccomp": sc_why,
                                     "RLIMIT_NPROC": why if self.nproc is None else ""})

    def _no_sandbox(self):
        why = "disabled by config (use_bwrap=False)" if not self.config.use_bwrap \
            else "bubblewrap (bwrap) not found; install it with `apt-get install bubblewrap`"
        if self.config.require_sandbox:
            raise SandboxUnavailable(f"python tool needs a sandbox: {why}")
        log.warning("python tool runs WITHOUT a filesystem/network sandbox: %s. Only "
                    "resource limits apply; model code can read host files and use the "
                    "network.", why)

    def _uid_pool(self) -> Optional[UidPool]:
        """Host-wide uid leases, one uid per concurrent run, so RLIMIT_NPROC is per run."""
        cfg = self.config
        if os.geteuid() != 0 or not cfg.drop_privileges:
            return None
        if not self.bwrap and not sandbox.path_traversable_by_others(cfg.python):
            log.warning("python tool: %s is not reachable by an unprivileged uid without "
                        "bubblewrap; running as root with limits only", cfg.python)
            return None
        return UidPool(cfg.uid_base, cfg.uid_pool, cfg.uid_lock_dir)

    # ---- public --------------------------------------------------------------------------
    def run(self, argument: str, timeout: Optional[float] = None) -> ToolResult:
        """Run `argument` as a Python program; never raises, never outlives `timeout`
        (plus process start-up and kill time, a few tens of milliseconds)."""
        t0 = time.monotonic()
        timeout = self.config.timeout_s if timeout is None else timeout
        deadline = t0 + timeout
        try:
            raw = self._run_confined(argument.encode("utf-8", "replace"), deadline)
        except Exception as exc:  # the sandbox itself failed: say so, keep the batch going
            log.exception("python tool: sandbox failure")
            return ToolResult(f"sandbox error: {type(exc).__name__}: {exc}", ToolStatus.ERROR,
                              time.monotonic() - t0, self.name)
        if raw is None:
            return ToolResult("sandbox busy: no free slot before the deadline",
                              ToolStatus.TIMEOUT, time.monotonic() - t0, self.name)
        text, status = render(raw, self.config, timeout)
        return ToolResult(text, status, time.monotonic() - t0, self.name)

    # ---- one confined process ------------------------------------------------------------
    def _run_confined(self, program: bytes, deadline: float) -> Optional[RawRun]:
        lease = None
        if self._uids is not None:
            lease = self._uids.acquire(deadline)
            if lease is None:
                return None
        uid = lease.uid if lease else None
        workdir = cg = None
        fds = []
        try:
            if self.cgroups is not None:
                # under bwrap the run's cgroup also holds bwrap and its PID-namespace init
                cg = cgroup.RunCgroup.create(self.cgroups, self.config.memory_bytes,
                                             self.config.max_processes + (2 if self.bwrap else 0))
            seccomp_fd, proc_files = None, {}
            if self.seccomp is not None:
                seccomp_fd = seccomp.program_fd(self.seccomp)
                fds.append(seccomp_fd)
            if self.bwrap:
                for path, data in self._proc_overrides.items():
                    proc_files[path] = sandbox.data_fd(data)
                    fds.append(proc_files[path])
            argv = sandbox.command(self.config, self.bwrap, uid, self.nproc, seccomp_fd,
                                   cg.procs_files if cg else (), proc_files)
            kwargs = dict(env=dict(self.config.env), start_new_session=True, pass_fds=fds)
            if not self.bwrap:
                workdir = tempfile.mkdtemp(prefix="tepo_py_")
                argv, kwargs = self._unsandboxed(argv, kwargs, uid, workdir)
            raw = run_process(argv, program, deadline, self.config.max_capture_bytes,
                              **kwargs)
            if cg is not None:
                raw.oom_kills = cg.oom_kills()
            return raw
        finally:
            for fd in fds:
                _close_quietly(fd)
            if cg is not None:
                self._reaper.release(cg)  # kills leftovers (daemons) and removes the cgroup
            elif uid is not None and not self.bwrap:
                _kill_uid(uid)  # daemonised leftovers; bwrap's PID namespace does this
            if lease is not None:
                lease.release()
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _unsandboxed(argv, kwargs, uid, workdir):
        """Without bwrap: a private working dir owned by the run's uid (the uid is dropped by
        setpriv in argv, after the cgroup join), or, without a uid, a shell in between so the
        code's parent is not the host process."""
        kwargs["cwd"] = workdir
        if uid is not None:
            os.chown(workdir, uid, uid)
        else:
            argv = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + argv
        return argv, kwargs


@functools.lru_cache(maxsize=None)
def _cgroup_host():
    """Detected once per process: (cgroup.Host or None, why not)."""
    return cgroup.detect()


def _host_meminfo() -> str:
    try:
        with open("/proc/meminfo") as f:
            return f.read()
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def _seccomp_program():
    """(compiled filter or None, why not), once per process."""
    try:
        return seccomp.filter_program(), ""
    except ValueError as exc:
        return None, str(exc)


_logged_protections: set = set()


def _log_protections(mode: str, missing: dict) -> None:
    """Say once per process and sandbox mode which protections are active and which not."""
    if mode in _logged_protections:
        return
    _logged_protections.add(mode)
    absent = "; ".join(f"{k}: {v}" for k, v in missing.items() if v)
    log.info("python tool protections: %s%s", mode, f" | NOT active: {absent}" if absent else "")
    if absent:
        log.warning("python tool: some protections are not active: %s", absent)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def run_process(argv, stdin_data: bytes, deadline: float, cap: int, **popen_kwargs) -> RawRun:
    """Start `argv` in its own process group, feed stdin, collect bounded output until exit,
    deadline or `cap` stdout bytes; then kill the group. Every wait is deadline-bounded."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, **popen_kwargs)
    try:
        out, err, timed_out, flooded = _pump(proc, stdin_data, deadline, cap)
    finally:
        _kill_group(proc)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
    return RawRun(bytes(out), bytes(err), proc.returncode, timed_out, flooded)


def _pump(proc, data: bytes, deadline: float, cap: int):
    """Selector loop over the three pipes. Returns (stdout, stderr tail, timed_out, flooded)."""
    sel = selectors.DefaultSelector()
    for pipe, tag in ((proc.stdout, "out"), (proc.stderr, "err")):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe.fileno(), selectors.EVENT_READ, tag)
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "in")
    pending = memoryview(data)
    out, err = bytearray(), bytearray()
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return out, err, True, False
            if exited_at is None and _exited(proc):
                exited_at = now
            if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
                break  # a leftover child holds the pipes; the group kill ends it
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                if key.data == "in":
                    pending = _feed(sel, proc, pending)
                    continue
                chunk = _read(key.fd)
                if chunk is None:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                elif key.data == "out":
                    out += chunk
                    if len(out) > cap:
                        return out, err, False, True
                else:
                    err += chunk
                    del err[:-_STDERR_KEEP]
        return out, err, False, False
    finally:
        sel.close()


def _feed(sel, proc, pending: memoryview) -> memoryview:
    """Write the next slice of the program; close stdin when done or when the child has
    closed its end (then the rest is moot)."""
    try:
        pending = pending[os.write(proc.stdin.fileno(), pending[:_CHUNK]):]
    except BlockingIOError:
        return pending
    except OSError:
        pending = pending[:0]
    if not len(pending):
        sel.unregister(proc.stdin.fileno())
        proc.stdin.close()  # EOF tells `python -` the program is complete
    return pending


def _read(fd: int) -> Optional[bytes]:
    """One bounded read: bytes, b'' at EOF, None when nothing is ready after all."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _exited(proc) -> bool:
    """Has the child exited? Checked without reaping it, so its pid (and process group id)
    stays reserved until we have killed the group: no risk of signalling a reused pid."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc) -> None:
    """SIGKILL the child's process group (the child is not yet reaped, see _exited), then
    reap. Under bwrap killing bwrap tears down the PID namespace and everything in it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # unkillable (D state); do not block the caller
        log.error("python tool: pid %d did not die after SIGKILL", proc.pid)


def _kill_uid(uid: int) -> None:
    """Kill every process of a sandbox uid (catches daemons that left the process group).
    `kill -9 -1` run as that uid signals exactly the processes it owns."""
    try:
        subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
    except (OSError, subprocess.SubprocessError):
        pass


def render(raw: RawRun, cfg: SandboxConfig, timeout: float):
    """Turn a RawRun into (model-facing text, status). Control bytes (NUL, ESC, …) are
    replaced, so model code cannot put them into the trajectory's text."""
    text = result_text(raw.stdout.decode("utf-8", "replace"), cfg.max_output_chars)
    if raw.oom_kills:
        # whatever else happened (even exit 0 of the top process), part of the run was
        # killed at its memory limit: say so, it is what the model must change
        text = _join(text, f"[memory limit of {cfg.memory_bytes >> 20} MiB for the run "
                           f"exceeded: {raw.oom_kills} process(es) killed]")
    if raw.timed_out:
        return _join(text, f"[timed out after {timeout:g} s]"), ToolStatus.TIMEOUT
    if raw.flooded:
        return _join(text, f"[output exceeded {cfg.max_capture_bytes} bytes; run stopped]"), \
            ToolStatus.ERROR
    if raw.returncode == 0:
        return text, ToolStatus.ERROR if raw.oom_kills else ToolStatus.OK
    return _join(text, _failure_line(raw)), ToolStatus.ERROR


def _failure_line(raw: RawRun) -> str:
    """The last error line (e.g. 'ZeroDivisionError: division by zero'), or the exit cause."""
    lines = [ln for ln in model_text(raw.stderr_tail.decode("utf-8", "replace")).splitlines()
             if ln.strip()]
    if lines:
        return truncate(lines[-1].strip(), 500)
    rc = raw.returncode
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc and rc > 128 else 0)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"[process killed by {name}{_SIGNAL_CAUSES.get(name, '')}]"
    return f"[exit status {rc}]"


def _join(text: str, note: str) -> str:
    text = text.rstrip("\n")
    return f"{text}\n{note}" if text else note
