"""Example records for the paper's two data shapes.

- math (AIME, MATH, GSM8K style): a question and one gold answer string.
- qa (HotpotQA, 2WikiMultihopQA, MuSiQue style): a question, every accepted answer string
  (aliases included), and optionally the supporting passages.

Records travel through grain/tfds as plain dicts (`to_dict`); `from_dict` restores them and
accepts the bytes that tfds hands back for text features.
"""
from __future__ import annotations

import dataclasses
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


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy scalar
        return _text(v.item())
    return str(v)


def from_dict(d: Mapping[str, Any]) -> Example:
    """The inverse of `to_dict`, also for tfds/grain records (bytes, numpy arrays)."""
    task = _text(d.get("task", MATH if "answer" in d else QA))
    if task == MATH:
        return MathExample(id=_text(d["id"]), question=_text(d["question"]),
                           answer=_text(d["answer"]), source=_text(d.get("source", "")))
    if task == QA:
        return QAExample(id=_text(d["id"]), question=_text(d["question"]),
                         answers=tuple(_text(a) for a in d["answers"]),
                         supporting_passages=tuple(_text(p) for p in
                                                   d.get("supporting_passages", ())),
                         source=_text(d.get("source", "")))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
