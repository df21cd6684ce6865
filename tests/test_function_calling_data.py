"""Function-calling records, readers (BFCL / API-Bank / rlla / ours) and the synthetic task."""
import json

import pytest

from tepo_jax.data.function_calling import (FunctionCallingExample, bfcl_schema,
                                            make_function_calling, read_function_calling,
                                            synthetic_functions, write_function_calling)
from tepo_jax.data.jsonl import JsonlError
from tepo_jax.rewards.function_calling import FunctionCallReward
from tepo_jax.tools.base import ToolStatus
from tepo_jax.tools.functions import function_tools
from tepo_jax.tools.json_format import QWEN25, JsonCallFormat


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_synthetic_is_deterministic_and_has_multi_call_questions():
    a, b = make_function_calling(40, seed=3), make_function_calling(40, seed=3)
    assert a == b and a != make_function_calling(40, seed=4)
    assert len({ex.question for ex in a}) == 40
    assert 5 <= sum(len(ex.gold_calls) > 1 for ex in a) <= 25
    assert {c["name"] for ex in a for c in ex.gold_calls} == {f.name for f in synthetic_functions()}


def test_synthetic_gold_calls_fit_the_schemas_and_run():
    tools = function_tools(synthetic_functions())
    for ex in make_function_calling(60, seed=0):
        assert [t["function"]["name"] for t in ex.tools] == list(tools)
        for c in ex.gold_calls:
            assert tools[c["name"]].validation_error(c["arguments"]) is None, (ex.question, c)
            assert tools[c["name"]].run(json.dumps(c["arguments"]), 1.0).status is ToolStatus.OK
        # the ideal turn, written as the template writes calls, scores the maximum
        fmt = JsonCallFormat(QWEN25)
        turn = "\n".join(fmt.render_call(c["name"], c["arguments"]) for c in ex.gold_calls)
        assert FunctionCallReward()(turn, ex.gold).em == 1.0


def test_record_round_trips(tmp_path):
    exs = make_function_calling(5, seed=1)
    assert [FunctionCallingExample.from_dict(e.to_dict()) for e in exs] == exs
    bytes_row = {k: v.encode() for k, v in exs[0].to_dict().items()}     # as tfds hands it back
    assert FunctionCallingExample.from_dict(bytes_row) == exs[0]
    path = tmp_path / "fc.jsonl"
    write_function_calling(path, exs)
    assert read_function_calling(path) == exs


def test_bfcl_layout_with_answers_file(tmp_path):
    q = _write(tmp_path / "BFCL_v3_simple.json", [{
        "id": "simple_0",
        "question": [[{"role": "user", "content": "Area of a triangle with base 10, height 5?"}]],
        "function": [{"name": "calc_area", "description": "Triangle area.", "parameters": {
            "type": "dict", "properties": {"base": {"type": "integer"},
                                           "height": {"type": "float"},
                                           "unit": {"type": "string"},
                                           "extra": {"type": "any"}},
            "required": ["base", "height"]}}]}])
    a = _write(tmp_path / "answers.json", [{"id": "simple_0", "ground_truth": [
        {"calc_area": {"base": [10], "height": [5.0, 5], "unit": ["", "units"]}}]}])
    (ex,) = read_function_calling(q, "bfcl", answers=a)
    assert ex.gold_calls == ({"name": "calc_area", "arguments": {"base": 10, "height": 5.0}},)
    params = ex.tools[0]["function"]["parameters"]
    assert params["type"] == "object" and params["properties"]["height"]["type"] == "number"
    assert "type" not in params["properties"]["extra"]
    assert ex.messages[0]["role"] == "user"


def test_bfcl_schema_conversion_is_recursive():
    s = bfcl_schema({"type": "dict", "properties": {"p": {"type": "tuple", "items": {
        "type": "float"}}}})
    assert s == {"type": "object", "properties": {"p": {"type": "array",
                                                         "items": {"type": "number"}}}}


def test_apibank_processed_json_array(tmp_path):
    path = tmp_path / "level-1-api_processed.json"
    path.write_text(json.dumps([
        {"system": "You can call ToolSearcher ...", "user": "User: find a meeting tool",
         "answer": {"name": "ToolSearcher", "parameters": {"keywords": "meeting"}}},
        {"system": "s", "user": "u", "answer": [{"name": "A", "parameters": {}}]}], indent=1))
    exs = read_function_calling(path, "apibank")
    assert exs[0].gold_calls == ({"name": "ToolSearcher", "arguments": {"keywords": "meeting"}},)
    assert exs[0].id == "apibank-1" and exs[1].gold_calls[0]["name"] == "A"
    assert [m["role"] for m in exs[0].messages] == ["system", "user"]


def test_rlla_raw_and_processed(tmp_path):
    gold = ('<think>...</think>\n<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n'
            '{"name": "g", "parameters": {}}\n</tool_call>')
    path = _write(tmp_path / "rlla.jsonl", [
        {"system": "tools: f, g", "user": "do both", "output": gold},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
         "reward_model": {"ground_truth": "<think>...</think>\n<response>Hello!</response>"}}])
    raw, processed = read_function_calling(path, "rlla")
    assert raw.gold_calls == ({"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}})
    assert processed.gold_calls == () and processed.question == "hi"


@pytest.mark.parametrize("layout,rows,needle", [
    ("bfcl", [{"id": "a", "question": [[{"role": "user", "content": "q"}]],
               "function": [{"name": "f"}], "ground_truth": [{"f": {}}]},
              {"id": "b", "function": []}], ":2: missing field 'question'"),
    ("apibank", [{"system": "s", "user": "u"}], ":1: missing field 'answer'"),
    ("function_calling", [{"messages": [{"role": "user", "content": "q"}],
                           "gold_calls": [{"arguments": {}}]}], ":1: gold call 0: missing 'name'"),
])
def test_reader_errors_name_file_and_line(tmp_path, layout, rows, needle):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(JsonlError) as e:
        read_function_calling(path, layout)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_invalid_json_line_and_unknown_layout(tmp_path):
    path = tmp_path / "x.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}], "gold_calls": []}
    path.write_text(json.dumps(good) + '\n{oops\n')
    with pytest.raises(JsonlError, match=r"x\.jsonl:2: invalid JSON"):
        read_function_calling(path)
    with pytest.raises(ValueError, match="unknown layout"):
        read_function_calling(path, "toolbench")


@pytest.mark.parametrize("calls,message", [
    ('{"name": 1}', "gold call 0: 'name' must be a string, got int"),
    ([{"arguments": {}}], "gold call 0: missing 'name'"),
    ([{"name": "f", "arguments": {}}, "g"], "gold call 1: expected an object {name, arguments}, got str"),
    ([{"name": "f", "arguments": [1]}], "gold call 0: 'arguments' must be an object of argument names to values, got list"),
    ("<tool_call>\n{\"name\": 1}\n</tool_call>", "gold call 0: tool call without a \"name\" string"),
    (5, "gold calls: expected a list of {name, arguments} objects, got int"),
])
def test_bad_gold_calls_are_named(calls, message):
    from tepo_jax.tools.json_format import normalize_calls
    with pytest.raises(ValueError) as e:
        normalize_calls(calls)
    assert str(e.value) == message


def test_reader_names_file_line_and_call(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}], "gold_calls": []},
            {"messages": [{"role": "user", "content": "q"}], "gold_calls": '{"name": 1}'}]
    path = _write(tmp_path / "fc.jsonl", rows)
    with pytest.raises(JsonlError, match=r"fc\.jsonl:2: gold call 0: 'name' must be a string, got int "
                                         r"\(layout 'function_calling'\)"):
        read_function_calling(path)
    with pytest.raises(JsonlError, match=r"rlla\.jsonl:1: gold call 0: missing 'name'"):
        read_function_calling(_write(tmp_path / "rlla.jsonl", [{"user": "u", "output": [{"arguments": {}}]}]), "rlla")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(JsonlError, match=r"empty\.json: no records"):
        read_function_calling(empty)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[\n{"messages": [{"role": "user", "content": "caf\xe9"}], "gold_calls": []}]')
    with pytest.raises(JsonlError, match=r"latin\.json:2: not valid UTF-8 \(byte 0xe9"):
        read_function_calling(latin)
