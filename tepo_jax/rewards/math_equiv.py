"""Math answer equivalence with `math-verify`, safe to call from any thread.

math-verify bounds parse/verify time with signal.alarm, which only works in the main thread
(it raises ValueError elsewhere). In the main thread we use its own timeouts; in any other
thread (e.g. a reward worker pool) we disable them and bound the call by running it in a
daemon helper thread joined with a timeout. A timed-out call counts as "not equivalent"; its
helper thread cannot be killed and finishes in the background (sympy holds no locks of ours).
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

from math_verify import parse, verify

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 5


def _parse(expr: str, timeout: int | None):
    parsed = parse(expr, parsing_timeout=timeout)
    if not parsed and "$" not in expr:
        # Bare LaTeX such as "x^2" or "\frac12" is only found inside math delimiters.
        parsed = parse(f"${expr}$", parsing_timeout=timeout)
    return parsed


def _equivalent_unbounded(prediction: str, golds: Sequence[str], timeout: int | None) -> bool:
    pred = _parse(prediction, timeout)
    if not pred:
        return False
    for gold in golds:
        gold_parsed = _parse(gold, timeout)
        if gold_parsed and verify(gold_parsed, pred, timeout_seconds=timeout):
            return True
    return False


def _run_bounded(fn, timeout_s: float) -> bool:
    result: list[bool] = []

    def target():
        try:
            result.append(fn())
        except Exception:  # noqa: BLE001 -- any parser failure means "not equivalent"
            log.debug("math-verify raised", exc_info=True)

    worker = threading.Thread(target=target, daemon=True, name="math-verify")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("math-verify timed out after %.1fs; scoring as not equivalent", timeout_s)
        return False
    return bool(result and result[0])


def math_equivalent(prediction: str, gold: Sequence[str] | str,
                    timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """True when `prediction` is mathematically equal to any gold answer ("1/2" == "0.5")."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if threading.current_thread() is threading.main_thread():
        try:
            return _equivalent_unbounded(prediction, golds, timeout_s)
        except Exception:  # noqa: BLE001
            log.debug("math-verify raised", exc_info=True)
            return False
    # Off the main thread: no signals; the helper thread's join is the timeout. The budget
    # covers every parse/verify of this call together.
    return _run_bounded(lambda: _equivalent_unbounded(prediction, golds, None),
                        timeout_s * (1 + len(golds)))
