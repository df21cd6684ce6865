"""Retrieval server: serves a saved BM25 index over HTTP so a pod shares one index.

    python -m tepo_jax.tools.server --index DIR --host 127.0.0.1 --port 8000

API: `POST /retrieve` with `{"queries": ["…", …], "top_k": 3}` returns
`{"results": [[{"id","title","text","score"}, …], …]}` (one list per query, best first);
`GET /health` returns `{"status": "ok", "num_docs": N}`. `RemoteSearch` is the client.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence

from pydantic import BaseModel, Field

from tepo_jax.tools.search import CLI_ERRORS, BM25Index, cli_message

log = logging.getLogger(__name__)
MAX_QUERIES = 1024  # per request: bounds one request's work and response size
MAX_TOP_K = 100


class RetrieveRequest(BaseModel):
    queries: List[str] = Field(..., max_length=MAX_QUERIES)
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)


def create_app(index: BM25Index):
    """The FastAPI app over `index`. Search runs in FastAPI's thread pool (sync endpoint), so
    one slow request does not block the event loop."""
    from fastapi import FastAPI  # noqa: PLC0415

    app = FastAPI(title="tepo_jax retrieval")

    @app.get("/health")
    def health():
        return {"status": "ok", "num_docs": index.num_docs}

    @app.post("/retrieve")
    def retrieve(req: RetrieveRequest):
        rows = index.search_many(req.queries, req.top_k)
        return {"results": [[p.as_dict() for p in row] for row in rows]}

    return app


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1-65535, got {port}")
    return port


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tepo_jax.tools.server")
    parser.add_argument("--index", required=True, help="directory written by `search build`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000)
    args = parser.parse_args(argv)
    import uvicorn  # noqa: PLC0415

    try:
        index = BM25Index.load(args.index, mmap=True)
    except CLI_ERRORS as e:
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 1
    log.info("serving %d passages from %s", index.num_docs, args.index)
    uvicorn.run(create_app(index), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
