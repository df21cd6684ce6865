"""ResT token weights: mean 1 over model tokens, 0 elsewhere, schedule endpoints, entropy roles."""
import math

import numpy as np
import pytest

from tepo_jax.rl.rest import (EntropyWeights, RestConfig, RoleSource, RoleWeights, Schedule,
                              rest_weights, rest_weights_for_trajectories, schedule_progress)
from tepo_jax.rollout.trajectory import TokenKind, TokenRole, Trajectory
from tepo_jax.tools.markup import roles_from_char_spans

R, K = TokenRole, TokenKind
START = RoleWeights(reasoning=1.0, format=3.0, tool_name=2.0, tool_args=1.0, answer_content=0.5)
END = RoleWeights(reasoning=2.0, format=0.5, tool_name=1.0, tool_args=3.0, answer_content=2.0)
CFG = RestConfig(total_steps=100, start=START, end=END)

# A padded [2, 8] batch: NONE marks prompt, tool-result and padding tokens.
ROLES = np.array([[R.NONE, R.NONE, R.REASONING, R.TOOL_NAME, R.TOOL_ARGS, R.FORMAT, R.NONE,
                   R.REASONING],
                  [R.NONE, R.REASONING, R.FORMAT, R.ANSWER_CONTENT, R.FORMAT, R.NONE, R.NONE,
                   R.NONE]], dtype=np.int8)
MASK = ROLES != R.NONE
ENTROPIES = np.where(MASK, np.arange(16, dtype=np.float32).reshape(2, 8) / 4, 0.0)


def ref_weight(role, s):
    """Interpolated raw weight of `role` at progress s, read from the dataclass fields."""
    name = {R.REASONING: "reasoning", R.FORMAT: "format", R.TOOL_NAME: "tool_name",
            R.TOOL_ARGS: "tool_args", R.ANSWER_CONTENT: "answer_content"}[role]
    return (1 - s) * getattr(START, name) + s * getattr(END, name)


def ref_normalised(s):
    raw = [[ref_weight(R(r), s) if r != R.NONE else 0.0 for r in row] for row in ROLES]
    model_total = sum(sum(row) for row in raw)
    n_model = int(MASK.sum())
    return np.array(raw) * n_model / model_total


@pytest.mark.parametrize("step, s", [(0, 0.0), (25, 0.25), (100, 1.0), (250, 1.0), (-5, 0.0)])
def test_span_weights_match_reference_linear(step, s):
    w = rest_weights(ROLES, ENTROPIES, MASK, step, CFG)
    assert w.dtype == np.float32 and w.shape == ROLES.shape
    np.testing.assert_allclose(w, ref_normalised(s), rtol=1e-6)
    assert w[MASK].mean() == pytest.approx(1.0) and (w[~MASK] == 0).all()


def test_schedule_endpoints_are_the_configured_ratios():
    w0 = rest_weights(ROLES, ENTROPIES, MASK, 0, CFG)
    w1 = rest_weights(ROLES, ENTROPIES, MASK, 100, CFG)
    # Ratio format / reasoning is the configured one at each end (normalisation cancels).
    assert w0[0, 5] / w0[0, 2] == pytest.approx(START.format / START.reasoning)
    assert w1[0, 5] / w1[0, 2] == pytest.approx(END.format / END.reasoning)
    # Structure loses weight to reasoning over training.
    assert w1[0, 3] / w1[0, 4] < w0[0, 3] / w0[0, 4]


def test_schedule_shapes():
    cos = RestConfig(total_steps=10, schedule="cosine")
    assert [schedule_progress(s, cos) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert schedule_progress(2, cos) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
    assert schedule_progress(7, RestConfig(total_steps=10, schedule=Schedule.CONSTANT)) == 0.0
    assert schedule_progress(3, RestConfig(total_steps=10)) == pytest.approx(0.3)


def test_entropy_variant():
    cfg = RestConfig(source="entropy", total_steps=10, entropy_quantile=0.75,
                     entropy_start=EntropyWeights(low=2.0, high=1.0),
                     entropy_end=EntropyWeights(low=1.0, high=3.0))
    assert cfg.source is RoleSource.ENTROPY
    model_h = np.sort(ENTROPIES[MASK])
    threshold = np.quantile(model_h, 0.75)
    n_high = int((model_h > threshold).sum())
    n = int(MASK.sum())
    for step, (low, high) in ((0, (2.0, 1.0)), (10, (1.0, 3.0))):
        w = rest_weights(ROLES, ENTROPIES, MASK, step, cfg)
        scale = n / (low * (n - n_high) + high * n_high)
        is_high = MASK & (ENTROPIES > threshold)
        np.testing.assert_allclose(w[is_high], high * scale, rtol=1e-6)
        np.testing.assert_allclose(w[MASK & ~is_high], low * scale, rtol=1e-6)
        assert w[MASK].mean() == pytest.approx(1.0) and (w[~MASK] == 0).all()
    assert n_high > 0


def test_degenerate_inputs_give_no_nan():
    zero = RestConfig(start=RoleWeights(0, 0, 0, 0, 0), end=RoleWeights(0, 0, 0, 0, 0))
    assert (rest_weights(ROLES, ENTROPIES, MASK, 0, zero) == 0).all()
    no_model = np.zeros_like(MASK)
    w = rest_weights(np.zeros_like(ROLES), ENTROPIES, no_model, 0, RestConfig(source="entropy"))
    assert (w == 0).all()
    with pytest.raises(ValueError):
        RestConfig(start=RoleWeights(reasoning=-1.0))
    with pytest.raises(ValueError):
        RestConfig(total_steps=0)


def _turn_trajectory(text, spans, group_id=0):
    """One prompt token + one model turn (all ANSWER kind) whose roles come from char spans."""
    roles = roles_from_char_spans(spans, text).tolist()
    n = len(spans)
    return Trajectory(
        token_ids=list(range(n + 1)), kinds=[K.PROMPT] + [K.ANSWER] * n, turns=[0] * (n + 1),
        roles=[R.NONE] + roles, logprobs=[0.0] + [-0.1] * n,
        entropies=[0.0] + [0.1 * (i + 1) for i in range(n)], tool_calls=[], prompt_id="p",
        group_id=group_id, sample_index=0, gold="x", task="qa", finish_reason="answer").validate()


def test_trajectory_batch_role_coverage_and_normalisation():
    text = "<answer>\\boxed{4}</answer>"
    a = _turn_trajectory(text, [(0, 8), (8, 15), (15, 17), (17, 26)])
    b = _turn_trajectory("hm <answer>4</answer>", [(0, 3), (3, 11), (11, 12), (12, 21)], 1)
    weights = rest_weights_for_trajectories([a, b], step=0, config=CFG)
    assert [w.shape for w in weights] == [(5,), (5,)]
    flat, mask = np.concatenate(weights), np.concatenate([a.model_mask(), b.model_mask()])
    assert flat[mask].mean() == pytest.approx(1.0) and (flat[~mask] == 0).all()
    assert (flat[mask] > 0).all()        # every model token has a weighted role
    assert a.roles.tolist() == [R.NONE, R.FORMAT, R.ANSWER_CONTENT, R.ANSWER_CONTENT, R.FORMAT]
    assert rest_weights_for_trajectories([], 0, CFG) == []


def _config(**algo):
    from tepo_jax.config import defaults
    c = defaults()
    c.model.tiny = True
    c.algo.rest = True
    for key, value in algo.items():
        node, *path = key.split("__")
        target = c.algo[node] if path else c.algo
        target[path[0] if path else node] = value
    return c


def test_config_builds_the_rest_config():
    from tepo_jax.config import defaults, validate
    from tepo_jax.rl.loop import rest_config
    default = rest_config(validate(_config()), total_steps=40)
    assert default == RestConfig(total_steps=40)           # config defaults == dataclass defaults
    cfg = rest_config(validate(_config(rest_start__format=5.0, rest_end__tool_args=0.25,
                                       rest_schedule="cosine", rest_total_steps=7,
                                       rest_entropy_quantile=0.5, rest_entropy_end__high=4.0,
                                       rest_entropy_roles=True)), total_steps=40)
    assert cfg.start.format == 5.0 and cfg.end.tool_args == 0.25 and cfg.total_steps == 7
    assert cfg.schedule is Schedule.COSINE and cfg.source is RoleSource.ENTROPY
    assert cfg.entropy_quantile == 0.5 and cfg.entropy_end == EntropyWeights(low=0.5, high=4.0)
    c = defaults()
    c.model.tiny = True
    assert rest_config(validate(c), 40) is None             # algo.rest off


@pytest.mark.parametrize("field, value", [("rest_end__tool_name", -1.0), ("rest_schedule", "step"),
                                          ("rest_entropy_quantile", 1.5), ("rest_total_steps", -1),
                                          ("rest_entropy_start__low", -0.1)])
def test_rest_config_fields_are_validated(field, value):
    from tepo_jax.config import ConfigError, validate
    with pytest.raises(ConfigError, match=r"config\.algo\." + field.replace("__", r"\.")):
        validate(_config(**{field: value}))


def test_config_override_changes_the_batch_token_weights():
    """algo.rest_start.format reaches the packed batch the train step sees."""
    import dataclasses
    from tepo_jax.config import validate
    from tepo_jax.rl.advantages import AdvantageConfig
    from tepo_jax.rl.loop import RLStepConfig, build_batch, rest_config
    text = "hm <answer>4</answer>"
    trajs = [dataclasses.replace(_turn_trajectory(text, [(0, 3), (3, 11), (11, 12), (12, 21)], g),
                                 reward=r, f1=r) for g, r in ((0, 1.0), (0, 0.0))]

    def format_over_answer(**override):
        cfg = RLStepConfig(advantage=AdvantageConfig(), kl_coef=0.0, row_multiple=1, seq_buckets=(8,),
                           rest=rest_config(validate(_config(rest_schedule="constant", **override)), 10))
        packed, _, metrics = build_batch(trajs, cfg, step=0)
        w, mask = packed.batch.token_weights, packed.batch.loss_mask > 0
        assert w[mask].mean() == pytest.approx(1.0)
        assert metrics["rest/progress"] == 0.0
        assert set(metrics) == {"rest/progress", "rest/weight/reasoning", "rest/weight/format",
                                "rest/weight/answer_content"}
        ratio = metrics["rest/weight/format"] / metrics["rest/weight/answer_content"]
        row = w[packed.placements[0].row, packed.placements[0].start:][:5]
        assert row[2] / row[3] == pytest.approx(ratio)   # '<answer>' (FORMAT) / '4' (ANSWER_CONTENT)
        return ratio

    assert format_over_answer() == pytest.approx(2.0 / 1.0)
    assert format_over_answer(rest_start__format=6.0, rest_start__answer_content=1.5) == pytest.approx(4.0)
