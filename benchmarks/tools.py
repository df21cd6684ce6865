"""Tool bridge throughput: sandboxed python calls through the pooled bridge vs one by one,
and search queries per second (local BM25 and over the retrieval server, batched vs single).

    python -m benchmarks.tools [--calls 48] [--workers 8] [--docs 20000] [--queries 256]

The last line is the headline: `tools: ours X calls/s, peer Y calls/s, ratio R`, where ours =
python calls through ToolBridge with a pool of --workers, peer = the same calls run one after
another with PythonTool.run, both measured in this run on this machine.
"""
from __future__ import annotations

import argparse
import random
import socket
import tempfile
import threading
import time

from benchmarks._host import host_line
from tepo_jax.tools import PythonTool, SandboxConfig, ToolBridge, ToolCall, ToolStatus

CODE = "import math\nprint(sum(math.isqrt(i) for i in range(20000)))"


def bench_python(calls: int, workers: int):
    """(pooled calls/s, sequential calls/s, sandbox mode)."""
    tool = PythonTool(SandboxConfig(timeout_s=30))
    tool.run(CODE, 30)  # warm the page cache for the interpreter
    t0 = time.perf_counter()
    seq = [tool.run(CODE, 30) for _ in range(calls)]
    seq_rate = calls / (time.perf_counter() - t0)
    with ToolBridge({"python": tool}, max_workers=workers, default_timeout=30) as bridge:
        t0 = time.perf_counter()
        pooled = bridge.run_batch([ToolCall("python", CODE)] * calls)
        pooled_rate = calls / (time.perf_counter() - t0)
    bad = [r for r in seq + pooled if r.status is not ToolStatus.OK]
    if bad:
        raise RuntimeError(f"{len(bad)} benchmark calls failed: {bad[0].text[:200]}")
    return pooled_rate, seq_rate, tool.mode


def _corpus(n: int):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(20_000)]
    return [{"id": str(i), "title": f"T{i}", "text": " ".join(rng.choices(vocab, k=24))}
            for i in range(n)], vocab


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def _serve(index, port: int):
    import uvicorn  # noqa: PLC0415
    from tepo_jax.tools.server import create_app  # noqa: PLC0415

    server = uvicorn.Server(uvicorn.Config(create_app(index), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread


def bench_search(docs: int, queries: int):
    """Queries/s: local batched, local single, remote batched, remote single."""
    from tepo_jax.tools.search import BM25Index, RemoteSearch, build_index  # noqa: PLC0415

    records, vocab = _corpus(docs)
    rng = random.Random(1)
    qs = [" ".join(rng.choices(vocab, k=4)) for _ in range(queries)]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        build_index(records, d)
        build_s = time.perf_counter() - t0
        index = BM25Index.load(d)
        out = {"build_s": build_s,
               "local_batched": _rate(lambda: index.search_many(qs, 3), queries),
               "local_single": _rate(lambda: [index.search(q, 3) for q in qs], queries)}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server, thread = _serve(index, port)
        try:
            url = f"http://127.0.0.1:{port}"
            batched, single = RemoteSearch(url, cache_size=0), RemoteSearch(url, cache_size=0)
            out["remote_batched"] = _rate(lambda: batched.search_many(qs, 3), queries)
            out["remote_single"] = _rate(lambda: [single.search_many([q], 3) for q in qs],
                                         queries)
        finally:
            server.should_exit = True
            thread.join(10)
    return out


def main(argv=None):
    print(host_line())
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools")
    p.add_argument("--calls", type=int, default=48)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--queries", type=int, default=256)
    args = p.parse_args(argv)

    s = bench_search(args.docs, args.queries)
    print(f"search: {args.docs} docs indexed in {s['build_s']:.1f} s")
    print(f"search local : batched {s['local_batched']:.0f} q/s, one by one "
          f"{s['local_single']:.0f} q/s, ratio {s['local_batched'] / s['local_single']:.2f}")
    print(f"search server: batched {s['remote_batched']:.0f} q/s, one by one "
          f"{s['remote_single']:.0f} q/s, ratio {s['remote_batched'] / s['remote_single']:.2f}")
    ours, peer, mode = bench_python(args.calls, args.workers)
    print(f"python ({mode}): {args.calls} calls, bridge pool of {args.workers} vs one by one")
    print(f"tools: ours {ours:.1f} calls/s, peer {peer:.1f} calls/s, ratio {ours / peer:.2f}")


if __name__ == "__main__":
    main()
