"""The tools and the call format of a run, built from its config (`config.tools`).

`bridge_from_config`: the python sandbox and the search tool (BM25 over the corpus, built
into <workdir>/search_index at the first start and rebuilt when the corpus changes, a prebuilt
`tools.search_index`, or a retrieval server, asked once at start-up whether it answers)
behind one ToolBridge. `function_bridge`: a function-calling run's
functions. `call_format`: the tag format for the tools, or JSON calls in the tokenizer's
family for function calling.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from tepo_jax import paths
from tepo_jax.errors import ConfigError, one_line
from tepo_jax.tools.base import Tool
from tepo_jax.tools.bridge import ToolBridge
from tepo_jax.tools.format import CallFormat, ToolFormat
from tepo_jax.tools.functions import FunctionTool, function_tools
from tepo_jax.tools.json_format import LLAMA31, QWEN25, JsonCallFormat, dialect_from_chat_template
from tepo_jax.tools.python_tool import PythonTool
from tepo_jax.tools.sandbox import SandboxConfig
from tepo_jax.tools.search import (FINGERPRINT_FILE, BM25Index, IndexNotFound, LocalSearch, RemoteSearch,
                                   RemoteSearchError, build_index, cli_message, corpus_fingerprint,
                                   missing_index_files, read_corpus)

log = logging.getLogger(__name__)
TOOL_NAMES = ("python", "search")   # the tag-format tools, each switched by config.tools.<name>


def enabled_tools(config) -> tuple[str, ...]:
    return tuple(t for t in TOOL_NAMES if config.tools[t])


def bridge_from_config(config, corpus_path: Optional[str], extra: Sequence[Tool] = ()) -> ToolBridge:
    """The config's tools and `extra` (a user's, tools/plugins) behind one bridge."""
    tools = {t.name: t for t in extra}
    if config.tools.python:
        t = config.tools
        tools["python"] = PythonTool(SandboxConfig(timeout_s=t.python_timeout_s, require_sandbox=t.require_sandbox,
                                                   max_output_chars=t.max_result_chars,
                                                   memory_bytes=t.python_memory_mb << 20,
                                                   max_processes=t.python_max_processes,
                                                   use_cgroup=t.sandbox_cgroup))
    if config.tools.search:
        tools["search"] = search_from_config(config, corpus_path)
    return ToolBridge(tools, max_workers=config.tools.max_workers,
                      default_timeout=config.tools.python_timeout_s + 1,
                      max_result_chars=config.tools.max_result_chars)


def function_bridge(config, functions: Sequence[FunctionTool]) -> ToolBridge:
    return ToolBridge(function_tools(functions), max_workers=config.tools.max_workers,
                      default_timeout=config.tools.python_timeout_s + 1)


def search_from_config(config, corpus_path: Optional[str]):
    """The search tool: a client of `tools.search_url` (checked at start-up: a server that
    does not answer fails here, not in every call of the run), a prebuilt
    `tools.search_index`, or the index in <workdir>/search_index, (re)built from the corpus
    when it is missing or was built from another corpus."""
    kw = dict(top_k=config.tools.search_top_k, max_chars=config.tools.max_result_chars)
    check_corpus_setting(config, corpus_path)
    if config.tools.search_backend == "remote":
        return remote_search(config.tools.search_url, **kw)
    if config.tools.search_index:
        return LocalSearch(load_index(config.tools.search_index, "config.tools.search_index"), **kw)
    index_dir = os.fspath(paths.as_path(config.workdir) / "search_index")
    stale = index_is_stale(index_dir, corpus_path)
    if stale:
        if not corpus_path:  # validate() requires one; kept for callers that skip it
            raise ConfigError("config.tools.search_corpus: the local search backend needs a corpus or an index")
        log.info("building the search index in %s from %s (%s)", index_dir, corpus_path, stale)
        build_search_index(corpus_path, index_dir)
    return LocalSearch(load_index(index_dir, "config.tools.search_corpus"), **kw)


def check_corpus_setting(config, corpus_path: Optional[str]) -> None:
    """ConfigError if the user set `tools.search_corpus` to a file that does not exist (even
    where the run indexes another corpus: the synthetic task writes its own)."""
    corpus = config.tools.search_corpus
    if not corpus:
        return
    try:
        found = paths.as_path(corpus).is_file()
    except OSError as e:
        raise ConfigError(f"config.tools.search_corpus={corpus!r}: cannot read it ({e})") from None
    if not found:
        raise ConfigError(f"config.tools.search_corpus={corpus!r}: no such file")
    if corpus_path and os.fspath(corpus_path) != corpus:
        log.warning("config.tools.search_corpus=%s is not used: data.task=%s indexes %s",
                    corpus, config.data.task, corpus_path)


def remote_search(url: str, check_timeout_s: float = 5.0, **kw) -> RemoteSearch:
    """A RemoteSearch client of `url`, once the server has answered (ConfigError if not)."""
    client = RemoteSearch(url, **kw)
    try:
        answer = client.check(timeout=check_timeout_s)
    except RemoteSearchError as e:
        client.close()
        raise ConfigError(f"config.tools.search_url={url!r}: no retrieval server answers there "
                          f"({one_line(e, 200)}); start it (python -m tepo_jax.tools.server) or fix "
                          "the URL") from None
    log.info("retrieval server %s: %s", url, one_line(answer, 120))
    return client


def index_is_stale(index_dir: str, corpus_path: Optional[str]) -> str:
    """Why the index in `index_dir` must be (re)built from `corpus_path`, "" if it need not:
    it is missing or incomplete, or its stored corpus fingerprint is absent or differs. With
    no corpus, an index that is there is used as it is."""
    missing = missing_index_files(index_dir)
    if missing:
        return "no index yet" if "params.index.json" in missing else f"incomplete: no {missing[0]}"
    if not corpus_path:
        return ""
    stored = paths.as_path(index_dir) / FINGERPRINT_FILE
    if not stored.is_file():
        return "no corpus fingerprint stored with it"
    try:
        old = json.loads(stored.read_text())
    except ValueError:
        return "unreadable corpus fingerprint"
    try:
        now = corpus_fingerprint(corpus_path)
    except OSError as e:  # the build that follows names the problem
        return f"cannot read the corpus ({e})"
    return "" if old == now else "the corpus changed"


def build_search_index(corpus_path: str, index_dir: str) -> None:
    """Build the index from `corpus_path`, then store its fingerprint (last, so a build that
    stops half-way is rebuilt at the next start)."""
    fingerprint = paths.as_path(index_dir) / FINGERPRINT_FILE
    if fingerprint.exists():
        fingerprint.unlink()
    try:
        build_index(read_corpus(corpus_path), index_dir)
    except ValueError as e:  # a malformed or empty corpus
        raise ConfigError(f"config.tools.search_corpus: {e}") from None
    except OSError as e:
        raise ConfigError(f"config.tools.search_corpus: {cli_message(e)}") from None
    paths.write_atomic(fingerprint, json.dumps(corpus_fingerprint(corpus_path)))


def load_index(index_dir: str, field: str) -> BM25Index:
    try:
        return BM25Index.load(index_dir)
    except IndexNotFound as e:
        raise ConfigError(f"{field}: {e}") from None


def call_format(tokenizer, tools: Sequence[str], function_calling: bool) -> CallFormat:
    """The tag format for `tools`, or (function calling) JSON calls in the tokenizer's family:
    Llama-3.1 if it has <|eot_id|>, else Qwen2.5, with the result strings read off its own
    chat template."""
    if not function_calling:
        return ToolFormat(tools=tuple(tools))
    base = LLAMA31 if "<|eot_id|>" in tokenizer.get_vocab() else QWEN25
    return JsonCallFormat(dialect_from_chat_template(tokenizer, base))
