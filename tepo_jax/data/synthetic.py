"""Synthetic tool-use tasks that ship with the project: deterministic from a seed, no download.

1. Arithmetic (task 'math') the model can only get right with the python tool: products,
   modular products, powers mod m and mixed expressions with 6- and 7-digit operands. The
   question always carries the expression in backticks, in Python syntax.
2. Two-hop questions (task 'qa') over a generated fictional knowledge base of people, cities
   and companies ("In which city was the founder of Zorblax Corp born?"), answerable only by
   searching its corpus: one fact per passage ({"id", "title", "text"}, title = the fact's
   subject) plus distractor passages. `supporting_passages` holds the two gold passages in
   hop order.

`reference_solution(example)` gives the ideal trajectory (model turns and the tool results
they should get) for the SFT data generator.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

from tepo_jax.data.jsonl import write_jsonl
from tepo_jax.data.records import MathExample, QAExample

# ------------------------------------------------------------------ arithmetic

_ARITH_FORMS = (
    lambda r: f"{r.randint(100_000, 9_999_999)} * {r.randint(100_000, 9_999_999)}",
    lambda r: f"({r.randint(100_000, 999_999)} * {r.randint(100_000, 999_999)}) % "
              f"{r.randint(1_000, 99_999)}",
    lambda r: f"pow({r.randint(100_000, 999_999)}, {r.randint(11, 99)}, "
              f"{r.randint(100_000, 999_999)})",
    lambda r: f"({r.randint(100_000, 999_999)} + {r.randint(100_000, 999_999)}) * "
              f"{r.randint(1_000, 99_999)} - {r.randint(100_000, 9_999_999)}",
    lambda r: f"{r.randint(10**9, 10**10)} // {r.randint(1_000, 99_999)}",
)
_EXPR_RE = re.compile(r"`([^`]+)`")
_SAFE_EXPR = re.compile(r"^[0-9+\-*/%(), pow]+$")


def evaluate_expression(expr: str) -> int:
    """Exact value of one of our generated expressions (digits, + - * // %, pow)."""
    if not _SAFE_EXPR.fullmatch(expr):
        raise ValueError(f"not a generated arithmetic expression: {expr!r}")
    return int(eval(expr, {"__builtins__": {}}, {"pow": pow}))  # noqa: S307 (checked above)


def make_arithmetic(n: int, seed: int, id_prefix: str = "arith") -> list[MathExample]:
    """`n` distinct arithmetic questions with exact integer answers."""
    rng, out, seen = random.Random(f"arith-{seed}"), [], set()
    while len(out) < n:
        expr = _ARITH_FORMS[rng.randrange(len(_ARITH_FORMS))](rng)
        if expr in seen:
            continue
        seen.add(expr)
        out.append(MathExample(id=f"{id_prefix}-{seed}-{len(out)}",
                               question=f"Compute the exact value of `{expr}`.",
                               answer=str(evaluate_expression(expr)), source="synthetic"))
    return out


# ------------------------------------------------------------------ knowledge base

_SYL = ("ba", "cor", "dun", "el", "fa", "gri", "hal", "iv", "jo", "ka", "lor", "mi", "nav",
        "or", "pel", "qua", "ros", "sa", "tov", "ul", "ven", "wis", "xan", "yor", "zor", "bel",
        "dra", "fen", "gal", "tis", "mar", "nel")
_CITY_SUFFIX = ("port", "ford", "heim", "burg", "dale", "mouth", " Falls", "ton", "vik")
_CO_SUFFIX = ("Corp", "Industries", "Labs", "Works", "Group", "Systems", "Dynamics")
_PRODUCTS = ("glass lenses", "river barges", "clockwork toys", "salt crackers", "wool coats",
             "signal lamps", "paper kites", "copper kettles", "rope bridges", "ink pens")

# (relation, subject kind, object kind, passage template, search phrase)
_RELATIONS = {
    "founder": ("company", "person", "{s} was founded by {o}.", "founder of {s}"),
    "born_in": ("person", "city", "{s} was born in the city of {o}.", "{s} born in"),
    "employer": ("person", "company", "{s} works for {o}.", "{s} works for"),
    "hq": ("company", "city", "{s} is headquartered in {o}.", "{s} headquarters"),
    "mayor": ("city", "person", "The mayor of {s} is {o}.", "mayor of {s}"),
}
# two-hop templates: (first relation, second relation, question)
_TEMPLATES = (
    ("founder", "born_in", "In which city was the founder of {e} born?"),
    ("employer", "hq", "In which city is the company that {e} works for headquartered?"),
    ("mayor", "employer", "Which company does the mayor of {e} work for?"),
    ("hq", "mayor", "Who is the mayor of the city where {e} is headquartered?"),
    ("founder", "employer", "Which company does the founder of {e} work for?"),
)


def _word(rng, k):
    return "".join(rng.choice(_SYL) for _ in range(k)).capitalize()


def _names(rng, n, make):
    out, seen = [], set()
    while len(out) < n:
        name = make(rng)
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _knowledge_base(n: int, rng: random.Random):
    """Entities and facts: every company has a founder and hq, every person a birthplace and
    employer, every city a mayor."""
    people = _names(rng, 3 * n + 10, lambda r: f"{_word(r, 2)} {_word(r, r.choice((2, 3)))}")
    cities = _names(rng, n + 5, lambda r: _word(r, 2) + r.choice(_CITY_SUFFIX))
    companies = _names(rng, 2 * n + 5, lambda r: f"{_word(r, r.choice((2, 3)))} "
                                                 f"{r.choice(_CO_SUFFIX)}")
    kinds = {"person": people, "city": cities, "company": companies}
    facts = {}
    for rel, (skind, okind, _, _) in _RELATIONS.items():
        for s in kinds[skind]:
            facts[(rel, s)] = rng.choice(kinds[okind])
    return kinds, facts


def _fact_passage(rel, s, o):
    return _RELATIONS[rel][2].format(s=s, o=o)


def make_multihop(n: int, seed: int, id_prefix: str = "mh",
                  n_distractors: int | None = None) -> tuple[list[QAExample], list[dict]]:
    """`n` two-hop questions and their corpus (fact passages + distractors), shuffled."""
    rng = random.Random(f"multihop-{seed}")
    kinds, facts = _knowledge_base(n, rng)
    corpus = [{"title": s, "text": _fact_passage(rel, s, o)} for (rel, s), o in facts.items()]
    for _ in range(n if n_distractors is None else n_distractors):
        c = rng.choice(kinds["company"])
        corpus.append({"title": c, "text": f"{c} is known for its {rng.choice(_PRODUCTS)}, "
                                           f"sold in {rng.choice(kinds['city'])}."})
    rng.shuffle(corpus)
    corpus = [{"id": f"p{i}", **p} for i, p in enumerate(corpus)]
    starts = [(t, e) for t in range(len(_TEMPLATES))
              for e in kinds[_RELATIONS[_TEMPLATES[t][0]][0]]]
    examples = []
    for i, (t, e) in enumerate(rng.sample(starts, n)):
        r1, r2, q = _TEMPLATES[t]
        bridge = facts[(r1, e)]
        answer = facts[(r2, bridge)]
        examples.append(QAExample(
            id=f"{id_prefix}-{seed}-{i}", question=q.format(e=e), answers=(answer,),
            supporting_passages=(_fact_passage(r1, e, bridge), _fact_passage(r2, bridge, answer)),
            source="synthetic"))
    return examples, corpus


# ------------------------------------------------------------------ reference solutions

def _template_of(question: str):
    for r1, r2, q in _TEMPLATES:
        m = re.fullmatch(re.escape(q).replace(re.escape("{e}"), "(.+)"), question)
        if m:
            return r1, r2, m.group(1)
    raise ValueError(f"not a synthetic multi-hop question: {question!r}")


def reference_solution(example) -> list[dict]:
    """The ideal trajectory for a synthetic example, as turns:
    `{"role": "model", "text"}` (ends with a closing tool tag or the answer tag) and
    `{"role": "tool", "tool", "text"}` (the raw result; the tool bridge wraps it in
    <result>...</result>). Multi-hop: two searches, the bridge entity read from the first
    gold passage."""
    if example.task == "math":
        m = _EXPR_RE.search(example.question)
        if m is None:
            raise ValueError(f"not a synthetic arithmetic question: {example.question!r}")
        return [{"role": "model", "text": f"The numbers are too large to multiply reliably by "
                                          f"hand, so I will use Python.\n<python>print({m.group(1)})"
                                          f"</python>"},
                {"role": "tool", "tool": "python", "text": example.answer},
                {"role": "model", "text": f"<answer>{example.answer}</answer>"}]
    r1, r2, entity = _template_of(example.question)
    hop1, hop2 = example.supporting_passages
    bridge = _bridge(r1, entity, hop1)
    return [{"role": "model", "text": f"First I need the {r1.replace('_', ' ')} fact about "
                                      f"{entity}.\n<search>{_RELATIONS[r1][3].format(s=entity)}"
                                      f"</search>"},
            {"role": "tool", "tool": "search", "text": hop1},
            {"role": "model", "text": f"So it is {bridge}. Now I need the "
                                      f"{r2.replace('_', ' ')} fact about {bridge}.\n<search>"
                                      f"{_RELATIONS[r2][3].format(s=bridge)}</search>"},
            {"role": "tool", "tool": "search", "text": hop2},
            {"role": "model", "text": f"<answer>{example.answers[0]}</answer>"}]


def _bridge(rel: str, subject: str, passage: str) -> str:
    tmpl = _RELATIONS[rel][2]
    pattern = re.escape(tmpl).replace(re.escape("{s}"), re.escape(subject)).replace(
        re.escape("{o}"), "(.+)")
    return re.fullmatch(pattern, passage).group(1)


# ------------------------------------------------------------------ files

def write_synthetic(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 512,
                    n_eval: int = 64) -> dict[str, Path]:
    """Writes arithmetic/multihop train+eval JSONL and the multi-hop corpus; returns paths.

    Train and eval come from one generation pass and are disjoint (no shared question); the
    eval questions are the last `n_eval`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arith = make_arithmetic(n_train + n_eval, seed)
    mh, corpus = make_multihop(n_train + n_eval, seed)
    files = {"arithmetic_train": arith[:n_train], "arithmetic_eval": arith[n_train:],
             "multihop_train": mh[:n_train], "multihop_eval": mh[n_train:], "corpus": corpus}
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths
