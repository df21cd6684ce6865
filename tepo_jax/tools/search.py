"""The search tool: BM25 over a local corpus, or a client for a shared retrieval server.

Local backend: `build_index` reads a JSONL corpus (`{"id", "title", "text"}` per line),
indexes "title + text" with bm25s and saves index and corpus to a directory; `BM25Index.load`
memory-maps both, so many processes on one host share the pages.
Remote backend: `RemoteSearch` POSTs `{"queries": [...], "top_k": k}` to `/retrieve` (see
server.py) with retries, exponential backoff and a bounded LRU cache, all inside one deadline
per call that every socket operation obeys (`DeadlineBackend`). Both are Tools (`name =
"search"`), so the bridge cannot tell them apart.

CLI:  python -m tepo_jax.tools.search build --corpus X.jsonl --out DIR
      python -m tepo_jax.tools.search query --index DIR "some question"
(a bad corpus or index: `error: <message>` and exit status 1)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from tepo_jax import paths
from tepo_jax.tools.base import ToolResult, ToolStatus, model_text, truncate

log = logging.getLogger(__name__)


def _import_bm25s():
    """Import bm25s without letting it import JAX: its top-k module imports `jax.lax` and runs
    it once at import time, which would initialise (and on a TPU host, claim) the accelerator
    from the host-side tools. A None entry in sys.modules makes that import fail cleanly, and
    bm25s falls back to numpy."""
    saved = sys.modules.get("jax.lax", _MISSING)
    sys.modules["jax.lax"] = None  # type: ignore[assignment]
    try:
        import bm25s  # noqa: PLC0415
    finally:
        if saved is _MISSING:
            del sys.modules["jax.lax"]
        else:
            sys.modules["jax.lax"] = saved
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its logger to DEBUG on import
    return bm25s


_MISSING = object()
_TOKENIZE = dict(lower=True, stopwords="en", show_progress=False)


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


# ---- corpus and index ---------------------------------------------------------------------
class SearchDataError(ValueError):
    """A corpus or an index that cannot be used; the message names the file (and line)."""


class IndexNotFound(SearchDataError, FileNotFoundError):
    """No complete BM25 index in the directory."""


# the files `bm25s.BM25.save` writes and `load` needs (corpus.mmindex.json is rebuilt on load)
INDEX_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy",
               "indices.csc.index.npy", "indptr.csc.index.npy", "corpus.jsonl")


def corpus_record(rec, where: str) -> Dict[str, str]:
    """`rec` (one parsed corpus line) as `{"id","title","text"}`; SearchDataError naming
    `where` (file:line) unless id is a string or an integer and title (optional) and text are
    strings: str() of a null or a list would be indexed as "None" or "['a', 'b']"."""
    if not isinstance(rec, dict):
        raise SearchDataError(f"{where}: expected a JSON object with 'id', 'title', 'text', "
                              f"got {_json_type(rec)}")
    for key in ("id", "text"):
        if key not in rec:
            raise SearchDataError(f"{where}: expected a JSON object with 'id', 'title', "
                                  f"'text' (missing {key!r})")
    if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
        raise SearchDataError(f"{where}: 'id' must be a string or an integer, "
                              f"got {_json_type(rec['id'])}")
    for key in ("title", "text"):
        if key in rec and not isinstance(rec[key], str):
            raise SearchDataError(f"{where}: {key!r} must be a string, "
                                  f"got {_json_type(rec[key])}")
    return {"id": str(rec["id"]), "title": rec.get("title", ""), "text": rec["text"]}


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", list: "a list", dict: "an object",
            int: "a number", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def read_corpus(path: str) -> Iterator[Dict[str, str]]:
    """Yield `{"id","title","text"}` records; a malformed line, or an id seen on an earlier
    line, is a SearchDataError naming the line(s)."""
    first_line: Dict[str, int] = {}
    with paths.as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SearchDataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise SearchDataError(f"{path}:{lineno}: not JSON ({exc})") from None
            rec = corpus_record(rec, f"{path}:{lineno}")
            seen = first_line.setdefault(rec["id"], lineno)
            if seen != lineno:
                raise SearchDataError(f"{path}:{lineno}: duplicate id {rec['id']!r} "
                                      f"(first on line {seen})")
            yield rec


FINGERPRINT_FILE = "corpus_fingerprint.json"   # written beside an index built from a corpus file
_HASH_UP_TO = 64 << 20


def corpus_fingerprint(path: str) -> Dict[str, object]:
    """What identifies the corpus file `path`: its size and a SHA-256 of its bytes, or for a
    file over 64 MiB (hashing it would cost a noticeable part of a rebuild) its absolute
    path, size and modification time."""
    p = paths.absolute(path)
    st = p.stat()
    if st.length > _HASH_UP_TO:
        return {"path": os.fspath(p), "size": int(st.length), "mtime": int(st.mtime)}
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": int(st.length), "sha256": digest.hexdigest()}


def build_index(records: Iterable[Dict[str, str]], out_dir: str) -> int:
    """Index the records with BM25 and save index + corpus to `out_dir`. Returns the count."""
    bm25s = _import_bm25s()
    corpus = list(records)
    if not corpus:
        raise SearchDataError("cannot build an index from an empty corpus")
    tokens = bm25s.tokenize([f"{r['title']}\n{r['text']}" for r in corpus], **_TOKENIZE)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    with paths.staged(out_dir) as local:  # bm25s writes local files; gs:// gets a copy
        retriever.save(local, corpus=corpus, show_progress=False)
    return len(corpus)


def missing_index_files(index_dir: str) -> List[str]:
    """The files of a saved index that `index_dir` lacks (all of them: no index there)."""
    d = paths.as_path(index_dir)
    return [name for name in INDEX_FILES if not (d / name).is_file()]


class BM25Index:
    """A saved bm25s index, memory-mapped. `search_many` is thread-safe (read-only arrays)."""

    def __init__(self, retriever):
        self._retriever = retriever
        self.num_docs = int(retriever.scores["num_docs"])

    @classmethod
    def load(cls, index_dir: str, mmap: bool = True) -> "BM25Index":
        missing = missing_index_files(index_dir)
        if "params.index.json" in missing:
            raise IndexNotFound(f"no BM25 index in {index_dir!r}; build one with "
                                "`python -m tepo_jax.tools.search build`")
        if missing:  # a build that stopped half-way
            raise IndexNotFound(f"{index_dir}: incomplete BM25 index (missing "
                                f"{', '.join(missing)}); rebuild it")
        bm25s = _import_bm25s()
        # bm25s memory-maps local files: a gs:// index is downloaded once per process.
        retriever = bm25s.BM25.load(paths.download(index_dir), mmap=mmap, load_corpus=True,
                                    show_progress=False)
        return cls(retriever)

    def search_many(self, queries: Sequence[str], k: int) -> List[List[Passage]]:
        """Top-k passages per query, best first; queries with no indexed word get []."""
        if not queries:
            return []
        bm25s = _import_bm25s()
        k = max(1, min(int(k), self.num_docs))
        toks = bm25s.tokenize(list(queries), return_ids=False, **_TOKENIZE)
        known = [[t for t in q if t in self._retriever.vocab_dict] for q in toks]
        live = [i for i, q in enumerate(known) if q]
        out: List[List[Passage]] = [[] for _ in queries]
        if not live:
            return out
        docs, scores = self._retriever.retrieve(
            [known[i] for i in live], k=k, show_progress=False, n_threads=0,
            backend_selection="numpy")
        for row, i in enumerate(live):
            out[i] = [Passage(str(d["id"]), d.get("title", ""), d["text"], float(s))
                      for d, s in zip(docs[row], scores[row]) if s > 0]
        return out

    def search(self, query: str, k: int) -> List[Passage]:
        return self.search_many([query], k)[0]


def format_passages(passages: Sequence[Passage], max_chars: int = 600) -> str:
    """Numbered passages as the model sees them: `Doc 1 (Title: …) text`, each truncated;
    control bytes from the corpus or a server are replaced (`model_text`)."""
    if not passages:
        return "No results found."
    return model_text("\n".join(f"Doc {i} (Title: {p.title}) {truncate(p.text.strip(), max_chars)}"
                                 for i, p in enumerate(passages, 1)))


# ---- tools ----------------------------------------------------------------------------------
class LocalSearch:
    """Search tool over an in-process BM25Index."""

    caps_own_results = True   # each passage is cut to `max_chars` (format_passages)

    def __init__(self, index: BM25Index, top_k: int = 3, max_chars: int = 600,
                 name: str = "search"):
        self.index, self.top_k, self.max_chars, self.name = index, top_k, max_chars, name

    def search_many(self, queries: Sequence[str], k: Optional[int] = None):
        return self.index.search_many(queries, k or self.top_k)

    def run(self, argument: str, timeout: Optional[float] = None) -> ToolResult:
        t0 = time.monotonic()
        text = format_passages(self.index.search(argument, self.top_k), self.max_chars)
        return ToolResult(text, ToolStatus.OK, time.monotonic() - t0, self.name)


class RemoteSearchError(RuntimeError):
    """The retrieval server could not be reached or answered badly within the retry budget."""


class DeadlineBackend:
    """An httpcore network backend whose every socket operation (connect, each read, each
    write) waits at most until the calling thread's deadline.

    httpx/httpcore timeouts are per operation: a server that sends headers and then one byte
    a second never trips a read timeout, so a call lasted as long as the server liked and held
    its bridge worker (issue 14). With the deadline checked before, and bounding, each
    operation, a call ends by its deadline plus one scheduling slice. Name resolution
    (getaddrinfo) is not bounded: give the server as an IP address or a local name.
    """

    def __init__(self):
        import httpcore  # noqa: PLC0415

        self._httpcore = httpcore
        self._inner = httpcore.SyncBackend()
        self._local = threading.local()

    @contextlib.contextmanager
    def deadline(self, at: float):
        """Operations of this thread inside the block end by `at` (time.monotonic())."""
        saved = getattr(self._local, "at", None)
        self._local.at = at
        try:
            yield
        finally:
            self._local.at = saved

    def bound(self, timeout: Optional[float], exc_type) -> Optional[float]:
        """`timeout` capped by the time left; `exc_type` raised when none is left."""
        at = getattr(self._local, "at", None)
        if at is None:
            return timeout
        left = at - time.monotonic()
        if left <= 0:
            raise exc_type("deadline of the search call reached")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        t = self.bound(timeout, self._httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, t, local_address,
                                                       socket_options), self)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        t = self.bound(timeout, self._httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, t, socket_options), self)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineStream:
    """A network stream whose reads and writes obey the backend's per-thread deadline."""

    _WRITE_CHUNK = 64 << 10  # the inner write resets its timeout per send(): bound each piece

    def __init__(self, inner, backend: DeadlineBackend):
        self._inner, self._backend = inner, backend

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        t = self._backend.bound(timeout, self._backend._httpcore.ReadTimeout)
        return self._inner.read(max_bytes, t)

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        view = memoryview(buffer)
        while len(view):
            t = self._backend.bound(timeout, self._backend._httpcore.WriteTimeout)
            self._inner.write(bytes(view[:self._WRITE_CHUNK]), t)
            view = view[self._WRITE_CHUNK:]

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        t = self._backend.bound(timeout, self._backend._httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, t),
                               self._backend)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class RemoteSearch:
    """Client for `POST {url}/retrieve`. Failures become ERROR results after `retries`
    retries; every call, retries and each byte of the answer included, ends by its
    deadline (the call's timeout), never a hang, and leaves no thread behind."""

    caps_own_results = True   # each passage is cut to `max_chars` (format_passages)

    def __init__(self, url: str, top_k: int = 3, max_chars: int = 600, timeout: float = 5.0,
                 retries: int = 2, backoff_s: float = 0.1, cache_size: int = 4096,
                 name: str = "search", max_response_bytes: int = 64 << 20):
        import httpcore  # noqa: PLC0415  (only the remote backend needs it)

        self.base_url = url.rstrip("/")
        self.url = self.base_url + "/retrieve"
        self.top_k, self.max_chars, self.name = top_k, max_chars, name
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.max_response_bytes = max_response_bytes
        self._httpcore = httpcore
        self._backend = DeadlineBackend()
        self._pool = httpcore.ConnectionPool(max_connections=64, network_backend=self._backend)
        self._errors = (httpcore.TimeoutException, httpcore.NetworkError,
                        httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                        RemoteSearchError, ValueError, KeyError, TypeError)
        self._cache: "collections.OrderedDict[tuple, List[Passage]]" = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.cache_hits = self.cache_misses = 0

    # -- cache --
    def _cache_get(self, key):
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            else:
                self.cache_misses += 1
            return hit

    def _cache_put(self, key, value):
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    # -- requests --
    def search_many(self, queries: Sequence[str], k: Optional[int] = None,
                    timeout: Optional[float] = None) -> List[List[Passage]]:
        """Top-k passages per query; cached queries are not sent. Raises RemoteSearchError."""
        k = k or self.top_k
        results: List[Optional[List[Passage]]] = [self._cache_get((q, k)) for q in queries]
        missing = sorted({q for q, r in zip(queries, results) if r is None})
        if missing:
            fetched = dict(zip(missing, self._post(missing, k, timeout or self.timeout)))
            for q, passages in fetched.items():
                self._cache_put((q, k), passages)
            results = [r if r is not None else fetched[q] for q, r in zip(queries, results)]
        return results  # type: ignore[return-value]

    def _post(self, queries: List[str], k: int, budget: float) -> List[List[Passage]]:
        """POST with retries and exponential backoff, all inside `budget` seconds: each
        attempt ends by min(its own `timeout`, the call's deadline)."""
        deadline = time.monotonic() + budget
        body = json.dumps({"queries": queries, "top_k": k}).encode()
        error, attempts = "no attempt", 0
        for attempt in range(self.retries + 1):
            if deadline - time.monotonic() <= 0:
                break
            attempts += 1
            try:
                with self._backend.deadline(min(deadline, time.monotonic() + self.timeout)):
                    payload = self._request(body)
                return _parse_response(payload, len(queries))
            except self._errors as exc:
                error = f"{type(exc).__name__}: {exc}"
            pause = self.backoff_s * (2 ** attempt)
            if attempt < self.retries and time.monotonic() + pause < deadline:
                time.sleep(pause)
        if time.monotonic() >= deadline:
            raise RemoteSearchError(f"retrieval server {self.url}: no complete answer within "
                                    f"the call's {budget:g} s deadline ({attempts} attempt(s); "
                                    f"last: {error})")
        raise RemoteSearchError(f"retrieval server {self.url} failed after "
                                f"{attempts} attempts: {error}")

    def _request(self, body: bytes):
        """One POST; the decoded JSON answer. The body is read in bounded pieces."""
        status, data = self._exchange("POST", self.url, body)
        if status >= 400:
            raise RemoteSearchError(f"HTTP {status}")
        return json.loads(data)

    def _exchange(self, method: str, url: str, body: Optional[bytes] = None):
        """(status, body) of one request; the body (not read for a status >= 400) is read in
        bounded pieces. Every socket operation obeys the calling thread's deadline."""
        headers = [(b"Accept", b"application/json")]
        if body is not None:
            headers.append((b"Content-Type", b"application/json"))
        # the wait for a free pooled connection is no socket operation: bound it here
        timeout = {"pool": self._backend.bound(None, self._httpcore.PoolTimeout)}
        with self._pool.stream(method, url, headers=headers, content=body,
                               extensions={"timeout": timeout}) as resp:
            data = bytearray()
            if resp.status >= 400:
                return resp.status, bytes(data)
            for chunk in resp.iter_stream():
                data += chunk
                if len(data) > self.max_response_bytes:
                    raise RemoteSearchError(f"answer larger than {self.max_response_bytes} bytes")
        return resp.status, bytes(data)

    def check(self, timeout: float = 5.0) -> str:
        """Ask the server, once and within `timeout` seconds, whether it answers: `GET /health`
        (tepo_jax.tools.server), or for a server without one an empty `POST /retrieve`.
        Returns what it said; RemoteSearchError with the reason when it does not answer.
        A start-up check: calls during a run keep their own retries and error results."""
        try:
            with self._backend.deadline(time.monotonic() + timeout):
                status, data = self._exchange("GET", self.base_url + "/health")
                if status == 200:
                    return data.decode("utf-8", "replace")[:200]
                empty = json.dumps({"queries": [], "top_k": 1}).encode()
                status2, data = self._exchange("POST", self.url, empty)
        except self._errors as exc:
            raise RemoteSearchError(f"{type(exc).__name__}: {exc}") from None
        if status2 in (404, 405) or status2 >= 500:
            raise RemoteSearchError(f"HTTP {status} from {self.base_url}/health and HTTP "
                                    f"{status2} from {self.url}: not a retrieval server")
        return f"HTTP {status2} from {self.url}"

    def run(self, argument: str, timeout: Optional[float] = None) -> ToolResult:
        t0 = time.monotonic()
        try:
            passages = self.search_many([argument], self.top_k, timeout)[0]
        except RemoteSearchError as exc:
            return ToolResult(f"search error: {exc}", ToolStatus.ERROR,
                              time.monotonic() - t0, self.name)
        return ToolResult(format_passages(passages, self.max_chars), ToolStatus.OK,
                          time.monotonic() - t0, self.name)

    def close(self):
        self._pool.close()


def _parse_response(payload, n: int) -> List[List[Passage]]:
    rows = payload["results"]
    if len(rows) != n:
        raise ValueError(f"server returned {len(rows)} result lists for {n} queries")
    return [[Passage(str(p["id"]), p.get("title", ""), p["text"], float(p.get("score", 0)))
             for p in row] for row in rows]


# ---- CLI ------------------------------------------------------------------------------------
# A bad corpus or index, or a file that cannot be read or written: one line, no traceback.
CLI_ERRORS = (SearchDataError, OSError)


def cli_message(e: BaseException) -> str:
    """The first line of `e`; an OSError as "FILE: reason"."""
    if isinstance(e, OSError) and not isinstance(e, SearchDataError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tepo_jax.tools.search")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a BM25 index from a JSONL corpus")
    b.add_argument("--corpus", required=True, help='JSONL with {"id","title","text"}')
    b.add_argument("--out", required=True, help="index directory to write")
    q = sub.add_parser("query", help="query a saved index")
    q.add_argument("--index", required=True)
    q.add_argument("--top-k", type=positive_int, default=3)
    q.add_argument("query", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            t0 = time.monotonic()
            n = build_index(read_corpus(args.corpus), args.out)
            print(f"indexed {n} passages into {args.out} in {time.monotonic() - t0:.1f} s")
        else:
            index = BM25Index.load(args.index)
            print(format_passages(index.search(" ".join(args.query), args.top_k)))
    except CLI_ERRORS as e:
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
