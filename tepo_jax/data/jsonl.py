"""JSONL readers for the math and multi-hop QA shapes, one field mapping per known layout.

Every error names the file and the 1-based line: `data.jsonl:7: missing field 'answer'`.
Layouts (the `layout=` argument):

  math      {"question", "answer"}                       (our own files, synthetic)
  gsm8k     {"question", "answer": "...#### 42"}          -> answer "42"
  math500   {"problem", "answer"} or {"problem", "solution"} -> last \\boxed{...}
  aime      {"problem"|"Problem", "answer"|"Answer"}      (answer may be an int)
  qa        {"question", "answers": [...]} or {"answer": "..."}, optional supporting_passages
  hotpotqa  {"question", "answer", "context": [[title, [sents]]], "supporting_facts"}
  2wiki     same fields as hotpotqa
  musique   {"question", "answer", "answer_aliases", "paragraphs": [{title, paragraph_text,
             is_supporting}]}
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator

from tepo_jax import paths
from tepo_jax.data.records import (Example, FieldError, MathExample, QAExample, answer_list,
                                    from_dict, question_text, text_list, text_value)


class JsonlError(ValueError):
    """A malformed line in a JSONL file; the message starts with `path:line:`."""


class _FieldError(Exception):
    pass


def _missing(names: tuple[str, ...]) -> _FieldError:
    return _FieldError(f"missing field {names[0]!r}" if len(names) == 1 else
                       f"missing field: one of {', '.join(repr(n) for n in names)}")


def _get(row: dict, *names: str) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    raise _missing(names)


def _row_id(row: dict, source: str, line: int) -> str:
    for k in ("id", "_id", "ID", "unique_id"):
        if row.get(k) not in (None, ""):
            return str(row[k])
    return f"{source}-{line}"


def _gsm8k_answer(text: str) -> str:
    if "####" not in text:
        raise _FieldError("GSM8K answer has no '#### <number>' line")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def _question(row, *names: str) -> str:
    for n in names:
        if row.get(n) is not None:
            return question_text(row[n], n)
    raise _missing(names)


def _answer(row, *names: str) -> str:
    for n in names:
        if row.get(n) is not None:
            return text_value(row[n], n, numbers=True)
    raise _missing(names)


def _math(row, sid, source):
    return MathExample(sid, _question(row, "question", "problem"), _answer(row, "answer"),
                       str(row.get("source") or source))


def _gsm8k(row, sid, source):
    return MathExample(sid, _question(row, "question"), _gsm8k_answer(_answer(row, "answer")),
                       source)


def _math500(row, sid, source):
    if row.get("answer") is not None:
        answer = _answer(row, "answer")
    else:
        answer = last_boxed(text_value(_get(row, "solution"), "solution"))
        if answer is None:
            raise _FieldError("solution has no \\boxed{...} answer")
    return MathExample(sid, _question(row, "problem", "question"), answer, source)


def _aime(row, sid, source):
    return MathExample(sid, _question(row, "problem", "Problem", "question"),
                       _answer(row, "answer", "Answer").strip(), source)


def _answers(row) -> list[str]:
    if row.get("answers") is not None:
        return list(answer_list(row["answers"]))   # the check in-memory rows get too
    return [_answer(row, "answers", "answer")]


def _qa(row, sid, source):
    return QAExample(sid, _question(row, "question"), tuple(_answers(row)),
                     text_list(row.get("supporting_passages") or [], "supporting_passages"),
                     str(row.get("source") or source))


def _hotpot(row, sid, source):
    titles = {t for t, *_ in row.get("supporting_facts") or ()}
    passages = tuple(f"{title}: {''.join(sents)}" for title, sents in row.get("context") or ()
                     if title in titles)
    return QAExample(sid, _question(row, "question"), (_answer(row, "answer"),), passages,
                     source)


def _musique(row, sid, source):
    answer = _answer(row, "answer")
    answers = [answer] + [a for a in text_list(row.get("answer_aliases") or [], "answer_aliases")
                          if a != answer]
    passages = tuple(f"{p.get('title', '')}: {p['paragraph_text']}"
                     for p in row.get("paragraphs") or () if p.get("is_supporting"))
    return QAExample(sid, _question(row, "question"), tuple(answers), passages, source)


LAYOUTS: dict[str, Callable[[dict, str, str], Example]] = {
    "math": _math, "gsm8k": _gsm8k, "math500": _math500, "aime": _aime,
    "qa": _qa, "hotpotqa": _hotpot, "2wiki": _hotpot, "musique": _musique,
}


def utf8_error(path: str, data: bytes, e: UnicodeDecodeError, first_line: int = 1) -> JsonlError:
    """'path:LINE: not valid UTF-8 (byte 0x.. at column N)' for a decode error in `data`
    (whose first line is `first_line`); the column counts bytes from 1."""
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return JsonlError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                      f"{column}); save the file as UTF-8")


def decode_utf8(path: str, data: bytes, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(path, data, e, first_line) from None


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON, bytes that are not UTF-8 and
    a file with no records at all are JsonlErrors."""
    path = os.fspath(path)
    if not paths.as_path(path).is_file():
        raise JsonlError(f"{path}: no such file")
    records = 0
    with paths.as_path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = decode_utf8(path, raw, line_no)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(f"{path}:{line_no}: invalid JSON ({e.msg} at column "
                                 f"{e.colno})") from None
            if not isinstance(row, dict):
                raise JsonlError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            records += 1
            yield line_no, row
    if not records:
        raise JsonlError(f"{path}: no records")


def field_message(e: Exception) -> str:
    """A reader's text for a bad field: "field 'answers': expected a list of strings, got str"."""
    if isinstance(e, FieldError) and e.field:
        return f"field {e.field!r}: {e.problem}"
    return str(e)


def read_jsonl(path: str | os.PathLike, layout: str = "math",
               source: str | None = None) -> list[Example]:
    """Reads `path` with the field mapping `layout` (see module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    source = source if source is not None else layout
    out = []
    for line_no, row in iter_json_lines(path):
        try:
            out.append(LAYOUTS[layout](row, _row_id(row, source, line_no), source))
        except (_FieldError, ValueError, TypeError, KeyError) as e:
            msg = field_message(e) if isinstance(e, (_FieldError, ValueError)) else \
                f"bad field ({type(e).__name__}: {e})"
            raise JsonlError(f"{os.fspath(path)}:{line_no}: {msg} (layout {layout!r})") from None
    return out


def read_records(path: str | os.PathLike) -> list[Example]:
    """Reads a file written by `write_jsonl` (each line a `to_dict` record)."""
    out = []
    for line_no, row in iter_json_lines(path):
        try:
            out.append(from_dict(row))
        except (KeyError, ValueError, TypeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else field_message(e)
            raise JsonlError(f"{os.fspath(path)}:{line_no}: {what}") from None
    return out


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Writes records (dataclasses with `to_dict`, or dicts), one JSON object per line."""
    with paths.as_path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict() if hasattr(r, "to_dict") else r,
                               ensure_ascii=False) + "\n")


def read_corpus(path: str | os.PathLike) -> list[dict]:
    """A search corpus: lines of {"id", "title", "text"}."""
    out = []
    for line_no, row in iter_json_lines(path):
        missing = [k for k in ("id", "title", "text") if k not in row]
        if missing:
            raise JsonlError(f"{os.fspath(path)}:{line_no}: missing field {missing[0]!r}")
        out.append({"id": str(row["id"]), "title": str(row["title"]), "text": str(row["text"])})
    return out
