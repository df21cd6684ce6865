"""Held-out comparison: bootstrap and t intervals against numpy loops written from their
definitions, per-question outcomes from trajectories, the paired gain, and the tables."""
import math

import numpy as np
import pytest

from tepo_jax.analysis import compare
from tepo_jax.analysis.stats import bootstrap_mean_ci, paired_difference_ci, t975, t_interval
from tepo_jax.rollout.trajectory import TokenRole, ToolCallRecord, Trajectory


def test_bootstrap_mean_ci_is_the_percentile_bootstrap():
    v = np.random.default_rng(0).random(50)
    mean, lo, hi = bootstrap_mean_ci(v, n_boot=700, seed=5)
    draws = np.random.default_rng(5).integers(0, 50, (700, 50))
    np.testing.assert_allclose([lo, hi], np.quantile(v[draws].mean(axis=1), [0.025, 0.975]), atol=1e-12)
    assert mean == pytest.approx(v.mean()) and lo < mean < hi
    assert bootstrap_mean_ci(v, n_boot=700, seed=5, clusters=np.arange(50)) == (mean, lo, hi)
    # clusters: whole groups are resampled; the estimate is the pooled mean
    groups = np.repeat(np.arange(10), 5)
    _, clo, chi = bootstrap_mean_ci(v, n_boot=700, seed=5, clusters=groups)
    cdraws = np.random.default_rng(5).integers(0, 10, (700, 10))
    sums = np.bincount(groups, v)
    np.testing.assert_allclose([clo, chi], np.quantile(sums[cdraws].sum(1) / 50, [0.025, 0.975]), atol=1e-12)
    assert all(math.isnan(x) for x in bootstrap_mean_ci([])) and math.isnan(bootstrap_mean_ci([1.0])[1])


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(200):
        _, lo, hi = bootstrap_mean_ci(rng.random(128) < 0.4, n_boot=400, seed=i)
        covered += lo <= 0.4 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_difference_and_t_interval():
    a, b = np.array([1, 1, 0, 1, 1, 0, 1, 1.0]), np.array([0, 1, 0, 0, 1, 0, 0, 1.0])
    assert paired_difference_ci(a, b, n_boot=300, seed=2) == bootstrap_mean_ci(a - b, n_boot=300, seed=2)
    with pytest.raises(ValueError, match="same shape"):
        paired_difference_ci(a, b[:3])
    v = [0.5, 0.62, 0.71]
    mean, lo, hi = t_interval(v)
    half = 4.302652729911275 * np.std(v, ddof=1) / math.sqrt(3)      # t(0.975, df=2)
    assert (mean, lo, hi) == pytest.approx((np.mean(v), np.mean(v) - half, np.mean(v) + half), abs=1e-3)
    assert math.isnan(t_interval([0.5])[1])


def test_t_quantile_past_the_table_is_students_not_the_normals():
    # t(0.975) for 31..200 degrees of freedom, from scipy.stats.t.ppf (the normal's is 1.95996)
    known = {31: 2.039513446396408, 32: 2.0369333434601016, 40: 2.021075390306273,
             60: 2.0002978220142604, 120: 1.9799304050824402, 200: 1.9718962236339088}
    for df, q in known.items():
        assert t975(df) == pytest.approx(q, abs=1e-4), df
    v = np.random.default_rng(0).normal(size=32)
    half = known[31] * np.std(v, ddof=1) / math.sqrt(32)
    assert t_interval(v)[2] - np.mean(v) == pytest.approx(half, rel=1e-4)


def traj(pid, em, calls=0, statuses=None, entropies=None):
    """prompt(2) r_0(2) [call(1) obs(1) r_k(2)]*calls."""
    kinds, turns, ents, recs = [0, 0, 1, 1], [0] * 4, [0, 0, 1.0, 1.0], []
    for k in range(1, calls + 1):
        start = len(kinds)
        h = (entropies or [0.5] * calls)[k - 1]
        kinds += [2, 3, 1, 1]
        turns += [k] * 4
        ents += [0.1, 0.0, h, h]
        recs.append(ToolCallRecord("python", "x", "1", (statuses or ["ok"] * calls)[k - 1],
                                   (start, start + 1), (start + 1, start + 2), k))
    kinds = np.array(kinds, np.int8)
    model = np.isin(kinds, [1, 2, 4])
    return Trajectory(np.arange(len(kinds)), kinds, turns, np.where(model, TokenRole.REASONING, TokenRole.NONE),
                      np.where(model, -0.5, 0.0), ents, recs, prompt_id=pid, group_id=0, sample_index=0,
                      gold=["1"], task="math", finish_reason="answer", em=em).validate()


def test_summaries_from_trajectories():
    sft = [traj(f"q{i}", float(i % 3 == 0), calls=1) for i in range(30)]
    rl = [traj(f"q{i}", float(i % 3 != 1), calls=2, statuses=["ok", "error"], entropies=[0.5, 2.0])
          for i in range(30)]
    ref = compare.question_outcomes(sft)
    s = compare.summarize("grpo", rl, ref, seed=0, wall_s=12.0)
    ids = sorted(f"q{i}" for i in range(30))                # questions in prompt-id order
    correct = np.array([float(int(p[1:]) % 3 != 1) for p in ids])
    assert s.accuracy == bootstrap_mean_ci(correct, seed=0) and s.n_questions == 30
    assert s.calls[0] == 2.0 and s.failure_rate == 0.5 and s.frac_reducing == 0.5   # ΔH −0.5, then +1.5
    sft_correct = np.array([float(int(p[1:]) % 3 == 0) for p in ids])
    assert s.accuracy_gain[0] == pytest.approx(correct.mean() - sft_correct.mean())
    assert s.beats_reference() == (s.accuracy_gain[1] > 0)
    table = compare.results_table([compare.summarize("SFT only", sft), s])
    assert table.splitlines()[2].startswith("| SFT only | 0.333 [") and "| 12 s |" in table
    assert "+0.333 [" in table.splitlines()[3]
    fam = compare.family_table({"SFT only": sft, "grpo": rl}, lambda pid: "even" if int(pid[1:]) % 2 == 0 else "odd")
    assert fam.splitlines()[2].startswith("| even | 15 |")
    with pytest.raises(ValueError, match="share no question"):
        compare.summarize("x", [traj("other", 1.0)], ref)


def test_samples_of_one_question_are_averaged():
    out = compare.question_outcomes([traj("a", 1.0), traj("a", 0.0, calls=2), traj("b", 1.0)])
    assert out.prompt_ids == ("a", "b") and out.correct.tolist() == [0.5, 1.0] and out.calls.tolist() == [1.0, 0.0]


def test_rollout_summary_resamples_whole_groups():
    steps = [[traj(f"q{g}", 0.0, calls=c) for g in range(4) for c in (0, 2)] for _ in range(3)]
    for step in steps:
        for i, t in enumerate(step):
            t.group_id, t.reward = i // 2, float(i % 2)
    s = compare.summarize_rollouts("grpo", steps, seed=1)
    assert s.n_trajectories == 24 and s.reward[0] == 0.5 and s.calls[0] == 1.0
    # every group holds one of each: any resample of whole groups has the same means
    assert s.reward[1] == s.reward[2] == 0.5 and s.calls[1] == s.calls[2] == 1.0
    assert "| grpo | 0.500 [0.500, 0.500] | 1.000 [1.000, 1.000] |" in compare.rollout_table([s], 5)


def test_study_table_is_the_mean_over_seeds_with_a_t_interval():
    from tepo_jax.study import RUNS, study_table

    def seed(acc, gain_lo, sampled_calls):
        runs = [compare.RunSummary(name, 128, (acc + 0.1 * i, 0.0, 1.0), (1.0 + i, 0.0, 9.0),
                                   None if i == 0 else (0.1 * i, gain_lo, 0.5), 0.5, 0.0)
                for i, name in enumerate(RUNS)]
        rollouts = [compare.RolloutSummary(name, 64, (0.5, 0.4, 0.6), (sampled_calls + i, 0.0, 9.0))
                    for i, name in enumerate(RUNS[1:])]
        return runs, rollouts

    table = study_table({0: seed(0.30, 0.05, 1.0), 1: seed(0.40, -0.01, 1.2), 2: seed(0.35, 0.02, 0.8)})
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()[2:]}
    assert list(rows) == list(RUNS)
    mean, lo, hi = t_interval([0.4, 0.5, 0.45])                       # RUNS[1] = SFT accuracy + 0.1
    assert rows[RUNS[1]][1] == f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    assert rows[RUNS[1]][4].startswith("1.000 [")                       # sampled calls: mean of 1.0, 1.2, 0.8
    assert rows[RUNS[1]][5] == "2/3"                                     # the seed with gain_lo < 0 does not count
    assert rows[RUNS[0]][4] == "" and rows[RUNS[0]][6] == "0.300, 0.400, 0.350 |"
