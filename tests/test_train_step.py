"""The jitted train step: gradient accumulation is exact (in every loss aggregation mode), the
8-device sharded step equals the single-device step (values and shardings), on-policy recompute
gives logprob_diff ~0, the step compiles once, the state round-trips through orbax, and the
optimizer schedule/decay mask."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import Decoder
from tepo_jax.rl.batch import SequenceData, pack_sequences, sequence_length_buckets
from tepo_jax.rl.loss import (AggMode, LossConfig, num_sequences,
                              policy_loss)
from tepo_jax.rl.optim import OptimConfig, ScheduleKind, build_optimizer, build_schedule
from tepo_jax.rl.train_step import (TrainState, accumulate_gradients, apply_update_if_finite, create_train_state,
                                    forward_logprobs, make_compute_logprobs, make_train_step, split_micro_batches,
                                    split_model)
from tepo_jax.sharding import MeshConfig, batch_sharding, create_sharded_model, make_mesh

TINY = ModelConfig(family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=4, qkv_bias=True)
LOSS = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.05, seq_chunk=8)


def make_batch(seed=0, rows=8, seq_len=32):
    """Packed trajectories: prompt (no loss), model tokens, a tool result (no loss), more model."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(2 * rows):
        n = int(rng.integers(8, 16))
        mask = np.zeros(n, np.float32)
        mask[3:n] = 1
        mask[6:8] = 0                      # tool result
        old = (-rng.random(n) * 4 * mask).astype(np.float32)
        seqs.append(SequenceData(rng.integers(0, TINY.vocab_size, n), mask,
                                 (rng.standard_normal() * mask).astype(np.float32), old,
                                 ref_logprobs=(old + 0.1 * rng.standard_normal(n) * mask).astype(np.float32),
                                 token_weights=np.where(mask > 0, rng.uniform(0.5, 1.5, n), 1.0)))
    return pack_sequences(seqs, seq_len=seq_len, num_rows=rows).batch


def single_device_mesh():
    return make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


def test_gradient_accumulation_equals_full_batch():
    """2 and 4 micro-batches give the 1-micro-batch gradient; the 4 one also with a remat model
    (rematerialisation changes fusion order only: fp32 reassociation, hence rtol 1e-5)."""
    model_def, params = split_model(Decoder(TINY, rngs=nnx.Rngs(0)))
    remat_def, remat_params = split_model(Decoder(TINY, rngs=nnx.Rngs(0), remat=True))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(remat_params)))
    batch = make_batch()
    grads = {}
    for m, mdef in ((1, model_def), (2, model_def), (4, remat_def)):
        fn = jax.jit(lambda p, b, m=m, mdef=mdef: accumulate_gradients(mdef, p, b, LOSS, m))
        grads[m] = fn(params, batch)
    for m in (2, 4):
        g, sums = grads[m]
        g1, sums1 = grads[1]
        assert float(sums["num_model_tokens"]) == float(sums1["num_model_tokens"]) == float(batch.loss_mask.sum())
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8)
        for k in sums1:
            np.testing.assert_allclose(float(sums[k]), float(sums1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert optax.global_norm(grads[1][0]) > 0


@pytest.mark.parametrize("mode", [m.value for m in AggMode])
def test_gradient_accumulation_equals_unsplit_loss_in_every_agg_mode(mode):
    """2 and 4 micro-batches give the loss, metrics and gradient of `policy_loss` on the whole
    batch (ResT weights and KL on): the normalisers (N, the number of sequences, each
    sequence's token count) are the whole batch's, not a micro-batch's."""
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.05, agg_mode=mode, norm_len=16, seq_chunk=8)
    model_def, params = split_model(Decoder(TINY, rngs=nnx.Rngs(0)))
    batch = make_batch()
    # The micro-batches hold different numbers of sequences and tokens: a per-micro-batch
    # normaliser would give a different result (see test_loss.py for the formulas themselves).
    micro = split_micro_batches(batch, 4)
    mask = lambda b: jnp.asarray(b.loss_mask)  # noqa: E731
    counts = {(float(num_sequences(micro.segment_ids[i], mask(micro)[i])), float(micro.loss_mask[i].sum()))
              for i in range(4)}
    assert len(counts) > 1

    def unsplit(p):
        logp, ent = forward_logprobs(model_def, p, batch, cfg)
        return policy_loss(logp, ent, batch, cfg)
    (loss, metrics), g_full = jax.jit(jax.value_and_grad(unsplit, has_aux=True))(params)
    assert float(loss) != 0 and optax.global_norm(g_full) > 0
    for m in (1, 2, 4):
        g, got = jax.jit(lambda p, b, m=m: accumulate_gradients(model_def, p, b, cfg, m))(params, batch)
        np.testing.assert_allclose(float(got["loss"]), float(loss), rtol=1e-5, atol=1e-8)
        for k in metrics:
            np.testing.assert_allclose(float(got[k]), float(metrics[k]), rtol=1e-5, atol=1e-7, err_msg=k)
        for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8)


def test_train_step_micro_batches_equal_one_batch_in_seq_mean_mode():
    """The real jitted step (accumulation, finalize, update): 4 micro-batches = 1, for a
    per-sequence aggregation mode."""
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.05, agg_mode="seq_mean_token_mean", seq_chunk=8)
    ref_state, ref_metrics, _, _ = _run_step(None, make_batch(), 1, loss_cfg=cfg)
    state, metrics, _, _ = _run_step(None, make_batch(), 4, loss_cfg=cfg)
    assert set(metrics[0]) == set(ref_metrics[0])
    for k in ref_metrics[0]:
        np.testing.assert_allclose(metrics[0][k], ref_metrics[0][k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_cfg,micro_batches", [(None, 1), (None, 2), (MeshConfig(2, 2, 2), 2)])
def test_reference_logprobs_in_the_update_program_equal_a_separate_pass(mesh_cfg, micro_batches):
    """reference=True computes the KL reference inside the step from `ref_params`: the same
    loss, kl, metrics and updated params as the old way (a separate jitted logprob pass whose
    result is put into the batch's ref_logprobs), per micro-batch and sharded. The reference
    is a different model (seed 7), so the kl term is far from 0 and a step that read the
    batch's zero ref_logprobs, or the policy's own logprobs, would give another kl."""
    mesh = single_device_mesh() if mesh_cfg is None else make_mesh(mesh_cfg)
    bs = batch_sharding(mesh)
    host_batch = make_batch()._replace(ref_logprobs=np.zeros((8, 32), np.float32))
    optimizer = build_optimizer(OptimConfig(learning_rate=1e-2, eps=1e-3))
    _, ref_params = split_model(create_sharded_model(TINY, mesh, seed=7))
    results = {}
    for inside in (False, True):
        model_def, state, shardings = create_train_state(create_sharded_model(TINY, mesh, seed=3), optimizer, mesh)
        step = make_train_step(model_def, optimizer, LOSS, mesh, shardings, bs, micro_batches, reference=inside)
        if inside:
            state, metrics = step(state, jax.device_put(host_batch, bs), ref_params)
        else:
            ref, _ = make_compute_logprobs(model_def, LOSS, mesh, shardings.params, bs)(ref_params,
                                                                                        jax.device_put(host_batch, bs))
            batch = host_batch._replace(ref_logprobs=np.asarray(jax.device_get(ref)))
            state, metrics = step(state, jax.device_put(batch, bs))
        results[inside] = (jax.device_get(metrics), jax.device_get(state.params))
    (m0, p0), (m1, p1) = results[False], results[True]
    assert m0["kl"] > 1e-3
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _run_step(mesh_cfg, batch, micro_batches, steps=1, loss_cfg=LOSS):
    mesh = single_device_mesh() if mesh_cfg is None else make_mesh(mesh_cfg)
    model = create_sharded_model(TINY, mesh, seed=3)
    # eps=1e-3: Adam's per-element direction m/(sqrt(v)+eps) divides by the gradient itself, so
    # for gradients near fp noise (k_bias grads here are ~1e-9) it amplifies reduction-order
    # differences without bound; with eps above them the update is a smooth function of the
    # gradient and the comparison below is well conditioned. (grad_norm is compared too.)
    ocfg = OptimConfig(learning_rate=1e-2, warmup_steps=1, schedule=ScheduleKind.COSINE, total_steps=10,
                       eps=1e-3)
    optimizer = build_optimizer(ocfg)
    model_def, state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = make_train_step(model_def, optimizer, loss_cfg, mesh, shardings, batch_sharding(mesh),
                           micro_batches, schedule=build_schedule(ocfg))
    out = []
    for _ in range(steps):
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
        out.append(jax.device_get(metrics))
    return state, out, shardings, step


@pytest.fixture(scope="module")
def reference_step():
    return _run_step(None, make_batch(), 1, steps=2)


@pytest.mark.parametrize("mesh_cfg,micro_batches", [(MeshConfig(2, 2, 2), 2), (MeshConfig(1, 8, 1), 1)])
def test_sharded_step_equals_single_device_step(reference_step, mesh_cfg, micro_batches):
    ref_state, ref_metrics, _, _ = reference_step
    state, metrics, shardings, _ = _run_step(mesh_cfg, make_batch(), micro_batches, steps=2)
    for got, want in zip(metrics, ref_metrics):
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert ref_metrics[0]["learning_rate"] == 0.0 and ref_metrics[1]["learning_rate"] > 0  # warmup
    # Params after two AdamW steps (the second moves them): same values...
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 2
    # ...and every output leaf on its intended sharding.
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding, sharding)
    spec = lambda x: x.sharding.spec  # noqa: E731
    q = state.params["layers"][0]["attn"]["q_proj"]
    expected_q = P("fsdp", "tensor", None)
    assert spec(q) == expected_q and q.sharding.mesh.shape == dict(zip(("data", "fsdp", "tensor"),
                                                                       (mesh_cfg.data, mesh_cfg.fsdp,
                                                                        mesh_cfg.tensor)))
    adam = state.opt_state[1][0]
    assert spec(adam.mu["layers"][0]["attn"]["q_proj"]) == expected_q
    assert spec(adam.nu["embed"]) == spec(state.params["embed"]) == P("tensor", "fsdp")
    assert spec(state.step) == P() and spec(state.rng) == P()


def test_step_compiles_once_donates_state_and_learns(reference_step):
    batch = make_batch()
    mesh = make_mesh(MeshConfig(1, 4, 2))
    model = create_sharded_model(TINY, mesh, seed=3)
    optimizer = build_optimizer(OptimConfig(learning_rate=3e-3))
    model_def, state, shardings = create_train_state(model, optimizer, mesh)
    step = make_train_step(model_def, optimizer, LossConfig(seq_chunk=8), mesh, shardings,
                           batch_sharding(mesh), micro_batches=2)
    logprobs = make_compute_logprobs(model_def, LossConfig(seq_chunk=8), mesh, shardings.params,
                                     batch_sharding(mesh))
    batch = jax.device_put(batch, batch_sharding(mesh))
    lp, ent = logprobs(state.params, batch)
    assert lp.sharding.is_equivalent_to(batch_sharding(mesh), 2)
    mask = np.asarray(batch.loss_mask) > 0
    # Positive advantage on every model token: the step must raise their logprob.
    batch = batch._replace(old_logprobs=lp, advantages=jnp.asarray(mask, jnp.float32))
    history = []
    for i in range(3):
        old = state
        state, metrics = step(state, batch)
        assert all(x.is_deleted() for x in jax.tree.leaves(old.params))  # donated
        history.append(metrics)
    assert step._cache_size() == 1          # traced and compiled exactly once
    # On-policy: the batch's old logprobs were recomputed with the same params.
    assert float(history[0]["logprob_diff_mean_abs"]) < 1e-6
    assert abs(float(history[0]["ratio_mean"]) - 1.0) < 1e-6
    assert float(history[0]["clip_frac_low"]) == 0 and float(history[0]["clip_frac_high"]) == 0
    np.testing.assert_allclose(float(history[0]["entropy_mean"]), np.asarray(ent)[mask].mean(), rtol=1e-6)
    assert float(history[1]["logprob_diff_mean_abs"]) > 1e-4   # params moved: off-policy now
    lp_after, _ = logprobs(state.params, batch)
    assert np.asarray(lp_after)[mask].mean() > np.asarray(lp)[mask].mean()
    assert float(history[2]["loss"]) < float(history[0]["loss"])


def test_length_buckets_waste_at_most_a_third_of_a_row():
    ladder = sequence_length_buckets(128, 4096)
    assert ladder[:6] == (128, 192, 256, 384, 512, 768) and ladder[-1] == 4096
    assert list(ladder) == sorted(set(ladder))
    for n in range(129, 4097):   # the padded row of every length beyond the first bucket
        mask = (np.arange(n) > 0).astype(np.float32)
        t = pack_sequences([SequenceData(np.ones(n, np.int32), mask, np.zeros(n), np.zeros(n))],
                           length_buckets=ladder).batch.tokens.shape[1]
        assert n <= t and (t - n) / t < 1 / 3, (n, t)


def test_train_state_orbax_round_trip(tmp_path):
    from tepo_jax.checkpoints.train_state import RunCheckpointer
    mesh = make_mesh(MeshConfig(1, 4, 2))
    optimizer = build_optimizer(OptimConfig())
    _, state, shardings = create_train_state(create_sharded_model(TINY, mesh), optimizer, mesh, seed=5)
    ckpt = RunCheckpointer(str(tmp_path))
    ckpt.save(0, state, {"note": "x"})
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    step, restored, extra = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 0 and extra == {"note": "x"}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim)


def test_schedule_and_weight_decay_mask():
    cos = build_schedule(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=4, total_steps=12,
                                     end_lr_ratio=0.1))
    np.testing.assert_allclose([float(cos(s)) for s in (0, 2, 4, 8, 12)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)
    const = build_schedule(OptimConfig(learning_rate=2.0, warmup_steps=2))
    np.testing.assert_allclose([float(const(s)) for s in (0, 1, 2, 50)], [0.0, 1.0, 2.0, 2.0])
    # Zero gradients: only decoupled weight decay moves the parameters, and only the matrices.
    opt = build_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5))
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.05)
    np.testing.assert_array_equal(np.asarray(updates["scale"]), 0.0)
    # Clipping: a huge gradient is scaled to global norm 1 before Adam's normalisation.
    clip = build_optimizer(OptimConfig(max_grad_norm=1.0))
    g = {"w": jnp.full((2, 2), 100.0), "scale": jnp.zeros(2)}
    _, st = clip.update(g, clip.init(params), params)
    np.testing.assert_allclose(np.asarray(st[1][0].mu["w"]), 0.1 * 0.5, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_the_step_clips_with_its_own_norm_as_optax_would(scale):
    """`apply_update_if_finite` hands the gradient norm it computed to the clipping of
    `build_optimizer` (no second norm), and the update equals optax's own clip + AdamW chain,
    for gradients below and above the clip; a norm passed in is the one used."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.ones(4)}
    grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)
    cfg = OptimConfig(learning_rate=0.1, max_grad_norm=1.0)
    ours = build_optimizer(cfg)
    reference = optax.chain(optax.clip_by_global_norm(1.0), build_optimizer(dataclasses.replace(cfg, max_grad_norm=0)))
    state = TrainState(params=params, opt_state=ours.init(params), step=jnp.zeros((), jnp.int32),
                       rng=jax.random.PRNGKey(0))
    new, metrics = jax.jit(lambda s, g: apply_update_if_finite(ours, s, g, jnp.float32(1.0)))(state, grads)
    updates, _ = reference.update(grads, reference.init(params), params)
    want = optax.apply_updates(params, updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(new.params[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-6)
    step = jax.make_jaxpr(lambda s, g: apply_update_if_finite(ours, s, g, jnp.float32(1.0)))(state, grads)
    assert _scalar_sqrts(step.jaxpr) == 1          # one global norm in the whole update
    norm = float(optax.global_norm(grads))
    clipped = ours.update(grads, ours.init(params), params, grad_norm=jnp.float32(2 * norm))
    mu = clipped[1][1][0].mu["w"]   # AdamW's first moment: (1 − b1) · the clipped gradient
    expected = (1 - cfg.b1) * np.asarray(grads["w"]) * (1.0 / (2 * norm) if 2 * norm > 1 else 1.0)
    np.testing.assert_allclose(np.asarray(mu), expected, rtol=1e-5)


def _scalar_sqrts(jaxpr) -> int:
    """sqrt equations with a scalar result (a global norm; Adam's are per parameter), sub-jaxprs
    included."""
    n = sum(e.primitive.name == "sqrt" and e.outvars[0].aval.shape == () for e in jaxpr.eqns)
    return n + sum(_scalar_sqrts(sub) for e in jaxpr.eqns for sub in jax.core.jaxprs_in_params(e.params))


# ------------------------------------------------- sampler/trainer invariant, end to end

def _search_policy(qwen):
    """A bigram Decoder over the real Qwen2.5 vocabulary that writes
    `Let me search.\\n<search>letter</search>` after the prompt and every result, sampling
    from a moderately peaked softmax (it sometimes leaves the chain and writes free text)."""
    from tepo_jax.testing.models import bigram_decoder
    from tepo_jax.tokenizer import encode_chat
    from tepo_jax.tools import ToolFormat
    chain = qwen.encode("Let me search.\n<search>letter</search>", add_special_tokens=False)
    starts = [encode_chat(qwen, [{"role": "user", "content": "hi"}])[-1],
              qwen.encode(ToolFormat().wrap_result("x"), add_special_tokens=False)[-1]]
    successor = {s: chain[0] for s in starts}
    successor.update(zip(chain[:-1], chain[1:]))
    return bigram_decoder(len(qwen), successor, logit=4.0)   # p(successor) ≈ 0.98


@pytest.fixture(scope="module")
def rl_parts(tmp_path_factory):
    from tepo_jax.data.records import QAExample
    from tepo_jax.rollout.agent import AgentLoop, RolloutConfig
    from tepo_jax.sampling.config import SamplerConfig
    from tepo_jax.sampling.sampler import Sampler
    from tepo_jax.builtin_tokenizers import cached_tokenizer_dir
    from tepo_jax.tokenizer import load_tokenizer
    from tepo_jax.tools import ToolBridge, ToolFormat
    from tepo_jax.tools.search import BM25Index, LocalSearch, build_index

    qwen = load_tokenizer(cached_tokenizer_dir("qwen2.5"))
    model = _search_policy(qwen)
    d = tmp_path_factory.mktemp("index")
    build_index([{"id": "1", "title": "Q", "text": "q is a letter"}, {"id": "2", "title": "R", "text": "r"}], str(d))
    bridge = ToolBridge({"search": LocalSearch(BM25Index.load(str(d)), top_k=1)})
    sampler = Sampler(model, SamplerConfig(max_slots=4, cache_buckets=(512,), steps_per_call=8,
                                           eos_ids=(qwen.convert_tokens_to_ids("<|im_end|>"),)), tokenizer=qwen)
    agent = AgentLoop(sampler, bridge, qwen, ToolFormat(), RolloutConfig(group_size=2, max_calls=2, max_tokens=48,
                                                                         max_turn_tokens=16), ("search",))
    examples = [QAExample(id=f"q{i}", question=f"What is {c}?", answers=("a letter",)) for i, c in enumerate("qr")]
    yield model, agent, examples
    bridge.close()


def test_rl_step_sampler_and_trainer_agree_and_rest_weights_reach_the_batch(rl_parts):
    """A real rollout, then the trainer's chunked logprob pass over the packed trajectories:
    the logged mean |sampler − trainer| logprob difference is below 1e-5 (fp32), and with ResT
    on, the batch the train step receives carries the ResT weights (mean 1 over model tokens)
    of exactly these trajectories at this step."""
    from tepo_jax.rl.advantages import AdvantageConfig
    from tepo_jax.rl.batch import power_of_two_buckets
    from tepo_jax.rl.loop import RLStepConfig, rl_step
    from tepo_jax.rl.rest import RestConfig, rest_weights_for_trajectories
    model, agent, examples = rl_parts
    mesh = single_device_mesh()
    optimizer = build_optimizer(OptimConfig(learning_rate=1e-3))
    model_def, state, shardings = create_train_state(model, optimizer, mesh)
    loss_cfg = LossConfig(seq_chunk=32)                   # < T: the scanned, chunked path
    seen, steps = {}, []

    def train_step(state, batch):
        seen["batch"] = jax.device_get(batch)
        return step_fn(state, batch)

    def run(examples, **kw):
        steps.append(kw.get("step"))
        seen["trajs"] = real_run(examples, **kw)
        return seen["trajs"]

    real_run, agent.run = agent.run, run
    try:
        step_fn = make_train_step(model_def, optimizer, loss_cfg, mesh, shardings, batch_sharding(mesh))
        rest_cfg = RestConfig(total_steps=10)
        cfg = RLStepConfig(advantage=AdvantageConfig(kind="tepo_dense"), rest=rest_cfg, kl_coef=0.0,
                           row_multiple=1, seq_buckets=power_of_two_buckets(128, 512))
        state, metrics, trajs = rl_step(state, examples, 3, agent=agent, model_def=model_def, train_step=train_step,
                                        put_batch=lambda b: jax.device_put(b, batch_sharding(mesh)),
                                        cfg=cfg, seed=0)
        first_batch = seen["batch"]
        # With the check every 2 steps, the 4th RL step (index 3) logs the diff, the 3rd not.
        every_2 = dataclasses.replace(cfg, logprob_check_every=2)
        state, checked, _ = rl_step(state, examples, 3, agent=agent, model_def=model_def, train_step=train_step,
                                    put_batch=lambda b: jax.device_put(b, batch_sharding(mesh)), cfg=every_2, seed=0)
        _, skipped, _ = rl_step(state, examples, 2, agent=agent, model_def=model_def, train_step=train_step,
                                put_batch=lambda b: jax.device_put(b, batch_sharding(mesh)), cfg=every_2, seed=0)
        assert "rl/sampler_trainer_logprob_diff" in checked
        assert "rl/sampler_trainer_logprob_diff" not in skipped
    finally:
        agent.run = real_run
    batch = first_batch
    mask = batch.loss_mask > 0
    assert steps == [3, 3, 2] and len(trajs) == 4 and batch.tokens.shape[1] > loss_cfg.seq_chunk
    assert sum(t.num_calls for t in trajs) > 0 and np.abs(batch.old_logprobs[mask]).max() > 0.01
    assert metrics["rl/sampler_trainer_logprob_diff"] < 1e-5
    assert abs(metrics["train/logprob_diff_mean_abs"]) < 1e-5 and metrics["train/ratio_mean"] == pytest.approx(1.0)
    for key in ("adv/reward_mean", "adv/bonus_mean", "adv/mean", "adv/std"):
        assert np.isfinite(metrics[key]), key
    assert metrics["adv/mean"] == pytest.approx(batch.advantages[mask].mean(), abs=1e-6)
    assert metrics["rest/progress"] == pytest.approx(0.3) and metrics["rest/weight/tool_name"] > 0
    w = batch.token_weights
    assert w[mask].mean() == pytest.approx(1.0, abs=1e-5)
    want = rest_weights_for_trajectories(trajs, 3, rest_cfg)
    got = [w[r, s:s + n] for (r, s, n) in _placements(batch, trajs)]
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-6)
    assert w[mask].std() > 0.1                              # roles really weighted differently


def test_tempered_policy_rollout_and_trainer_agree(rl_parts):
    """loss.tempered_policy's pieces end to end: a rollout at temperature 0.7 from a sampler that
    records the τ = 0.7 policy, trained with LossConfig(policy_temperature=0.7), gives a logged
    sampler − trainer logprob difference below 1e-5 and ratios of 1; the same rollouts trained
    as the τ = 1 policy differ by far more (the check sees a mismatch)."""
    from tepo_jax.rl.advantages import AdvantageConfig
    from tepo_jax.rl.batch import power_of_two_buckets
    from tepo_jax.rl.loop import RLStepConfig, rl_step
    from tepo_jax.rollout.agent import AgentLoop
    from tepo_jax.sampling.sampler import Sampler
    model, agent, examples = rl_parts
    tau = 0.7
    sampler = Sampler(model, agent.sampler.config.replace(policy_temperature=tau), tokenizer=agent.tokenizer)
    tempered = AgentLoop(sampler, agent.bridge, agent.tokenizer, agent.fmt,
                         dataclasses.replace(agent.config, temperature=tau), agent.tools)
    mesh = single_device_mesh()
    optimizer = build_optimizer(OptimConfig(learning_rate=1e-3))
    cfg = RLStepConfig(advantage=AdvantageConfig(kind="grpo"), rest=None, kl_coef=0.0, row_multiple=1,
                       seq_buckets=power_of_two_buckets(128, 512))
    diffs = {}
    for trained_tau in (tau, 1.0):
        model_def, state, shardings = create_train_state(model, optimizer, mesh)
        step_fn = make_train_step(model_def, optimizer, LossConfig(seq_chunk=32, policy_temperature=trained_tau),
                                  mesh, shardings, batch_sharding(mesh))
        _, metrics, trajs = rl_step(state, examples, 0, agent=tempered, model_def=model_def, train_step=step_fn,
                                    put_batch=lambda b: jax.device_put(b, batch_sharding(mesh)), cfg=cfg, seed=0)
        diffs[trained_tau] = metrics["rl/sampler_trainer_logprob_diff"]
        if trained_tau == tau:
            assert metrics["train/ratio_mean"] == pytest.approx(1.0)
    assert sum(len(t.token_ids) for t in trajs) > 100
    assert diffs[tau] < 1e-5 and diffs[1.0] > 1e-2, diffs


def _placements(batch, trajs):
    """(row, start, length) of each trajectory in the packed batch, found by its token ids."""
    out = []
    for t in trajs:
        hits = [(r, s) for r in range(batch.tokens.shape[0])
                for s in range(batch.tokens.shape[1] - len(t) + 1)
                if batch.positions[r, s] == 0 and np.array_equal(batch.tokens[r, s:s + len(t)], t.token_ids)]
        out.append((*hits[0], len(t)))
    return out


def test_a_non_finite_update_is_skipped_and_the_state_kept():
    """A NaN advantage (or loss, or gradient) must leave params, optimizer state and step count
    as they were, bit for bit, and say so in `update_skipped`; the next finite batch applies."""
    mesh = single_device_mesh()
    model = create_sharded_model(TINY, mesh, seed=3)
    optimizer = build_optimizer(OptimConfig(learning_rate=1e-2))
    model_def, state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = make_train_step(model_def, optimizer, LOSS, mesh, shardings, batch_sharding(mesh))
    good = make_batch()
    bad = good._replace(advantages=np.where(np.asarray(good.loss_mask) > 0, np.nan, 0).astype(np.float32))
    state, metrics = step(state, jax.device_put(good, batch_sharding(mesh)))
    assert float(metrics["update_skipped"]) == 0.0 and int(state.step) == 1
    before = jax.device_get((state.params, state.opt_state))
    rng_before = np.asarray(jax.random.key_data(state.rng) if jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
                            else state.rng)
    state, metrics = step(state, jax.device_put(bad, batch_sharding(mesh)))
    assert float(metrics["update_skipped"]) == 1.0
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1                      # no optimizer update counted
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.params, state.opt_state)))):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    rng_after = np.asarray(jax.random.key_data(state.rng) if jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
                           else state.rng)
    assert not np.array_equal(rng_after, rng_before)  # the step's randomness still moves on
    state, metrics = step(state, jax.device_put(good, batch_sharding(mesh)))
    assert float(metrics["update_skipped"]) == 0.0 and int(state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(jax.device_get(state.params))))
