"""Schema-validated function tools: validation errors become results the model sees."""
import json

import pytest

from tepo_jax.tools.base import ParseError, ToolCall, ToolStatus
from tepo_jax.tools.bridge import ToolBridge
from tepo_jax.tools.functions import (FunctionTool, function_from_schema, function_tools,
                                      tools_for_prompt)
from tepo_jax.tools.json_format import QWEN25, JsonCallFormat

WEATHER = FunctionTool(
    "get_weather", "Weather now.",
    {"type": "object", "properties": {"city": {"type": "string", "minLength": 1},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                      "days": {"type": "integer", "minimum": 1}},
     "required": ["city"], "additionalProperties": False},
    lambda city, unit="celsius", days=1: {"city": city, "temp": 12, "unit": unit})


def run(tool, args):
    return tool.run(json.dumps(args) if not isinstance(args, str) else args, 5.0)


def test_valid_call_runs_and_returns_json():
    r = run(WEATHER, {"city": "Oslo"})
    assert r.status is ToolStatus.OK and json.loads(r.text) == {"city": "Oslo", "temp": 12,
                                                                "unit": "celsius"}


@pytest.mark.parametrize("args,needle", [
    ({}, "missing required field `city`"),
    ({"city": "Oslo", "unit": "kelvin"}, "field `unit`: 'kelvin' is not one of"),
    ({"city": 42}, "field `city`: 42 is not of type 'string'"),
    ({"city": "Oslo", "days": 0}, "field `days`"),
    ({"city": "Oslo", "wind": True}, "'wind'"),
    ("{not json", "not JSON"),
])
def test_schema_violations_name_the_bad_field(args, needle):
    r = run(WEATHER, args)
    assert r.status is ToolStatus.ERROR
    assert r.text.startswith("invalid arguments for get_weather")
    assert needle in r.text, r.text


def test_implementation_errors_are_results_not_exceptions():
    boom = FunctionTool("boom", "", {"type": "object"}, lambda: 1 / 0)
    r = run(boom, {})
    assert r.status is ToolStatus.ERROR and "ZeroDivisionError" in r.text


def test_invalid_schema_is_rejected_at_construction():
    with pytest.raises(ValueError, match="invalid JSON Schema for function 'bad'"):
        FunctionTool("bad", "", {"type": "objekt"})


def test_prompt_tool_list_and_round_trip():
    (entry,) = tools_for_prompt([WEATHER])
    assert entry["type"] == "function"
    assert set(entry["function"]) == {"name", "description", "parameters"}
    back = function_from_schema(entry)
    assert back.name == "get_weather" and back.parameters == WEATHER.parameters
    with pytest.raises(ValueError, match="duplicate"):
        function_tools([WEATHER, WEATHER])


def test_a_multi_call_turn_through_the_bridge_gives_one_result_block():
    fmt = JsonCallFormat(QWEN25, functions=("get_weather",))
    turn = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "kelvin"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"\n</tool_call>'
            '<|im_end|>')
    calls = fmt.parse_calls(turn)
    assert [type(c) for c in calls] == [ToolCall, ToolCall, ParseError]
    with ToolBridge(function_tools([WEATHER]), max_workers=2) as bridge:
        results = bridge.run_batch(calls)
    assert [r.status for r in results] == [ToolStatus.OK, ToolStatus.ERROR, ToolStatus.PARSE_ERROR]
    assert "missing required field `city`" in results[1].text
    block = fmt.wrap_results([r.text for r in results])
    assert block.count("<tool_response>") == 3
    assert block.index('"Oslo"') < block.index("missing required") < block.index("malformed JSON")


@pytest.mark.parametrize("argument", [
    '{"city": ' + "[" * 5000 + "]" * 5000 + "}",
    "[" * 3000 + "]" * 3000,
])
def test_deeply_nested_arguments_are_an_error_result_not_a_recursion_error(argument):
    r = WEATHER.run(argument, 5.0)   # called directly, without the bridge's guard
    assert r.status is ToolStatus.ERROR
    assert r.text.startswith("invalid arguments for get_weather: JSON nested too deeply")
