"""The python tool's run-wide limits (issue 14): memory and processes counted per run by a
cgroup, no nested user/mount namespaces or mounts (seccomp), uids unique on the host across
tools and processes, control bytes kept out of model-facing text, RLIMIT_NOFILE set.

Every hostile case also checks that the next ordinary call on the same tool prints 42. A case
whose mechanism the host lacks (no writable cgroup, no bwrap, not root) skips and says why.
"""
import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tepo_jax.tools import PythonTool, SandboxConfig, ToolStatus, python_tool, sandbox
from tepo_jax.tools import cgroup, seccomp
from tepo_jax.tools.uidpool import UidPool

HAVE_BWRAP = sandbox.find_bwrap() is not None
CGROUP_HOST, CGROUP_WHY = cgroup.detect()
needs_cgroup = pytest.mark.skipif(CGROUP_HOST is None,
                                  reason=f"no per-run cgroup on this host: {CGROUP_WHY}")
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the uid pool is used only as root")
MODES = [pytest.param(True, id="bwrap", marks=needs_bwrap), pytest.param(False, id="limits-only")]
LIMIT = 256 << 20


def _tool(bwrap: bool, tmp_lock_dir=None, **kw) -> PythonTool:
    cfg = dict(timeout_s=10.0, memory_bytes=LIMIT, use_bwrap=bwrap)
    if tmp_lock_dir:
        cfg["uid_lock_dir"] = tmp_lock_dir
    return PythonTool(SandboxConfig(**{**cfg, **kw}))


def _next_call_works(tool):
    after = tool.run("print(6 * 7)", timeout=5.0)
    assert (after.status, after.text.strip()) == (ToolStatus.OK, "42"), after.text


def _run_cgroups_left():
    """Run cgroups of this process still on disk (each run must remove its own)."""
    if CGROUP_HOST is None:
        return []
    return [d for b in set(CGROUP_HOST.bases.values())
            for d in glob.glob(os.path.join(b, f"tepo-{os.getpid()}-*"))]


# ---- memory: one limit for the whole run ------------------------------------------------------
# 48 memfds of 15 MiB: 720 MiB written with write(), in no address space (RLIMIT_AS misses it),
# each file under RLIMIT_FSIZE (16 MiB).
MEMFD = """
import os
fds = []
for i in range(48):
    fd = os.memfd_create("x")
    os.write(fd, b"x" * (15 << 20))
    fds.append(fd)
print("held", sum(os.fstat(fd).st_size for fd in fds) >> 20, "MiB")
"""
# Four children of 150 MiB each: every process is under RLIMIT_AS, the run is at 600 MiB.
FORKED = """
import os, time
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        b = bytearray(150 << 20)
        for j in range(0, len(b), 4096):
            b[j] = 1
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
codes = [os.waitpid(p, 0)[1] for p in kids]
print("all held" if codes == [0] * 4 else f"children: {codes}")
"""


@needs_cgroup
@pytest.mark.parametrize("bwrap", MODES)
@pytest.mark.parametrize("code,held", [(MEMFD, "held"), (FORKED, "all held")],
                         ids=["memfd", "forked_children"])
def test_run_memory_is_limited_as_a_whole(bwrap, code, held):
    tool = _tool(bwrap)
    t0 = time.monotonic()
    r = tool.run(code, timeout=10.0)
    assert time.monotonic() - t0 < 10.0
    assert held not in r.text, f"the run held more than its {LIMIT >> 20} MiB: {r.text!r}"
    assert r.status is ToolStatus.ERROR
    assert f"memory limit of {LIMIT >> 20} MiB for the run exceeded" in r.text, r.text
    assert _run_cgroups_left() == []
    _next_call_works(tool)


FORK_COUNT = """
import os, time
n = 0
try:
    while n < 200:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        n += 1
    print("no limit: forked", n)
except OSError as e:
    print("fork refused after", n, type(e).__name__)
"""


@needs_cgroup
@pytest.mark.parametrize("bwrap", MODES)
def test_run_processes_are_limited_without_a_dedicated_uid(bwrap):
    """Root with drop_privileges=False: RLIMIT_NPROC does not apply to root, so only the
    cgroup's pids.max stops a fork bomb short of the deadline."""
    tool = _tool(bwrap, drop_privileges=False, max_processes=16)
    r = tool.run(FORK_COUNT, timeout=10.0)
    assert r.text.startswith("fork refused after"), r.text
    assert int(r.text.split()[3]) <= 16, r.text
    assert _run_cgroups_left() == []
    _next_call_works(tool)


def test_cgroup_join_argv_runs_the_command_inside(tmp_path):
    """The join prefix writes the shell's own pid, then execs: the command keeps that pid."""
    procs = tmp_path / "cgroup.procs"
    out = subprocess.run(cgroup.join_argv([str(procs)]) + ["sh", "-c", "echo $$"],
                         capture_output=True, text=True, check=True).stdout
    assert procs.read_text().strip() == out.strip()
    bad = subprocess.run(cgroup.join_argv([str(tmp_path / "no" / "such")]) + ["true"],
                         capture_output=True, text=True)
    assert bad.returncode == 125 and "cannot join cgroup" in bad.stderr


def test_cgroup_parsing_and_v2_limits(tmp_path):
    mountinfo = textwrap.dedent("""\
        30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
        31 25 0:27 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
        32 25 0:28 / /sys/fs/cgroup/unified rw,relatime shared:11 - cgroup2 cgroup2 rw
        """)
    assert cgroup.parse_mounts(mountinfo) == ("/sys/fs/cgroup/unified", {
        "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids"})
    assert cgroup.parse_own("4:memory:/a/b\n8:pids:/\n0::/c\n") == ("/c", {"memory": "/a/b",
                                                                            "pids": "/"})
    # v2: a fake cgroup dir whose controllers are already enabled for children
    base = tmp_path / "cg"
    base.mkdir()
    (base / "cgroup.controllers").write_text("cpu memory pids\n")
    (base / "cgroup.subtree_control").write_text("memory pids\n")
    host, why = cgroup._v2_host(str(tmp_path), "/cg")
    assert host is not None and host.version == 2, why
    run = base / "tepo-run"
    run.mkdir()
    for f in ("memory.max", "memory.swap.max", "pids.max"):
        (run / f).write_text("max\n")
    writes = dict(cgroup.limit_writes(host, "tepo-run", 1 << 30, 34))
    assert writes == {str(run / "memory.max"): str(1 << 30), str(run / "memory.swap.max"): "0",
                      str(run / "pids.max"): "34"}
    (base / "cgroup.controllers").write_text("cpu\n")
    assert cgroup._v2_host(str(tmp_path), "/cg") == (None, f"cgroup v2: memory/pids controller "
                                                           f"not available in {base}")


# ---- namespaces and mounts ----------------------------------------------------------------------
NESTED = """
import ctypes, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/tmp/m", exist_ok=True)
r = libc.unshare(0x10000000 | 0x20000)  # CLONE_NEWUSER | CLONE_NEWNS
print("unshare", r, ctypes.get_errno())
r = libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, None)
print("mount", r, ctypes.get_errno())
p = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /tmp/m && echo mounted"],
                   capture_output=True, text=True)
print("cli", p.returncode, p.stdout.strip())
"""
EPERM_ALL = "unshare -1 1\nmount -1 1\ncli 1"


@needs_bwrap
def test_no_nested_user_or_mount_namespace_on_this_host_path():
    """As root (CI) the dropped uid could unshare a user namespace, gain capabilities in it
    and mount; the seccomp filter denies it. As non-root this runs the non-root path."""
    tool = _tool(True)
    r = tool.run(NESTED, timeout=10.0)
    assert r.status is ToolStatus.OK and r.text.strip() == EPERM_ALL, r.text
    _next_call_works(tool)


@needs_bwrap
def test_no_nested_namespaces_on_the_non_root_path():
    """bwrap run as an ordinary uid (via setpriv when the tests run as root), with the argv a
    non-root host builds: its own user namespace with --disable-userns, plus the filter."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run bwrap as a non-root uid")
    python = "/usr/bin/python3"
    if not os.path.exists(python) or not sandbox.path_traversable_by_others(python):
        pytest.skip("needs a world-accessible /usr/bin/python3")
    cfg = SandboxConfig(python=python, timeout_s=10.0)
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] \
        if os.geteuid() == 0 else []
    fd = seccomp.program_fd(seccomp.filter_program())
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "geteuid", lambda: 65534)
            mp.setattr(sandbox, "visible_paths", lambda c: [p for p in sandbox._SYSTEM_DIRS
                                                            if os.path.lexists(p)])
            argv = prefix + sandbox.command(cfg, sandbox.find_bwrap(), None, "userns", fd)
        assert "--disable-userns" in argv and "--seccomp" in argv
        raw = python_tool.run_process(argv, NESTED.encode(), time.monotonic() + 10, 1 << 20,
                                      cwd="/tmp", start_new_session=True, pass_fds=[fd])
    finally:
        os.close(fd)
    assert raw.returncode == 0, raw.stderr_tail[-500:]
    assert raw.stdout.decode().strip() == EPERM_ALL


def test_seccomp_program_shape():
    prog = seccomp.filter_program("x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
    insns = [prog[i:i + 8] for i in range(0, len(prog), 8)]
    # first: load arch, compare with AUDIT_ARCH_X86_64, deny otherwise
    assert insns[1][4:] == (0xC000003E).to_bytes(4, "little")
    assert insns[-1][4:] == (0x7FFF0000).to_bytes(4, "little")  # default: allow
    assert len(seccomp.filter_program("aarch64")) > 0
    with pytest.raises(ValueError, match="no seccomp syscall table"):
        seccomp.filter_program("mips")


# ---- uids: one run per uid on the host ----------------------------------------------------------
HOLD = """
import os, time
for i in range(6):
    if os.fork() == 0:
        time.sleep(4)
        os._exit(0)
print(os.getuid(), flush=True)
time.sleep(4)
"""
FORK4 = """
import os, time
n = 0
try:
    for i in range(4):
        if os.fork() == 0:
            time.sleep(1)
            os._exit(0)
        n += 1
except OSError as e:
    print("refused", type(e).__name__)
print(os.getuid(), n)
"""


@needs_root
@needs_bwrap
def test_two_tools_in_two_processes_never_share_a_uid(tmp_path):
    """Another process's tool holds a run of 7 processes; a run of this process's tool forks
    4 more with max_processes=8. With a shared uid its forks would be refused (RLIMIT_NPROC
    counts per uid); with host-wide leases it gets a uid of its own."""
    lock_dir = str(tmp_path / "uids")
    cfg = dict(timeout_s=10.0, max_processes=8, uid_lock_dir=lock_dir, uid_base=62000,
               uid_pool=4)
    other = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tepo_jax.tools import PythonTool, SandboxConfig;"
         f"print(PythonTool(SandboxConfig(**{cfg!r})).run(sys.stdin.read(), 10).text)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    other.stdin.write(HOLD)
    other.stdin.close()
    try:
        _wait_for_uid_procs(range(62000, 62004), 7, other)
        tool = PythonTool(SandboxConfig(**cfg))
        r = tool.run(FORK4, timeout=10.0)
        other_out = other.stdout.read()
        other.wait(timeout=20)
    finally:
        other.kill()
    assert "refused" not in r.text, f"forks refused: the other run's processes counted: {r.text}"
    uid, forked = r.text.split()
    assert forked == "4", r.text
    assert uid != other_out.strip(), (uid, other_out)
    _next_call_works(tool)


def _wait_for_uid_procs(uids, n, proc, within_s=10.0):
    """Until `n` processes of `uids` are alive (the other run is holding its processes)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the other process's run ended early"
        count = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                count += os.stat(f"/proc/{pid}").st_uid in uids
            except FileNotFoundError:
                pass
        if count >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the other run never held {n} processes")


def test_uid_pool_leases_are_host_wide(tmp_path):
    """Two pools over one lock dir (two tools) never hand out the same uid; a lease held by
    a process that dies is free again."""
    lock_dir = str(tmp_path / "uids")
    a, b = UidPool(100, 2, lock_dir), UidPool(100, 2, lock_dir)
    x = a.acquire(time.monotonic() + 1)
    y = b.acquire(time.monotonic() + 1)
    assert {x.uid, y.uid} == {100, 101}
    assert b.acquire(time.monotonic() + 0.05) is None  # all leased: waits, then gives up
    x.release()
    z = b.acquire(time.monotonic() + 1)
    assert z.uid == x.uid
    z.release()
    y.release()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({lock_dir!r} + "/100.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(30)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        w = a.acquire(time.monotonic() + 1)
        assert w.uid == 101  # 100 is the other process's
    finally:
        holder.kill()
        holder.wait()
    assert a.acquire(time.monotonic() + 1).uid == 100  # its holder died: free again
    w.release()


def test_uid_lock_dir_writable_by_others_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(PermissionError, match="not writable by others"):
        UidPool(100, 2, str(d))


# ---- smaller holes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bwrap", MODES)
def test_control_bytes_do_not_reach_the_model(bwrap):
    tool = _tool(bwrap)
    r = tool.run("import sys\nsys.stdout.write('a\\x00b\\x1b[2Jc\\r\\nd\\te\\x7f')\n"
                 "sys.stderr.write('Err\\x1b]0;x\\x07or\\n')\nraise SystemExit(1)", timeout=5.0)
    assert r.text == "a\ufffdb\ufffd[2Jc\nd\te\ufffd\nErr\ufffd]0;x\ufffdor", repr(r.text)
    _next_call_works(tool)


@pytest.mark.parametrize("bwrap", MODES)
def test_open_files_limit_is_the_configured_one(bwrap):
    tool = _tool(bwrap, max_open_files=64)
    r = tool.run("import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
                 "fds = [open('/dev/null') for _ in range(100)]", timeout=5.0)
    assert r.status is ToolStatus.ERROR and r.text.startswith("(64, 64)\n"), r.text
    assert "Too many open files" in r.text
    _next_call_works(tool)


def test_protections_are_logged_once_at_start(caplog):
    python_tool._logged_protections.clear()
    with caplog.at_level(logging.INFO, logger="tepo_jax.tools.python_tool"):
        first = PythonTool(SandboxConfig(use_bwrap=HAVE_BWRAP))
        PythonTool(SandboxConfig(use_bwrap=HAVE_BWRAP))
    lines = [r.getMessage() for r in caplog.records if "protections" in r.getMessage()]
    assert lines and lines[0].startswith(f"python tool protections: {first.mode}")
    assert len([ln for ln in lines if ln.startswith("python tool protections")]) == 1
    if CGROUP_HOST is None:
        assert any("cgroup" in ln and "NOT active" in ln for ln in lines)


@needs_bwrap
def test_proc_shows_the_run_not_the_host():
    """/proc/meminfo gives the run's memory limit, and /proc/1/cmdline (bwrap's own argv)
    no host paths or options."""
    tool = _tool(True)
    r = tool.run("print([ln.split() for ln in open('/proc/meminfo').read().splitlines()[:3]])\n"
                 "print(repr(open('/proc/1/cmdline').read()))", timeout=5.0)
    kib = str(LIMIT >> 10)
    assert r.status is ToolStatus.OK, r.text
    assert r.text.splitlines() == [
        str([["MemTotal:", kib, "kB"], ["MemFree:", kib, "kB"], ["MemAvailable:", kib, "kB"]]),
        repr("bwrap\x00")], r.text
    _next_call_works(tool)


@needs_cgroup
def test_cgroups_of_a_killed_tool_process_are_swept_at_start():
    """A SIGKILLed trainer leaves its run cgroups behind (empty: the runs die with it); the
    next tool process removes them, and never one of a live process."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_dirs = cgroup.RunCgroup.create(CGROUP_HOST, LIMIT, 8).dirs
        names = {f"tepo-{child.pid}-0": child.pid, f"tepo-{dead.pid}-0": dead.pid}
        for name in names:
            for base in set(CGROUP_HOST.bases.values()):
                os.mkdir(os.path.join(base, name))
        removed = cgroup.sweep_stale(CGROUP_HOST)
        assert sorted(removed) == sorted(os.path.join(b, f"tepo-{dead.pid}-0")
                                         for b in set(CGROUP_HOST.bases.values()))
        assert all(os.path.isdir(d) for d in live_dirs)  # this process's own: alive
    finally:
        child.kill()
        child.wait()
        for base in set(CGROUP_HOST.bases.values()):
            for name in (f"tepo-{child.pid}-0", f"tepo-{dead.pid}-0"):
                if os.path.isdir(os.path.join(base, name)):
                    os.rmdir(os.path.join(base, name))
        for d in live_dirs:
            os.rmdir(d)
