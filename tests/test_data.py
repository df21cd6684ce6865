"""Data: JSONL layouts and errors, synthetic tasks, tfds builders, grain pipelines."""
import json
import re
from collections import Counter

import pytest

from tepo_jax.data import jsonl, prompts, records, synthetic
from tepo_jax.data.pipeline import make_dataset, shard_indices
from tepo_jax.data.records import MathExample, QAExample, from_dict


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ JSONL

def test_layouts_map_fields(tmp_path):
    g = jsonl.read_jsonl(_write(tmp_path / "g.jsonl", [
        {"question": "q?", "answer": "6 * 7 = <<6*7=42>>42\n#### 1,042"}]), "gsm8k")
    assert g == [MathExample("gsm8k-1", "q?", "1042", "gsm8k")]
    m = jsonl.read_jsonl(_write(tmp_path / "m.jsonl", [
        {"problem": "p", "solution": r"so \boxed{\frac{1}{2}} then \boxed{\sqrt{2}}"}]), "math500")
    assert m[0].answer == r"\sqrt{2}"
    a = jsonl.read_jsonl(_write(tmp_path / "a.jsonl", [{"ID": "2024-I-1", "Problem": "p",
                                                        "Answer": 204}]), "aime")
    assert (a[0].id, a[0].answer) == ("2024-I-1", "204")
    h = jsonl.read_jsonl(_write(tmp_path / "h.jsonl", [{
        "_id": "x", "question": "q", "answer": "Paris",
        "context": [["A", ["a1. ", "a2."]], ["B", ["b1."]], ["C", ["c."]]],
        "supporting_facts": [["A", 0], ["C", 0]]}]), "hotpotqa")
    assert h == [QAExample("x", "q", ("Paris",), ("A: a1. a2.", "C: c."), "hotpotqa")]
    mu = jsonl.read_jsonl(_write(tmp_path / "mu.jsonl", [{
        "id": "2hop_1", "question": "q", "answer": "USA", "answer_aliases": ["US", "USA"],
        "paragraphs": [{"title": "T", "paragraph_text": "gold", "is_supporting": True},
                       {"title": "D", "paragraph_text": "noise", "is_supporting": False}]}]),
        "musique")
    assert mu[0].answers == ("USA", "US") and mu[0].supporting_passages == ("T: gold",)


@pytest.mark.parametrize("line, layout, message", [
    ('{"question": "q", "answer": ', "math", r"bad\.jsonl:3: invalid JSON"),
    ('{"question": "q"}', "math", r"bad\.jsonl:3: missing field 'answer'"),
    ('{"question": "q", "answer": "no hashes"}', "gsm8k", r"bad\.jsonl:3: GSM8K answer"),
    ('{"question": "q", "answers": "x"}', "qa", r"bad\.jsonl:3: field 'answers': expected a list of strings, got str"),
    ('[1, 2]', "qa", r"bad\.jsonl:3: expected a JSON object"),
    ('{"answer": "a"}', "hotpotqa", r"bad\.jsonl:3: missing field 'question'"),
])
def test_errors_name_file_and_line(tmp_path, line, layout, message):
    good = {"question": "q", "answer": "1\n#### 1", "answers": ["a"]}
    path = _write(tmp_path / "bad.jsonl", [good, "", line, good])  # line 2 is blank
    with pytest.raises(jsonl.JsonlError, match=message):
        jsonl.read_jsonl(path, layout)


def test_corpus_and_records_round_trip(tmp_path):
    exs, corpus = synthetic.make_multihop(5, seed=1)
    jsonl.write_jsonl(tmp_path / "r.jsonl", exs + synthetic.make_big_arithmetic(3, 1))
    assert jsonl.read_records(tmp_path / "r.jsonl")[:5] == exs
    jsonl.write_jsonl(tmp_path / "c.jsonl", corpus)
    assert jsonl.read_corpus(tmp_path / "c.jsonl") == corpus
    _write(tmp_path / "c2.jsonl", [{"id": "1", "title": "t", "text": "x"}, {"id": "2", "text": "y"}])
    with pytest.raises(jsonl.JsonlError, match=r"c2\.jsonl:2: missing field 'title'"):
        jsonl.read_corpus(tmp_path / "c2.jsonl")
    with pytest.raises(jsonl.JsonlError, match="no such file"):
        jsonl.read_jsonl(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ prompts

def test_system_prompt_lists_only_enabled_tools():
    both = prompts.system_prompt(("python", "search"))
    assert "<python>code</python>" in both and "<search>query</search>" in both
    assert "<result>" in both and "<answer>" in both
    only_py = prompts.system_prompt(("python",))
    assert "<python>" in only_py and "<search>" not in only_py
    assert "<python>" not in prompts.system_prompt(())
    with pytest.raises(ValueError, match="unknown tools"):
        prompts.system_prompt(("browser",))
    msgs = prompts.to_messages(synthetic.make_big_arithmetic(1, 0)[0], tools=("python",))
    assert [m["role"] for m in msgs] == ["system", "user"] and "`" in msgs[1]["content"]


# ------------------------------------------------------------------ synthetic

def test_synthetic_is_deterministic_in_seed():
    assert synthetic.make_big_arithmetic(20, 7) == synthetic.make_big_arithmetic(20, 7)
    assert synthetic.make_big_arithmetic(20, 7) != synthetic.make_big_arithmetic(20, 8)
    assert synthetic.make_multihop(20, 7) == synthetic.make_multihop(20, 7)
    assert synthetic.make_multihop(20, 7)[0] != synthetic.make_multihop(20, 8)[0]


def _independent_eval(expr):
    """Our own tiny evaluator: a * b, (a * b) % m, pow(a, e, m), (a + b) * c - d, a // b."""
    n = [int(x) for x in re.findall(r"\d+", expr)]
    if expr.startswith("pow("):
        return pow(n[0], n[1], n[2])
    if "%" in expr:
        return (n[0] * n[1]) % n[2]
    if "+" in expr:
        return (n[0] + n[1]) * n[2] - n[3]
    if "//" in expr:
        return n[0] // n[1]
    return n[0] * n[1]


def test_arithmetic_gold_is_correct_and_needs_a_tool():
    exs = synthetic.make_big_arithmetic(200, 0)
    assert len({e.question for e in exs}) == 200
    forms = set()
    for e in exs:
        expr = re.search(r"`([^`]+)`", e.question).group(1)
        assert int(e.answer) == _independent_eval(expr), e
        assert max(len(x) for x in re.findall(r"\d+", expr)) >= 6
        forms.add(re.sub(r"\d+", "N", expr))
    assert len(forms) == 5


def test_multihop_answers_are_retrievable():
    import bm25s

    exs, corpus = synthetic.make_multihop(60, seed=2)
    texts = {p["text"] for p in corpus}
    assert len({p["id"] for p in corpus}) == len(corpus) > 5 * 60
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([p["title"] + " " + p["text"] for p in corpus],
                                   show_progress=False), show_progress=False)
    hits = 0
    for e in exs:
        hop1, hop2 = e.supporting_passages
        assert hop1 in texts and hop2 in texts and e.answers[0] in hop2
        bridge_words = set(hop1.rstrip(".").split()) & set(hop2.split())
        assert bridge_words, e                 # hop 2 is about the entity hop 1 found
        turns = synthetic.reference_solution(e)
        assert [t["role"] for t in turns] == ["model", "tool", "model", "tool", "model"]
        assert turns[1]["text"] == hop1 and turns[3]["text"] == hop2
        assert turns[-1]["text"] == f"<answer>{e.answers[0]}</answer>"
        for query, gold in ((turns[0]["text"], hop1), (turns[2]["text"], hop2)):
            q = re.search(r"<search>(.*)</search>", query).group(1)
            docs, _ = retriever.retrieve(bm25s.tokenize([q], show_progress=False), k=3,
                                         show_progress=False)
            hits += gold in {corpus[int(i)]["text"] for i in docs[0]}
    assert hits >= 0.9 * 2 * len(exs)          # the reference queries find the gold passages


def test_reference_solution_for_arithmetic():
    e = MathExample("x", "Compute the exact value of `123 * 456`.", "56088")
    turns = synthetic.reference_solution(e)
    assert turns[0]["text"].endswith("<python>print(123 * 456)</python>")
    assert turns[1] == {"role": "tool", "tool": "python", "text": "56088"}
    assert turns[2]["text"] == "<answer>56088</answer>"


def test_write_synthetic_splits_are_disjoint_and_in_proportion(tmp_path):
    paths = synthetic.write_synthetic(tmp_path, seed=0, n_train=90, n_eval=45, mix=synthetic.DEMO_MIX)
    train, ev = jsonl.read_records(paths["train"]), jsonl.read_records(paths["eval"])
    assert (len(train), len(ev)) == (90, 45)
    assert not {e.question for e in train} & {e.question for e in ev}
    counts = Counter(synthetic.family_of(e) for e in ev)
    total = sum(synthetic.DEMO_MIX.values())
    assert counts == {f: round(45 * w / total) for f, w in synthetic.DEMO_MIX.items()}
    assert len(jsonl.read_corpus(paths["corpus"])) == 3 * 900   # one world of facts, not one per family


def test_family_counts_and_errors():
    assert synthetic.family_counts(10, {"product": 1, "lookup": 1, "in_context": 1}) == \
        {"product": 4, "lookup": 3, "in_context": 3}
    assert synthetic.family_counts(7, {"product": 1, "multihop": 0}) == {"product": 7}
    with pytest.raises(ValueError, match="unknown synthetic family 'sums'"):
        synthetic.family_counts(4, {"sums": 1})
    with pytest.raises(ValueError, match="no family with a positive weight"):
        synthetic.family_counts(4, {"product": 0})
    with pytest.raises(ValueError, match="'small_product' has 720 distinct questions; 721"):
        synthetic.make_small_arithmetic("small_product", 721, 0)


def test_small_arithmetic_is_right_and_every_number_is_below_1000():
    for family, (b_lo, b_hi) in (("product", (11, 99)), ("small_product", (2, 9))):
        exs = synthetic.make_small_arithmetic(family, 300, seed=4)
        assert len({e.question for e in exs}) == 300 and synthetic.make_small_arithmetic(family, 300, 4) == exs
        for e in exs:
            a, b = map(int, re.fullmatch(r"Compute `(\d+) \* (\d+)`\.", e.question).groups())
            assert int(e.answer) == a * b < 1000 and b_lo <= b <= b_hi and 10 <= a <= 99
            assert synthetic.family_of(e) == family and e.id.startswith(f"{family}-4-")


def test_fact_questions_lookup_needs_the_corpus_in_context_states_it():
    import bm25s

    lookup, corpus = synthetic.make_lookup(60, seed=2)
    in_ctx, corpus2 = synthetic.make_lookup(60, seed=2, in_context=True)
    assert corpus == corpus2 and not {e.supporting_passages for e in lookup} & {e.supporting_passages for e in in_ctx}
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([p["title"] + " " + p["text"] for p in corpus], show_progress=False),
                    show_progress=False)
    for e in lookup + in_ctx:
        fact, answer = e.supporting_passages[0], e.answers[0]
        assert fact in {p["text"] for p in corpus} and re.search(rf"\b{answer}\b", fact)
        assert (fact in e.question) == (e in in_ctx) and int(answer) < 1000
        query = synthetic.lookup_subject(e.question)          # the reference solution's query
        docs, _ = retriever.retrieve(bm25s.tokenize([query], show_progress=False), k=1, show_progress=False)
        assert corpus[int(docs[0][0])]["text"] == fact


def test_solutions_state_a_belief_then_answer_or_check():
    product = synthetic.make_small_arithmetic("product", 1, 0)[0]
    lookup = synthetic.make_lookup(1, 0)[0][0]
    in_ctx = synthetic.make_lookup(1, 0, in_context=True)[0][0]
    a = product.answer
    assert synthetic.reference_solution(product) == [
        {"role": "model", "text": f"Roughly {synthetic.rough(a)}. Checking.\n<python>print("
                                  f"{product.question[9:-2]})</python>"},
        {"role": "tool", "tool": "python", "text": a}, {"role": "model", "text": f"<answer>{a}</answer>"}]
    assert synthetic.reference_solution(in_ctx) == synthetic.direct_solution(in_ctx) == [
        {"role": "model", "text": f"I know it.\n<answer>{in_ctx.answers[0]}</answer>"}]
    assert synthetic.tool_solution(in_ctx)[0]["text"].startswith("I know it. Checking.\n<search>")
    assert synthetic.reference_solution(lookup)[0]["text"].endswith(
        f"<search>{synthetic.lookup_subject(lookup.question)}</search>")
    assert [synthetic.rough(v) for v in ("658", "17", "5", "0", "950", "999")] == \
        ["700", "20", "5", "0", "1000", "1000"]


# ------------------------------------------------------------------ tfds

def test_tfds_builders_round_trip_without_tensorflow(tmp_path):
    import sys

    import tensorflow_datasets as tfds

    from tepo_jax.data import tfds_builders as tb

    tfds.disable_progress_bar()
    qa = [QAExample(f"q{i}", f"question {i} é?", tuple(f"a{j}" for j in range(i % 3 + 1)),
                    ("p",) * (i % 2), source="mine") for i in range(7)]
    jsonl.write_jsonl(tmp_path / "qa.jsonl", qa)
    _write(tmp_path / "gsm.jsonl", [{"question": f"q{i}", "answer": f"x\n#### {i}"}
                                    for i in range(4)])
    src = tb.build(tb.QaJsonl, tmp_path / "tfds", splits={"train": tmp_path / "qa.jsonl"})
    assert sorted((from_dict(r) for r in src["train"]), key=lambda e: e.id) == qa
    src = tb.build(tb.MathJsonl, tmp_path / "tfds", splits={"test": tmp_path / "gsm.jsonl"},
                   layout="gsm8k")
    assert sorted(from_dict(r).answer for r in src["test"]) == ["0", "1", "2", "3"]
    syn = tb.build(tb.SyntheticArithmetic, tmp_path / "tfds", seed=5, n_train=12, n_eval=4)
    want = synthetic.make_big_arithmetic(16, 5)
    got = tfds.data_source("synthetic_arithmetic", data_dir=str(tmp_path / "tfds"))
    assert {k: len(v) for k, v in got.items()} == {"train": 12, "eval": 4}
    assert sorted((from_dict(r) for r in syn["eval"]), key=lambda e: e.id) == \
        sorted(want[12:], key=lambda e: e.id)
    assert list(tmp_path.glob("tfds/synthetic_arithmetic/1.0.0/*.array_record*"))
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------ grain

def test_checkpoint_restore_gives_the_same_batches():
    data = [{"i": i} for i in range(37)]
    ds = make_dataset(data, seed=3, batch_size=4)
    it = iter(ds)
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    following = [next(it) for _ in range(5)]
    fresh = iter(make_dataset(data, seed=3, batch_size=4))
    fresh.set_state(state)
    assert [next(fresh) for _ in range(5)] == following
    again = iter(make_dataset(data, seed=3, batch_size=4))
    assert [next(again) for _ in range(5)] == first        # same seed, same order
    other = iter(make_dataset(data, seed=4, batch_size=4))
    assert [next(other) for _ in range(5)] != first
    assert all(len(b) == 4 for b in first + following)
    # the state is plain data that survives JSON (it goes into the checkpoint)
    fresh2 = iter(make_dataset(data, seed=3, batch_size=4))
    fresh2.set_state(json.loads(json.dumps(state)))
    assert [next(fresh2) for _ in range(5)] == following


def test_epochs_cover_every_record_once():
    batches = list(make_dataset(list(range(12)), seed=0, batch_size=3, num_epochs=2))
    flat = [x for b in batches for x in b]
    assert sorted(flat[:12]) == list(range(12)) and sorted(flat[12:]) == list(range(12))
    assert flat[:12] != flat[12:]                           # reshuffled per epoch


def test_host_shards_partition_the_data():
    n, hosts = 50, 4
    seen = []
    for h in range(hosts):
        ds = make_dataset(list(range(n)), seed=0, batch_size=2, num_epochs=1,
                          shard_index=h, shard_count=hosts)
        seen.append([x for b in ds for x in b])
        assert set(seen[-1]) == set(shard_indices(n, h, hosts))
    flat = [x for s in seen for x in s]
    assert len(flat) == len(set(flat)) == 48                # disjoint, 2 dropped for balance
    assert len({len(s) for s in seen}) == 1
    with pytest.raises(ValueError, match="bad shard"):
        shard_indices(n, 4, 4)


def test_pipeline_reads_a_tfds_source(tmp_path):
    import tensorflow_datasets as tfds

    from tepo_jax.data import tfds_builders as tb

    tfds.disable_progress_bar()
    src = tb.build(tb.SyntheticMultihop, tmp_path, seed=1, n_train=10, n_eval=2)["train"]
    batch = next(iter(make_dataset(src, seed=0, batch_size=5, transform=from_dict)))
    assert len(batch) == 5 and all(isinstance(e, QAExample) for e in batch)


def test_short_prompt_names_the_tools_in_one_line_without_tags():
    short = prompts.system_prompt(("python", "search"), style="short")
    assert "\n" not in short and "python" in short and "search" in short
    assert "<" not in short                                   # no literal tags to copy from
    assert "search" not in prompts.system_prompt(("python",), style="short")
    assert prompts.system_prompt((), style="short") == "Put the final answer in the answer tag."
    assert len(short) < len(prompts.system_prompt()) / 4
    with pytest.raises(ValueError, match="unknown prompt style 'tiny'"):
        prompts.system_prompt(style="tiny")
    msgs = prompts.to_messages(synthetic.make_small_arithmetic("product", 1, 0)[0], style="short")
    assert msgs[0]["content"] == short


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_file_has_no_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    for read in (lambda p: jsonl.read_jsonl(p, "math"), jsonl.read_records, jsonl.read_corpus):
        with pytest.raises(jsonl.JsonlError, match=rf"^{re.escape(str(path))}: no records"):
            read(path)


def test_bytes_that_are_not_utf8_name_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(jsonl.JsonlError,
                       match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        jsonl.read_jsonl(path, "math")


def test_from_dict_refuses_rows_that_would_read_wrong():
    with pytest.raises(records.FieldError, match="answers: expected a list of strings, got str"):
        from_dict({"id": "a", "question": "q", "answers": "paris"})
    with pytest.raises(records.FieldError, match="answer: expected a string, got None"):
        from_dict({"id": "a", "question": "q", "answer": None})
    # tfds hands back bytes and numpy arrays: still read
    import numpy as np
    ex = from_dict({"id": b"a", "task": b"qa", "question": np.array(b"q", dtype=object),
                    "answers": np.array([b"x", b"y"], dtype=object),
                    "supporting_passages": np.array([], dtype=object), "source": b"s"})
    assert ex == QAExample("a", "q", ("x", "y"), (), "s")
