"""The tools and the call format of a run, built from its config (`config.tools`).

`bridge_from_config`: the python sandbox and the search tool (BM25 over the corpus, built
into <workdir>/search_index at the first start, a prebuilt `tools.search_index`, or a
retrieval server) behind one ToolBridge. `function_bridge`: a function-calling run's
functions. `call_format`: the tag format for the tools, or JSON calls in the tokenizer's
family for function calling.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from tepo_jax import paths
from tepo_jax.errors import ConfigError
from tepo_jax.tools.base import Tool
from tepo_jax.tools.bridge import ToolBridge
from tepo_jax.tools.format import CallFormat, ToolFormat
from tepo_jax.tools.functions import FunctionTool, function_tools
from tepo_jax.tools.json_format import LLAMA31, QWEN25, JsonCallFormat, dialect_from_chat_template
from tepo_jax.tools.python_tool import PythonTool
from tepo_jax.tools.sandbox import SandboxConfig
from tepo_jax.tools.search import BM25Index, LocalSearch, RemoteSearch, build_index, read_corpus

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
                      default_timeout=config.tools.python_timeout_s + 1)


def function_bridge(config, functions: Sequence[FunctionTool]) -> ToolBridge:
    return ToolBridge(function_tools(functions), max_workers=config.tools.max_workers,
                      default_timeout=config.tools.python_timeout_s + 1)


def search_from_config(config, corpus_path: Optional[str]):
    kw = dict(top_k=config.tools.search_top_k, max_chars=config.tools.max_result_chars)
    if config.tools.search_backend == "remote":
        return RemoteSearch(config.tools.search_url, **kw)
    index_dir = config.tools.search_index or os.fspath(paths.as_path(config.workdir) / "search_index")
    built = (paths.as_path(index_dir) / "params.index.json").exists()
    if config.tools.search_index and not built:
        raise ConfigError(f"config.tools.search_index: {index_dir}: no bm25 index here (params.index.json)")
    if not built:
        if not corpus_path:  # validate() requires one; kept for callers that skip it
            raise ConfigError("config.tools.search_corpus: the local search backend needs a corpus or an index")
        try:
            build_index(read_corpus(corpus_path), index_dir)
        except ValueError as e:  # a malformed or empty corpus
            raise ConfigError(f"config.tools.search_corpus: {e}") from None
    return LocalSearch(BM25Index.load(index_dir), **kw)


def call_format(tokenizer, tools: Sequence[str], function_calling: bool) -> CallFormat:
    """The tag format for `tools`, or (function calling) JSON calls in the tokenizer's family:
    Llama-3.1 if it has <|eot_id|>, else Qwen2.5, with the result strings read off its own
    chat template."""
    if not function_calling:
        return ToolFormat(tools=tuple(tools))
    base = LLAMA31 if "<|eot_id|>" in tokenizer.get_vocab() else QWEN25
    return JsonCallFormat(dialect_from_chat_template(tokenizer, base))
