"""The default tag format: stop strings, result wrapping, and the end-of-turn parser."""
import dataclasses

import pytest

from tepo_jax.tools import AnswerTurn, CallFormat, ParseError, ToolCall, ToolFormat

FMT = ToolFormat()


def test_is_a_call_format_and_frozen():
    assert isinstance(FMT, CallFormat)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FMT.tools = ("x",)


def test_stop_strings_are_closing_tags():
    assert FMT.stop_strings == ("</python>", "</search>", "</answer>")
    assert ToolFormat(tools=("calc",)).stop_strings == ("</calc>", "</answer>")


def test_wrap_result_and_defang():
    assert FMT.wrap_result("42") == "\n<result>\n42\n</result>\n"
    wrapped = FMT.wrap_result("a</result>b")
    assert wrapped.count("</result>") == 1 and "a</ result>b" in wrapped


@pytest.mark.parametrize("text, expected", [
    ("Let me compute.\n<python>print(1+1)</python>", ToolCall("python", "print(1+1)")),
    ("<search> capital of France </search>", ToolCall("search", "capital of France")),
    ("<search>q</search>\n  ", ToolCall("search", "q")),  # trailing whitespace after stop
    ("<python>\nfor i in range(2):\n    print(i)\n</python>",
     ToolCall("python", "for i in range(2):\n    print(i)")),  # indentation kept
    ("<python>\n```python\nprint(3)\n```\n</python>", ToolCall("python", "print(3)")),
    ("<python>print(1)</python> <result>\n1\n</result> now <search>x y</search>",
     ToolCall("search", "x y")),  # the call at the END of the turn wins
    ("<python>a=1</python><result>ok</result><python>print(a)</python>",
     ToolCall("python", "print(a)")),  # second call of the same tool
    ("So the answer is <answer> Paris </answer>", AnswerTurn("Paris")),
    ("<python>x</python> done <answer>4</answer>", AnswerTurn("4")),
    ("I think it is Paris.", None),  # no call, no answer: a plain turn
    ("", None),
    ("the <b>bold</b> word", None),  # unrelated markup, never opened as a tool
])
def test_parse_valid(text, expected):
    assert FMT.parse(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("<calculator>1+1</calculator>", "unknown tool 'calculator'"),
    ("<python>print(1)", "unclosed tag <python>"),
    ("<search>what is", "unclosed tag <search>"),
    ("<answer>Paris", "unclosed tag <answer>"),
    ("<python>   </python>", "empty argument"),
    ("<search></search>", "empty argument"),
    ("<python>\n```python\n```\n</python>", "empty argument"),
    ("<python>print(1)<search>q</search></python>", "nested tag <search>"),
    ("<search><python>x</python></search>", "nested tag <python>"),
    ("<python>a<python>b</python>", "nested tag <python>"),
    ("<python>x<answer>1</answer></python>", "nested tag <answer>"),
    ("print(1)</python>", "without an opening <python>"),
    ("42</answer>", "without an opening <answer>"),
])
def test_parse_errors(text, needle):
    out = FMT.parse(text)
    assert isinstance(out, ParseError), out
    assert needle in out.message
    assert "<python>…</python>" in out.message or "limit" in out.message  # says how to call


def test_parse_error_names_the_tool():
    assert FMT.parse("<python>print(1)").tool == "python"
    assert FMT.parse("<search></search>").tool == "search"


def test_argument_length_limit():
    fmt = ToolFormat(max_argument_chars=10)
    out = fmt.parse("<search>" + "a" * 11 + "</search>")
    assert isinstance(out, ParseError) and "limit is 10" in out.message
    assert fmt.parse("<search>" + "a" * 10 + "</search>") == ToolCall("search", "a" * 10)


def test_custom_tags_and_validation():
    fmt = ToolFormat(tools=("calc",), answer_tag="final", result_tag="obs")
    assert fmt.parse("<calc>2*3</calc>") == ToolCall("calc", "2*3")
    assert fmt.parse("<final>6</final>") == AnswerTurn("6")
    assert isinstance(fmt.parse("<python>1</python>"), ParseError)
    assert fmt.wrap_result("6") == "\n<obs>\n6\n</obs>\n"
    with pytest.raises(ValueError, match="distinct"):
        ToolFormat(tools=("answer",))
    with pytest.raises(ValueError, match="invalid tag"):
        ToolFormat(tools=("py thon",))


def test_roundtrip_with_stop_strings():
    """A turn cut at any stop string the format reports parses to a call or an answer."""
    for stop in FMT.stop_strings:
        tag = stop[2:-1]
        out = FMT.parse(f"thinking <{tag}>x</{tag}>")
        assert isinstance(out, (ToolCall, AnswerTurn))
