"""Trajectory: layout, segment entropies, validation errors, JSONL round trip, ResT roles."""
import dataclasses
import json
import math
import random

import numpy as np
import pytest

from tepo_jax.rollout.trajectory import (SCHEMA_VERSION, TokenKind, TokenRole, ToolCallRecord,
                                         Trajectory, TrajectoryError, entropy_deltas,
                                         entropy_reducing, from_jsonl_line, read_jsonl,
                                         segment_entropies, to_jsonl_line, write_jsonl)
from tepo_jax.tools.markup import CallMarkup, kinds_from_char_spans, roles_from_char_spans

K, R = TokenKind, TokenRole


def build(segments, prompt_len=2, **meta):
    """Hand layout: segments in order, ('r', [H..]), ('call', name, [H..]), ('obs', length),
    ('ans', [H..]). The turn increases at each call, as the schema says."""
    ids, kinds, turns, roles, ents, calls = [], [], [], [], [], []
    turn = 0

    def add(kind, role, entropy):
        ids.append(100 + len(ids))
        kinds.append(kind)
        turns.append(turn)
        roles.append(role)
        ents.append(entropy)

    for _ in range(prompt_len):
        add(K.PROMPT, R.NONE, 0.0)
    for seg in segments:
        if seg[0] == "r":
            for h in seg[1]:
                add(K.REASONING, R.REASONING, h)
        elif seg[0] == "ans":
            for h in seg[1]:
                add(K.ANSWER, R.ANSWER_CONTENT, h)
        elif seg[0] == "unrun":
            for h in seg[1]:
                add(K.UNRUN_CALL, R.TOOL_ARGS, h)
        elif seg[0] == "call":
            turn += 1
            start = len(ids)
            for h in seg[2]:
                add(K.TOOL_CALL, R.TOOL_ARGS, h)
            calls.append(ToolCallRecord(seg[1], "args", "", "ok", (start, len(ids)), (0, 0), turn))
        elif seg[0] == "obs":
            start = len(ids)
            for _ in range(seg[1]):
                add(K.TOOL_RESULT, R.NONE, 0.0)
            calls[-1].result_span = (start, len(ids))
    logprobs = [-0.5 if k in (K.REASONING, K.TOOL_CALL, K.ANSWER, K.UNRUN_CALL) else 0.0 for k in kinds]
    defaults = dict(prompt_id="p0", group_id=0, sample_index=0, gold=["Paris"], task="qa",
                    finish_reason="answer")
    defaults.update(meta)
    return Trajectory(ids, kinds, turns, roles, logprobs, ents, calls, **defaults)


TWO_CALLS = [("r", [2.0, 4.0]), ("call", "python", [1.0]), ("obs", 2), ("r", [1.0, 2.0]),
             ("call", "search", [0.5, 0.5]), ("obs", 1), ("r", [3.0]), ("ans", [5.0])]


def test_layout_and_segment_entropies():
    t = build(TWO_CALLS).validate()
    assert t.token_ids.dtype == np.int32 and t.kinds.dtype == np.int8
    assert t.turns.dtype == np.int16 and t.entropies.dtype == np.float32
    # r_0 = mean(2,4) = 3 ; r_1 = mean(1,2) = 1.5 ; r_2 = mean(3,5) = 4 (answer in r_2)
    assert segment_entropies(t) == pytest.approx([3.0, 1.5, 4.0])
    assert entropy_deltas(t) == pytest.approx([-1.5, 2.5])
    assert entropy_reducing(t) == [1, 0]
    assert t.model_mask().sum() == 2 + 1 + 2 + 2 + 1 + 1


def test_equal_segments_in_another_order_are_not_entropy_reducing():
    # float32 means of these 7 values in the two orders differ by an ulp (2.3549366 vs
    # 2.3549364): ΔH must be exactly 0, so I = 0 (design: I_k = 1[ΔH_k < 0]).
    h = [3.1848085, 1.3489336, 0.20486762, 0.082638174, 4.0663514, 4.563778, 3.0331788]
    assert np.float32(h).mean() != np.float32(h[::-1]).mean()
    t = build([("r", h), ("call", "python", [1.0]), ("obs", 2), ("r", h[::-1][:-1]), ("ans", h[:1])])
    assert entropy_deltas(t) == [0.0] and entropy_reducing(t) == [0]


def test_empty_segments_give_nan_and_no_reduction():
    t = build([("call", "python", [1.0]), ("obs", 1), ("call", "python", [1.0]), ("obs", 1),
               ("ans", [0.1])]).validate()
    h = segment_entropies(t)
    assert math.isnan(h[0]) and math.isnan(h[1]) and h[2] == pytest.approx(0.1)
    assert all(math.isnan(d) for d in entropy_deltas(t))
    assert entropy_reducing(t) == [0, 0]


def test_no_call_trajectory():
    t = build([("r", [1.0]), ("ans", [2.0])]).validate()
    assert segment_entropies(t) == pytest.approx([1.5])
    assert entropy_deltas(t) == [] and t.num_calls == 0


def test_unrun_call_is_a_model_token_outside_every_segment():
    """A call past max_calls: loss-carrying model tokens of turn n, not part of H(r_n)."""
    t = build(TWO_CALLS[:-1] + [("unrun", [0.01, 0.01, 0.01])], finish_reason="max_calls").validate()
    unrun = t.kinds == K.UNRUN_CALL
    assert unrun.sum() == 3 and t.model_mask()[unrun].all() and (t.turns[unrun] == 2).all()
    assert segment_entropies(t) == pytest.approx([3.0, 1.5, 3.0])   # r_2 = [3.0] only
    assert entropy_reducing(t) == [1, 0]   # with the unrun call in r_2 it would be [1, 1]


def test_unrun_call_outside_the_last_turn_is_rejected():
    t = build(TWO_CALLS[:4] + [("unrun", [0.1, 0.1])] + TWO_CALLS[4:])   # in turn 1 of n = 2
    with pytest.raises(TrajectoryError, match="UNRUN_CALL tokens must belong"):
        t.validate()
    t = build(TWO_CALLS[:2] + [("unrun", [0.1])], finish_reason="max_calls")
    t.roles[-1] = R.NONE
    with pytest.raises(TrajectoryError, match="role must be NONE"):
        t.validate()


def test_builder_marks_an_unrun_call_turn(tmp_path):
    """The rollout does not run a call past max_calls: from the call's first token on, the
    turn is UNRUN_CALL (an answer's tokens would stay ANSWER)."""
    from tepo_jax.rollout.builder import TrajectoryBuilder

    class CharTok:   # one character per token: decode is the join
        def decode(self, ids, skip_special_tokens=False):
            return "".join(map(chr, ids))

    turn = "Let me check.<search>q</search>"
    b = TrajectoryBuilder([1, 2], tokenizer=CharTok(), prompt_id="p", group_id=0,
                          sample_index=0, gold="g", task="qa")
    b.add_model_turn([ord(c) for c in turn], [-0.1] * len(turn), [1.0] * len(turn), is_call=False)
    t = b.finish("max_calls")
    start = 2 + turn.index("<search>")
    assert (t.kinds[2:start] == K.REASONING).all() and (t.kinds[start:] == K.UNRUN_CALL).all()
    assert (t.roles[start:start + 8] == R.TOOL_NAME).all() and (t.turns[2:] == 0).all()


def test_jsonl_round_trip(tmp_path):
    a = build(TWO_CALLS, gold="1/2", task="math", finish_reason="eos", final_text="<answer>")
    b = dataclasses.replace(build([("r", [0.3]), ("ans", [0.7])], sample_index=1), reward=0.5,
                            f1=0.5, em=0.0, malformed=False, extracted="paris france")
    c = dataclasses.replace(build(TWO_CALLS[:-1] + [("unrun", [0.2])], finish_reason="max_calls"),
                            reward=1.5, reward_parts={"format": 1.0, "correctness": 0.5})
    a.entropies[3] = np.float32(1.2345678)   # a float32 value with no short decimal form
    path = tmp_path / "trajs.jsonl"
    write_jsonl(path, [a, b, c])
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and f'"schema_version": {SCHEMA_VERSION}' in lines[0]
    for orig, back in zip([a, b, c], read_jsonl(path)):
        back.validate()
        for name in ("token_ids", "kinds", "turns", "roles", "logprobs", "entropies"):
            assert getattr(back, name).dtype == getattr(orig, name).dtype
            np.testing.assert_array_equal(getattr(back, name), getattr(orig, name))
        assert back.tool_calls == orig.tool_calls
        for name in ("prompt_id", "group_id", "sample_index", "gold", "task", "finish_reason",
                     "final_text", "reward", "f1", "em", "malformed", "extracted", "reward_parts"):
            assert getattr(back, name) == getattr(orig, name)


def test_version_1_files_still_read():
    """Version 1 (before UNRUN_CALL and reward_parts) has the same fields minus reward_parts."""
    d = json.loads(to_jsonl_line(build(TWO_CALLS)))
    d["schema_version"] = 1
    del d["reward_parts"]
    back = from_jsonl_line(json.dumps(d)).validate()
    assert back.reward_parts is None and back.kinds.tolist() == build(TWO_CALLS).kinds.tolist()


def test_unknown_schema_version_is_rejected():
    line = to_jsonl_line(build(TWO_CALLS)).replace(f'"schema_version": {SCHEMA_VERSION}',
                                                   '"schema_version": 999')
    with pytest.raises(TrajectoryError, match="schema_version"):
        from_jsonl_line(line)


def _broken(mutate):
    t = build(TWO_CALLS)
    mutate(t)
    return t


@pytest.mark.parametrize("mutate, message", [
    (lambda t: setattr(t, "kinds", t.kinds[:-1]), "kinds has shape"),
    (lambda t: t.roles.__setitem__(0, R.FORMAT), "role must be NONE"),
    (lambda t: t.roles.__setitem__(2, R.NONE), "role must be NONE"),
    (lambda t: t.kinds.__setitem__(0, 9), "outside TokenKind"),
    (lambda t: t.entropies.__setitem__(0, 0.5), "entropies must be 0"),
    (lambda t: t.logprobs.__setitem__(2, np.nan), "non-finite"),
    (lambda t: t.turns.__setitem__(2, 1), "non-decreasing"),
    (lambda t: t.turns.__setitem__(3, 1), "order call, tool result"),
    (lambda t: t.kinds.__setitem__(2, K.ANSWER), "ANSWER tokens must belong"),
    (lambda t: setattr(t.tool_calls[0], "call_span", (4, 6)), "do not match span"),
    (lambda t: setattr(t.tool_calls[1], "turn", 3), "expected 2"),
    (lambda t: t.tool_calls.pop(), "turns must lie in"),
    (lambda t: setattr(t, "finish_reason", "done"), "finish_reason"),
    (lambda t: (t.kinds.__setitem__(1, K.REASONING), t.roles.__setitem__(1, R.REASONING),
                t.logprobs.__setitem__(1, -1.0)), None),   # still valid: prompt prefix of 1
])
def test_validate_errors(mutate, message):
    t = _broken(mutate)
    if message is None:
        t.validate()
    else:
        with pytest.raises(TrajectoryError, match=message):
            t.validate()


def test_tool_result_after_reasoning_in_same_turn_is_rejected():
    t = build(TWO_CALLS)
    # Swap an obs_1 token and an r_1 token: the order within turn 1 breaks.
    t.kinds[5], t.kinds[6] = K.REASONING, K.TOOL_RESULT
    with pytest.raises(TrajectoryError):
        t.validate()


# ------------------------------------------------------------------ roles from char spans

def _labelled(pieces):
    """text and its per-character (role, kind), written by hand from labelled pieces."""
    text = "".join(p for p, _, _ in pieces)
    char_roles = [r for p, r, _ in pieces for _ in p]
    char_kinds = [k for p, _, k in pieces for _ in p]
    return text, char_roles, char_kinds


PYTHON_TURN = [("Let me compute.\n", R.REASONING, K.REASONING),
               ("<python>", R.TOOL_NAME, K.TOOL_CALL),
               ("print(2 + 2)", R.TOOL_ARGS, K.TOOL_CALL),
               ("</python>", R.FORMAT, K.TOOL_CALL)]
ANSWER_TURN = [("<think>", R.FORMAT, K.REASONING), ("It is 4.", R.REASONING, K.REASONING),
               ("</think>", R.FORMAT, K.REASONING), (" So ", R.REASONING, K.REASONING),
               ("<answer>", R.FORMAT, K.ANSWER), ("\\boxed{4}", R.ANSWER_CONTENT, K.ANSWER),
               ("</answer>", R.FORMAT, K.ANSWER)]
JSON_TURN = [("Search it.", R.REASONING, K.REASONING), ("<tool_call>", R.FORMAT, K.TOOL_CALL),
             ('{"name": "', R.FORMAT, K.TOOL_CALL), ("search", R.TOOL_NAME, K.TOOL_CALL),
             ('", "arguments": ', R.FORMAT, K.TOOL_CALL),
             ('{"query": "capital of France"}', R.TOOL_ARGS, K.TOOL_CALL),
             ("}", R.FORMAT, K.TOOL_CALL), ("</tool_call>", R.FORMAT, K.TOOL_CALL)]


def _random_spans(n_chars, rng, max_len=5):
    spans, start = [], 0
    while start < n_chars:
        end = min(n_chars, start + rng.randint(1, max_len))
        spans.append((start, end))
        start = end
    return spans


@pytest.mark.parametrize("pieces", [PYTHON_TURN, ANSWER_TURN, JSON_TURN])
def test_roles_and_kinds_follow_first_character(pieces):
    text, char_roles, char_kinds = _labelled(pieces)
    rng = random.Random(0)
    for _ in range(20):
        spans = _random_spans(len(text), rng)
        roles = roles_from_char_spans(spans, text)
        kinds = kinds_from_char_spans(spans, text)
        assert roles.tolist() == [char_roles[s] for s, _ in spans]
        assert kinds.tolist() == [char_kinds[s] for s, _ in spans]


def test_roles_cover_every_model_token_exactly_once():
    text, _, _ = _labelled(PYTHON_TURN + ANSWER_TURN)
    spans = _random_spans(len(text), random.Random(1)) + [(len(text), len(text))]  # + EOS
    kinds = kinds_from_char_spans(spans, text)
    roles = roles_from_char_spans(spans, text, kinds=kinds)
    assert roles.shape == (len(spans),)
    assert set(roles.tolist()) <= {int(r) for r in TokenRole if r != R.NONE}
    assert roles[-1] == R.FORMAT           # zero-width special token


def test_straddling_token_takes_first_character_role():
    text = "ok.<python>x</python>"
    spans = [(0, 2), (2, 5), (5, 11), (11, 12), (12, 21)]   # "ok", ".<p", "ython>", "x", ...
    assert roles_from_char_spans(spans, text).tolist() == [
        R.REASONING, R.REASONING, R.TOOL_NAME, R.TOOL_ARGS, R.FORMAT]


def test_non_model_tokens_get_none_and_unclosed_call_runs_to_end():
    text = "a<python>print("
    spans = [(0, 1), (1, 9), (9, 15)]
    kinds = [K.PROMPT, K.TOOL_CALL, K.TOOL_CALL]
    assert roles_from_char_spans(spans, text, kinds=kinds).tolist() == [
        R.NONE, R.TOOL_NAME, R.TOOL_ARGS]
    markup = CallMarkup(tool_tags=("calc",))
    assert roles_from_char_spans([(0, 1), (1, 9)], text, markup=markup).tolist() == [
        R.REASONING, R.REASONING]


def test_an_unclosed_answer_draft_ends_where_the_next_answer_opens():
    # As rewards.extract reads it: the answer is the closed "Paris", whose tags are FORMAT,
    # not content of the draft.
    text = "<answer>I think <answer>Paris</answer>"
    spans = [(0, 8), (8, 16), (16, 24), (24, 29), (29, 38)]
    assert roles_from_char_spans(spans, text).tolist() == [
        R.FORMAT, R.ANSWER_CONTENT, R.FORMAT, R.ANSWER_CONTENT, R.FORMAT]
    assert kinds_from_char_spans(spans, text).tolist() == [K.ANSWER] * 5


# ----------------------------------------------------------------------------- reading bad files


def test_read_jsonl_names_file_and_line_of_every_malformed_line(tmp_path):
    """One error type (TrajectoryError), `FILE:LINE: problem`, each record validated."""
    good = to_jsonl_line(build(TWO_CALLS))
    d = json.loads(good)
    nan_entropy = dict(d, entropies=[x if i != 3 else math.nan for i, x in enumerate(d["entropies"])])
    short = dict(d, logprobs=d["logprobs"][:4])
    bad_kind = dict(d, kinds=[9] + d["kinds"][1:])
    cases = [(good[:40], "invalid JSON"), ('"text"', "expected a JSON object, got a str"),
             (json.dumps({k: v for k, v in d.items() if k != "turns"}), "missing field 'turns'"),
             (json.dumps(dict(d, token_ids=None)), "token_ids: expected a list of numbers"),
             (json.dumps(dict(d, tool_calls={"a": 1})), "tool_calls is a dict"),
             (json.dumps(dict(d, tool_calls=[3])), "tool_calls[0] is a int"),
             (json.dumps(nan_entropy), "entropies has non-finite values on model tokens (token 3: nan)"),
             (json.dumps(short), "logprobs has shape (4,)"),
             (json.dumps(bad_kind), "outside TokenKind")]
    for bad, needle in cases:
        path = tmp_path / "t.jsonl"
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(TrajectoryError) as e:
            read_jsonl(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}:3: ") and needle in msg and len(msg.splitlines()) == 1, msg
    path.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(TrajectoryError, match=r"t.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_from_jsonl_line_validates():
    t = build(TWO_CALLS)
    t.entropies[3] = np.inf                     # written by hand: the writer forbids NaN/inf
    d = json.loads(to_jsonl_line(build(TWO_CALLS)))
    d["entropies"] = [float(x) for x in t.entropies]
    with pytest.raises(TrajectoryError, match=r"entropies has non-finite .* \(token 3: inf\)"):
        from_jsonl_line(json.dumps(d))
