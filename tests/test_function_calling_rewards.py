"""ToolRL/ResT function-call rewards against hand-computed cases.

Correctness: R = c_lo + (c_hi - c_lo) * S / S_max with S = r_name + Σ(r_key + r_value) and
S_max = 1 + Σ_gold (1 + |args|); default ranges format [0, 1], correctness [-3, 3].
"""
import json

import pytest

from tepo_jax.rewards import compute_reward, get_reward_fn
from tepo_jax.rewards.function_calling import (REST, TOOLRL, FunctionCallReward,
                                               FunctionCallRewardConfig, FunctionCallRewardResult,
                                               LinearRange, call_match, match_score)

REWARD = FunctionCallReward()


def call(name, **args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


def gold(*calls):
    return json.dumps([{"name": n, "arguments": a} for n, a in calls])


W_OSLO = ("get_weather", {"city": "Oslo", "unit": "celsius"})
FX = ("convert_currency", {"amount": 5, "from_currency": "USD", "to_currency": "EUR"})


def test_exact_match_gets_the_top_of_both_ranges():
    r = REWARD(call("get_weather", city="Oslo", unit="celsius") + "<|im_end|>", gold(W_OSLO))
    assert isinstance(r, FunctionCallRewardResult)
    assert (r.score, r.f1, r.em, r.malformed) == (4.0, 1.0, 1.0, False)
    assert r.parts["format"] == 1.0 and r.parts["correctness"] == 3.0


def test_right_name_wrong_value():
    r = REWARD(call("get_weather", city="Bergen", unit="celsius"), gold(W_OSLO))
    # S = name 1 + keys 1 + values 1 (unit) = 3 of S_max = 1 + (1 + 2) = 4
    assert r.parts["match"] == 3.0 and r.parts["max_match"] == 4.0
    assert r.f1 == pytest.approx(0.75) and r.em == 0.0
    assert r.parts["correctness"] == pytest.approx(-3 + 6 * 0.75)
    assert r.score == pytest.approx(1.0 + 1.5)


def test_right_name_missing_argument_key():
    r = REWARD(call("get_weather", city="Oslo"), gold(W_OSLO))
    # keys: Jaccard({city}, {city, unit}) = 1/2; values: city = 1 -> S = 2.5 / 4
    assert r.parts["keys"] == 0.5 and r.parts["values"] == 1.0
    assert r.f1 == pytest.approx(2.5 / 4)


def test_extra_call_lowers_the_name_score():
    text = call("get_weather", city="Oslo", unit="celsius") + "\n" + call(*FX[:1], **FX[1])
    r = REWARD(text, gold(W_OSLO))
    # names: multiset Jaccard([w], [w, fx]) = 1/2; the gold call matches fully: 1 + 2
    assert r.parts["name"] == 0.5
    assert r.f1 == pytest.approx(3.5 / 4)
    assert r.parts["num_pred"] == 2 and r.parts["num_gold"] == 1


def test_missing_call():
    r = REWARD(call("get_weather", city="Oslo", unit="celsius"), gold(W_OSLO, FX))
    # names 1/2; W matches 1 + 2; FX unmatched; S_max = 1 + 3 + 4 = 8
    assert r.parts["max_match"] == 8.0
    assert r.f1 == pytest.approx((0.5 + 3) / 8)


def test_wrong_function_gets_no_argument_credit():
    r = REWARD(call("get_forecast", city="Oslo", unit="celsius"), gold(W_OSLO))
    assert r.parts["match"] == 0.0 and r.parts["correctness"] == -3.0


def test_malformed_json_gets_the_bottom_of_correctness():
    r = REWARD('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}\n</tool_call>',
               gold(W_OSLO))
    assert r.malformed and r.parts["correctness"] == -3.0 and r.f1 == 0.0
    assert r.parts["format"] == 1.0          # the tags are right; the JSON is not


def test_no_call_when_one_is_due_and_a_call_when_none_is():
    r = REWARD("It is sunny in Oslo.", gold(W_OSLO))
    assert (r.parts["format"], r.parts["correctness"], r.score) == (0.0, -3.0, -3.0)
    r = REWARD("Hello! How can I help?", "[]")
    assert (r.parts["format"], r.parts["correctness"], r.f1) == (1.0, 0.0, 1.0)
    r = REWARD(call("get_weather", city="Oslo"), "[]")
    assert (r.parts["format"], r.parts["correctness"]) == (0.0, 0.0)


def test_unclosed_tag_fails_format():
    r = REWARD('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', gold(W_OSLO))
    assert r.parts["format"] == 0.0 and r.malformed


def test_swapped_order_is_full_credit_but_not_exact():
    text = call(*FX[:1], **FX[1]) + "\n" + call(W_OSLO[0], **W_OSLO[1])
    r = REWARD(text, gold(W_OSLO, FX))
    assert r.f1 == 1.0 and r.em == 0.0 and r.parts["correctness"] == 3.0


def test_value_types_compare_as_json_values():
    g = gold(("convert_currency", {"amount": 5}))
    assert REWARD(call("convert_currency", amount=5.0), g).f1 == 1.0
    assert REWARD(call("convert_currency", amount="5"), g).f1 == pytest.approx(2 / 3)


def test_toolrl_gold_string_and_think_requirement():
    toolrl_gold = ('<think>...</think>\n<tool_call>\n{"name": "get_weather", "parameters": '
                   '{"city": "Oslo", "unit": "celsius"}}\n</tool_call>')
    reward = FunctionCallReward(TOOLRL)
    plain = call("get_weather", city="Oslo", unit="celsius")
    assert reward(plain, toolrl_gold).parts["format"] == 0.0     # no <think> block
    thought = "<think>Oslo, celsius.</think>\n" + plain
    r = reward(thought, toolrl_gold)
    assert (r.parts["format"], r.parts["correctness"], r.em) == (1.0, 3.0, 1.0)
    assert reward(plain + "\n<think>late</think>", toolrl_gold).parts["format"] == 0.0


def test_exact_only_variant():
    r = FunctionCallReward(FunctionCallRewardConfig(exact_only=True))(
        call("get_weather", city="Oslo"), gold(W_OSLO))
    assert r.parts["correctness"] == -3.0


@pytest.mark.parametrize("step,fmt,corr", [
    (0, (-2.0, 2.0), (-2.0, 2.0)),
    (30, (-1.6, 1.8), (-2.2, 2.2)),
    (75, (-1.0, 1.5), (-2.5, 2.5)),       # the format minimum reaches its limit -1 here
    (150, (-1.0, 1.0), (-3.0, 3.0)),
    (600, (-1.0, 1.0), (-3.0, 3.0)),
])
def test_rest_range_schedule_matches_toolrl_schedulereward(step, fmt, corr):
    ranges = REST.ranges(step)
    assert ranges["format"] == pytest.approx(fmt) and ranges["correct"] == pytest.approx(corr)
    r = FunctionCallReward(REST)("<think>x</think>\n" + call("get_weather", city="Bergen",
                                                             unit="celsius"), gold(W_OSLO), step)
    assert r.parts["format"] == pytest.approx(fmt[1])
    assert r.parts["correctness"] == pytest.approx(corr[0] + (corr[1] - corr[0]) * 0.75)
    assert (r.parts["correct_lo"], r.parts["correct_hi"]) == pytest.approx(corr)


def test_static_ranges_and_linear_range():
    assert FunctionCallRewardConfig().ranges(1000) == {"format": (0.0, 1.0),
                                                       "correct": (-3.0, 3.0)}
    assert LinearRange(0.0, 1.0, 10).at(5) == 0.5 and LinearRange(0.0, 1.0, 10).at(50) == 1.0
    assert LinearRange(0.0, 1.0, 0).at(0) == 1.0


def test_match_helpers():
    assert match_score(["a", "b"], ["a", "b"]) == 1.0
    assert match_score(["a", "a"], ["a"]) == 0.5 and match_score([], ["a"]) == 0.0
    parts = call_match([{"name": "f", "arguments": {"x": 1}}],
                       [{"name": "f", "arguments": {"x": 2}}, {"name": "f", "arguments": {"x": 1}}])
    assert parts["values"] == 1.0     # the best unused same-name call is matched


def test_registered_and_scores_trajectory_gold():
    fn = get_reward_fn("function_calling")
    r = fn(call("get_weather", city="Oslo", unit="celsius"), [gold(W_OSLO)])
    assert r.em == 1.0 and r.score == 4.0
    assert compute_reward(call("get_weather", city="Oslo", unit="celsius"), gold(W_OSLO),
                          "function_calling").parts["exact"] == 1.0


def _fc_config(**reward):
    from tepo_jax.config import defaults, validate
    c = defaults()
    c.model.tiny, c.data.task = True, "function_calling"
    c.reward.update(reward)
    return validate(c)


def test_config_schedule_moves_the_ranges_with_the_step():
    """reward.fc_schedule='rest': the rollout's TaskRewards score at the RL step, so the ranges
    move (T = reward.fc_schedule_steps); 'off' keeps ToolRL's static ranges at every step."""
    from tepo_jax.rewards import TaskRewards
    task_rewards = TaskRewards.from_config
    text = call("get_weather", city="Bergen", unit="celsius")     # S / S_max = 0.75
    rewards = task_rewards(_fc_config(fc_schedule="rest", fc_schedule_steps=10))
    by_step = {s: rewards(text, gold(W_OSLO), "function_calling", s) for s in (0, 5, 10, 40)}
    # Hand values from the schedule: f_hi = max(1, 2 - t/T), c = [max(-3, -2 - t/T), min(3, 2 + t/T)]
    for step, (f_hi, c_lo, c_hi) in {0: (2.0, -2.0, 2.0), 5: (1.5, -2.5, 2.5),
                                    10: (1.0, -3.0, 3.0), 40: (1.0, -3.0, 3.0)}.items():
        r = by_step[step]
        assert r.parts["format_hi"] == pytest.approx(f_hi) and r.parts["format"] == pytest.approx(f_hi)
        assert r.score == pytest.approx(f_hi + c_lo + (c_hi - c_lo) * 0.75)
    static = task_rewards(_fc_config())
    for step in (0, 5, 400):
        r = static(text, gold(W_OSLO), "function_calling", step)
        assert (r.parts["format_hi"], r.parts["correct_lo"], r.parts["correct_hi"]) == (1.0, -3.0, 3.0)
    # Tasks without a schedule fall through to the registry.
    assert static("<answer>Paris</answer>", ["Paris"], "qa", 9).score == 1.0
    think = task_rewards(_fc_config(fc_require_think=True))
    assert think(text, gold(W_OSLO), "function_calling").parts["format"] == 0.0


def test_parts_reach_the_trajectory_and_the_metrics():
    from tepo_jax.rl.tepo_metrics import tepo_step_metrics
    from tepo_jax.rollout.trajectory import TokenKind, TokenRole, Trajectory, attach_reward
    traj = Trajectory([1, 2], [TokenKind.PROMPT, TokenKind.REASONING], [0, 0],
                      [TokenRole.NONE, TokenRole.REASONING], [0.0, -0.1], [0.0, 0.5], [],
                      prompt_id="p", group_id=0, sample_index=0, gold=[gold(W_OSLO)],
                      task="function_calling", finish_reason="answer")
    a = attach_reward(traj, REWARD(call("get_weather", city="Oslo", unit="celsius"), gold(W_OSLO)))
    b = attach_reward(traj, REWARD(call("get_weather", city="Bergen", unit="celsius"), gold(W_OSLO)))
    assert a.reward_parts["exact"] == 1.0 and b.reward_parts["values"] == 1.0
    m = tepo_step_metrics([a, b])
    for part in ("format", "correctness", "name", "keys", "values", "match", "exact",
                 "format_hi", "correct_lo"):
        assert f"reward/fc/{part}" in m
    assert m["reward/fc/exact"] == 0.5 and m["reward/fc/values"] == pytest.approx(1.5)
    assert m["reward/fc/correctness"] == pytest.approx((3.0 + (-3.0 + 6.0 * 0.75)) / 2)
    assert not any(k.startswith("reward/qa/") for k in tepo_step_metrics([attach_reward(
        traj, compute_reward("<answer>x</answer>", ["x"], "qa"))]))
