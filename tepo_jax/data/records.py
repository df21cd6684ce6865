"""Example records for the paper's two data shapes.

- math (AIME, MATH, GSM8K style): a question and one gold answer string.
- qa (HotpotQA, 2WikiMultihopQA, MuSiQue style): a question, every accepted answer string
  (aliases included), and optionally the supporting passages.

Records travel through grain/tfds as plain dicts (`to_dict`); `from_dict` restores them and
accepts the bytes that tfds hands back for text features.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Union

MATH, QA = "math", "qa"
TASKS = (MATH, QA)


@dataclasses.dataclass(frozen=True)
class MathExample:
    id: str
    question: str
    answer: str
    source: str = ""
    task: str = MATH

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def gold(self) -> list[str]:
        return [self.answer]


@dataclasses.dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]
    supporting_passages: tuple[str, ...] = ()
    source: str = ""
    task: str = QA

    def __post_init__(self):
        # lists in, tuples stored: records are hashable and immutable
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "supporting_passages", tuple(self.supporting_passages))
        if not self.answers:
            raise ValueError(f"QA example {self.id!r} has no answers")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["answers"], d["supporting_passages"] = list(self.answers), list(self.supporting_passages)
        return d

    @property
    def gold(self) -> list[str]:
        return list(self.answers)


Example = Union[MathExample, QAExample]


class FieldError(ValueError):
    """A record field that is missing or has the wrong shape. `field` names it (None: the
    record as a whole), `problem` says what is wrong; str() is 'field: problem'. Every reader
    (JSONL lines, in-memory rows, tfds records) raises it through the checks below and adds
    where the record came from."""

    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}" if field else problem)


# Fields `from_dict` reads (plus "demonstration", which `tepo_jax.plugins` reads from rows).
KNOWN_FIELDS = ("id", "task", "question", "answer", "answers", "supporting_passages", "source",
                "demonstration")
TASK_FIELD = {MATH: "answer", QA: "answers"}


def _type_name(v: Any) -> str:
    return "None" if v is None else type(v).__name__


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy scalar / 0-d array
        return v.item()
    return v


def text_value(v: Any, field: str, numbers: bool = False) -> str:
    """`v` as text: a str, UTF-8 bytes (tfds), or with `numbers` an int or float (an AIME answer,
    an integer id); anything else (None, a list, a bool) is a FieldError naming `field`."""
    v = _scalar(v)
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FieldError(field, f"not valid UTF-8 (byte 0x{v[e.start]:02x} at {e.start})") from None
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise FieldError(field, f"expected a string, got {_type_name(v)}")


def text_list(v: Any, field: str) -> tuple[str, ...]:
    """A list (tuple, 1-d array) of strings as a tuple of str. A bare string is refused: read
    as a list it would be its characters."""
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) and \
            not (hasattr(v, "tolist") and getattr(v, "ndim", 0) == 1):
        raise FieldError(field, f"expected a list of strings, got {_type_name(v)}")
    items = v.tolist() if hasattr(v, "tolist") else v
    for j, item in enumerate(items):
        if not isinstance(item, (str, bytes)):
            raise FieldError(field, f"expected a list of strings, got {_type_name(item)} at [{j}]")
    return tuple(text_value(item, f"{field}[{j}]") for j, item in enumerate(items))


def answer_list(v: Any, field: str = "answers") -> tuple[str, ...]:
    """A QA record's accepted answers: a non-empty list of strings (`text_list`)."""
    answers = text_list(v, field)
    if not answers:
        raise FieldError(field, "empty list; give at least one accepted answer")
    return answers


def missing_field(field: str, row: Mapping, task: str | None = None) -> FieldError:
    """'missing field F' (for `task`), with a "did you mean" for the row's unknown keys."""
    where = f" (task {task!r})" if task else ""
    return FieldError(None, f"missing field {field!r}{where}{unknown_keys_hint(row)}")


def unknown_keys_hint(row: Mapping) -> str:
    unknown = [str(k) for k in row if k not in KNOWN_FIELDS]
    if not unknown:
        return ""
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, KNOWN_FIELDS, n=1, cutoff=0.6)
        hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    return "; unknown field" + ("s " if len(hints) > 1 else " ") + ", ".join(hints)


def task_of(d: Mapping[str, Any]) -> str:
    """The record's task: its "task" field, else math for "answer" and QA for "answers"."""
    if d.get("task") is not None:
        task = text_value(d["task"], "task")
        if task not in TASKS:
            raise FieldError("task", f"unknown task {task!r}; expected one of {TASKS}")
        return task
    if "answer" in d and "answers" in d:
        raise FieldError(None, "has both 'answer' (math) and 'answers' (QA); keep one, or say "
                               "which with 'task'")
    if "answer" in d or "answers" in d:
        return MATH if "answer" in d else QA
    raise FieldError(None, "missing field 'answer' (math) or 'answers' (QA)" + unknown_keys_hint(d))


def _need(d: Mapping[str, Any], field: str, task: str | None = None) -> Any:
    if field not in d:
        raise missing_field(field, d, task)
    return d[field]


def question_text(v: Any, field: str = "question") -> str:
    q = text_value(v, field)
    if not q.strip():
        raise FieldError(field, "empty")
    return q


def from_dict(d: Mapping[str, Any]) -> Example:
    """The inverse of `to_dict`, also for tfds/grain records (bytes, numpy arrays) and rows a
    user writes; a missing or ill-typed field is a FieldError naming it."""
    task = task_of(d)
    common = dict(id=text_value(_need(d, "id"), "id", numbers=True),
                  question=question_text(_need(d, "question", task)),
                  source=text_value(d.get("source") or "", "source"))
    if task == MATH:
        return MathExample(answer=text_value(_need(d, "answer", task), "answer", numbers=True),
                           **common)
    answers = answer_list(_need(d, "answers", task))
    passages = d.get("supporting_passages")
    return QAExample(answers=answers, supporting_passages=() if passages is None else
                     text_list(passages, "supporting_passages"), **common)
