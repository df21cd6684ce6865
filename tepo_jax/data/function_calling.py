"""Function-calling data: the record, JSONL readers (BFCL / API-Bank / ToolRL 'rlla'), and a
synthetic task family of fictional APIs that ships with the project.

Record (`FunctionCallingExample`): the conversation so far (chat messages), the functions the
model may call (OpenAI-style tool entries, rendered by the chat template via `tools=`), and the
gold calls [{name, arguments}] the next assistant turn should make (several for parallel
questions). `gold` is the gold calls as one JSON string, the shape `Trajectory.gold` and the
'function_calling' reward take.

Readers (`read_function_calling(path, layout)`; errors name `file:line`):
  function_calling  ours: {"id", "messages", "tools", "gold_calls"} (what `to_dict` writes)
  bfcl       {"id", "question": [[{role, content}, ...]] | [{...}], "function": [{name,
             description, parameters}]} + gold from the row's "ground_truth" or from a
             possible-answer file (`answers=`): {"id", "ground_truth": [{fname: {arg:
             [acceptable values]}}]}. BFCL's schema types (dict, float, tuple, any) become JSON
             Schema types; the gold value of an argument is its first acceptable value, and
             an argument whose first acceptable value is "" (optional) is left out.
  apibank    the processed API-Bank files ToolRL/ResT evaluate on: {"system", "user",
             "answer": {name, parameters} | [...]} (tools are described inside "system").
  rlla       ToolRL's mix, raw {"system"|"instruction", "user"|"input"|"question",
             "output"|"answer"} or verl-processed {"prompt": [messages], "reward_model":
             {"ground_truth"}}; the gold is ToolRL's `<tool_call>\\n{json per line}\\n
             </tool_call>` string (a gold without <tool_call> means: no call).
A file whose first non-blank character is '[' is read as one JSON array (items numbered from 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from tepo_jax import paths
from tepo_jax.data.jsonl import JsonlError, decode_utf8, iter_json_lines
from tepo_jax.tools.functions import FunctionTool, tools_for_prompt
from tepo_jax.tools.json_format import normalize_calls

FUNCTION_CALLING = "function_calling"


@dataclasses.dataclass(frozen=True)
class FunctionCallingExample:
    id: str
    messages: tuple
    tools: tuple
    gold_calls: tuple
    source: str = ""
    task: str = FUNCTION_CALLING

    def __post_init__(self):
        for name in ("messages", "tools", "gold_calls"):
            object.__setattr__(self, name, tuple(dict(x) for x in getattr(self, name)))
        if not any(m.get("role") == "user" for m in self.messages):
            raise ValueError(f"function-calling example {self.id!r} has no user message")
        for c in self.gold_calls:
            if set(c) != {"name", "arguments"} or not isinstance(c["arguments"], dict):
                raise ValueError(f"gold call {c!r} must be {{name, arguments: object}}")

    @property
    def gold(self) -> str:
        return json.dumps(list(self.gold_calls), ensure_ascii=False)

    @property
    def question(self) -> str:
        return [m for m in self.messages if m.get("role") == "user"][-1]["content"]

    def to_dict(self) -> dict:
        """Flat record for grain/tfds: the nested fields as JSON strings."""
        return {"id": self.id, "messages": json.dumps(list(self.messages), ensure_ascii=False),
                "tools": json.dumps(list(self.tools), ensure_ascii=False), "gold_calls": self.gold,
                "source": self.source, "task": self.task}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FunctionCallingExample":
        def text(v):
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)

        def field(name):
            v = d[name]
            return json.loads(text(v)) if isinstance(v, (str, bytes)) else v
        return cls(id=text(d["id"]), messages=field("messages"), tools=field("tools"),
                   gold_calls=normalize_calls(field("gold_calls")),
                   source=text(d.get("source", "")))


# ------------------------------------------------------------------------------ gold calls

# ------------------------------------------------------------------------------ readers

class _RowError(Exception):
    pass


def _need(row: Mapping, *names: str) -> Any:
    for n in names:
        if row.get(n) is not None:
            return row[n]
    raise _RowError(f"missing field {names[0]!r}" if len(names) == 1 else
                    "missing field: one of " + ", ".join(repr(n) for n in names))


_BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "int": "integer",
               "bool": "boolean", "str": "string", "list": "array"}


def bfcl_schema(schema: Any) -> Any:
    """BFCL's parameter schema with its non-standard types mapped to JSON Schema."""
    if isinstance(schema, list):
        return [bfcl_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "type" and isinstance(v, str):
            if v == "any":
                continue
            out[k] = _BFCL_TYPES.get(v, v)
        elif k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: bfcl_schema(s) for name, s in v.items()}
        else:
            out[k] = bfcl_schema(v)
    return out


def _bfcl_gold(ground_truth: Sequence[Mapping]) -> list[dict]:
    calls = []
    for entry in ground_truth:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise _RowError(f"ground_truth entry must be {{function: {{arg: [values]}}}}, "
                            f"got {entry!r}")
        (name, args), = entry.items()
        gold_args = {}
        for arg, acceptable in args.items():
            values = acceptable if isinstance(acceptable, list) else [acceptable]
            if values and values[0] != "":
                gold_args[arg] = values[0]
        calls.append({"name": name, "arguments": gold_args})
    return calls


def _bfcl(row, sid, source, answers):
    question = _need(row, "question")
    if question and isinstance(question[0], list):
        question = question[0]                  # BFCL v3: one list of turns per row
    functions = _need(row, "function", "functions")
    functions = functions if isinstance(functions, list) else [functions]
    tools = [{"type": "function", "function": {
        "name": f["name"], "description": f.get("description", ""),
        "parameters": bfcl_schema(f.get("parameters", {"type": "dict", "properties": {}}))}}
        for f in functions]
    gt = row.get("ground_truth", answers.get(sid) if answers else None)
    if gt is None:
        raise _RowError(f"no ground truth for id {sid!r} (row or answers file)")
    return FunctionCallingExample(sid, question, tools, _bfcl_gold(gt), source)


def _apibank(row, sid, source, _answers):
    answer = _need(row, "answer")
    messages = [{"role": "system", "content": str(_need(row, "system"))},
                {"role": "user", "content": str(_need(row, "user"))}]
    return FunctionCallingExample(sid, messages, row.get("tools", []),
                                  normalize_calls(answer if isinstance(answer, list) else [answer]),
                                  source)


def _rlla(row, sid, source, _answers):
    if "prompt" in row:
        messages = list(row["prompt"])
        gold = _need(row.get("reward_model") or {}, "ground_truth")
    else:
        system = row.get("system", row.get("instruction"))
        messages = ([{"role": "system", "content": str(system)}] if system else []) + \
            [{"role": "user", "content": str(_need(row, "user", "input", "question"))}]
        gold = _need(row, "output", "answer")
    calls = normalize_calls(gold) if "<tool_call>" in str(gold) or not isinstance(gold, str) else []
    return FunctionCallingExample(sid, messages, row.get("tools", []), calls, source)


def _ours(row, sid, source, _answers):
    return FunctionCallingExample(sid, _need(row, "messages"), row.get("tools", []),
                                  normalize_calls(_need(row, "gold_calls")),
                                  row.get("source") or source)


LAYOUTS: dict[str, Callable] = {"function_calling": _ours, "bfcl": _bfcl, "apibank": _apibank,
                                "rlla": _rlla}


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line or item number, object): JSONL, or one JSON array when the file starts with '['."""
    path = os.fspath(path)
    if not paths.as_path(path).is_file():
        raise JsonlError(f"{path}: no such file")
    with paths.as_path(path).open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from iter_json_lines(path)
        return
    try:
        items = json.loads(decode_utf8(path, paths.as_path(path).read_bytes()))
    except json.JSONDecodeError as e:
        raise JsonlError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list) or not items:
        raise JsonlError(f"{path}: no records (an empty JSON array)")
    for i, row in enumerate(items, start=1):
        if not isinstance(row, dict):
            raise JsonlError(f"{path}:item {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def read_bfcl_answers(path: str | os.PathLike) -> dict[str, list]:
    """id -> ground_truth from a BFCL possible-answer file."""
    out = {}
    for line_no, row in iter_rows(path):
        if "id" not in row or "ground_truth" not in row:
            raise JsonlError(f"{os.fspath(path)}:{line_no}: expected 'id' and 'ground_truth'")
        out[str(row["id"])] = row["ground_truth"]
    return out


def read_function_calling(path: str | os.PathLike, layout: str = "function_calling",
                          source: Optional[str] = None,
                          answers: str | os.PathLike | None = None
                          ) -> list[FunctionCallingExample]:
    """Examples from `path` in `layout` (see module docstring); `answers` is BFCL's
    possible-answer file when the rows carry no ground truth."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    source = source if source is not None else layout
    gold = read_bfcl_answers(answers) if answers else None
    out = []
    for line_no, row in iter_rows(path):
        sid = str(row.get("id") or row.get("_id") or f"{source}-{line_no}")
        try:
            out.append(LAYOUTS[layout](row, sid, source, gold))
        except (_RowError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            msg = str(e) if isinstance(e, (_RowError, ValueError)) else \
                f"bad field ({type(e).__name__}: {e})"
            raise JsonlError(f"{os.fspath(path)}:{line_no}: {msg} (layout {layout!r})") from None
    return out


def write_function_calling(path: str | os.PathLike, examples: Sequence[FunctionCallingExample]
                           ) -> None:
    with paths.as_path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            row = {"id": ex.id, "messages": list(ex.messages), "tools": list(ex.tools),
                   "gold_calls": list(ex.gold_calls), "source": ex.source}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------- synthetic task family

_CITIES = ("Arvenholm", "Brisca", "Caldera Bay", "Dunmere", "Eskaton", "Fallow Reach",
           "Glimmerport", "Hollowell", "Isenbrook", "Juniper Flats")
_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "ZRK")     # ZRK: the fictional zorkmid
_RATES = {"USD": 1.0, "EUR": 0.9, "GBP": 0.8, "JPY": 150.0, "ZRK": 7.5}   # units per USD
_SYMBOLS = ("ZORB", "KLTX", "MERA", "QNTM", "VYLO")
_CABINS = ("economy", "business", "first")


def _stable(*parts: Any) -> int:
    """A small deterministic integer from the arguments (no Python hash randomisation)."""
    h = 0
    for ch in json.dumps(parts):
        h = (h * 131 + ord(ch)) % 1_000_003
    return h


def _weather(city: str, unit: str = "celsius") -> dict:
    c = _stable("weather", city) % 35 - 5
    temp = c if unit == "celsius" else round(c * 9 / 5 + 32)
    return {"city": city, "temperature": temp, "unit": unit,
            "conditions": ("sunny", "cloudy", "rain", "snow")[_stable("sky", city) % 4]}


def _convert(amount: float, from_currency: str, to_currency: str) -> dict:
    value = amount / _RATES[from_currency] * _RATES[to_currency]
    return {"amount": amount, "from": from_currency, "to": to_currency,
            "result": round(value, 2)}


def _book(origin: str, destination: str, date: str, passengers: int = 1,
          cabin: str = "economy") -> dict:
    if origin == destination:
        raise ValueError("origin and destination must differ")
    return {"confirmation": f"FL{_stable(origin, destination, date, passengers, cabin):06d}",
            "origin": origin, "destination": destination, "date": date,
            "passengers": passengers, "cabin": cabin}


def _stock(symbol: str) -> dict:
    return {"symbol": symbol, "price": round(10 + _stable("px", symbol) % 9000 / 10, 2)}


def _reminder(text: str, time: str) -> dict:
    return {"status": "scheduled", "text": text, "time": time}


def synthetic_functions() -> list[FunctionTool]:
    """The fictional APIs of the synthetic task, with schemas and implementations."""
    s = {"type": "string"}
    return [
        FunctionTool("get_weather", "Current weather in a city.", {
            "type": "object", "properties": {
                "city": {**s, "enum": list(_CITIES)},
                "unit": {**s, "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": False}, _weather),
        FunctionTool("convert_currency", "Convert an amount between currencies.", {
            "type": "object", "properties": {
                "amount": {"type": "number", "exclusiveMinimum": 0},
                "from_currency": {**s, "enum": list(_CURRENCIES)},
                "to_currency": {**s, "enum": list(_CURRENCIES)}},
            "required": ["amount", "from_currency", "to_currency"],
            "additionalProperties": False}, _convert),
        FunctionTool("book_flight", "Book a flight between two cities.", {
            "type": "object", "properties": {
                "origin": {**s, "enum": list(_CITIES)},
                "destination": {**s, "enum": list(_CITIES)},
                "date": {**s, "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                "cabin": {**s, "enum": list(_CABINS)}},
            "required": ["origin", "destination", "date"], "additionalProperties": False},
            _book),
        FunctionTool("get_stock_price", "Latest price of a stock by ticker symbol.", {
            "type": "object", "properties": {"symbol": {**s, "pattern": "^[A-Z]{1,5}$"}},
            "required": ["symbol"], "additionalProperties": False}, _stock),
        FunctionTool("set_reminder", "Schedule a reminder for today at a 24-hour time.", {
            "type": "object", "properties": {
                "text": {**s, "minLength": 1},
                "time": {**s, "pattern": r"^([01]\d|2[0-3]):[0-5]\d$"}},
            "required": ["text", "time"], "additionalProperties": False}, _reminder),
    ]


def _q_weather(r):
    city, unit = r.choice(_CITIES), r.choice(("celsius", "fahrenheit", None))
    args = {"city": city} if unit is None else {"city": city, "unit": unit}
    ask = f"What's the weather like in {city}" + (f", in {unit}?" if unit else "?")
    return ask, [{"name": "get_weather", "arguments": args}]


def _q_convert(r):
    a, b = r.sample(_CURRENCIES, 2)
    amount = r.choice((5, 20, 75, 120, 250, 1000, 12.5))
    return (f"How much is {amount} {a} in {b}?",
            [{"name": "convert_currency",
              "arguments": {"amount": amount, "from_currency": a, "to_currency": b}}])


def _q_flight(r):
    o, d = r.sample(_CITIES, 2)
    date = f"2031-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    n, cabin = r.randint(1, 4), r.choice(_CABINS)
    return (f"Book {'an' if cabin[0] in 'aeiou' else 'a'} {cabin} flight from {o} to {d} on {date} for {n} "
            f"passenger{'s' if n > 1 else ''}.",
            [{"name": "book_flight", "arguments": {"origin": o, "destination": d, "date": date,
                                                   "passengers": n, "cabin": cabin}}])


def _q_stock(r):
    sym = r.choice(_SYMBOLS)
    return (f"What is {sym} trading at?",
            [{"name": "get_stock_price", "arguments": {"symbol": sym}}])


def _q_reminder(r):
    what = r.choice(("call the harbour master", "water the ferns", "renew the zorkmid permit"))
    t = f"{r.randint(6, 22):02d}:{r.choice((0, 15, 30, 45)):02d}"
    return (f"Remind me to {what} at {t}.",
            [{"name": "set_reminder", "arguments": {"text": what, "time": t}}])


_SINGLE = (_q_weather, _q_convert, _q_flight, _q_stock, _q_reminder)


def _q_two_cities(r):
    a, b = r.sample(_CITIES, 2)
    return (f"Compare the weather in {a} and {b}.",
            [{"name": "get_weather", "arguments": {"city": a}},
             {"name": "get_weather", "arguments": {"city": b}}])


def _q_pair(r):
    first, second = r.sample(_SINGLE, 2)      # two different functions
    (qa, ga), (qb, gb) = first(r), second(r)
    return f"Two things. First: {qa} Second: {qb}", ga + gb


_MULTI = (_q_two_cities, _q_pair)
SYSTEM_PROMPT = ("You are a helpful assistant with access to functions. Call every function "
                 "the request needs (several calls in one turn are fine), then answer from "
                 "their results.")


def make_function_calling(n: int, seed: int, multi_fraction: float = 0.3,
                          id_prefix: str = "fc") -> list[FunctionCallingExample]:
    """`n` distinct questions over `synthetic_functions()` with known gold calls; about
    `multi_fraction` of them need two calls. Deterministic in (n, seed, multi_fraction)."""
    rng, seen, out = random.Random(f"function-calling-{seed}"), set(), []
    tools = tuple(tools_for_prompt(synthetic_functions()))
    while len(out) < n:
        make = rng.choice(_MULTI) if rng.random() < multi_fraction else rng.choice(_SINGLE)
        question, gold = make(rng)
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question}]
        out.append(FunctionCallingExample(f"{id_prefix}-{seed}-{len(out)}", messages, tools,
                                          gold, "synthetic"))
    return out
