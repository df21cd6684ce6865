"""The python tool against hostile model code.

Every hostile case must: return a bounded result (status and text as expected) within its
deadline (wall time asserted), leave the host unharmed (this process, a canary sibling process
and host files), leave no sandbox process behind, and the next call must work.
Cases that rely on bubblewrap's filesystem/network/PID isolation skip with a reason when it is
absent; the rest also run in the limits-only mode.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tepo_jax.tools import PythonTool, SandboxConfig, SandboxUnavailable, ToolStatus
from tepo_jax.tools.sandbox import find_bwrap, visible_paths

HAVE_BWRAP = find_bwrap() is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) not installed: "
                                 "`apt-get install bubblewrap` to run the sandbox-only cases")
START_SLACK_S = 3.0  # process start + kill on a loaded 2-core machine
CFG = SandboxConfig(timeout_s=5.0, cpu_s=5, memory_bytes=512 << 20, max_output_chars=2000,
                    max_capture_bytes=1 << 20)


@pytest.fixture(scope="module")
def canary():
    """A sibling of the host process: code that escapes and kills around it would hit it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def host_dir():
    """A world-readable/writable dir OUTSIDE /tmp with a world-readable/writable file, so
    only the sandbox (not file permissions) can stop the code from reading or changing it."""
    import tempfile
    import shutil
    d = tempfile.mkdtemp(prefix=".tepo_sandbox_probe_", dir=os.getcwd())
    os.chmod(d, 0o777)
    path = os.path.join(d, "secret.txt")
    with open(path, "w") as f:
        f.write("host secret 1234")
    os.chmod(path, 0o666)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def listener():
    """A TCP server on 127.0.0.1 that sandboxed code must not reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


def sandbox_uid_procs(cfg: SandboxConfig):
    """Pids of live processes owned by the sandbox's uid range (leftovers of a run)."""
    uids = range(cfg.uid_base, cfg.uid_base + cfg.uid_pool)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = os.stat(f"/proc/{pid}")
        except FileNotFoundError:
            continue
        if st.st_uid in uids:
            found.append(int(pid))
    return found


# (name, code template, timeout, allowed statuses, substring expected in text or None)
# Templates may use {secret}, {host_dir}, {port}, {host_pid}.
COMMON = [
    ("infinite_loop", "while True:\n    pass", 1.0, {ToolStatus.TIMEOUT}, "timed out"),
    ("sleep_past_deadline", "import time\nprint('before', flush=True)\ntime.sleep(60)", 1.0,
     {ToolStatus.TIMEOUT}, "before"),
    ("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n"
     "    except OSError:\n        pass", 1.0, {ToolStatus.TIMEOUT, ToolStatus.ERROR}, None),
    # Touches every page it gets, so it is slow on a loaded machine: a generous deadline.
    ("memory_bomb", "a = []\nwhile True:\n    a.append(bytearray(32 << 20))", 8.0,
     {ToolStatus.ERROR}, "MemoryError"),
    ("huge_allocation", "x = bytearray(1 << 40)", 5.0, {ToolStatus.ERROR}, "MemoryError"),
    ("huge_output", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", 5.0,
     {ToolStatus.ERROR}, "output exceeded"),
    ("os_exit", "import os\nprint('partial', flush=True)\nos._exit(3)", 5.0,
     {ToolStatus.ERROR}, "exit status 3"),
    ("kill_parent", "import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(30)", 2.0,
     {ToolStatus.ERROR, ToolStatus.TIMEOUT, ToolStatus.OK}, None),
    ("binary_garbage", "import os\nos.write(1, bytes(range(256)) * 4096)", 5.0,
     {ToolStatus.OK}, "\ufffd"),
    ("cpu_rlimit", "while True:\n    pass", 8.0, {ToolStatus.ERROR}, "CPU time limit"),
    ("raise_exception", "def f(n):\n    return f(n + 1)\nf(0)", 5.0,
     {ToolStatus.ERROR}, "RecursionError"),
]
BWRAP_ONLY = [
    ("read_etc_shadow", "print(open('/etc/shadow').read())", 5.0,
     {ToolStatus.ERROR}, "Error"),
    ("read_host_file", "print(open({secret!r}).read())", 5.0, {ToolStatus.ERROR}, "Error"),
    ("write_host_file", "open({secret!r}, 'w').write('pwned')", 5.0, {ToolStatus.ERROR},
     "Error"),
    ("create_host_file", "open({host_dir!r} + '/new.txt', 'w').write('pwned')", 5.0,
     {ToolStatus.ERROR}, "Error"),
    ("write_system_dir", "open('/usr/pwned.txt', 'w').write('x')", 5.0,
     {ToolStatus.ERROR}, "Error"),
    ("network_connect", "import socket\nsocket.create_connection(('127.0.0.1', {port}), "
     "timeout=2)", 5.0, {ToolStatus.ERROR}, "Error"),
    ("kill_host_pid", "import os\nos.kill({host_pid}, 9)", 5.0, {ToolStatus.ERROR}, "Error"),
    ("kill_everything", "import os\nos.kill(-1, 9)", 5.0,
     {ToolStatus.ERROR, ToolStatus.OK}, None),
    ("daemon_escape", "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
     "    time.sleep(60)\nprint('parent done')", 5.0, {ToolStatus.OK}, "parent done"),
    ("fill_tmp", "open('/tmp/big', 'wb').write(b'x' * (64 << 20))", 5.0,
     {ToolStatus.ERROR}, None),
]


def _check_case(tool, case, canary, host_dir, listener):
    name, template, timeout, statuses, needle = case
    secret = os.path.join(host_dir, "secret.txt")
    code = template.format(secret=secret, host_dir=host_dir, port=listener.getsockname()[1],
                           host_pid=os.getpid())
    t0 = time.monotonic()
    result = tool.run(code, timeout=timeout)
    wall = time.monotonic() - t0
    assert wall < timeout + START_SLACK_S, f"{name}: took {wall:.2f}s (deadline {timeout}s)"
    assert result.status in statuses, f"{name}: {result.status} {result.text[:300]!r}"
    if needle is not None:
        assert needle in result.text, f"{name}: {needle!r} not in {result.text[:300]!r}"
    assert len(result.text) < tool.config.max_output_chars + 600, f"{name}: unbounded text"
    # The host is unharmed: canary alive, host files unchanged, nothing listening got a hit.
    assert canary.poll() is None, f"{name}: the canary sibling process was killed"
    with open(secret) as f:
        assert f.read() == "host secret 1234", f"{name}: host file changed"
    assert not os.path.exists(os.path.join(host_dir, "new.txt")), f"{name}: file created"
    with pytest.raises(BlockingIOError):
        listener.accept()
    if tool._uids is not None:
        assert _eventually_empty(lambda: sandbox_uid_procs(tool.config)), \
            f"{name}: sandbox processes left behind"
    after = tool.run("print(6 * 7)", timeout=5.0)
    assert (after.status, after.text.strip()) == (ToolStatus.OK, "42"), f"{name}: next call"


def _eventually_empty(probe, within_s: float = 2.0) -> bool:
    """Processes killed with SIGKILL vanish asynchronously; poll briefly, do not sleep-assert."""
    deadline = time.monotonic() + within_s
    while probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def bwrap_tool():
    if not HAVE_BWRAP:
        pytest.skip("bubblewrap (bwrap) not installed")
    return PythonTool(CFG)


@pytest.fixture(scope="module")
def limits_tool():
    return PythonTool(SandboxConfig(**{**CFG.__dict__, "use_bwrap": False}))


def _cfg_for(case, base):
    """The cpu_rlimit case lowers the CPU limit below its deadline to see RLIMIT_CPU act."""
    if case[0] == "cpu_rlimit":
        return PythonTool(SandboxConfig(**{**base.config.__dict__, "cpu_s": 1}))
    return base


@needs_bwrap
@pytest.mark.parametrize("case", COMMON + BWRAP_ONLY, ids=lambda c: c[0])
def test_hostile_bwrap(case, bwrap_tool, canary, host_dir, listener):
    _check_case(_cfg_for(case, bwrap_tool), case, canary, host_dir, listener)


@pytest.mark.parametrize("case", COMMON, ids=lambda c: c[0])
def test_hostile_limits_only(case, limits_tool, canary, host_dir, listener):
    _check_case(_cfg_for(case, limits_tool), case, canary, host_dir, listener)


# ---- ordinary behaviour ---------------------------------------------------------------------
def test_stdout_and_last_error_line(limits_tool):
    r = limits_tool.run("print('hi')\nx = 1 / 0", timeout=5)
    assert r.status is ToolStatus.ERROR
    assert r.text == "hi\nZeroDivisionError: division by zero"


def test_truncation_marker():
    tool = PythonTool(SandboxConfig(max_output_chars=100, use_bwrap=HAVE_BWRAP))
    r = tool.run("print('a' * 1000, end='')", timeout=5)
    assert r.status is ToolStatus.OK
    assert r.text == "a" * 100 + "…[truncated 900 chars]"


def test_large_program_on_stdin(limits_tool):
    code = "# pad\n" * 200_000 + "print('end')"  # 1.2 MB: more than a pipe buffer
    r = limits_tool.run(code, timeout=10)
    assert (r.status, r.text.strip()) == (ToolStatus.OK, "end")


@needs_bwrap
def test_sandbox_view(bwrap_tool):
    r = bwrap_tool.run("import os, numpy\nprint(os.getcwd(), sorted(os.listdir('/tmp')), "
                       "os.getpid(), numpy.__name__)", timeout=10)
    assert r.status is ToolStatus.OK, r.text
    cwd, rest = r.text.split(" ", 1)
    # A private /tmp that holds nothing of the host's (only the way to a bound interpreter or
    # venv that lives under /tmp, as in a clone in /tmp); the venv is importable.
    under_tmp = sorted({p.split("/")[2] for p in visible_paths(CFG) if p.startswith("/tmp/")})
    assert cwd == "/tmp" and rest.startswith(f"{under_tmp} "), rest


@needs_bwrap
def test_an_interpreter_under_tmp_stays_visible(tmp_path_factory):
    """bwrap mounts the private /tmp before the read-only binds: a venv in /tmp/<clone>/.venv
    is bound on top of it, not hidden by it (it was: every run failed with 'No such file')."""
    prefix = tempfile.mkdtemp(prefix="tepo_interp_", dir="/tmp")
    try:
        os.chmod(prefix, 0o755)   # the dropped uid must be able to reach it
        os.mkdir(os.path.join(prefix, "bin"))
        python = os.path.join(prefix, "bin", "python")
        os.symlink(os.path.realpath(sys.executable), python)
        cfg = SandboxConfig(**{**CFG.__dict__, "python": python})
        r = PythonTool(cfg).run("import os\nprint(sorted(os.listdir('/tmp')))", timeout=10)
        assert r.status is ToolStatus.OK, r.text
        # its prefix (and the test venv's, when this checkout is under /tmp), nothing else
        under_tmp = sorted({p.split("/")[2] for p in visible_paths(cfg) if p.startswith("/tmp/")})
        assert os.path.basename(prefix) in under_tmp and r.text.strip() == str(under_tmp)
    finally:
        shutil.rmtree(prefix)


def test_require_sandbox_refuses_without_bwrap():
    with pytest.raises(SandboxUnavailable, match="needs a sandbox"):
        PythonTool(SandboxConfig(use_bwrap=False, require_sandbox=True))


def test_missing_bwrap_warns(caplog):
    with caplog.at_level("WARNING"):
        PythonTool(SandboxConfig(use_bwrap=False))
    assert "WITHOUT a filesystem/network sandbox" in caplog.text


def test_concurrent_runs_are_independent():
    from concurrent.futures import ThreadPoolExecutor
    tool = PythonTool(SandboxConfig(use_bwrap=HAVE_BWRAP))
    codes = [f"print({i} * 2)" for i in range(8)] + ["while True: pass"]
    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda c: tool.run(c, timeout=1.0), codes))
    assert [r.text.strip() for r in results[:8]] == [str(i * 2) for i in range(8)]
    assert results[8].status is ToolStatus.TIMEOUT


# ---- the process limit as a non-root user -----------------------------------------------------
def _as_non_root(monkeypatch, userns=True):
    from tepo_jax.tools import sandbox
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_kernel_version", lambda: (6, 1))
    monkeypatch.setattr(sandbox, "user_namespaces_work", lambda: userns)
    return sandbox


def _after(argv, flag):
    return argv[argv.index(flag) + 1:]


def test_non_root_argv_limits_processes_in_its_own_user_namespace(monkeypatch):
    sandbox = _as_non_root(monkeypatch)
    cfg = SandboxConfig(max_processes=32)
    nproc = "--nproc=32:32"
    scope, _ = sandbox.nproc_scope(cfg, "/usr/bin/bwrap", dedicated_uid=False)
    argv = sandbox.command(cfg, "/usr/bin/bwrap", None, scope)
    bwrap_opts, inner = argv[:argv.index("--")], _after(argv, "--")
    assert scope == "userns" and "--unshare-user" in bwrap_opts and "--cap-add" not in bwrap_opts
    assert inner[0] == "prlimit" and nproc in inner and "setpriv" not in inner
    scope, _ = sandbox.nproc_scope(cfg, None, dedicated_uid=False)
    argv = sandbox.command(cfg, None, None, scope)
    assert scope == "userns" and argv[:4] == ["unshare", "--user", "--", "prlimit"] and nproc in argv
    tool = PythonTool(SandboxConfig(use_bwrap=False))
    assert tool.nproc == "userns" and "+nproc/userns" in tool.mode
    # Where the limit cannot count one run alone it is left out (with a warning), not set
    # host-wide for the uid, where the trainer's own threads would exhaust it.
    monkeypatch.setattr(sandbox, "user_namespaces_work", lambda: False)
    assert sandbox.nproc_scope(cfg, None, dedicated_uid=False)[0] is None
    monkeypatch.setattr(sandbox, "_kernel_version", lambda: (5, 10))
    scope, why = sandbox.nproc_scope(cfg, "/usr/bin/bwrap", dedicated_uid=False)
    assert scope is None and "5.14" in why and nproc not in sandbox.command(cfg, "/usr/bin/bwrap", None, scope)


def test_root_argv_limits_processes_of_a_dedicated_uid(monkeypatch):
    from tepo_jax.tools import sandbox
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cfg = SandboxConfig(max_processes=32)
    assert sandbox.nproc_scope(cfg, "/usr/bin/bwrap", dedicated_uid=True)[0] == "uid"
    inner = _after(sandbox.command(cfg, "/usr/bin/bwrap", 61000, "uid"), "--")
    assert inner[0] == "prlimit" and "--nproc=32:32" in inner and "setpriv" in inner
    assert sandbox.nproc_scope(cfg, None, dedicated_uid=False)[0] is None  # root ignores it


FORK_COUNT = """import os, time
n = 0
try:
    while n < 1000:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        n += 1
    print("no limit: forked", n)
except OSError as e:
    print("fork refused after", n, "children", type(e).__name__)
"""
NOBODY = 65534


def _non_root_prefix():
    """argv prefix that runs a command as a non-root uid, or None (skip)."""
    if os.geteuid() != 0:
        return []
    import shutil
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"] \
        if shutil.which("setpriv") else None


@pytest.mark.parametrize("mode", ["bwrap", "unshare"])
def test_fork_bomb_stopped_by_the_process_limit_as_non_root(mode, monkeypatch):
    """A real run as a non-root uid: the run's forks are refused at max_processes, while 40
    other processes of the same uid outside the run do not count against it."""
    import shutil
    from tepo_jax.tools import python_tool, sandbox
    prefix = _non_root_prefix()
    python = "/usr/bin/python3"  # world-readable, unlike an interpreter under /root
    if prefix is None or not os.path.exists(python) or not sandbox.path_traversable_by_others(python):
        pytest.skip("needs a non-root uid (setpriv when root) and a world-accessible /usr/bin/python3")
    if mode == "bwrap" and not HAVE_BWRAP:
        pytest.skip("bubblewrap (bwrap) not installed")
    probe = subprocess.run(prefix + ["unshare", "--user", "true"], capture_output=True)
    if mode == "unshare" and (shutil.which("unshare") is None or probe.returncode != 0):
        pytest.skip(f"no unprivileged user namespaces here: {probe.stderr.decode()[:200]}")
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "geteuid", lambda: NOBODY)  # argv as the non-root host builds it
    monkeypatch.setattr(sandbox, "visible_paths", lambda cfg: [p for p in sandbox._SYSTEM_DIRS
                                                               if os.path.lexists(p)])
    cfg = SandboxConfig(python=python, max_processes=16, timeout_s=10.0)
    bwrap = find_bwrap() if mode == "bwrap" else None
    scope, why = sandbox.nproc_scope(cfg, bwrap, dedicated_uid=False)
    assert scope == "userns", why
    argv = prefix + sandbox.command(cfg, bwrap, None, scope)
    others = [subprocess.Popen(prefix + ["sleep", "30"]) for _ in range(40)] if prefix else []
    try:
        t0 = time.monotonic()
        raw = python_tool.run_process(argv, FORK_COUNT.encode(), t0 + 10.0, 1 << 20, cwd="/tmp",
                                      start_new_session=True)
        wall = time.monotonic() - t0
    finally:
        for p in others:
            p.kill()
            p.wait()
    out = raw.stdout.decode()
    assert not raw.timed_out and wall < 10.0, (wall, out, raw.stderr_tail[-300:])
    assert out.startswith("fork refused after") and "BlockingIOError" in out, (out, raw.stderr_tail[-300:])
    children = int(out.split()[3])
    # The run itself (python, and bwrap's init under bwrap) takes 1-2 of the 16.
    assert 16 - 3 <= children <= 16, out
