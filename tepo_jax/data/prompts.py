"""The system prompt that teaches the tag tool format, and example -> chat messages.

The format matches `tepo_jax.tools.format.ToolFormat`: calls `<python>code</python>` and
`<search>query</search>`, results inserted as `<result>...</result>`, the final answer in
`<answer>...</answer>`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from tepo_jax.data.records import MATH, Example

TOOL_DESCRIPTIONS = {
    "python": ("<python>code</python>", "runs Python 3 code and returns what it prints "
               "(use print); use it for any calculation"),
    "search": ("<search>query</search>", "searches a knowledge base and returns the most "
               "relevant passages; search again with a new query if a passage is missing"),
}

_HEADER = ("You are a helpful assistant that solves problems step by step and can use tools. "
           "Think before each step.")
_FOOTER = ("Each call gets its result back inside <result>...</result>, written by the tool, "
           "not by you; never write <result> yourself. Make one call at a time and wait for "
           "its result. When you are done, give only the final answer inside "
           "<answer>...</answer>, for example <answer>42</answer>.")
_NO_TOOLS = ("Give only the final answer inside <answer>...</answer>, for example "
             "<answer>42</answer>.")


# The "short" style: the same contract in one line, for models too small to need the
# instructions, and without literal tags: a tag in the prompt ("<answer>...</answer>") is a
# place a small model's induction heads copy from ("<answer>" -> "..."), which fights the
# copying it has to learn (a 2-layer model learned to copy results in a few hundred SFT steps
# with this prompt, and had not after 500 with the tags in it; docs/demo.md).
PROMPT_STYLES = ("full", "short")
_SHORT_TOOLS = {"python": "python runs code", "search": "search finds facts"}


def system_prompt(tools: Sequence[str] = ("python", "search"), style: str = "full",
                  descriptions: Mapping[str, str] = {}) -> str:
    """The system prompt for the enabled `tools` (built-ins from TOOL_DESCRIPTIONS, a user's
    tools from `descriptions`), in order, in `style` (PROMPT_STYLES)."""
    unknown = [t for t in tools if t not in TOOL_DESCRIPTIONS and t not in descriptions]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; known: {sorted(TOOL_DESCRIPTIONS)} "
                         "(describe your own with `descriptions`)")
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    if style == "short":
        calls = ", ".join(_SHORT_TOOLS.get(t) or f"{t} {descriptions[t]}".strip() for t in tools)
        return (f"Tools: {calls}. " if tools else "") + "Put the final answer in the answer tag."
    if not tools:
        return f"{_HEADER}\n\n{_NO_TOOLS}"
    usage = {t: TOOL_DESCRIPTIONS.get(t) or (f"<{t}>argument</{t}>", descriptions[t] or "a tool")
             for t in tools}
    lines = [f"- {usage[t][0]}: {usage[t][1].rstrip('.')}." for t in tools]
    return f"{_HEADER}\n\nTools:\n" + "\n".join(lines) + f"\n\n{_FOOTER}"


def user_prompt(example: Example) -> str:
    if example.task == MATH:
        return f"Solve the problem. Put the final number or expression in the answer tag.\n\n" \
               f"Problem: {example.question}"
    return f"Answer the question with a short phrase.\n\nQuestion: {example.question}"


def to_messages(example: Example, tools: Sequence[str] = ("python", "search"),
                style: str = "full", descriptions: Mapping[str, str] = {}) -> list[dict]:
    """Chat messages (system + user) for `example`, ready for `tokenizer.encode_chat`."""
    return [{"role": "system", "content": system_prompt(tools, style, descriptions)},
            {"role": "user", "content": user_prompt(example)}]
