"""Synthetic tool-use tasks that ship with the project: deterministic from a seed, no download.

The task families are sized for what they are for. The first four are the CPU demo's: a
2-layer model learns them from a few hundred SFT steps, and each gives RL something to do
(docs/demo.md). The last two look like the paper's benchmarks and are for real models.

  product         `31 * 27` (two 2-digit numbers, product below 1000). Beyond a tiny model's
                  head; with the python tool it only has to copy the operands and the result.
  small_product   `47 * 6` (2-digit times 1-digit). Also beyond its head, but the SFT
                  demonstrator answers most of these in its head (`sft.tool_rate`), so the
                  warm-started policy does too, and RL has to learn to call python here.
  lookup          "How many kg does crate 650 weigh?": the answer is only in the search
                  corpus (one fact per passage), found by searching the subject ("crate 650").
  in_context      "Crate 650 weighs 17 kg. How many kg does crate 650 weigh?": the fact is in
                  the question, so no tool is needed; a search is redundant (the SFT
                  demonstrator searches anyway half of the time).
  big_arithmetic  products, modular products, powers mod m and mixed expressions with 6- and
                  7-digit operands (the old demo's arithmetic).
  multihop        two-hop questions over a fictional knowledge base ("In which city was the
                  founder of Zorblax Corp born?"); `supporting_passages` are the gold passages
                  in hop order.

Every example's `source` is `synthetic/<family>` and its id `<family>-<seed>-<i>`, so metrics
and analyses can split by family (`family_of`). `make_tasks` draws a mix of families;
`reference_solution(example)` gives the ideal trajectory for the SFT data generator and
`direct_solution(example)` the no-tool one.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
from pathlib import Path
from typing import Mapping, Sequence

from tepo_jax.data.jsonl import write_jsonl
from tepo_jax.paths import as_path
from tepo_jax.data.records import MathExample, QAExample

SOURCE_PREFIX = "synthetic/"


def _math(family: str, seed: int, i: int, expr: str) -> MathExample:
    return MathExample(id=f"{family}-{seed}-{i}", question=f"Compute `{expr}`.",
                       answer=str(evaluate_expression(expr)), source=SOURCE_PREFIX + family)


def _sample(family: str, pool: Sequence, n: int, rng: random.Random) -> list:
    if n > len(pool):
        raise ValueError(f"the synthetic family {family!r} has {len(pool)} distinct questions; "
                         f"{n} were asked for (lower data.n_train / data.n_eval or its data.mix weight)")
    return rng.sample(list(pool), n)


# ------------------------------------------------------------------ small arithmetic
# Every number is below 1000: one token each for the demo's tokenizer (as in Llama 3's, which
# cuts digit runs into chunks of up to three), so copying a number is copying one token.

_SMALL_POOLS = {
    "product": [f"{a} * {b}" for a in range(11, 100) for b in range(11, 100) if a * b < 1000],
    "small_product": [f"{a} * {b}" for a in range(10, 100) for b in range(2, 10)],
}


def make_small_arithmetic(family: str, n: int, seed: int) -> list[MathExample]:
    """`n` distinct questions of one small-arithmetic family (product, small_product)."""
    exprs = _sample(family, _SMALL_POOLS[family], n, random.Random(f"{family}-{seed}"))
    return [_math(family, seed, i, e) for i, e in enumerate(exprs)]


# ------------------------------------------------------------------ lookup and in-context facts

# (subject noun, passage, question, object range)
_FACT_RELATIONS = (
    ("station", "Station {s} is {o} km from the capital.", "How many km is station {s} from the capital?",
     (10, 999)),
    ("crate", "Crate {s} weighs {o} kg.", "How many kg does crate {s} weigh?", (10, 999)),
    ("room", "Room {s} has {o} seats.", "How many seats does room {s} have?", (20, 999)),
)
_SUBJECTS = range(100, 1000)


def lookup_query(noun: str, subject: int) -> str:
    return f"{noun} {subject}"


def fact_world(seed: int) -> tuple[list[tuple[int, int, int]], list[dict]]:
    """(facts, corpus) of one seed's world: every subject of every relation has one value,
    and the corpus one passage per fact (the facts nobody asks about are distractors)."""
    rng = random.Random(f"facts-{seed}")
    facts = [(r, s, rng.randint(*rel[3])) for r, rel in enumerate(_FACT_RELATIONS) for s in _SUBJECTS]
    corpus = [{"id": f"fact-{i}", "title": f"{_FACT_RELATIONS[r][0].capitalize()} {s}",
               "text": _FACT_RELATIONS[r][1].format(s=s, o=o)} for i, (r, s, o) in enumerate(facts)]
    return facts, corpus


def make_lookup(n: int, seed: int, in_context: bool = False) -> tuple[list[QAExample], list[dict]]:
    """`n` one-hop questions about the seed's facts and the corpus holding them. Lookup: the
    fact is only in the corpus. In context: the question states the fact first ("Crate 650
    weighs 17 kg. How many kg does crate 650 weigh?"), so no search is needed. The two
    families ask about disjoint halves of the facts."""
    facts, corpus = fact_world(seed)
    family = "in_context" if in_context else "lookup"
    order = list(range(len(facts)))
    random.Random(f"facts-order-{seed}").shuffle(order)
    half = order[int(in_context)::2]
    examples = []
    for i, j in enumerate(_sample(family, half, n, random.Random(f"{family}-{seed}"))):
        r, s, o = facts[j]
        _, passage, question, _ = _FACT_RELATIONS[r]
        fact = passage.format(s=s, o=o)
        text = f"{fact} {question.format(s=s)}" if in_context else question.format(s=s)
        examples.append(QAExample(id=f"{family}-{seed}-{i}", question=text, answers=(str(o),),
                                  supporting_passages=(fact,), source=SOURCE_PREFIX + family))
    return examples, corpus


# ------------------------------------------------------------------ big arithmetic

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


def make_big_arithmetic(n: int, seed: int, id_prefix: str = "big_arithmetic") -> list[MathExample]:
    """`n` distinct 6-7 digit arithmetic questions with exact integer answers."""
    rng, out, seen = random.Random(f"arith-{seed}"), [], set()
    while len(out) < n:
        expr = _ARITH_FORMS[rng.randrange(len(_ARITH_FORMS))](rng)
        if expr in seen:
            continue
        seen.add(expr)
        out.append(MathExample(id=f"{id_prefix}-{seed}-{len(out)}",
                               question=f"Compute the exact value of `{expr}`.",
                               answer=str(evaluate_expression(expr)),
                               source=SOURCE_PREFIX + "big_arithmetic"))
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


def make_multihop(n: int, seed: int, id_prefix: str = "multihop",
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
            source=SOURCE_PREFIX + "multihop"))
    return examples, corpus


# ------------------------------------------------------------------ families and mixes

@dataclasses.dataclass(frozen=True)
class Family:
    tool: str            # the tool its reference solution calls ("" for none)
    needs_tool: bool     # False: a model can answer it without any tool (a call is redundant)


FAMILIES: Mapping[str, Family] = {
    "product": Family("python", True),
    "small_product": Family("python", True),
    "lookup": Family("search", True),
    "in_context": Family("search", False),
    "big_arithmetic": Family("python", True),
    "multihop": Family("search", True),
}
_NO_CORPUS: list[dict] = []


def family_of(example) -> str:
    """The synthetic family of an example ('' for an example from anywhere else)."""
    source = getattr(example, "source", "") or ""
    return source[len(SOURCE_PREFIX):] if source.startswith(SOURCE_PREFIX) else ""


def make_family(family: str, n: int, seed: int) -> tuple[list, list[dict]]:
    """`n` distinct examples of `family` and the corpus they need (empty for arithmetic)."""
    if family in _SMALL_POOLS:
        return make_small_arithmetic(family, n, seed), _NO_CORPUS
    if family == "big_arithmetic":
        return make_big_arithmetic(n, seed), _NO_CORPUS
    if family in ("lookup", "in_context"):
        return make_lookup(n, seed, in_context=family == "in_context")
    if family == "multihop":
        return make_multihop(n, seed)
    raise ValueError(f"unknown synthetic family {family!r}; known: {', '.join(FAMILIES)}")


def family_counts(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split `n` over the families with positive weight in `mix`, in proportion (largest
    remainder, ties to the family listed first)."""
    unknown = sorted(set(mix) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown synthetic family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    weights = {f: float(w) for f, w in mix.items() if w > 0}
    if not weights:
        raise ValueError("the synthetic mix has no family with a positive weight")
    total = sum(weights.values())
    exact = {f: n * w / total for f, w in weights.items()}
    counts = {f: int(x) for f, x in exact.items()}
    by_remainder = sorted(weights, key=lambda f: -(exact[f] - counts[f]))
    for f in by_remainder[: n - sum(counts.values())]:
        counts[f] += 1
    return counts


def make_tasks(n_train: int, n_eval: int, seed: int,
               mix: Mapping[str, float]) -> tuple[list, list, list[dict]]:
    """(train, eval, corpus): each family's share of both splits from one generation pass per
    family (so no question is in both), each split shuffled with a seeded generator."""
    train_counts, eval_counts = family_counts(n_train, mix), family_counts(n_eval, mix)
    train, evals, corpus = [], [], {}
    for family in train_counts:
        k = train_counts[family]
        examples, family_corpus = make_family(family, k + eval_counts[family], seed)
        train += examples[:k]
        evals += examples[k:]
        corpus.update((p["id"], p) for p in family_corpus)  # lookup and in_context share theirs
    random.Random(f"mix-train-{seed}").shuffle(train)
    random.Random(f"mix-eval-{seed}").shuffle(evals)
    return train, evals, list(corpus.values())


DEMO_MIX = {"product": 1.0, "small_product": 1.5, "lookup": 1.0, "in_context": 1.0}


# ------------------------------------------------------------------ reference solutions

# The first line of every solution says what the demonstrator believes: "I know it." when it
# knows the answer, a one-significant-figure estimate ("Roughly 700. Checking.") before a call
# it needs. So the model's uncertainty about the answer sits in r_0, the segment before the
# call, which TEPO's ΔH compares with the segment after the result (docs/demo.md). The answer
# is never a copy of the estimate: a model that learned to copy its own first line would
# never learn to copy the result.
CHECKING = "Checking."
KNOWN = "I know it."


def rough(value: str) -> str:
    """`value` to one significant figure: '658' -> '700', '17' -> '20', '5' -> '5'."""
    n = int(value)
    if n == 0:
        return "0"
    scale = 10 ** (len(str(abs(n))) - 1)
    return str(int(round(n / scale)) * scale)


def _expression(example) -> str:
    m = _EXPR_RE.search(example.question)
    if m is None:
        raise ValueError(f"not a synthetic arithmetic question: {example.question!r}")
    return m.group(1)


def _answer(example) -> str:
    return example.answer if example.task == "math" else example.answers[0]


def reference_solution(example) -> list[dict]:
    """The ideal trajectory for a synthetic example, as turns:
    `{"role": "model", "text"}` (ends with a closing tool tag or the answer tag) and
    `{"role": "tool", "tool", "text"}` (the raw result; the tool bridge wraps it in
    <result>...</result>). A family that needs no tool (in_context) is answered directly;
    multi-hop: two searches, the bridge entity read from the first gold passage."""
    family = family_of(example) or ("big_arithmetic" if example.task == "math" else "multihop")
    if not FAMILIES[family].needs_tool:
        return direct_solution(example)
    if family == "multihop":
        return _multihop_solution(example)
    return tool_solution(example)


def tool_solution(example) -> list[dict]:
    """A belief, then the check: arithmetic prints the expression with python, a fact question
    searches its subject; then the answer copied from the result."""
    answer = _answer(example)
    family = FAMILIES.get(family_of(example))
    knows = family is not None and not family.needs_tool
    lead = f"{KNOWN} {CHECKING}" if knows else f"Roughly {rough(answer)}. {CHECKING}"
    if example.task == "math":
        call, tool, result = f"<python>print({_expression(example)})</python>", "python", answer
    else:
        call = f"<search>{lookup_subject(example.question)}</search>"
        tool, result = "search", example.supporting_passages[0]
    return [{"role": "model", "text": f"{lead}\n{call}"}, {"role": "tool", "tool": tool, "text": result},
            {"role": "model", "text": f"<answer>{answer}</answer>"}]


def direct_solution(example) -> list[dict]:
    """The answer without any tool call (right: the demonstrator knows it)."""
    return [{"role": "model", "text": f"{KNOWN}\n<answer>{_answer(example)}</answer>"}]


def solution_variants(example) -> list[list[dict]]:
    """Every script the SFT demonstrator may play for `example`, without redundant calls:
    the reference solution, the direct answer and (arithmetic, lookup) the tool solution."""
    out = [reference_solution(example), direct_solution(example)]
    if example.task == "math" or family_of(example) in ("lookup", "in_context"):
        out.append(tool_solution(example))
    return out


_LOOKUP_SUBJECT = re.compile(r"(station|crate|room) (\d+)", re.IGNORECASE)


def lookup_subject(question: str) -> str:
    """The search query of a lookup question: its subject, e.g. 'station 317'."""
    m = _LOOKUP_SUBJECT.search(question)
    if m is None:
        raise ValueError(f"not a synthetic lookup question: {question!r}")
    return lookup_query(m.group(1).lower(), int(m.group(2)))


# ------------------------------------------------------------------ multi-hop solutions

def _template_of(question: str):
    for r1, r2, q in _TEMPLATES:
        m = re.fullmatch(re.escape(q).replace(re.escape("{e}"), "(.+)"), question)
        if m:
            return r1, r2, m.group(1)
    raise ValueError(f"not a synthetic multi-hop question: {question!r}")


def _multihop_solution(example) -> list[dict]:
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
                    n_eval: int = 64, mix: Mapping[str, float] = DEMO_MIX) -> dict[str, Path]:
    """Writes `make_tasks`' train and eval splits and the search corpus as JSONL
    (train.jsonl, eval.jsonl, corpus.jsonl; records read back with `jsonl.read_records`);
    returns their paths by name."""
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals, corpus = make_tasks(n_train, n_eval, seed, mix)
    paths = {}
    for name, rows in {"train": train, "eval": evals, "corpus": corpus}.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths
