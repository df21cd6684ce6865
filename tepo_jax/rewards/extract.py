"""Answer extraction: the last <answer>…</answer> of a model turn, and \\boxed{…} inside it."""
from __future__ import annotations

import re

# The content may not hold another <answer>: in "<answer>draft <answer>Paris</answer>" the
# closed answer is "Paris", not "draft <answer>Paris".
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_BOXED = "\\boxed"


def extract_answer_tag(text: str) -> str | None:
    """Content of the LAST closed <answer>…</answer>, stripped; None when there is none.
    The last one wins because models sometimes draft an answer and then correct it."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _balanced_brace_content(text: str, open_pos: int) -> str | None:
    """Content between text[open_pos] == '{' and its matching '}', nested braces included."""
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
    return None  # unbalanced: no box content


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{…} in text (nested braces handled); None when absent."""
    start = text.rfind(_BOXED + "{")
    while start != -1:
        content = _balanced_brace_content(text, start + len(_BOXED))
        if content is not None:
            return content.strip()
        start = text.rfind(_BOXED + "{", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The answer string a reward compares with the gold: the last <answer> content, reduced to
    its last \\boxed{} when it has one. None (malformed) when there is no tag or it is empty."""
    content = extract_answer_tag(text)
    if content is None:
        return None
    boxed = extract_boxed(content)
    answer = boxed if boxed is not None else content
    return answer or None
