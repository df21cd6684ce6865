"""The tool bridge: runs a batch of parsed tool calls concurrently on the host.

The rollout parses each finished model turn (`CallFormat.parse`), hands the calls to
`ToolBridge.submit`, keeps the accelerator decoding the other sequences, and collects the
results in input order. Guarantees:

- each call has its own deadline (`ToolCall.timeout` or `default_timeout`), counted from when
  a worker starts it, not from when it was queued;
- a slow, crashing or hostile call yields an error/timeout ToolResult for that call only; an
  exception in a tool never escapes, and a tool that ignores its deadline is abandoned (its
  thread is left to finish; counted in `abandoned`) so the batch still returns on time;
- a call that cannot even start (every worker held by abandoned tools) times out too;
- output order equals input order; counters cover calls, failures, timeouts and latency.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence, Union

from tepo_jax.tools.base import ParseError, Tool, ToolCall, ToolResult, ToolStatus

Call = Union[ToolCall, ParseError]
_POLL_S = 0.02          # how often the batch waiter re-checks deadlines
_DEFAULT_GRACE_S = 1.0  # beyond its deadline a tool gets this long before being abandoned


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
    """Bounded-pool executor for tool calls. Thread-safe; one instance per host."""

    def __init__(self, tools: Mapping[str, Tool], max_workers: int = 8,
                 default_timeout: float = 10.0, grace_s: float = _DEFAULT_GRACE_S):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.tools = dict(tools)
        self.max_workers = max_workers
        self.default_timeout = default_timeout
        self.grace_s = grace_s
        self._pool = cf.ThreadPoolExecutor(max_workers, thread_name_prefix="tool")
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
        return out

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()

    def close(self, wait: bool = False) -> None:
        self._waiters.shutdown(wait=wait, cancel_futures=True)
        self._pool.shutdown(wait=wait, cancel_futures=True)

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
        timeout = self.default_timeout if call.timeout is None else call.timeout
        with self._lock:
            self._waiting += 1
            ahead = self._waiting  # calls queued before this one, from every batch
        # It may wait behind `ahead` calls, `max_workers` at a time, each up to its deadline;
        # past that the pool is clogged by abandoned (hung) tools and waiting is pointless.
        rounds = -(-ahead // self.max_workers) + 1
        patience = rounds * (max(timeout, self.default_timeout) + self.grace_s)
        slot = _Slot(call.tool, timeout, start_by=time.monotonic() + patience)
        slot.future = self._pool.submit(self._guarded, tool, call, timeout, slot)
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
                if s.future.done():
                    s.done = s.future.result()  # _guarded never raises
                elif s.started is not None and now > s.started + s.timeout + self.grace_s:
                    s.done = self._abandon(s, now)
                elif s.started is None and now > s.start_by and s.future.cancel():
                    with self._lock:
                        self._waiting -= 1
                    s.done = ToolResult("[not started: every tool worker is busy or hung]",
                                        ToolStatus.TIMEOUT, 0.0, s.tool)
                else:
                    still.append(s)
            pending = still
        return [s.done for s in slots]

    def _abandon(self, slot: "_Slot", now: float) -> ToolResult:
        with self._lock:
            self.abandoned += 1
        slot.future.cancel()
        return ToolResult(f"[timed out after {slot.timeout:g} s]", ToolStatus.TIMEOUT,
                          now - slot.started, slot.tool)

    def _guarded(self, tool: Tool, call: ToolCall, timeout: float, slot: "_Slot"):
        with self._lock:
            self._waiting -= 1
        return _run_guarded(tool, call, timeout, slot)

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


def _run_guarded(tool: Tool, call: ToolCall, timeout: float, slot: _Slot) -> ToolResult:
    """Run one call; any exception becomes an ERROR result naming the exception."""
    slot.started = t0 = time.monotonic()
    try:
        result = tool.run(call.argument, timeout)
    except Exception as exc:  # a crashing tool must not take the batch down
        return ToolResult(f"tool error: {type(exc).__name__}: {exc}", ToolStatus.ERROR,
                          time.monotonic() - t0, call.tool)
    if not isinstance(result, ToolResult):
        return ToolResult(f"tool error: {call.tool} returned {type(result).__name__}",
                          ToolStatus.ERROR, time.monotonic() - t0, call.tool)
    latency = time.monotonic() - t0
    return dataclasses.replace(result, latency_s=latency, tool=call.tool)
