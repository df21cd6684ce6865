"""Advantages (grpo, tepo_sparse, tepo_dense) against an independent loop-based reference
written from docs/design.md's formulas, plus the per-step TEPO metrics."""
import math

import numpy as np
import pytest

from tepo_jax.rl.advantages import (AdvantageConfig, AdvantageKind, StdKind, batch_advantages,
                                    get_advantage_fn, group_normalize)
from tepo_jax.rl.tepo_metrics import STABLE_KEYS, tepo_step_metrics
from tepo_jax.rollout.trajectory import TokenKind, TokenRole, ToolCallRecord, Trajectory

K = TokenKind
MODEL = (K.REASONING, K.TOOL_CALL, K.ANSWER, K.UNRUN_CALL)


def build(segments, group_id=0, prompt_len=2, **meta):
    """('r', [H..]) reasoning, ('call', name, [H..]), ('obs', length), ('ans', [H..]),
    ('unrun', [H..]) a call the rollout did not run (past max_calls)."""
    kinds, turns, ents, calls = [], [], [], []
    turn = 0
    for _ in range(prompt_len):
        kinds.append(K.PROMPT), turns.append(0), ents.append(0.0)
    for seg in segments:
        tag = seg[0]
        if tag == "call":
            turn += 1
            calls.append(ToolCallRecord(seg[1], "", "", "ok", (len(kinds), len(kinds) + len(seg[2])),
                                        (0, 0), turn))
        if tag == "obs":
            calls[-1].result_span = (len(kinds), len(kinds) + seg[1])
            entropies, kind = [0.0] * seg[1], K.TOOL_RESULT
        else:
            entropies = seg[-1]
            kind = {"r": K.REASONING, "call": K.TOOL_CALL, "ans": K.ANSWER,
                    "unrun": K.UNRUN_CALL}[tag]
        for h in entropies:
            kinds.append(kind), turns.append(turn), ents.append(h)
    roles = [TokenRole.REASONING if k in MODEL else TokenRole.NONE for k in kinds]
    logprobs = [-1.0 if k in MODEL else 0.0 for k in kinds]
    meta = {"prompt_id": "p", "sample_index": 0, "gold": "g", "task": "qa",
            "finish_reason": "answer", **meta}
    return Trajectory(list(range(len(kinds))), kinds, turns, roles, logprobs, ents, calls,
                      group_id=group_id, **meta).validate()


# ------------------------------------------------------------------ independent reference

def ref_segment_entropy(traj, k):
    total, count = 0.0, 0
    for t in range(len(traj.kinds)):
        if traj.kinds[t] in (K.REASONING, K.ANSWER) and traj.turns[t] == k:
            total += float(traj.entropies[t])
            count += 1
    return total / count if count else None


def ref_indicators(traj):
    out = []
    for k in range(1, len(traj.tool_calls) + 1):
        before, after = ref_segment_entropy(traj, k - 1), ref_segment_entropy(traj, k)
        out.append(1 if before is not None and after is not None and after - before < 0 else 0)
    return out


def ref_normalize(values, eps=1e-6, ddof=0):
    if not values:
        return []
    mean = sum(values) / len(values)
    denom = len(values) - ddof if len(values) > 1 else len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / denom)
    return [(v - mean) / (std + eps) for v in values]


def ref_grpo(group, scores, eps=1e-6, ddof=0):
    adv = ref_normalize(list(scores), eps, ddof)
    return [[adv[i] if k in MODEL else 0.0 for k in traj.kinds] for i, traj in enumerate(group)]


def ref_sparse_rewards(group, scores, c=1.0):
    rewards = []
    for traj, f1 in zip(group, scores):
        n = len(traj.tool_calls)
        rewards.append(f1 * c if n == 0 else f1 * sum(ref_indicators(traj)) / n)
    return rewards


def ref_sparse(group, scores, c=1.0, eps=1e-6):
    return ref_grpo(group, ref_sparse_rewards(group, scores, c), eps)


def ref_dense_rewards(group, scores, alpha):
    return [[f1 * (1 + alpha * i_k) for i_k in ref_indicators(t)] for t, f1 in zip(group, scores)]


def ref_dense(group, scores, alpha, eps=1e-6):
    per_call = ref_dense_rewards(group, scores, alpha)
    flat = ref_normalize([r for rs in per_call for r in rs], eps)
    call_adv, pos = [], 0
    for rs in per_call:
        call_adv.append(flat[pos:pos + len(rs)])
        pos += len(rs)
    outcome = ref_normalize(list(scores), eps)
    out = []
    for i, traj in enumerate(group):
        n = len(traj.tool_calls)
        row = []
        for t in range(len(traj.kinds)):
            kind, turn = traj.kinds[t], int(traj.turns[t])
            if kind == K.TOOL_CALL:
                row.append(call_adv[i][turn - 1])                 # call_k itself
            elif kind in (K.REASONING, K.ANSWER):
                # r_turn is the pre-segment of call turn+1; r_n gets the outcome advantage.
                row.append(call_adv[i][turn] if turn < n else outcome[i])
            elif kind == K.UNRUN_CALL:
                row.append(outcome[i])          # final turn, after r_n's last token
            else:
                row.append(0.0)
        out.append(row)
    return out


def run(kind, group, scores, **cfg):
    return get_advantage_fn(kind)(group, scores, AdvantageConfig(kind=kind, **cfg))


def assert_matches(result, reference):
    assert len(result.advantages) == len(reference)
    for got, want in zip(result.advantages, reference):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ fixtures

NO_CALL = [("r", [1.0, 2.0]), ("ans", [0.5])]
ONE_CALL_REDUCING = [("r", [2.0, 2.0]), ("call", "search", [0.3]), ("obs", 2), ("r", [1.0]),
                     ("ans", [0.5])]
ONE_CALL_RAISING = [("r", [0.5]), ("call", "python", [0.3, 0.2]), ("obs", 1), ("r", [2.0]),
                    ("ans", [2.0])]
THREE_CALLS = [("r", [3.0]), ("call", "search", [0.1]), ("obs", 1), ("r", [2.0]),
               ("call", "python", [0.2]), ("obs", 2), ("r", [2.5, 2.5]),
               ("call", "search", [0.4]), ("obs", 1), ("r", [1.0]), ("ans", [1.0])]
EMPTY_SEGMENTS = [("call", "search", [0.1]), ("obs", 1), ("call", "search", [0.2]), ("obs", 1),
                  ("r", [0.1]), ("ans", [0.1])]   # r_0 and r_1 empty -> I_1 = I_2 = 0
# Hit max_calls: the 3rd call is written but not run. H(r_0) = H(r_1) = 2 -> I = [0, 0]; were the
# low-entropy unrun call counted in r_2, H(r_2) = 0.7 would give a spurious I_2 = 1.
MAX_CALLS = [("r", [2.0]), ("call", "search", [0.3]), ("obs", 1), ("r", [2.0]),
             ("call", "search", [0.3]), ("obs", 1), ("r", [2.0, 2.0]), ("unrun", [0.05, 0.05])]
NO_FINAL_SEGMENT = [("r", [2.0]), ("call", "python", [0.4]), ("obs", 2)]   # r_1 empty: I_1 = 0
ONLY_UNRUN_AFTER = [("r", [2.0]), ("call", "python", [0.4]), ("obs", 2), ("unrun", [0.1])]


def mixed_group():
    group = [build(s) for s in (NO_CALL, ONE_CALL_REDUCING, ONE_CALL_RAISING, THREE_CALLS,
                                EMPTY_SEGMENTS)]
    return group, [0.2, 1.0, 0.6, 0.8, 0.4]


def test_reference_indicators_on_hand_layouts():
    # Hand-derived: THREE_CALLS H = [3, 2, 2.5, 1] -> ΔH = [-1, +0.5, -1.5] -> I = [1, 0, 1].
    assert ref_indicators(build(THREE_CALLS)) == [1, 0, 1]
    assert ref_indicators(build(EMPTY_SEGMENTS)) == [0, 0]
    assert ref_indicators(build(ONE_CALL_REDUCING)) == [1]


@pytest.mark.parametrize("kind", list(AdvantageKind))
def test_mixed_group_matches_reference(kind):
    group, scores = mixed_group()
    result = run(kind, group, scores, alpha=0.5, no_call_scale=0.7)
    reference = {AdvantageKind.GRPO: lambda: ref_grpo(group, scores),
                 AdvantageKind.TEPO_SPARSE: lambda: ref_sparse(group, scores, c=0.7),
                 AdvantageKind.TEPO_DENSE: lambda: ref_dense(group, scores, alpha=0.5)}[kind]()
    assert_matches(result, reference)
    for traj, adv, info in zip(group, result.advantages, result.info):
        assert (adv[~traj.model_mask()] == 0).all()
        assert list(info.indicators) == ref_indicators(traj)
        assert info.num_calls == len(traj.tool_calls)
        assert info.num_reducing == sum(ref_indicators(traj))


def test_sparse_rewards_by_hand():
    group, scores = mixed_group()
    info = run(AdvantageKind.TEPO_SPARSE, group, scores, no_call_scale=0.7).info
    # no call: 0.2*0.7 ; 1/1 reducing: 1.0 ; 0/1: 0 ; 2/3 of 0.8 ; 0/2 (empty segments): 0
    assert [i.rewards[0] for i in info] == pytest.approx([0.14, 1.0, 0.0, 0.8 * 2 / 3, 0.0])


def test_dense_rewards_by_hand():
    group, scores = mixed_group()
    info = run(AdvantageKind.TEPO_DENSE, group, scores, alpha=0.5).info
    assert [list(i.rewards) for i in info] == [
        [], [1.5], [0.6], pytest.approx([1.2, 0.8, 1.2]), [0.4, 0.4]]


@pytest.mark.parametrize("kind", list(AdvantageKind))
def test_all_equal_rewards_give_zero(kind):
    group = [build(s) for s in (THREE_CALLS, THREE_CALLS, ONE_CALL_REDUCING)]
    scores = [0.5, 0.5, 0.5]
    if kind is AdvantageKind.TEPO_SPARSE:
        group = [build(THREE_CALLS)] * 3          # same m/n, so the R_i are equal too
    if kind is AdvantageKind.TEPO_DENSE:
        group = [build(ONE_CALL_RAISING), build(NO_CALL), build(EMPTY_SEGMENTS)]  # all I = 0
    for adv in run(kind, group, scores).advantages:
        assert np.isfinite(adv).all() and (adv == 0).all()


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("std_kind", list(StdKind))
@pytest.mark.parametrize("scores", [[0.1] * 3, [0.7] * 6, [0.5] * 3, [1.0, 1.0], [0.0]])
def test_equal_scores_normalise_to_exactly_zero(scores, std_kind, eps):
    # The float mean of equal values can be an ulp off (3 × 0.1): the centred residue over an
    # equally tiny std was ±1 (NaN with eps 0), not 0.
    for scale in (True, False):
        cfg = AdvantageConfig(kind="grpo", std_kind=std_kind, eps=eps, scale_by_std=scale)
        out = group_normalize(scores, cfg)
        assert out.dtype == np.float64 and (out == 0).all(), out


@pytest.mark.parametrize("kind", list(AdvantageKind))
def test_single_trajectory_single_call_group(kind):
    for std_kind in StdKind:
        result = run(kind, [build(ONE_CALL_REDUCING)], [0.9], std_kind=std_kind)
        assert np.isfinite(result.advantages[0]).all() and (result.advantages[0] == 0).all()


def test_dense_single_call_in_group_gets_zero_call_advantage():
    group, scores = [build(ONE_CALL_REDUCING), build(NO_CALL)], [1.0, 0.0]
    result = run(AdvantageKind.TEPO_DENSE, group, scores)
    assert_matches(result, ref_dense(group, scores, alpha=AdvantageConfig().alpha))
    call_tokens = group[0].kinds == K.TOOL_CALL
    assert (result.advantages[0][call_tokens] == 0).all()          # std over 1 call = 0


def test_zero_f1_with_reducing_calls_gets_no_bonus():
    group = [build(THREE_CALLS), build(ONE_CALL_REDUCING), build(ONE_CALL_RAISING)]
    scores = [0.0, 0.0, 1.0]
    dense = run(AdvantageKind.TEPO_DENSE, group, scores, alpha=2.0)
    assert list(dense.info[0].rewards) == [0.0, 0.0, 0.0] and dense.info[1].rewards == (0.0,)
    assert dense.info[0].num_reducing == 2                          # reducing, yet no bonus
    sparse = run(AdvantageKind.TEPO_SPARSE, group, scores)
    assert sparse.info[0].rewards == (0.0,) and sparse.info[1].rewards == (0.0,)
    assert_matches(dense, ref_dense(group, scores, alpha=2.0))
    # The failed trajectories' reducing calls must not beat the successful one's call.
    assert dense.advantages[0].max() < dense.advantages[2].max()


def test_alpha_zero_dense_is_per_call_grpo():
    group, scores = mixed_group()
    result = run(AdvantageKind.TEPO_DENSE, group, scores, alpha=0.0)
    for traj, info, f1 in zip(group, result.info, scores):
        assert list(info.rewards) == [f1] * len(traj.tool_calls)   # R_{i,k} = F1_i
    # Call advantages = F1 normalised over the group's calls (one entry per call).
    per_call_f1 = [f1 for t, f1 in zip(group, scores) for _ in t.tool_calls]
    expected = iter(ref_normalize(per_call_f1))
    for traj, adv in zip(group, result.advantages):
        for call in traj.tool_calls:
            want = next(expected)
            np.testing.assert_allclose(adv[call.call_span[0]:call.call_span[1]], want, rtol=1e-5)
    assert_matches(result, ref_dense(group, scores, alpha=0.0))


def test_dense_segment_assignment_by_hand():
    group = [build(THREE_CALLS), build(NO_CALL)]
    result = run(AdvantageKind.TEPO_DENSE, group, [1.0, 0.0], alpha=1.0)
    adv, turns, kinds = result.advantages[0], group[0].turns, group[0].kinds
    call_adv = {k: adv[(kinds == K.TOOL_CALL) & (turns == k)][0] for k in (1, 2, 3)}
    for k in (0, 1, 2):   # r_k carries call k+1's advantage
        seg = ((kinds == K.REASONING) | (kinds == K.ANSWER)) & (turns == k)
        assert (adv[seg] == call_adv[k + 1]).all()
    final = (kinds == K.ANSWER) | ((kinds == K.REASONING) & (turns == 3))
    assert (adv[final] == pytest.approx(result.info[0].outcome_advantage))
    assert call_adv[1] > call_adv[2]                  # reducing call 1 beats raising call 2
    no_call = result.advantages[1]
    assert (no_call[group[1].model_mask()] == pytest.approx(result.info[1].outcome_advantage))


def test_config_std_eps_and_strings():
    group, scores = mixed_group()
    result = run(AdvantageKind.GRPO, group, scores, std_kind="sample", eps=0.1)
    assert_matches(result, ref_grpo(group, scores, eps=0.1, ddof=1))
    assert AdvantageConfig(kind="tepo_dense").kind is AdvantageKind.TEPO_DENSE
    assert get_advantage_fn("tepo_sparse") is get_advantage_fn(AdvantageKind.TEPO_SPARSE)
    with pytest.raises(ValueError):
        get_advantage_fn("ppo")
    with pytest.raises(ValueError, match="scores"):
        run(AdvantageKind.GRPO, group, scores[:-1])


def test_batch_advantages_groups_by_group_id():
    a = [build(THREE_CALLS, group_id=7), build(NO_CALL, group_id=7)]
    b = [build(ONE_CALL_REDUCING, group_id=3), build(ONE_CALL_RAISING, group_id=3)]
    batch = [a[0], b[0], a[1], b[1]]
    cfg = AdvantageConfig(kind=AdvantageKind.TEPO_DENSE, alpha=0.7)
    result = batch_advantages(batch, [1.0, 0.3, 0.5, 0.9], cfg)
    want_a = ref_dense(a, [1.0, 0.5], alpha=0.7)
    want_b = ref_dense(b, [0.3, 0.9], alpha=0.7)
    for got, want in zip(result.advantages, [want_a[0], want_b[0], want_a[1], want_b[1]]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_alpha_default_is_the_config_default():
    from tepo_jax.config import defaults
    assert AdvantageConfig().alpha == defaults().algo.alpha == 0.5


def test_config_builds_the_advantage_config():
    from tepo_jax.config import ConfigError, defaults, validate
    from tepo_jax.rl.loop import advantage_config
    c = defaults()
    c.model.tiny = True
    assert advantage_config(validate(c)) == AdvantageConfig(kind="tepo_sparse")
    c.algo.update(advantage="tepo_dense", alpha=0.3, no_call_scale=0.5, adv_eps=0.01,
                  adv_std="sample", adv_scale_by_std=False)
    cfg = advantage_config(validate(c))
    assert cfg == AdvantageConfig(kind=AdvantageKind.TEPO_DENSE, alpha=0.3, no_call_scale=0.5,
                                  eps=0.01, std_kind=StdKind.SAMPLE, scale_by_std=False)
    # scale_by_std=False: the call advantages are R_{i,k} − mean over the group's calls.
    group, scores = mixed_group()
    got = get_advantage_fn(cfg.kind)(group, scores, cfg)
    rewards = [r for rs in ref_dense_rewards(group, scores, 0.3) for r in rs]
    want = iter(np.array(rewards) - np.mean(rewards))
    for traj, adv in zip(group, got.advantages):
        for call in traj.tool_calls:
            np.testing.assert_allclose(adv[call.call_span[0]], next(want), rtol=1e-6)
    c.algo.adv_std = "ddof"
    with pytest.raises(ConfigError, match="config.algo.adv_std"):
        validate(c)


@pytest.mark.parametrize("kind", list(AdvantageKind))
def test_unrun_call_past_max_calls_gets_no_bonus_and_the_outcome_advantage(kind):
    group = [build(MAX_CALLS), build(ONE_CALL_REDUCING), build(NO_CALL), build(ONE_CALL_RAISING)]
    scores = [1.0, 0.6, 0.2, 0.9]
    result = run(kind, group, scores, alpha=0.5)
    reference = {AdvantageKind.GRPO: lambda: ref_grpo(group, scores),
                 AdvantageKind.TEPO_SPARSE: lambda: ref_sparse(group, scores),
                 AdvantageKind.TEPO_DENSE: lambda: ref_dense(group, scores, alpha=0.5)}[kind]()
    assert_matches(result, reference)
    info, adv, traj = result.info[0], result.advantages[0], group[0]
    assert info.indicators == (0, 0) and info.num_reducing == 0    # no spurious I_2 = 1
    assert info.rewards == ((0.0,) if kind is AdvantageKind.TEPO_SPARSE else
                            (1.0, 1.0) if kind is AdvantageKind.TEPO_DENSE else (1.0,))
    unrun = traj.kinds == K.UNRUN_CALL
    assert (adv[unrun] != 0).all()                                  # they carry the loss
    final = (traj.kinds == K.REASONING) & (traj.turns == 2)
    np.testing.assert_array_equal(adv[unrun], adv[final][:1].repeat(unrun.sum()))
    if kind is not AdvantageKind.TEPO_SPARSE:
        assert adv[unrun][0] == pytest.approx(result.info[0].outcome_advantage)


def test_dense_group_without_calls_is_grpo():
    group = [build(NO_CALL), build([("r", [0.2]), ("ans", [0.9, 0.1])]), build([("ans", [1.0])])]
    scores = [0.3, 1.0, 0.0]
    dense = run(AdvantageKind.TEPO_DENSE, group, scores, alpha=0.5)
    assert_matches(dense, ref_dense(group, scores, alpha=0.5))
    assert_matches(dense, ref_grpo(group, scores))
    assert all(i.rewards == () and i.num_calls == 0 for i in dense.info)
    assert any((a != 0).any() for a in dense.advantages)


@pytest.mark.parametrize("layout", [NO_FINAL_SEGMENT, ONLY_UNRUN_AFTER])
def test_dense_empty_final_segment(layout):
    """r_n empty (the trajectory stopped right after obs_n, or only an unrun call follows):
    I_n = 0, the pre-segment and call still get call n's advantage."""
    group = [build(layout), build(ONE_CALL_REDUCING), build(THREE_CALLS)]
    scores = [0.8, 0.5, 1.0]
    dense = run(AdvantageKind.TEPO_DENSE, group, scores, alpha=0.5)
    assert_matches(dense, ref_dense(group, scores, alpha=0.5))
    assert dense.info[0].indicators == (0,) and dense.info[0].rewards == (0.8,)
    traj, adv = group[0], dense.advantages[0]
    pre = traj.model_mask() & (traj.turns <= 1) & (traj.kinds != K.UNRUN_CALL)
    assert len(set(adv[pre].tolist())) == 1 and adv[pre][0] != 0


# -------------------------------------------------------------------------------- metrics

def test_step_metrics():
    group = [build(THREE_CALLS, finish_reason="answer", reward=0.8, f1=0.8, em=0.0,
                   malformed=False),
             build(NO_CALL, finish_reason="max_tokens", reward=0.0, f1=0.0, em=0.0,
                   malformed=True),
             build(EMPTY_SEGMENTS, finish_reason="answer", reward=1.0, f1=1.0, em=1.0,
                   malformed=False)]
    m = tepo_step_metrics(group)
    assert set(STABLE_KEYS) <= set(m)
    assert all(isinstance(v, float) for v in m.values())
    # H(r_0): THREE_CALLS 3.0; NO_CALL mean(1, 2, 0.5) (its answer is in r_0); EMPTY: NaN
    assert m["tepo/h_r0"] == pytest.approx((3.0 + (1.0 + 2.0 + 0.5) / 3) / 2)
    assert m["tepo/h_later"] == pytest.approx((2.0 + 2.5 + 1.0 + 0.1) / 4)
    assert m["tepo/dh_mean"] == pytest.approx((-1.0 + 0.5 - 1.5) / 3)
    assert m["tepo/dh_std"] == pytest.approx(np.std([-1.0, 0.5, -1.5]))
    assert m["tepo/frac_reducing"] == pytest.approx(2 / 5)
    assert m["tepo/calls_per_traj"] == pytest.approx(5 / 3)
    assert m["tepo/no_call_rate"] == pytest.approx(1 / 3)
    assert m["tepo/dh/search"] == pytest.approx((-1.0 - 1.5) / 2)   # EMPTY_SEGMENTS: NaN, skipped
    assert m["tepo/dh/python"] == pytest.approx(0.5)
    assert m["tepo/calls/search"] == 4.0 and m["tepo/frac_reducing/search"] == 0.5
    assert m["reward/f1"] == pytest.approx(0.6) and m["reward/em"] == pytest.approx(1 / 3)
    assert m["reward/malformed_rate"] == pytest.approx(1 / 3)
    assert m["finish/answer"] == pytest.approx(2 / 3) and m["finish/eos"] == 0.0


def test_step_metrics_without_calls_are_nan_not_zero():
    m = tepo_step_metrics([build(NO_CALL)])
    assert math.isnan(m["tepo/dh_mean"]) and math.isnan(m["tepo/frac_reducing"])
    assert math.isnan(m["reward/f1"]) and m["tepo/no_call_rate"] == 1.0


def test_eval_metrics_without_calls_give_no_failure_rate():
    from tepo_jax.rl.loop import eval_metrics
    m = eval_metrics([build(NO_CALL, reward=1.0, f1=1.0, em=1.0), build(NO_CALL, reward=0.0, f1=0.0, em=0.0)])
    assert math.isnan(m["eval/tool_failure_rate"]) and m["eval/calls_per_question"] == 0.0
    assert m["eval/accuracy"] == 0.5
    failing = build(ONE_CALL_RAISING, em=0.0, f1=0.0)
    failing.tool_calls[0].status = "error"
    assert eval_metrics([failing])["eval/tool_failure_rate"] == 1.0


def test_zero_groups_counts_groups_without_any_signal():
    from tepo_jax.rl.tepo_metrics import advantage_metrics
    # 3 × 0.1 is a sum whose float mean is an ulp off: the group still teaches nothing
    same = [build([("r", [1.0]), ("ans", [0.5])], group_id=0, reward=0.1, f1=0.1) for _ in range(3)]
    mixed = [build([("r", [1.0]), ("ans", [0.5])], group_id=1, reward=r, f1=r) for r in (0.0, 1.0, 1.0)]
    trajs = same + mixed
    adv = batch_advantages(trajs, [t.f1 for t in trajs], AdvantageConfig(kind="grpo"))
    m = advantage_metrics(adv.info, adv.advantages, trajs)
    assert m["adv/zero_groups"] == 0.5                      # group 0: equal rewards, all advantages 0
    assert all(not a.any() for a in adv.advantages[:3]) and all(a.any() for a in adv.advantages[3:])
