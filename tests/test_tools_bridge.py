"""The bridge: concurrency, per-call deadlines, isolation of failures, order, counters."""
import threading
import time

import pytest

from tepo_jax.tools import (ParseError, PythonTool, SandboxConfig, ToolBridge, ToolCall,
                            ToolFormat, ToolResult, ToolStatus)


class Echo:
    name = "echo"

    def run(self, argument, timeout):
        return ToolResult(argument.upper(), ToolStatus.OK)


class Crash:
    name = "crash"

    def run(self, argument, timeout):
        raise RuntimeError(f"boom on {argument}")


class Hang:
    """Ignores its deadline until released: the bridge must abandon it, not wait."""
    name = "hang"

    def __init__(self):
        self.release = threading.Event()

    def run(self, argument, timeout):
        self.release.wait(30)
        return ToolResult("late", ToolStatus.OK)


class Barrier:
    """Each call waits until `n` calls are running at once: proves real concurrency without
    timing assertions (a sequential executor would time out instead)."""
    name = "barrier"

    def __init__(self, n):
        self.barrier = threading.Barrier(n, timeout=10)

    def run(self, argument, timeout):
        self.barrier.wait()
        return ToolResult(argument, ToolStatus.OK)


def test_mixed_batch_order_and_counters():
    hang = Hang()
    bridge = ToolBridge({"echo": Echo(), "crash": Crash(), "hang": hang},
                        max_workers=4, default_timeout=5.0, grace_s=0.2)
    calls = [ToolCall("echo", "a"), ToolCall("hang", "x", timeout=0.3),
             ToolCall("crash", "c"), ParseError("unclosed tag <python>", tool="python"),
             ToolCall("nope", "z"), ToolCall("echo", "b")]
    t0 = time.monotonic()
    results = bridge.run_batch(calls)
    assert time.monotonic() - t0 < 3.0  # the hung call did not stall the batch
    hang.release.set()
    assert [r.status for r in results] == [
        ToolStatus.OK, ToolStatus.TIMEOUT, ToolStatus.ERROR, ToolStatus.PARSE_ERROR,
        ToolStatus.PARSE_ERROR, ToolStatus.OK]
    assert results[0].text == "A" and results[5].text == "B"
    assert "RuntimeError: boom on c" in results[2].text
    assert "unknown tool 'nope'" in results[4].text and "echo" in results[4].text
    assert results[3].text == "unclosed tag <python>"
    stats = bridge.stats()
    assert stats["all"]["calls"] == 6
    assert stats["all"]["failures"] == 3 and stats["all"]["timeouts"] == 1
    assert stats["all"]["abandoned"] == 1
    assert stats["echo"]["calls"] == 2 and stats["echo"]["failures"] == 0
    assert stats["hang"]["latency_max_s"] >= 0.3
    assert stats["all"]["latency_total_s"] >= stats["all"]["latency_max_s"]
    bridge.close()


def test_calls_run_concurrently():
    bridge = ToolBridge({"barrier": Barrier(4)}, max_workers=4, default_timeout=10)
    results = bridge.run_batch([ToolCall("barrier", str(i)) for i in range(4)])
    assert [r.text for r in results] == ["0", "1", "2", "3"]
    bridge.close()


def test_deadline_counts_from_start_not_from_queueing():
    """With one worker, a queued call is not timed out for time spent waiting in the queue."""
    class Slowish:
        name = "slow"

        def run(self, argument, timeout):
            time.sleep(0.3)
            return ToolResult("done", ToolStatus.OK)
    bridge = ToolBridge({"slow": Slowish()}, max_workers=1, default_timeout=0.5, grace_s=0.1)
    results = bridge.run_batch([ToolCall("slow", str(i)) for i in range(3)])
    assert [r.status for r in results] == [ToolStatus.OK] * 3
    bridge.close()


def test_submit_returns_future_and_overlaps():
    bridge = ToolBridge({"barrier": Barrier(3)}, max_workers=3, default_timeout=10)
    fut = bridge.submit([ToolCall("barrier", "x"), ToolCall("barrier", "y")])
    # The caller keeps working while the batch runs; here it supplies the third party.
    third = bridge.submit([ToolCall("barrier", "z")])
    assert [r.text for r in fut.result(timeout=10)] == ["x", "y"]
    assert third.result(timeout=10)[0].text == "z"
    bridge.close()


def test_pool_clogged_by_hung_tools_still_returns():
    """One worker, held by a tool that never honours its deadline, and no replacement allowed
    (max_hung=0): the queued call behind it fails too, saying the tools are hung, instead of
    waiting forever; once the hung call returns its thread rejoins and the pool recovers."""
    hang = Hang()
    bridge = ToolBridge({"hang": hang, "echo": Echo()}, max_workers=1, default_timeout=0.2,
                        grace_s=0.1, max_hung=0)
    t0 = time.monotonic()
    results = bridge.run_batch([ToolCall("hang", "x"), ToolCall("echo", "y")])
    assert time.monotonic() - t0 < 3.0
    assert [r.status for r in results] == [ToolStatus.TIMEOUT, ToolStatus.ERROR]
    assert "not started" in results[1].text and "hung" in results[1].text
    hang.release.set()
    deadline = time.monotonic() + 5
    while bridge.stats()["all"]["hung_threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge.run_batch([ToolCall("echo", "z")])[0].text == "Z"  # the pool recovers
    bridge.close()


def test_empty_batch():
    with ToolBridge({}, max_workers=1) as bridge:
        assert bridge.run_batch([]) == []
        assert bridge.stats()["all"]["calls"] == 0


def test_end_to_end_with_python_tool_and_parser():
    """Parse model turns, run them through the bridge with the real sandboxed python tool."""
    fmt = ToolFormat()
    turns = ["<python>print(sum(range(10)))</python>",
             "<python>while True: pass</python>",
             "<python>import os; os._exit(7)</python>",
             "<python>print(1)",
             "<python>print('ok')</python>"]
    calls = [fmt.parse(t) for t in turns]
    tool = PythonTool(SandboxConfig(timeout_s=1.5))
    with ToolBridge({"python": tool}, max_workers=4, default_timeout=1.5) as bridge:
        t0 = time.monotonic()
        results = bridge.run_batch(calls)
        assert time.monotonic() - t0 < 1.5 + 4.0
    assert [r.status for r in results] == [ToolStatus.OK, ToolStatus.TIMEOUT,
                                           ToolStatus.ERROR, ToolStatus.PARSE_ERROR,
                                           ToolStatus.OK]
    assert results[0].text.strip() == "45" and "exit status 7" in results[2].text
    assert fmt.wrap_result(results[4].text).startswith("\n<result>\nok")


def test_invalid_pool_size():
    with pytest.raises(ValueError, match="max_workers"):
        ToolBridge({}, max_workers=0)


def test_hung_tools_are_replaced_so_the_pool_keeps_working(caplog):
    """More calls hang than there are workers: each abandoned thread is replaced, so a normal
    tool still runs at once; the first hang of a tool is logged once, naming it."""
    hang = Hang()
    bridge = ToolBridge({"hang": hang, "echo": Echo()}, max_workers=2, default_timeout=0.2,
                        grace_s=0.1)
    with caplog.at_level("WARNING", logger="tepo_jax.tools.bridge"):
        first = bridge.run_batch([ToolCall("hang", "a"), ToolCall("hang", "b")])
        second = bridge.run_batch([ToolCall("hang", "c")])
        t0 = time.monotonic()
        normal = bridge.run_batch([ToolCall("echo", "ok")])
    assert [r.status for r in first + second] == [ToolStatus.TIMEOUT] * 3
    assert normal[0].status is ToolStatus.OK and normal[0].text == "OK"
    assert time.monotonic() - t0 < 1.0
    stats = bridge.stats()["all"]
    assert stats["abandoned"] == 3 and stats["hung_threads"] == 3
    warned = [r for r in caplog.records if "'hang'" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    hang.release.set()
    bridge.close()


def test_past_the_hung_bound_calls_fail_at_once_saying_tools_are_hung(caplog):
    hang = Hang()
    bridge = ToolBridge({"hang": hang, "echo": Echo()}, max_workers=1, default_timeout=0.2,
                        grace_s=0.1, max_hung=1)
    with caplog.at_level("WARNING", logger="tepo_jax.tools.bridge"):
        bridge.run_batch([ToolCall("hang", "a")])   # replaced (1 <= max_hung)
        bridge.run_batch([ToolCall("hang", "b")])   # not replaced: no worker left
        t0 = time.monotonic()
        r = bridge.run_batch([ToolCall("echo", "x")])[0]
    assert time.monotonic() - t0 < 0.5
    assert r.status is ToolStatus.ERROR
    assert "tool threads are hung" in r.text and "'hang' x2" in r.text
    assert any(rec.levelname == "ERROR" and "HUNG" in rec.getMessage() for rec in caplog.records)
    hang.release.set()   # the hung calls return: a thread rejoins, the pool works again
    deadline = time.monotonic() + 5
    while bridge.stats()["all"]["hung_threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge.run_batch([ToolCall("echo", "y")])[0].text == "Y"
    bridge.close()


_HANG_SCRIPT = """
import sys, threading, time
from tepo_jax.plugins import as_tool
from tepo_jax.tools import ToolBridge, ToolCall

def lookup(q):
    threading.Event().wait()      # a user tool that never returns

bridge = ToolBridge({"lookup": as_tool(lookup)}, max_workers=1, default_timeout=1.0, grace_s=0.2)
results = bridge.run_batch([ToolCall("lookup", "x")] * 2)
print([r.status.value for r in results], flush=True)
if sys.argv[1] == "close":
    bridge.close()
print("main done", flush=True)
"""


@pytest.mark.parametrize("close", ["close", "no-close"])
def test_hung_user_tool_does_not_keep_the_interpreter_alive(close):
    """A plain-function tool that never returns is abandoned; closing the bridge (or not) and
    leaving main must end the process: the hung thread may not be joined at exit."""
    import subprocess
    import sys
    try:
        out = subprocess.run([sys.executable, "-c", _HANG_SCRIPT, close], capture_output=True,
                             text=True, timeout=15)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the interpreter did not exit (stdout: {e.stdout!r})")
    assert out.returncode == 0, out.stderr
    assert "['timeout', 'timeout']" in out.stdout and "main done" in out.stdout


def test_close_with_a_batch_in_flight_gives_results_not_exceptions():
    hang = Hang()
    bridge = ToolBridge({"hang": hang, "echo": Echo()}, max_workers=1, default_timeout=0.5,
                        grace_s=0.1)
    fut = bridge.submit([ToolCall("hang", "x"), ToolCall("echo", "y")])
    deadline = time.monotonic() + 5
    while not any(w.future for w in bridge._pool._workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    bridge.close()   # the queued echo is cancelled
    results = fut.result(timeout=5)
    hang.release.set()
    assert results[0].status is ToolStatus.TIMEOUT
    assert results[1].status is ToolStatus.ERROR and "closed" in results[1].text


@pytest.mark.parametrize("kw, needle", [
    (dict(max_workers=0), "max_workers must be >= 1, got 0"),
    (dict(max_workers=-1), "max_workers"),
    (dict(default_timeout=0.0), "default_timeout"),
    (dict(default_timeout=-1.0), "default_timeout"),
    (dict(default_timeout=float("nan")), "default_timeout"),
    (dict(grace_s=float("nan")), "grace_s"),
    (dict(max_hung=-1), "max_hung"),
])
def test_bridge_refuses_bad_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ToolBridge({}, **kw)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_python_tool_refuses_a_deadline_that_is_not_positive(timeout):
    with pytest.raises(ValueError, match="timeout_s"):
        PythonTool(SandboxConfig(timeout_s=timeout))
