"""Host-side tools for the agent: call parsing, sandboxed python, search, and the bridge.

Nothing here imports JAX. The search backends (bm25s, httpx, FastAPI) are imported from
`tepo_jax.tools.search` / `tepo_jax.tools.server` only when used.
"""
from tepo_jax.tools.base import (AnswerTurn, ParseError, Tool, ToolCall, ToolResult,
                                 ToolStatus, truncate)
from tepo_jax.tools.bridge import ToolBridge
from tepo_jax.tools.format import CallFormat, ToolFormat
from tepo_jax.tools.python_tool import PythonTool, SandboxUnavailable
from tepo_jax.tools.sandbox import SandboxConfig

__all__ = ["AnswerTurn", "CallFormat", "ParseError", "PythonTool", "SandboxConfig",
           "SandboxUnavailable", "Tool", "ToolBridge", "ToolCall", "ToolFormat", "ToolResult",
           "ToolStatus", "truncate"]
