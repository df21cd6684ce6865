"""Search: BM25 index over a generated 100k-passage corpus, the retrieval server and its
client (roundtrip, cache, dead and silent servers)."""
import json
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tepo_jax.tools import ToolStatus
from tepo_jax.tools.search import (BM25Index, LocalSearch, Passage, RemoteSearch,
                                   build_index, format_passages, read_corpus)

N_DOCS = 100_000
NEEDLES = [
    {"id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron "
     "lattice tower in Paris, completed in 1889."},
    {"id": "danube", "title": "Danube", "text": "The Danube flows through Vienna, Budapest "
     "and Belgrade into the Black Sea."},
]


def _corpus_lines(n):
    """Deterministic filler passages over a synthetic vocabulary, plus the needles."""
    rng = random.Random(0)
    vocab = [f"tok{i}" for i in range(20_000)]
    for i in range(n - len(NEEDLES)):
        yield {"id": str(i), "title": f"Filler {i}",
               "text": " ".join(rng.choices(vocab, k=10))}
    yield from NEEDLES


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for rec in _corpus_lines(N_DOCS):
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def index_dir(corpus_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("index"))
    t0 = time.monotonic()
    assert build_index(read_corpus(corpus_file), out) == N_DOCS
    assert time.monotonic() - t0 < 60, "building 100k passages must take well under a minute"
    return out


@pytest.fixture(scope="module")
def index(index_dir):
    return BM25Index.load(index_dir, mmap=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(index_dir):
    """The retrieval server started with its one command, on a free local port."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tepo_jax.tools.server", "--index",
                             index_dir, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up within 60 s"
        time.sleep(0.1)
    yield url, proc
    proc.kill()
    proc.wait()


# ---- local index --------------------------------------------------------------------------
def test_index_is_memory_mapped(index):
    assert index.num_docs == N_DOCS
    assert isinstance(index._retriever.scores["data"], np.memmap)


@pytest.mark.parametrize("query, first", [
    ("Where is the Eiffel Tower?", "eiffel"),
    ("river through Vienna and Budapest", "danube"),
])
def test_local_search_finds_needles(index, query, first):
    hits = index.search(query, k=3)
    assert hits[0].id == first and len(hits) <= 3
    assert hits[0].score >= hits[-1].score


def test_batched_equals_single(index):
    queries = ["Eiffel Tower", "tok1 tok2 tok3", "Danube Black Sea", "zzzunknownzzz"]
    batched = index.search_many(queries, k=5)
    assert batched == [index.search(q, k=5) for q in queries]
    assert batched[3] == []  # no indexed word: no results rather than arbitrary ones


def test_local_tool_output_is_formatted(index):
    tool = LocalSearch(index, top_k=2, max_chars=30)
    r = tool.run("Eiffel Tower Paris and the Danube", timeout=5)
    assert r.status is ToolStatus.OK and r.tool == "search"
    lines = r.text.splitlines()
    assert lines[0].startswith("Doc 1 (Title: Eiffel Tower) The Eiffel Tower")
    assert "…[truncated" in lines[0] and len(lines) == 2
    assert lines[1].startswith("Doc 2 (Title: Danube) ")
    assert tool.run("qqqq", timeout=5).text == "No results found."


def test_format_passages():
    ps = [Passage("1", "A", "alpha"), Passage("2", "B", "beta")]
    assert format_passages(ps) == "Doc 1 (Title: A) alpha\nDoc 2 (Title: B) beta"
    assert format_passages([]) == "No results found."


def test_bad_corpus_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "title": "t", "text": "x"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_corpus(str(path)))


def test_load_missing_index_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="search build"):
        BM25Index.load(str(tmp_path))


def test_cli_build_and_query(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in NEEDLES))
    out = tmp_path / "idx"
    env = dict(os.environ)
    run = lambda *a: subprocess.run([sys.executable, "-m", "tepo_jax.tools.search", *a],
                                    capture_output=True, text=True, timeout=120, env=env)
    built = run("build", "--corpus", str(corpus), "--out", str(out))
    assert built.returncode == 0 and "indexed 2 passages" in built.stdout, built.stderr
    found = run("query", "--index", str(out), "--top-k", "1", "Vienna")
    assert found.returncode == 0 and found.stdout.startswith("Doc 1 (Title: Danube)")


def test_search_does_not_import_jax():
    code = ("import sys, tempfile; from tepo_jax.tools.search import build_index, BM25Index\n"
            "d = tempfile.mkdtemp(); build_index([{'id': '1', 'title': 'tt', 'text': 'alpha beta'}]"
            " * 3, d)\nBM25Index.load(d).search('alpha', 2); print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ---- server and client --------------------------------------------------------------------
def test_server_roundtrip_matches_local(server, index):
    url, _ = server
    client = RemoteSearch(url, top_k=3, timeout=10)
    queries = ["Eiffel Tower", "Vienna Budapest", "tok5 tok6"]
    remote = client.search_many(queries)
    local = index.search_many(queries, 3)
    assert [[p.id for p in row] for row in remote] == [[p.id for p in row] for row in local]
    r = client.run("Where is the Eiffel Tower?")
    assert r.status is ToolStatus.OK and r.text.startswith("Doc 1 (Title: Eiffel Tower)")
    client.close()


def test_client_cache_counts_and_serves_hits(server):
    url, _ = server
    client = RemoteSearch(url, top_k=2, timeout=10, cache_size=2)
    client.search_many(["Danube", "Eiffel"])
    assert (client.cache_hits, client.cache_misses) == (0, 2)
    client.search_many(["Danube", "Eiffel", "Danube"])
    assert (client.cache_hits, client.cache_misses) == (3, 2)
    client.search_many(["Paris"])  # evicts the least recently used entry ("Eiffel")
    client.search_many(["Danube"])
    assert (client.cache_hits, client.cache_misses) == (4, 3)
    client.search_many(["Eiffel"])
    assert (client.cache_hits, client.cache_misses) == (4, 4)
    client.close()


def test_server_validates_requests(server):
    import httpx
    url, _ = server
    bad = httpx.post(url + "/retrieve", json={"queries": "not a list"}, timeout=10)
    assert bad.status_code == 422
    zero = httpx.post(url + "/retrieve", json={"queries": ["x"], "top_k": 0}, timeout=10)
    assert zero.status_code == 422
    ok = httpx.post(url + "/retrieve", json={"queries": [], "top_k": 2}, timeout=10)
    assert ok.json() == {"results": []}


def test_dead_server_errors_after_retries():
    client = RemoteSearch(f"http://127.0.0.1:{_free_port()}", timeout=1.0, retries=2,
                          backoff_s=0.05)
    t0 = time.monotonic()
    r = client.run("anything", timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert r.status is ToolStatus.ERROR and "failed after 3 attempts" in r.text


def test_silent_server_is_bounded_by_the_call_timeout():
    """A server that accepts connections but never answers must not hang the call."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        client = RemoteSearch(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout=0.5,
                              retries=5, backoff_s=0.05)
        t0 = time.monotonic()
        r = client.run("anything", timeout=1.2)
        assert time.monotonic() - t0 < 1.2 + 1.0
    assert r.status is ToolStatus.ERROR and "search error" in r.text


# ---- one deadline per remote call (issue 14) --------------------------------------------------
class TrickleServer:
    """An HTTP server on 127.0.0.1 that, in mode "headers", sends its response headers one
    byte every 0.1 s, in mode "body" sends them at once and then the body one byte every
    0.1 s (each read succeeds well inside any per-read timeout; 30 bytes, then it hangs up),
    and in mode "ok" answers at once with one passage per query."""

    def __init__(self, mode: str):
        import threading
        self.mode, self.stop = mode, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int([ln.split(b":")[1] for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length")][0])
                while len(body) < length:
                    body += conn.recv(65536)
                if self.mode == "ok":
                    rows = [[{"id": "1", "title": "T", "text": q}]
                            for q in json.loads(body)["queries"]]
                    data = json.dumps({"results": rows}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                    return
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" \
                       b"Content-Length: 100000\r\n\r\n"
                if self.mode == "body":
                    conn.sendall(head)
                # 30 bytes, 3 s: far past the test's deadline, short enough that a client
                # without one fails the test by its wall time instead of hanging it
                for byte in (head if self.mode == "headers" else b" " * 100000)[:30]:
                    if self.stop.wait(0.1):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def trickle(request):
    srv = TrickleServer(request.param)
    yield srv
    srv.close()


@pytest.mark.parametrize("trickle", ["headers", "body"], indirect=True)
def test_trickling_server_is_bounded_by_one_deadline(trickle):
    """Each read gets a byte within 0.1 s, so per-read timeouts never fire: only a deadline
    for the whole call ends it. The next call on the same client works."""
    client = RemoteSearch(trickle.url, timeout=5.0, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    r = client.run("anything", timeout=1.0)
    wall = time.monotonic() - t0
    assert wall < 1.0 + 0.3, f"call took {wall:.2f} s past its 1 s deadline"
    assert r.status is ToolStatus.ERROR and "no complete answer within the call's 1 s deadline" in r.text, r.text
    trickle.mode = "ok"
    again = client.run("second", timeout=2.0)
    assert again.status is ToolStatus.OK and again.text == "Doc 1 (Title: T) second"


@pytest.mark.parametrize("trickle", ["body"], indirect=True)
def test_trickling_server_frees_the_bridge_worker(trickle):
    """Through the bridge the call must end by itself (not be abandoned with its thread
    stuck): with one worker, the next call then runs and succeeds."""
    from tepo_jax.tools import ToolBridge, ToolCall
    client = RemoteSearch(trickle.url, timeout=5.0, retries=0)
    with ToolBridge({"search": client}, max_workers=1, default_timeout=1.0,
                    grace_s=0.5) as bridge:
        first = bridge.run_batch([ToolCall("search", "q1")])[0]
        assert first.status is ToolStatus.ERROR and bridge.abandoned == 0, first
        trickle.mode = "ok"
        second = bridge.run_batch([ToolCall("search", "q2")])[0]
    assert second.status is ToolStatus.OK and second.text == "Doc 1 (Title: T) q2", second


def test_control_bytes_from_a_server_do_not_reach_the_model():
    text = format_passages([Passage("1", "T\x1b[2J", "a\x00b")])
    assert text == "Doc 1 (Title: T\ufffd[2J) a\ufffdb"


# ---- bad input: one line naming the problem -------------------------------------------------
def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows, message", [
    ([{"id": 1, "title": "t", "text": None}], r"c.jsonl:1: 'text' must be a string, got null"),
    ([{"id": 1, "title": "t", "text": "ok"}, {"id": 2, "text": ["alpha", "beta"]}],
     r"c.jsonl:2: 'text' must be a string, got a list"),
    ([{"id": 1, "title": ["x"], "text": "a"}], r"c.jsonl:1: 'title' must be a string, got a list"),
    ([{"id": {"a": 1}, "text": "a"}], r"c.jsonl:1: 'id' must be a string or an integer, got an object"),
    (["[1, 2]"], r"c.jsonl:1: expected a JSON object with .id., .title., .text., got a list"),
    ([{"id": 1, "text": "a"}, "", {"id": "2", "text": "b"}, {"id": "1", "text": "c"}],
     r"c.jsonl:4: duplicate id '1' \(first on line 1\)"),
])
def test_corpus_refuses_non_string_fields_and_duplicate_ids(tmp_path, rows, message):
    from tepo_jax.tools.search import SearchDataError
    path = _jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(SearchDataError, match=message):
        list(read_corpus(path))


def test_corpus_that_is_not_utf8_names_its_line(tmp_path):
    from tepo_jax.tools.search import SearchDataError
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n{"id": 2, "text": "\xff"}\n')
    with pytest.raises(SearchDataError, match=r"c.jsonl:2: not UTF-8"):
        list(read_corpus(str(path)))


def test_half_built_index_says_rebuild(tmp_path):
    (tmp_path / "params.index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"incomplete BM25 index \(missing vocab.index.json, .*\); "
                                                r"rebuild it"):
        BM25Index.load(str(tmp_path))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tepo_jax.tools import search, server
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": 1, "text": "x"}, {"id": 2}])
    cases = [
        (search.main, ["build", "--corpus", bad, "--out", str(tmp_path / "i")],
         f"error: {bad}:2: expected a JSON object with 'id', 'title', 'text' (missing 'text')"),
        (search.main, ["build", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "i")],
         f"error: {tmp_path / 'nope.jsonl'}: No such file or directory"),
        (search.main, ["query", "--index", str(tmp_path), "x"], f"error: no BM25 index in '{tmp_path}'"),
        (server.main, ["--index", str(tmp_path)], f"error: no BM25 index in '{tmp_path}'"),
    ]
    for main, argv, first in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(first) and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("top_k", ["0", "-3"])
def test_cli_refuses_top_k_below_one(tmp_path, capsys, top_k):
    from tepo_jax.tools import search
    with pytest.raises(SystemExit) as e:
        search.main(["query", "--index", str(tmp_path), "--top-k", top_k, "x"])
    assert e.value.code == 2 and f"argument --top-k: must be >= 1, got {top_k}" in capsys.readouterr().err


def _search_config(tmp_path, **tools):
    from tepo_jax.config import defaults
    c = defaults()
    c.workdir = str(tmp_path / "run")
    c.tools.update(tools)
    return c


def test_workdir_index_is_rebuilt_when_the_corpus_changes(tmp_path, caplog):
    """The index in <workdir>/search_index belongs to the corpus it was built from: another
    corpus at the same workdir rebuilds it (INFO line), the same corpus (rewritten with the
    same bytes, as the synthetic task does at each start) reuses it."""
    import logging
    from tepo_jax.tools.from_config import search_from_config
    corpus = tmp_path / "corpus.jsonl"
    _jsonl(corpus, [{"id": "a", "title": "Apple", "text": "apples are red"}])
    caplog.set_level(logging.INFO, logger="tepo_jax.tools.from_config")
    c = _search_config(tmp_path, search_corpus=str(corpus))
    assert search_from_config(c, str(corpus)).run("apples").text == "Doc 1 (Title: Apple) apples are red"
    index_file = tmp_path / "run" / "search_index" / "params.index.json"
    built = index_file.stat().st_mtime_ns
    _jsonl(corpus, [{"id": "a", "title": "Apple", "text": "apples are red"}])  # same bytes again
    caplog.clear()
    search_from_config(c, str(corpus))
    assert index_file.stat().st_mtime_ns == built and "building the search index" not in caplog.text
    _jsonl(corpus, [{"id": "b", "title": "Banana", "text": "bananas are yellow"}])
    tool = search_from_config(c, str(corpus))
    assert tool.run("bananas").text == "Doc 1 (Title: Banana) bananas are yellow"
    assert tool.run("apples").text == "No results found."
    assert "building the search index" in caplog.text and "the corpus changed" in caplog.text
    # an index from before fingerprints (or a build that stopped half-way) is rebuilt too
    (tmp_path / "run" / "search_index" / "corpus_fingerprint.json").unlink()
    caplog.clear()
    search_from_config(c, str(corpus))
    assert "no corpus fingerprint" in caplog.text


def test_a_configured_corpus_that_does_not_exist_is_refused(tmp_path):
    """Even where the run indexes another corpus (data.task=synthetic writes its own)."""
    from tepo_jax.errors import ConfigError
    from tepo_jax.tools.from_config import search_from_config
    own = _jsonl(tmp_path / "synthetic_corpus.jsonl", [{"id": "a", "text": "apples"}])
    c = _search_config(tmp_path, search_corpus=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"config.tools.search_corpus='.*nope.jsonl': no such file"):
        search_from_config(c, own)
    with pytest.raises(ConfigError, match=r"config.tools.search_corpus='.*nope.jsonl': no such file"):
        search_from_config(c, c.tools.search_corpus)


def test_bad_corpus_through_the_config_names_the_field_and_line(tmp_path):
    from tepo_jax.errors import ConfigError
    from tepo_jax.tools.from_config import search_from_config
    path = _jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])
    with pytest.raises(ConfigError, match=r"config.tools.search_corpus: .*c.jsonl:2: duplicate id '1'"):
        search_from_config(_search_config(tmp_path, search_corpus=path), path)
    half = tmp_path / "half"
    half.mkdir()
    (half / "params.index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"config.tools.search_index: .*incomplete BM25 index"):
        search_from_config(_search_config(tmp_path, search_index=str(half)), None)


def test_remote_backend_refuses_a_server_that_does_not_answer_at_start():
    """A run with a dead retrieval server stops at start-up with one line, instead of training
    to the end with every search call an error."""
    from tepo_jax.errors import ConfigError
    from tepo_jax.tools.from_config import search_from_config
    c = _search_config(__import__("pathlib").Path("/tmp"), search_backend="remote", search_url="http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"config.tools.search_url='http://127.0.0.1:9': no retrieval server "
                                          r"answers there \(ConnectError"):
        search_from_config(c, None)
    assert time.monotonic() - t0 < 6
    c.tools.search_url = "127.0.0.1:9"   # no scheme
    with pytest.raises(ConfigError, match="config.tools.search_url.*UnsupportedProtocol"):
        search_from_config(c, None)


def test_remote_backend_refuses_a_server_that_is_not_a_retrieval_server():
    """Something answers, but 404 on /health and on /retrieve: not the server."""
    import http.server
    import threading
    from tepo_jax.errors import ConfigError
    from tepo_jax.tools.from_config import search_from_config

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _404(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_POST = _404

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        c = _search_config(__import__("pathlib").Path("/tmp"), search_backend="remote",
                           search_url=f"http://127.0.0.1:{httpd.server_address[1]}")
        with pytest.raises(ConfigError, match=r"HTTP 404 from .*/health and HTTP 404 from .*/retrieve: "
                                              r"not a retrieval server"):
            search_from_config(c, None)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_backend_starts_against_a_live_server(server):
    from tepo_jax.tools.from_config import search_from_config
    url, _ = server
    c = _search_config(__import__("pathlib").Path("/tmp"), search_backend="remote", search_url=url)
    tool = search_from_config(c, None)
    assert tool.run("Where is the Eiffel Tower?").text.startswith("Doc 1 (Title: Eiffel Tower)")
    tool.close()
