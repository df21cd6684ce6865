"""The tool bridge: runs a batch of parsed tool calls concurrently on the host.

The rollout parses each finished model turn (`CallFormat.parse`), hands the calls to
`ToolBridge.submit`, keeps the accelerator decoding the other sequences, and collects the
results in input order. Guarantees:

- each call has its own deadline (`ToolCall.timeout` or `default_timeout`), counted from when
  a worker starts it, not from when it was queued;
- a slow, crashing or hostile call yields an error/timeout ToolResult for that call only; an
  exception in a tool never escapes, and a tool that ignores its deadline is abandoned (its
  thread is left to finish; counted in `abandoned`) so the batch still returns on time;
- tools run on daemon threads of the bridge's own pool (`_DaemonPool`), never on a
  ThreadPoolExecutor, whose threads the interpreter joins at exit: a tool that never returns
  cannot keep the process alive. At exit (and in `close(wait=True)`) the bridge waits only
  for calls still within deadline + grace, so e.g. the python sandbox cleans up after itself;
- an abandoned call's thread is written off and a new one takes its place, so hung tools do
  not eat the pool's `max_workers`; at most `max_hung` written-off threads are kept (a warning
  names each tool the first time it hangs). Past that bound the pool shrinks instead, the
  bridge logs an error, and when no worker is left, calls fail at once with a result that
  says the tools are hung (a thread that returns late rejoins the pool);
- a call that cannot even start in time (every worker busy or hung) times out too;
- output order equals input order; counters cover calls, failures, timeouts and latency;
- every tool's result text reaches the model cleaned and capped (`base.result_text`): control
  characters and lone surrogates become U+FFFD, and the text is cut to `max_result_chars`
  unless the tool caps its own results (`caps_own_results`, the built-ins). This is the one
  place all tool output passes, so a user's tool cannot put 10 MB, NUL bytes or text the
  tokenizer rejects into a trajectory.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import logging
import math
import numbers
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from tepo_jax.tools.base import ParseError, Tool, ToolCall, ToolResult, ToolStatus, result_text

Call = Union[ToolCall, ParseError]
_POLL_S = 0.02          # how often the batch waiter re-checks deadlines
_DEFAULT_GRACE_S = 1.0  # beyond its deadline a tool gets this long before being abandoned

_IDLE_EXIT_S = 60.0     # an idle worker thread exits after this long (started again on demand)
_DRAIN_MAX_S = 60.0     # closing waits at most this long for calls within their deadline
_REFUSED_LOG_EVERY_S = 60.0  # while every worker is hung, refused calls are logged this often

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ToolStats:
    """Counters for one tool (or for all tools together)."""

    calls: int = 0
    failures: int = 0      # status error or parse_error
    timeouts: int = 0
    total_latency_s: float = 0.0
    max_latency_s: float = 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.total_latency_s / self.calls if self.calls else 0.0

    def add(self, result: ToolResult) -> None:
        self.calls += 1
        self.failures += result.status in (ToolStatus.ERROR, ToolStatus.PARSE_ERROR)
        self.timeouts += result.status is ToolStatus.TIMEOUT
        self.total_latency_s += result.latency_s
        self.max_latency_s = max(self.max_latency_s, result.latency_s)

    def as_dict(self) -> Dict[str, float]:
        return {"calls": self.calls, "failures": self.failures, "timeouts": self.timeouts,
                "latency_total_s": self.total_latency_s,
                "latency_mean_s": self.mean_latency_s, "latency_max_s": self.max_latency_s}


class ToolBridge:
    """Bounded-pool executor for tool calls. Thread-safe; one instance per host.

    max_hung: written-off (hung) tool threads kept while still replacing them with fresh
    workers; None: 4 * max_workers.
    max_result_chars: the longest result text the model sees from a tool that does not cap
    its own results (`caps_own_results`); None: no cap (results are still cleaned).
    """

    def __init__(self, tools: Mapping[str, Tool], max_workers: int = 8,
                 default_timeout: float = 10.0, grace_s: float = _DEFAULT_GRACE_S,
                 max_hung: Optional[int] = None, max_result_chars: Optional[int] = None):
        if not _count(max_workers) or max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if not _positive_seconds(default_timeout):
            raise ValueError(f"default_timeout must be a positive number of seconds, got "
                             f"{default_timeout!r}")
        if not (_seconds(grace_s) and grace_s >= 0):
            raise ValueError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        max_hung = 4 * max_workers if max_hung is None else max_hung
        if not _count(max_hung) or max_hung < 0:
            raise ValueError(f"max_hung must be >= 0, got {max_hung}")
        if max_result_chars is not None and (not _count(max_result_chars) or max_result_chars < 1):
            raise ValueError(f"max_result_chars must be >= 1 or None, got {max_result_chars!r}")
        self.tools = dict(tools)
        self.max_workers = max_workers
        self.default_timeout = default_timeout
        self.grace_s = grace_s
        self.max_result_chars = max_result_chars
        self._pool = _DaemonPool(max_workers, max_hung, name="tool")
        # Batches wait on their calls in this separate pool, so submit() never blocks.
        self._waiters = cf.ThreadPoolExecutor(max(2, max_workers // 2),
                                              thread_name_prefix="tool-batch")
        self._lock = threading.Lock()
        self._stats: Dict[str, ToolStats] = {}
        self.abandoned = 0
        self._waiting = 0  # submitted calls no worker has started yet

    # ---- public --------------------------------------------------------------------------
    def run_batch(self, calls: Sequence[Call]) -> List[ToolResult]:
        """Execute `calls` concurrently; results in input order, one per call."""
        slots = [self._start(call) for call in calls]
        results = self._collect(slots)
        self._record(results)
        return results

    def submit(self, calls: Sequence[Call]) -> "cf.Future[List[ToolResult]]":
        """Non-blocking `run_batch`: returns a Future, so the caller can overlap tool
        execution with device decoding and call `.result()` when it needs the results."""
        return self._waiters.submit(self.run_batch, list(calls))

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Counters per tool and under 'all'. A snapshot; safe to log."""
        with self._lock:
            out = {name: s.as_dict() for name, s in sorted(self._stats.items())}
            total = ToolStats()
            for s in self._stats.values():
                total.calls += s.calls
                total.failures += s.failures
                total.timeouts += s.timeouts
                total.total_latency_s += s.total_latency_s
                total.max_latency_s = max(total.max_latency_s, s.max_latency_s)
            out["all"] = total.as_dict()
            out["all"]["abandoned"] = self.abandoned
        out["all"]["hung_threads"] = self._pool.hung
        return out

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()

    def close(self, wait: bool = False) -> None:
        """Stop taking calls; queued ones are cancelled. wait=True: also wait for the calls
        still running within their deadline + grace (never for hung ones)."""
        self._pool.shutdown(wait=False)   # first, so in-flight batches see their calls cancelled
        self._waiters.shutdown(wait=wait, cancel_futures=True)
        if wait:
            self._pool.drain()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals -----------------------------------------------------------------------
    def _start(self, call: Call) -> "_Slot":
        """Resolve a call to an immediate result (parse error, unknown tool) or a future."""
        if isinstance(call, ParseError):
            return _Slot(call.tool, 0.0, done=ToolResult(call.message, ToolStatus.PARSE_ERROR,
                                                         0.0, call.tool))
        tool = self.tools.get(call.tool)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            msg = f"unknown tool {call.tool!r}; available tools: {known}"
            return _Slot(call.tool, 0.0, done=ToolResult(msg, ToolStatus.PARSE_ERROR, 0.0,
                                                         call.tool))
        timeout = self.default_timeout if call.timeout is None or math.isnan(call.timeout) \
            else max(call.timeout, 0.0)
        if self._pool.stuck:  # nothing would ever run it: say why, at once
            return _Slot(call.tool, timeout, done=ToolResult(self._pool.refuse(),
                                                             ToolStatus.ERROR, 0.0, call.tool))
        with self._lock:
            self._waiting += 1
            ahead = self._waiting  # calls queued before this one, from every batch
        # It may wait behind `ahead` calls, `max_workers` at a time, each up to its deadline;
        # past that the pool is clogged by abandoned (hung) tools and waiting is pointless.
        rounds = -(-ahead // self.max_workers) + 1
        patience = rounds * (max(timeout, self.default_timeout) + self.grace_s)
        slot = _Slot(call.tool, timeout, start_by=time.monotonic() + patience)
        slot.future = self._pool.submit(timeout + self.grace_s, self._guarded, tool, call,
                                        timeout, slot)
        return slot

    def _collect(self, slots: List["_Slot"]) -> List[ToolResult]:
        """Wait for every slot, abandoning any that overruns deadline + grace."""
        pending = [s for s in slots if s.done is None]
        while pending:
            cf.wait([s.future for s in pending], timeout=_POLL_S,
                    return_when=cf.FIRST_COMPLETED)
            now = time.monotonic()
            still = []
            for s in pending:
                if s.future.cancelled():  # the bridge was closed before the call started
                    s.done = ToolResult("[not run: the tool bridge was closed]",
                                        ToolStatus.ERROR, 0.0, s.tool)
                elif s.future.done():
                    s.done = s.future.result()  # _guarded never raises
                elif s.started is not None and now > s.started + s.timeout + self.grace_s:
                    s.done = self._abandon(s, now)
                elif s.started is None and (now > s.start_by or self._pool.stuck) \
                        and s.future.cancel():
                    with self._lock:
                        self._waiting -= 1
                    if self._pool.stuck:  # every worker hung: an error that says so
                        s.done = ToolResult(self._pool.refuse(), ToolStatus.ERROR, 0.0, s.tool)
                    else:
                        s.done = ToolResult("[not started: every tool worker is busy or hung]",
                                            ToolStatus.TIMEOUT, 0.0, s.tool)
                else:
                    still.append(s)
            pending = still
        return [s.done for s in slots]

    def _abandon(self, slot: "_Slot", now: float) -> ToolResult:
        with self._lock:
            self.abandoned += 1
        self._pool.write_off(slot.future, slot.tool, slot.timeout)
        return ToolResult(f"[timed out after {slot.timeout:g} s]", ToolStatus.TIMEOUT,
                          now - slot.started, slot.tool)

    def _guarded(self, tool: Tool, call: ToolCall, timeout: float, slot: "_Slot"):
        with self._lock:
            self._waiting -= 1
        cap = None if getattr(tool, "caps_own_results", False) else self.max_result_chars
        return _run_guarded(tool, call, timeout, slot, cap)

    def _record(self, results: List[ToolResult]) -> None:
        with self._lock:
            for r in results:
                self._stats.setdefault(r.tool or "?", ToolStats()).add(r)


@dataclasses.dataclass
class _Slot:
    tool: str
    timeout: float
    start_by: float = 0.0
    done: Optional[ToolResult] = None
    future: Optional[cf.Future] = None
    started: Optional[float] = None


def _run_guarded(tool: Tool, call: ToolCall, timeout: float, slot: _Slot,
                 max_chars: Optional[int]) -> ToolResult:
    """Run one call; any exception (SystemExit too) becomes an ERROR result naming it. The
    text, an exception's message included, comes out cleaned and cut to `max_chars`."""
    slot.started = t0 = time.monotonic()
    try:
        result = tool.run(call.argument, timeout)
    except BaseException as exc:  # a crashing tool must not take the batch down
        result = ToolResult(f"tool error: {type(exc).__name__}: {exc}", ToolStatus.ERROR)
    else:
        if not isinstance(result, ToolResult):
            result = ToolResult(f"tool error: {call.tool} returned {type(result).__name__}",
                                ToolStatus.ERROR)
        elif not isinstance(result.text, str):
            result = ToolResult(f"tool error: {call.tool} returned a ToolResult whose text is "
                                f"{type(result.text).__name__}, not str", ToolStatus.ERROR)
    latency = time.monotonic() - t0
    text = result_text(result.text, -1 if max_chars is None else max_chars)
    return dataclasses.replace(result, text=text, latency_s=latency, tool=call.tool)


def _count(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _seconds(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _positive_seconds(x) -> bool:
    return _seconds(x) and x > 0


class _Worker:
    __slots__ = ("thread", "future", "limit_at", "written_off", "tool")

    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.future: Optional[cf.Future] = None   # the call it runs now
        self.limit_at = 0.0                        # when that call is past deadline + grace
        self.written_off = False                   # abandoned: not counted in the pool's size
        self.tool = ""                             # the abandoned call's tool


class _DaemonPool:
    """Up to `size` daemon threads running submitted calls (cf.Futures), started as needed;
    an idle one exits after `_IDLE_EXIT_S`.

    `write_off(future)` gives up on a running call: its thread no longer counts towards
    `size` (a new one is started for queued work) and exits when the call returns, or rejoins
    the pool if the pool is short of threads then. At most `size + max_hung` threads exist:
    past `max_hung` hung threads the pool shrinks by one per further hung call, and it is
    `stuck` when no worker is left. Daemon threads never keep the interpreter alive; at exit
    it waits (`drain`) only for the calls within their limit.
    """

    def __init__(self, size: int, max_hung: int, name: str):
        self.size, self.max_hung, self.name = size, max_hung, name
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque = collections.deque()
        self._workers: set = set()
        self._live = 0          # workers not written off
        self._idle = 0          # live workers waiting for work
        self._hung = 0          # written-off workers whose call has not returned
        self._hung_tools: collections.Counter = collections.Counter()
        self._warned: set = set()
        self._over_bound = False
        self._refused, self._refused_logged_at = 0, -math.inf
        self._closed = False
        self._count = 0
        _register_exit_drain(self)

    # ---- state ---------------------------------------------------------------------------
    @property
    def hung(self) -> int:
        """Written-off threads whose call has not returned."""
        return self._hung

    @property
    def stuck(self) -> bool:
        """No worker left and none may be started: nothing submitted would run."""
        with self._cond:
            return self._live == 0 and not self._can_spawn()

    def hung_message(self) -> str:
        with self._cond:
            tools = ", ".join(f"{t!r} x{n}" for t, n in self._hung_tools.most_common())
            return (f"[not started: tool threads are hung: {self._hung} tool call(s) ({tools}) "
                    f"ran past their deadline and have not returned; {self._live} of {self.size} "
                    f"workers left (at most {self.max_hung} hung threads are replaced)]")

    def refuse(self) -> str:
        """hung_message() for a call refused because every worker is hung; logs an error
        at most once a minute while this lasts."""
        text = self.hung_message()
        with self._cond:
            self._refused += 1
            now = time.monotonic()
            if now < self._refused_logged_at + _REFUSED_LOG_EVERY_S:
                return text
            self._refused_logged_at, n, self._refused = now, self._refused, 0
        log.error("tool bridge: %d tool call(s) refused: every tool worker is HUNG. %s", n, text)
        return text

    def _can_spawn(self) -> bool:
        return self._live < self.size and self._live + self._hung < self.size + self.max_hung

    # ---- running -------------------------------------------------------------------------
    def submit(self, limit_s: float, fn: Callable[..., Any], *args) -> cf.Future:
        """Run fn(*args) on a worker; `limit_s` after it starts it may be written off."""
        future: cf.Future = cf.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot run tool calls after the bridge is closed")
            self._queue.append((future, limit_s, fn, args))
            self._spawn_if_needed()
            self._cond.notify()
        return future

    def _spawn_if_needed(self) -> None:
        if len(self._queue) > self._idle and self._can_spawn():
            w = _Worker()
            self._count += 1
            w.thread = threading.Thread(target=self._work, args=(w,), daemon=True,
                                        name=f"{self.name}-{self._count}")
            self._workers.add(w)
            self._live += 1
            w.thread.start()

    def _work(self, w: _Worker) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._idle += 1
                    woke = self._cond.wait(_IDLE_EXIT_S)
                    self._idle -= 1
                    if not woke and not self._queue:
                        break
                if not self._queue:  # closed or idle too long
                    self._live -= 1
                    self._workers.discard(w)
                    return
                future, limit_s, fn, args = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                w.future, w.limit_at = future, time.monotonic() + limit_s
            try:
                result = fn(*args)
            except BaseException as exc:  # fn is _guarded, which does not raise
                future.set_exception(exc)
            else:
                future.set_result(result)
            with self._cond:
                w.future = None
                self._cond.notify_all()   # for drain()
                if not w.written_off:
                    continue
                tool, w.tool, w.written_off = w.tool, "", False
                self._hung -= 1
                self._hung_tools[tool] -= 1
                if self._hung_tools[tool] <= 0:
                    del self._hung_tools[tool]
                if self._hung <= self.max_hung:
                    self._over_bound = False
                hung = self._hung
                exits = self._closed or self._live >= self.size  # its replacement runs on
                if exits:
                    self._workers.discard(w)
                else:
                    self._live += 1   # the pool is short of threads: rejoin it
            log.info("tool bridge: an abandoned %r call returned after all; %d tool "
                        "threads still hung", tool, hung)
            if exits:
                return

    # ---- giving up on a call -------------------------------------------------------------
    def write_off(self, future: Optional[cf.Future], tool: str, timeout: float) -> None:
        """The call running `future` is abandoned: stop counting its thread, replace it."""
        with self._cond:
            w = next((w for w in self._workers if w.future is future), None)
            if w is None or w.written_off or future is None or future.done():
                return
            w.written_off, w.tool = True, tool
            self._live -= 1
            self._hung += 1
            self._hung_tools[tool] += 1
            first = tool not in self._warned
            self._warned.add(tool)
            over = self._hung > self.max_hung and not self._over_bound
            self._over_bound = self._over_bound or over
            self._spawn_if_needed()
            hung, live, stuck = self._hung, self._live, self.stuck
            names = ", ".join(f"{t!r} x{n}" for t, n in self._hung_tools.most_common())
        if first:
            log.warning("tool %r ran past its %g s deadline without returning; the call is "
                        "abandoned and its (daemon) thread replaced. A tool must return within "
                        "its timeout.", tool, timeout)
        if over or stuck:
            log.error("tool bridge: %d tool threads are HUNG (%s): more than max_hung=%d, so "
                      "they are no longer replaced; %d of %d workers left%s", hung, names,
                      self.max_hung, live, self.size,
                      "; EVERY TOOL CALL FAILS until a hung call returns" if stuck else "")

    # ---- closing -------------------------------------------------------------------------
    def shutdown(self, wait: bool = False) -> None:
        """Cancel the queued calls; idle workers exit. wait: `drain`."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for future, *_ in queued:
            future.cancel()
        if wait:
            self.drain()

    def drain(self, max_wait_s: float = _DRAIN_MAX_S) -> None:
        """Wait for the running calls that are not written off, each at most until its
        deadline + grace (past it, it would be abandoned anyway), all at most `max_wait_s`."""
        end = time.monotonic() + max_wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                waits = [min(w.limit_at, end) - now for w in self._workers
                         if w.future is not None and not w.written_off]
                waits = [t for t in waits if t > 0]
                if not waits:
                    return
                self._cond.wait(min(min(waits), 1.0))


_POOLS: "weakref.WeakSet[_DaemonPool]" = weakref.WeakSet()
_EXIT_HOOK: list = []


def _register_exit_drain(pool: _DaemonPool) -> None:
    """At interpreter exit, before non-daemon threads are joined, cancel queued calls and
    wait for running ones within their limit (one hook per process, for every live pool)."""
    _POOLS.add(pool)
    if _EXIT_HOOK:
        return
    _EXIT_HOOK.append(True)
    try:  # threading's hook runs before the interpreter joins threads (concurrent.futures' too)
        threading._register_atexit(_drain_all)
    except (AttributeError, RuntimeError):  # older Python, or already shutting down
        import atexit
        atexit.register(_drain_all)


def _drain_all() -> None:
    pools = list(_POOLS)
    for pool in pools:
        pool.shutdown(wait=False)
    for pool in pools:
        pool.drain()
