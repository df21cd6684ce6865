"""Rewards: extraction, SQuAD normalisation / EM / F1, math-verify equivalence, registry."""
import threading

import pytest

from tepo_jax.rewards import (RewardResult, compute_reward, exact_match, extract_answer,
                              extract_boxed, get_reward_fn, math_equivalent, normalize_answer,
                              token_f1)
from tepo_jax.rollout.trajectory import TokenKind, TokenRole, Trajectory, attach_reward


# ------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text, expected", [
    ("<answer>Paris</answer>", "Paris"),
    ("<answer>draft</answer> wait <answer> Lyon </answer>", "Lyon"),      # last one wins
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),              # nested braces
    ("<answer>so \\boxed{a} or \\boxed{{x}^{2}}</answer>", "{x}^{2}"),      # last box
    ("<answer>\\boxed{unclosed</answer>", "\\boxed{unclosed"),               # no valid box
    ("<answer>multi\nline</answer>", "multi\nline"),
    ("no tag at all", None),
    ("<answer>   </answer>", None),                                         # empty
    ("<answer>\\boxed{}</answer>", None),                                   # empty box
    ("<answer>truncated", None),                                            # unclosed tag
    ("<answer>I think <answer>Paris</answer>", "Paris"),                    # unclosed draft, then one
    ("<answer>a</answer><answer>b <answer>c</answer>", "c"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_nested():
    assert extract_boxed("x \\boxed{\\sqrt{\\frac{a}{b}}} y") == "\\sqrt{\\frac{a}{b}}"
    assert extract_boxed("nothing") is None


# ------------------------------------------------------------------------------ QA metrics

def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theory") == "theory"          # 'the' only as a whole word


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("Paris", "paris", 1.0, 1.0),
    ("the Paris.", ["London", "Paris"], 1.0, 1.0),             # articles, punct, multi gold
    ("Paris France", "Paris", 0.0, 2 * 0.5 * 1.0 / 1.5),       # P=1/2, R=1 -> 2/3
    ("New York City", ["York", "new york"], 0.0, 0.8),         # best gold: P=2/3, R=1
    ("Berlin", ["Paris", "Rome"], 0.0, 0.0),
    ("a", "the", 1.0, 1.0),                                    # both empty after normalising
])
def test_em_f1(pred, gold, em, f1):
    assert exact_match(pred, gold) == em
    assert token_f1(pred, gold) == pytest.approx(f1)


def test_f1_counts_repeated_tokens_once_each():
    # pred "paris paris", gold "paris": overlap 1, P = 1/2, R = 1 -> F1 = 2/3
    assert token_f1("paris paris", "Paris") == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------- math-verify

@pytest.mark.parametrize("pred, gold", [
    ("0.5", "1/2"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "1/2"),
    ("x^{2}", "x^2"),
    ("x \\cdot x", "x^2"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("3", ["7", "3.0"]),
])
def test_math_equivalent(pred, gold):
    assert math_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [("0.51", "1/2"), ("x^3", "x^2"), ("4", "3")])
def test_math_not_equivalent(pred, gold):
    assert not math_equivalent(pred, gold)


def test_math_equivalent_from_worker_thread():
    # math-verify's signal timeouts only work in the main thread; ours must work anywhere.
    results = {}

    def work():
        results["eq"] = math_equivalent("0.5", "\\frac{1}{2}")
        results["neq"] = math_equivalent("0.25", "\\frac{1}{2}")

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert results == {"eq": True, "neq": False}


# ------------------------------------------------------------------------------- registry

def test_qa_reward_result():
    r = compute_reward("think <answer>The Paris</answer>", ["paris", "Lyon"], "qa")
    assert r == RewardResult(score=1.0, f1=1.0, em=1.0, malformed=False, extracted="The Paris")
    partial = compute_reward("<answer>Paris France</answer>", "Paris", "qa")
    assert partial.score == pytest.approx(2 / 3) and partial.em == 0.0
    assert compute_reward("<answer>Paris France</answer>", "Paris", "qa_em").score == 0.0


@pytest.mark.parametrize("task", ["qa", "qa_em", "math"])
@pytest.mark.parametrize("text", ["Paris", "<answer></answer>", "<answer> \\boxed{} </answer>"])
def test_malformed_gets_zero(task, text):
    r = compute_reward(text, "Paris", task)
    assert r.malformed and r.score == 0.0 and r.f1 == 0.0 and r.extracted is None


def test_math_reward():
    good = compute_reward("<answer>The result is \\boxed{\\frac{1}{2}}</answer>", "0.5", "math")
    assert good.score == 1.0 and not good.malformed and good.extracted == "\\frac{1}{2}"
    bad = compute_reward("<answer>\\boxed{2}</answer>", "0.5", "math")
    assert bad.score == 0.0 and not bad.malformed


def test_registry_and_trajectory_dispatch():
    assert get_reward_fn("math") is not get_reward_fn("qa")
    with pytest.raises(ValueError, match="unknown reward task"):
        get_reward_fn("chess")
    traj = Trajectory([1, 2], [TokenKind.PROMPT, TokenKind.ANSWER], [0, 0],
                      [TokenRole.NONE, TokenRole.ANSWER_CONTENT], [0.0, -0.1], [0.0, 0.2], [],
                      prompt_id="p", group_id=0, sample_index=0, gold=["Rome"], task="qa",
                      finish_reason="answer", final_text="<answer>rome</answer>")
    result = compute_reward(traj)
    assert result.em == 1.0
    scored = attach_reward(traj, result)
    assert (scored.reward, scored.f1, scored.em, scored.malformed, scored.extracted) == (
        1.0, 1.0, 1.0, False, "rome")
    assert traj.reward is None                        # the original is unchanged
