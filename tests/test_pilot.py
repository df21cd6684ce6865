"""Pilot study: call-quality rules, ΔH per call, the statistics, the CLI, and the whole
pipeline on real trajectories (synthetic tasks through the real tools and tokenizer)."""
import json
import math

import numpy as np
import pytest

from tepo_jax.analysis import pilot
from tepo_jax.rollout.trajectory import (TokenKind, TokenRole, ToolCallRecord, Trajectory,
                                         entropy_deltas, write_jsonl)

# ----------------------------------------------------------------------------- helpers


def make_traj(seg_entropies, calls, *, gold=("Efport",), final_text="<answer>Efport</answer>",
              prompt_id="p0", seg_len=3):
    """prompt(2) r_0 [call_k(2) obs_k(2) r_k]...; seg_entropies[k] is the entropy of every
    token of r_k (None: r_k empty). calls: (name, arguments, result, status)."""
    kinds, turns, ent, records = [TokenKind.PROMPT] * 2, [0, 0], [0.0, 0.0], []

    def seg(k, h):
        n = 0 if h is None else seg_len
        kinds.extend([TokenKind.REASONING] * n)
        turns.extend([k] * n)
        ent.extend([h] * n)

    seg(0, seg_entropies[0])
    for k, (name, args, result, status) in enumerate(calls, start=1):
        c0 = len(kinds)
        kinds.extend([TokenKind.TOOL_CALL] * 2 + [TokenKind.TOOL_RESULT] * 2)
        turns.extend([k] * 4)
        ent.extend([0.1, 0.1, 0.0, 0.0])
        records.append(ToolCallRecord(name, args, result, status, (c0, c0 + 2),
                                      (c0 + 2, c0 + 4), k))
        seg(k, seg_entropies[k])
    kinds = np.array(kinds, np.int8)
    model = np.isin(kinds, [1, 2, 4])
    roles = np.where(model, TokenRole.REASONING, TokenRole.NONE)
    t = Trajectory(token_ids=np.arange(len(kinds)), kinds=kinds, turns=turns, roles=roles,
                   logprobs=np.where(model, -0.5, 0.0), entropies=ent, tool_calls=records,
                   prompt_id=prompt_id, group_id=0, sample_index=0, gold=list(gold), task="qa",
                   finish_reason="answer", final_text=final_text)
    return t.validate()


def label_one(name, args, result, status="ok", *, later_calls=(), final_text="<answer>x</answer>",
              gold=("Efport",), examples=None):
    calls = [(name, args, result, status)] + list(later_calls)
    t = make_traj([1.0] * (len(calls) + 1), calls, gold=gold, final_text=final_text)
    return pilot.label_calls([t], examples=examples)[0]


HOP1 = "Zorblax Corp was founded by Ab Cd."
HOP2 = "Ab Cd was born in the city of Efport."
EXAMPLES = {"p0": pilot.ExampleInfo((HOP1, HOP2), "In which city was the founder of Zorblax Corp born?")}

# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("result,status,examples,high,reason", [
    (f"Doc 1 (Title: Ab Cd) {HOP2}", "ok", None, True, "gold_answer"),
    (f"Doc 1 (Title: Zorblax Corp) {HOP1}", "ok", EXAMPLES, True, "needed_entity"),
    ("Doc 1 (Title: Zorblax Corp) Zorblax Corp is known for its ink pens, sold in Velport.",
     "ok", EXAMPLES, False, "irrelevant"),
    ("No results found.", "ok", EXAMPLES, False, "no_results"),
    ("search error: connection refused", "error", EXAMPLES, False, "status:error"),
    ("[timed out after 10 s]", "timeout", None, False, "status:timeout"),
    # without supporting passages: an entity of the result that the model uses later
    (f"Doc 1 (Title: Zorblax Corp) {HOP1}", "ok", None, True, "entity_used_later"),
])
def test_search_rule(result, status, examples, high, reason):
    lb = label_one("search", "founder of Zorblax Corp", result, status, examples=examples,
                   later_calls=[("search", "Ab Cd born in", "x", "ok")])
    assert (lb.high, lb.reason) == (high, reason)


def test_search_entity_named_in_the_query_is_not_needed():
    # The result only repeats the query's own entity: nothing new, even though that entity
    # is on the gold chain.
    lb = label_one("search", "Zorblax Corp", "Doc 1 (Title: Zorblax Corp) Zorblax Corp sells pens.",
                   examples=EXAMPLES)
    assert (lb.high, lb.reason) == (False, "irrelevant")


def test_gold_match_is_normalised_and_whole_word():
    assert pilot.contains_phrase("It is THE Efport.", "efport")
    assert not pilot.contains_phrase("Efportville is big", "Efport")
    lb = label_one("search", "q", "the city of efport!", gold=("The Efport",))
    assert lb.reason == "gold_answer"


@pytest.mark.parametrize("result,status,later,final,high,reason", [
    ("123456789\n", "ok", (), "<answer>123456789</answer>", True, "gold_answer"),
    ("4521\n", "ok", [("python", "print(4521 * 3)", "13563", "ok")], "<answer>x</answer>",
     True, "value_used"),
    ("4521\n", "ok", (), "<answer>x</answer>", False, "value_unused"),
    ("", "ok", (), "<answer>x</answer>", False, "no_output"),
    ("Traceback (most recent call last):\nZeroDivisionError", "ok", (), "", False,
     "error_output"),
    ("ZeroDivisionError: division by zero", "error", (), "", False, "status:error"),
    ("[timed out after 10 s]", "timeout", (), "", False, "status:timeout"),
    ("Unknown tool or malformed call", "parse_error", (), "", False, "status:parse_error"),
    ("hello world\n", "ok", (), "<answer>it said hello world</answer>", True, "value_used"),
    # 12.0 printed, 12 used: the same number
    ("12.0\n", "ok", (), "<answer>12</answer>", True, "value_used"),
])
def test_python_rule(result, status, later, final, high, reason):
    lb = label_one("python", "print(x)", result, status, later_calls=later, final_text=final,
                   gold=("123456789",))
    assert (lb.high, lb.reason) == (high, reason)


def test_single_digits_inside_longer_output_are_not_values():
    # "3" appears in the answer by chance; only whole-output single digits count.
    assert pilot.printed_values("x = 3, y = 417\n") == ["417"]
    assert pilot.printed_values("7\n") == ["7"]
    lb = label_one("python", "print(x)", "x = 3, y = 417\n", final_text="<answer>3 apples</answer>",
                   gold=("nothing",))
    assert lb.reason == "value_unused"


def test_values_match_whole_numbers_only():
    lb = label_one("python", "print(x)", "417\n", final_text="<answer>14170</answer>",
                   gold=("nothing",))
    assert lb.reason == "value_unused"


def test_entities():
    assert pilot.entities("The mayor of Velport is Ab Cd.") == {"velport", "ab cd"}
    assert pilot.entities("Which company does Ab Cd work for? 1999") == {"ab cd", "1999"}


def test_unknown_tool_uses_generic_rule_and_rules_are_pluggable(monkeypatch):
    t = make_traj([1.0, 0.5], [("calculator", "2+2", "4", "ok")], gold=("4",))
    assert pilot.label_calls([t])[0].reason == "gold_answer"
    custom = lambda ctx: pilot.Quality(ctx.call.arguments == "2+2", "custom")  # noqa: E731
    lb = pilot.label_calls([t], rules={"calculator": custom})[0]
    assert (lb.high, lb.reason) == (True, "custom")
    monkeypatch.setitem(pilot.QUALITY_RULES, "calculator", lambda ctx: pilot.Quality(False, "reg"))
    assert pilot.label_calls([t])[0].reason == "reg"


def test_decoder_gives_rules_all_later_model_text():
    t = make_traj([1.0, 1.0], [("python", "print(x)", "4521\n", "ok")], gold=("z",))
    assert pilot.label_calls([t])[0].reason == "value_unused"
    seen = []

    def decode(ids):
        seen.append(ids)
        return "so the value is 4521"
    assert pilot.label_calls([t], decode=decode)[0].reason == "value_used"
    call = t.tool_calls[0]
    assert seen == [list(range(call.result_span[1], len(t)))]   # only later model tokens


# ----------------------------------------------------------------------------- ΔH and stats


def test_labels_carry_dh_and_reducing():
    t = make_traj([2.0, 1.5, None, 1.0], [("search", "a", "No results found.", "ok")] * 3)
    labels = pilot.label_calls([t])
    assert [lb.dh for lb in labels][:1] == [-0.5]
    assert math.isnan(labels[1].dh) and math.isnan(labels[2].dh)   # r_2 empty
    np.testing.assert_array_equal([lb.dh for lb in labels], entropy_deltas(t))
    assert [lb.reducing for lb in labels] == [1, 0, 0]
    assert [lb.turn for lb in labels] == [1, 2, 3]
    rep = pilot.pilot_report(labels, n_boot=50)
    assert (rep.n_calls, rep.n_defined) == (3, 1)


def test_point_biserial_matches_its_formula_and_corrcoef():
    rng = np.random.default_rng(1)
    q = (rng.random(200) < 0.4).astype(float)
    dh = rng.normal(0, 1, 200) - 0.5 * q
    r = pilot.pearson(q, dh)
    assert r == pytest.approx(np.corrcoef(q, dh)[0, 1], abs=1e-12)
    p = q.mean()
    rpb = (dh[q == 1].mean() - dh[q == 0].mean()) / dh.std() * math.sqrt(p * (1 - p))
    assert r == pytest.approx(rpb, abs=1e-12)
    assert math.isnan(pilot.pearson(np.ones(5), np.arange(5.0)))


def test_bootstrap_matches_naive_loop_and_is_seeded():
    rng = np.random.default_rng(2)
    q = (rng.random(60) < 0.5).astype(float)
    dh = rng.normal(0, 1, 60) - 0.8 * q
    lo, hi = pilot.bootstrap_ci(q, dh, n_boot=300, seed=7)
    draws = np.random.default_rng(7).integers(0, 60, (300, 60))   # the same stream
    naive = [np.corrcoef(q[d], dh[d])[0, 1] for d in draws]
    np.testing.assert_allclose([lo, hi], np.quantile(naive, [0.025, 0.975]), atol=1e-9)
    assert lo < pilot.pearson(q, dh) < hi
    assert pilot.bootstrap_ci(q, dh, n_boot=300, seed=7) == (lo, hi)
    assert pilot.bootstrap_ci(q, dh, n_boot=300, seed=8) != (lo, hi)
    # one point per cluster == resampling points
    assert pilot.bootstrap_ci(q, dh, n_boot=300, seed=7, clusters=np.arange(60)) == (lo, hi)


def test_fisher_ci():
    lo, hi = pilot.fisher_ci(0.3, 103)
    half = 1.959963984540054 / 10
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.3) - half),
                                      math.tanh(math.atanh(0.3) + half)), abs=1e-9)
    assert all(math.isnan(v) for v in pilot.fisher_ci(0.3, 3))
    assert pilot.fisher_p_value(0.0, 50) == pytest.approx(1.0)


def test_report_groups_and_json():
    trajs = [make_traj([2.0, 1.0, 1.5], [("search", "q", "Efport", "ok"),
                                         ("python", "1/0", "ZeroDivisionError", "error")]),
             make_traj([1.0, 0.5], [("search", "q", "the Efport", "ok")]),
             make_traj([1.0, 1.2], [("python", "x", "err", "timeout")])]
    labels, rep = pilot.run_pilot(trajs, n_boot=200, resample="trajectory")
    assert rep.by_quality["high"]["n"] == 2 and rep.by_quality["high"]["dh_mean"] == pytest.approx(-0.75)
    assert rep.by_quality["low"]["dh_mean"] == pytest.approx(0.35)
    assert rep.by_quality["high"]["frac_reducing"] == 1.0 and rep.by_quality["low"]["frac_reducing"] == 0.0
    assert rep.by_tool["python"]["low"]["n"] == 2 and rep.by_tool["search"]["all"]["n"] == 2
    assert rep.reasons == {"python/status:error": 1, "python/status:timeout": 1,
                           "search/gold_answer": 2}
    assert rep.r == pytest.approx(np.corrcoef([1, 0, 1, 0], [-1.0, 0.5, -0.5, 0.2])[0, 1])
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["by_quality"]["low"]["n"] == 2
    text = pilot.format_report(rep)
    assert "quality=high" in text and "bootstrap CI" in text and "Fisher-z CI" in text
    for unit, plural in (("call", "calls"), ("trajectory", "trajectories")):
        assert f"(200 resamples of {plural}, seed" in pilot.format_report(
            pilot.pilot_report(labels, resample=unit, n_boot=200))
    with pytest.raises(ValueError):
        pilot.pilot_report(labels, resample="bogus")


def test_cli(tmp_path, capsys):
    from tepo_jax.runlog import RunLog
    log = RunLog(tmp_path, tensorboard=False)    # the driver's layout, by the driver's writer
    log.save_trajectories("sft_data", [make_traj([0.0, 0.0], [("search", "q", "Efport", "ok")])])
    log.save_trajectories("eval_000000", [make_traj([1.0, 0.5], [("search", "q", "x", "ok")])] * 5)
    log.save_trajectories("rl_000001", [make_traj([2.0, 1.0], [("search", "q", "Efport", "ok")])])
    log.save_trajectories("rl_000002", [make_traj([1.0, 2.0], [("python", "x", "", "error")]),
                                        make_traj([1.0, 0.4], [("search", "q", "Efport", "ok")])])
    d = tmp_path / "trajectories"
    out = tmp_path / "pilot.json"
    assert pilot.main(["--trajectories", str(d), "--json", str(out), "--n-boot", "100"]) == 0
    printed = capsys.readouterr().out
    assert "3 tool calls" in printed and "point-biserial" in printed   # rl files only
    data = json.loads(out.read_text())
    assert data["report"]["n_calls"] == 3 and len(data["labels"]) == 3
    assert pilot.main(["--trajectories", str(d), "--last", "1"]) == 0
    assert "2 tool calls" in capsys.readouterr().out
    assert pilot.main(["--trajectories", str(d), "--phase", "eval"]) == 0
    assert "5 tool calls" in capsys.readouterr().out
    assert pilot.main(["--trajectories", str(d), "--phase", "all"]) == 0
    assert "9 tool calls" in capsys.readouterr().out
    assert pilot.main(["--trajectories", str(d / "eval_000000.jsonl")]) == 0   # a file as given
    assert "5 tool calls" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        pilot.load_trajectories(tmp_path / "missing")
    old = tmp_path / "old"
    old.mkdir()
    write_jsonl(old / "step_000000.jsonl", [make_traj([2.0, 1.0], [("search", "q", "x", "ok")])])
    assert pilot.main(["--trajectories", str(old)]) == 2
    assert "it has step_000000.jsonl" in capsys.readouterr().err
    assert len(pilot.load_trajectories(old, phase="all")) == 1
    with pytest.raises(ValueError, match="phase"):
        pilot.trajectory_files(d, phase="train")


def test_multi_call_turns_are_keyed_per_tool():
    """A function-calling turn with several calls is ONE record ("a,b") with one ΔH; per-tool
    statistics count it under each distinct tool, never under the joined name."""
    from tepo_jax.analysis import plots
    from tepo_jax.rl.tepo_metrics import call_tools, tepo_step_metrics

    both = ("get_weather,convert", '[{"name": "get_weather"}, {"name": "convert"}]',
            json.dumps(["21 C", "70 F"]), "ok")
    trajs = [make_traj([2.0, 1.0], [both], gold=("70 F",)),                       # ΔH -1.0
             make_traj([1.0, 1.5], [("get_weather", "{}", "15 C", "ok")], gold=("9 F",)),  # +0.5
             make_traj([1.0, 0.8], [("get_weather,get_weather", "[]", json.dumps(["a", "b"]),
                                     "error")], gold=("x",))]                         # −0.2
    assert call_tools(trajs[0].tool_calls[0]) == ("get_weather", "convert")
    assert call_tools(trajs[2].tool_calls[0]) == ("get_weather",)        # distinct: once
    labels = pilot.label_calls(trajs)
    assert [lb.tools for lb in labels] == [("get_weather", "convert"), ("get_weather",),
                                           ("get_weather",)]
    assert [(lb.high, lb.reason) for lb in labels] == [
        (True, "gold_answer"), (False, "value_unused"), (False, "status:error")]
    rep = pilot.pilot_report(labels, n_boot=50)
    assert set(rep.by_tool) == {"get_weather", "convert"}
    assert rep.by_tool["get_weather"]["all"]["n"] == 3
    assert rep.by_tool["get_weather"]["all"]["dh_mean"] == pytest.approx((-1.0 + 0.5 - 0.2) / 3)
    assert rep.by_tool["convert"]["high"]["n"] == 1 and rep.by_tool["convert"]["low"]["n"] == 0
    assert rep.n_defined == 3 and not any("," in k for k in rep.reasons)
    groups = plots.dh_groups(labels)
    np.testing.assert_allclose(groups["tool"]["convert"], [-1.0])
    np.testing.assert_allclose(groups["tool"]["get_weather"], [-1.0, 0.5, -0.2])
    m = tepo_step_metrics(trajs)
    assert not any("," in k for k in m)
    assert m["tepo/calls/get_weather"] == 3.0 and m["tepo/calls/convert"] == 1.0
    assert m["tepo/dh/get_weather"] == pytest.approx((-1.0 + 0.5 - 0.2) / 3)
    assert m["tepo/dh_std/get_weather"] == pytest.approx(np.std([-1.0, 0.5, -0.2]))
    assert m["tepo/dh/convert"] == pytest.approx(-1.0) and m["tepo/dh_std/convert"] == 0.0
    assert m["tepo/frac_reducing/get_weather"] == pytest.approx(2 / 3)
    assert m["tepo/num_calls"] == 3.0
    # the rules read a multi-call turn's results one per line (each a value of its own)
    t = make_traj([1.0, 1.0], [("a,b", "[]", json.dumps(["sunny", "rainy"]), "ok")], gold=("x",),
                  final_text="<answer>sunny</answer>")
    assert pilot.turn_record(t.tool_calls[0]).result == "sunny\nrainy"
    assert pilot.label_calls([t])[0].reason == "value_used"


# ----------------------------------------------------------------------------- real trajectories


@pytest.fixture(scope="module")
def real_trajs(tmp_path_factory):
    from tepo_jax.analysis import examples as ex
    d = tmp_path_factory.mktemp("pilot_real")
    exs, corpus = ex.synthetic_examples(n_math=2, n_qa=2, seed=3)
    tok, bridge = ex.tools_and_tokenizer(d, exs, corpus)
    try:
        trajs = ex.build_trajectories(exs, tok, bridge, seed=3, redundant_rate=0.0)
    finally:
        bridge.close()
    rng = np.random.default_rng(0)
    return [ex.with_entropies(t, rng) for t in trajs], exs, tok


def test_real_trajectories_are_labelled_as_designed(real_trajs):
    trajs, exs, tok = real_trajs
    labels = pilot.label_calls(trajs, examples=pilot.examples_from_records(exs),
                               decode=lambda ids: tok.decode(ids))
    by_traj = {}
    for lb in labels:
        by_traj.setdefault(lb.traj_index, []).append((lb.tool, lb.high, lb.reason))
    # reference solutions: python prints the answer; hop 1 finds the bridge, hop 2 the answer
    assert by_traj[0] == [("python", True, "gold_answer")]
    assert by_traj[2] == [("search", True, "needed_entity"), ("search", True, "gold_answer")]
    # faulty variants (one per task, played through the real sandbox and index)
    faulty_math, faulty_qa = by_traj[4], by_traj[5]
    assert faulty_math[:2] == [("python", False, "status:error"),
                               ("python", False, "value_unused")]
    assert faulty_math[2] == ("python", True, "gold_answer")
    assert faulty_qa[0][:2] == ("search", False)
    assert all(not math.isnan(lb.dh) for lb in labels)
    rep = pilot.pilot_report(labels, n_boot=200, min_class_n=1)
    assert rep.by_quality["high"]["n"] + rep.by_quality["low"]["n"] == len(labels) == 12
    assert -1 <= rep.r <= 1 and rep.ci_bootstrap[0] <= rep.ci_bootstrap[1]


# ----------------------------------------------------------------------------- quality classes


def test_quality_classes_useful_redundant_useless():
    gold = ("870",)
    first = ("search", "station 5", "Station 5 is 870 km from the capital.", "ok")
    again = ("search", "station 5", "Station 5 is 870 km from the capital.", "ok")   # the same call
    empty = ("search", "station 6", "No results found.", "ok")
    t = make_traj([1.0, 0.5, 0.6, 0.7], [first, again, empty], gold=gold, final_text="<answer>870</answer>")
    assert [lb.quality_class for lb in pilot.label_calls([t])] == ["useful", "redundant", "useless"]
    # the question already states the answer: the first (gold-bearing) call is redundant too
    stated = {"p0": pilot.ExampleInfo((), "Station 5 is 870 km from the capital. How far is station 5?")}
    assert pilot.label_calls([t], examples=stated)[0].quality_class == "redundant"
    assert pilot.is_redundant(t, 0, gold, "How far is station 5?") is False


def _labels(n_useful, n_redundant, n_useless, seed=0):
    rng = np.random.default_rng(seed)
    out, i = [], 0
    for cls, n, mean in (("useful", n_useful, -0.5), ("redundant", n_redundant, 0.2), ("useless", n_useless, 0.4)):
        for _ in range(n):
            dh = float(rng.normal(mean, 0.3))
            out.append(pilot.CallLabel(i, f"p{i}", 1, "search", ("search",), "ok", cls != "useless", cls,
                                       dh, int(dh < 0), redundant=cls == "redundant"))
            i += 1
    return out


def test_class_means_have_bootstrap_intervals_when_the_class_is_big_enough():
    labels = _labels(40, 25, 30)
    rep = pilot.pilot_report(labels, n_boot=500, seed=3)
    for cls in pilot.QUALITY_CLASSES:
        dh = np.array([lb.dh for lb in labels if lb.quality_class == cls])
        st = rep.by_class[cls]
        assert st["n"] == dh.size and st["dh_mean"] == pytest.approx(dh.mean())
        draws = np.random.default_rng(3).integers(0, dh.size, (500, dh.size))   # the same stream
        naive = np.quantile(dh[draws].mean(axis=1), [0.025, 0.975])
        np.testing.assert_allclose([st["dh_lo"], st["dh_hi"]], naive, atol=1e-12)
    assert rep.by_class["useful"]["dh_hi"] < 0 < rep.by_class["useless"]["dh_lo"]
    assert not rep.notes and not math.isnan(rep.ci_bootstrap[0])
    assert "useful" in pilot.format_class_summary(rep) and "note:" not in pilot.format_class_summary(rep)


def test_small_classes_get_no_interval_and_say_why():
    """One high-quality call among many: a bootstrap CI of r would be narrow and meaningless."""
    labels = _labels(1, 0, 60)
    rep = pilot.pilot_report(labels, n_boot=300)
    assert all(math.isnan(v) for v in rep.ci_bootstrap)
    assert math.isnan(rep.by_class["useful"]["dh_lo"]) and not math.isnan(rep.by_class["useless"]["dh_lo"])
    text = pilot.format_report(rep)
    assert "only 1 high-quality call(s)" in text and "no CI for the useful class: 1 call(s)" in text
    assert "not shown" in text
    assert json.loads(json.dumps(rep.to_dict(), allow_nan=False))["ci_bootstrap"] == [None, None]
    assert not math.isnan(pilot.pilot_report(labels, n_boot=300, min_class_n=1).ci_bootstrap[0])


def test_cli_rules_by_import_path(tmp_path, capsys, monkeypatch):
    """--rules pkg.module:TABLE replaces a tool's rule; a bad path is a one-line error."""
    from tepo_jax.runlog import RunLog
    log = RunLog(tmp_path, tensorboard=False)
    log.save_trajectories("rl_000001", [make_traj([2.0, 1.0], [("search", "q", "Efport", "ok")])])
    (tmp_path / "my_rules.py").write_text(
        "from tepo_jax.analysis import pilot\n"
        "RULES = {'search': lambda ctx: pilot.Quality(False, 'mine')}\nNOT_A_TABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pilot.json"
    args = ["--trajectories", str(tmp_path / "trajectories"), "--n-boot", "50", "--json", str(out)]
    assert pilot.main(args + ["--rules", "my_rules:RULES"]) == 0
    assert [lb["reason"] for lb in json.loads(out.read_text())["labels"]] == ["mine"]
    capsys.readouterr()
    for spec, needle in (("my_rules:MISSING", "has no 'MISSING'"), ("no_such_module:R", "cannot import"),
                         ("my_rules:NOT_A_TABLE", "expected a dict"), ("my_rules", "package.module:NAME")):
        assert pilot.main(args + ["--rules", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- bad input: one line


def _cli_error(capsys, args):
    """pilot.main's exit status and its one stderr line (asserts it is one line)."""
    rc = pilot.main(args)
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), out.err
    return rc, err, out.out


@pytest.fixture
def traj_file(tmp_path):
    path = tmp_path / "rl_000001.jsonl"
    write_jsonl(path, [make_traj([2.0, 1.0], [("search", "q", "Efport", "ok")])] * 3)
    return path


@pytest.mark.parametrize("flag, value, needle", [
    ("--last", "-18", "--last must be >= 1"), ("--last", "0", "--last must be >= 1"),
    ("--n-boot", "0", "--n-boot must be >= 1"), ("--n-boot", "-5", "--n-boot must be >= 1"),
    ("--level", "1.5", "--level must be in (0, 1)"), ("--level", "0", "--level must be in (0, 1)"),
    ("--min-class-n", "0", "--min-class-n must be >= 1")])
def test_cli_refuses_bad_counts_and_levels(traj_file, capsys, flag, value, needle):
    rc, err, printed = _cli_error(capsys, ["--trajectories", str(traj_file.parent), flag, value])
    assert rc == 2 and needle in err and printed == ""


def test_library_refuses_bad_counts_and_levels(tmp_path, traj_file):
    labels = pilot.label_calls(pilot.load_trajectories(traj_file))
    with pytest.raises(ValueError, match="n_boot must be >= 1"):
        pilot.pilot_report(labels, n_boot=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        pilot.pilot_report(labels, level=1.5)
    with pytest.raises(ValueError, match="last must be >= 1"):
        pilot.trajectory_files(traj_file.parent, last=-18)


def test_cli_checks_output_paths_before_any_work(tmp_path, traj_file, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for flag, path, needle in (("--json", afile / "x.json", f"{afile} is a file, not a directory"),
                               ("--plot", afile / "sub" / "x.png", f"{afile} is a file"),
                               ("--json", tmp_path, "is a directory")):
        rc, err, printed = _cli_error(capsys, ["--trajectories", str(traj_file), "--n-boot", "20",
                                               flag, str(path)])
        assert rc == 2 and flag in err and needle in err and printed == ""   # nothing computed
    out = tmp_path / "new" / "dir" / "pilot.json"                         # created when missing
    assert pilot.main(["--trajectories", str(traj_file), "--n-boot", "20", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["report"]["n_calls"] == 3


def _traj_dict():
    from tepo_jax.rollout.trajectory import to_json_dict
    return to_json_dict(make_traj([2.0, 1.0], [("search", "q", "Efport", "ok")]))


def _set(key, value):
    def mutate(d):
        d[key] = value(d[key]) if callable(value) else value
    return mutate


def _set_item(key, i, value):
    return lambda d: d[key].__setitem__(i, value)


@pytest.mark.parametrize("mutate, needle", [
    ('{"schema_version": 2, "token_ids": [1, 2', "invalid JSON"),          # truncated last line
    ("[1, 2, 3]", "expected a JSON object, got a list"),
    (_set("schema_version", 3), "schema_version 3"),
    (lambda d: d.pop("entropies"), "missing field 'entropies'"),
    (_set("entropies", lambda v: v[:3]), "entropies has shape (3,)"),
    (_set("entropies", lambda v: ["a"] * len(v)), "entropies: expected a list of numbers"),
    (_set_item("entropies", 2, math.inf), "entropies has non-finite values on model tokens (token 2"),
    (_set_item("logprobs", 3, math.nan), "logprobs has non-finite values on model tokens (token 3"),
    (_set("tool_calls", [{"name": "search"}]), "tool_calls[0] has no field 'arguments'"),
])
def test_cli_malformed_trajectory_lines_are_one_line_errors(tmp_path, capsys, mutate, needle):
    """Every malformed line: FILE:LINE: problem, no traceback, nothing silently computed."""
    good = json.dumps(_traj_dict())
    if isinstance(mutate, str):
        bad = mutate
    else:
        d = _traj_dict()
        mutate(d)
        bad = json.dumps(d)
    path = tmp_path / "rl_000001.jsonl"
    path.write_text(good + "\n" + good + "\n" + bad)
    rc, err, printed = _cli_error(capsys, ["--trajectories", str(path), "--n-boot", "20"])
    assert rc == 2 and err.startswith(f"error: {path}:3: ") and needle in err and printed == ""


def test_cli_bad_dataset_tokenizer_and_empty_file_are_one_line_errors(tmp_path, traj_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for args, needle in ((["--dataset", str(bad)], f"{bad}:1"),
                         (["--tokenizer", str(empty_dir)], "no tokenizer files"),
                         (["--tokenizer", str(tmp_path / "nope")], "tokenizer directory not found")):
        rc, err, printed = _cli_error(capsys, ["--trajectories", str(traj_file), "--n-boot", "20", *args])
        assert rc == 2 and needle in err and printed == ""
    rc, err, _ = _cli_error(capsys, ["--trajectories", str(empty)])
    assert rc == 2 and "no trajectories" in err


# ----------------------------------------------------------------------------- metrics readers (traces)


def test_discover_metrics_refuses_a_path_with_no_metrics(tmp_path):
    from tepo_jax.analysis import traces
    with pytest.raises(FileNotFoundError, match="nope: no such metrics file or run directory"):
        traces.discover_metrics(f"a={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        traces.discover_metrics(tmp_path / "empty")
    run = tmp_path / "runs" / "grpo"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0, "reward/f1": 0.5}\n')
    assert traces.discover_metrics(tmp_path / "runs") == {"grpo": run / "metrics.jsonl"}


@pytest.mark.parametrize("step", ['"abc"', "null", "1.5", "true"])
def test_read_metrics_names_a_bad_step(tmp_path, step):
    from tepo_jax.analysis import traces
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 0, "r": 1.0}}\n{{"step": {step}, "r": 2.0}}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: 'step' must be a whole number"):
        traces.read_metrics(path)
    path.write_text('{"step": 0, "r": 1.0}\n{"step": 2.0, "r": 2.0}\n')   # 2.0 is a step
    assert traces.metric_series(traces.read_metrics(path), "r")[0].tolist() == [0, 2]
