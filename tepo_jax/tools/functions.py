"""Schema-validated function tools for the JSON call format.

A `FunctionTool` is a `Tool` (name + `run(argument, timeout)`) whose argument is the JSON
object of a call's arguments. `run` validates it against the function's JSON Schema with
`jsonschema` before calling the Python implementation; an invalid call becomes an ERROR
result whose text names the bad field, so the model sees what to fix. The implementation's
return value becomes the result text (strings as is, anything else as JSON).

`tools_for_prompt(functions)` is the OpenAI-style tool list that `encode_chat(..., tools=)`
hands to the Qwen2.5 / Llama-3.1 chat templates, which write it into the system (Qwen) or
first user (Llama) message.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import jsonschema

from tepo_jax.tools.base import JSONDepthError, ToolResult, ToolStatus, loads_model_json, truncate


@dataclasses.dataclass(frozen=True)
class FunctionTool:
    """One callable function: name, description, JSON Schema of its arguments, implementation.

    `parameters` is the schema of the arguments object ({"type": "object", "properties":
    {...}, "required": [...]}); it is checked once at construction (Draft 2020-12).
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Optional[Callable[..., Any]] = None   # called as fn(**arguments); None: schema only
    max_result_chars: int = 4_000
    # Its own `max_result_chars` applies, not the bridge's cap (a class attribute, not a field).
    caps_own_results = True

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a function needs a non-empty name")
        try:
            jsonschema.Draft202012Validator.check_schema(dict(self.parameters))
        except jsonschema.SchemaError as e:
            raise ValueError(f"invalid JSON Schema for function {self.name!r}: {e.message}") from e

    @property
    def validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(dict(self.parameters))

    def schema(self) -> dict:
        """The OpenAI-style tool entry the chat templates render."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": dict(self.parameters)}}

    def validation_error(self, arguments: Any) -> Optional[str]:
        """None if `arguments` fits the schema, else a message naming the bad field."""
        errors = sorted(self.validator.iter_errors(arguments), key=lambda e: list(e.path))
        if not errors:
            return None
        e = jsonschema.exceptions.best_match(errors)
        return f"invalid arguments for {self.name}: {_describe(e)}"

    def run(self, argument: str, timeout: float) -> ToolResult:
        t0 = time.monotonic()
        try:
            arguments = loads_model_json(argument) if argument.strip() else {}
        except JSONDepthError as e:
            return self._result(f"invalid arguments for {self.name}: {e}", ToolStatus.ERROR, t0)
        except ValueError as e:
            return self._result(f"invalid arguments for {self.name}: not JSON ({e})",
                                ToolStatus.ERROR, t0)
        problem = self.validation_error(arguments)
        if problem:
            return self._result(problem, ToolStatus.ERROR, t0)
        if self.fn is None:
            return self._result("ok", ToolStatus.OK, t0)
        try:
            value = self.fn(**arguments)
        except Exception as e:  # the model sees the failure, the rollout goes on
            return self._result(f"error in {self.name}: {type(e).__name__}: {e}",
                                ToolStatus.ERROR, t0)
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return self._result(text, ToolStatus.OK, t0)

    def _result(self, text: str, status: ToolStatus, t0: float) -> ToolResult:
        return ToolResult(truncate(text, self.max_result_chars), status,
                          time.monotonic() - t0, self.name)


def _describe(error: jsonschema.ValidationError) -> str:
    """'field `unit`: 'kelvin' is not one of [...]' / 'missing required field `city`'."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        where = f" in `{path}`" if path else ""
        return f"missing required field `{missing}`{where}"
    if error.validator == "additionalProperties" and not path:
        return f"unexpected field(s): {error.message.split('(')[-1].rstrip(')')}"
    return f"field `{path}`: {error.message}" if path else error.message


def tools_for_prompt(functions: Iterable[FunctionTool]) -> list[dict]:
    """The `tools=` list for `encode_chat` / the chat templates, in the given order."""
    return [f.schema() for f in functions]


def function_tools(functions: Iterable[FunctionTool]) -> Dict[str, FunctionTool]:
    """name -> tool mapping for `ToolBridge(tools=...)`; duplicate names are an error."""
    out: Dict[str, FunctionTool] = {}
    for f in functions:
        if f.name in out:
            raise ValueError(f"duplicate function name {f.name!r}")
        out[f.name] = f
    return out


def function_from_schema(entry: Mapping[str, Any], fn: Optional[Callable[..., Any]] = None
                         ) -> FunctionTool:
    """A FunctionTool from an OpenAI-style entry ({"type": "function", "function": {...}})
    or a bare {"name", "description", "parameters"} dict."""
    spec = entry.get("function", entry)
    return FunctionTool(name=spec["name"], description=spec.get("description", ""),
                        parameters=spec.get("parameters") or {"type": "object"}, fn=fn)
