"""The agent loop: token-in/token-out across several tool turns with the real Qwen2.5 tokenizer.

The policy is a real Decoder whose blocks are switched off (zero output projections) and
whose embedding/unembedding encode a bigram table, so greedy decoding writes
`<search>letter</search>` after every newline-ending context: a real model, real sampler, real
tokenizer and real tools, with behaviour we can predict.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from tepo_jax.data.records import QAExample
from tepo_jax.data.prompts import to_messages
from tepo_jax.logprobs import logprob_and_entropy
from tepo_jax.rollout.agent import AgentLoop, RolloutConfig
from tepo_jax.rollout.trajectory import TokenKind
from tepo_jax.sampling.config import SamplerConfig
from tepo_jax.sampling.sampler import Sampler
from tepo_jax.testing.models import bigram_decoder
from tepo_jax.testing.tokenizers import cached_tokenizer_dir
from tepo_jax.tokenizer import encode_chat, load_tokenizer
from tepo_jax.tools import ToolBridge, ToolFormat
from tepo_jax.tools.search import BM25Index, LocalSearch, build_index

CALL = "<search>letter</search>"


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(cached_tokenizer_dir("qwen2.5"))


@pytest.fixture(scope="module")
def loop(qwen, tmp_path_factory):
    fmt = ToolFormat()
    call = qwen.encode(CALL, add_special_tokens=False)
    result_end = qwen.encode(fmt.wrap_result("x"), add_special_tokens=False)[-1]
    prompt_end = encode_chat(qwen, [{"role": "user", "content": "hi"}])[-1]
    successor = {prompt_end: call[0], result_end: call[0]}
    successor.update({a: b for a, b in zip(call[:-1], call[1:])})
    model = bigram_decoder(len(qwen), successor)
    d = tmp_path_factory.mktemp("index")
    build_index([{"id": "1", "title": "Q", "text": "q is a letter of the alphabet"},
                 {"id": "2", "title": "R", "text": "r comes after q"}], str(d))
    bridge = ToolBridge({"search": LocalSearch(BM25Index.load(str(d)), top_k=1)})
    sampler = Sampler(model, SamplerConfig(max_slots=4, cache_buckets=(512,), steps_per_call=8,
                                           eos_ids=(qwen.convert_tokens_to_ids("<|im_end|>"),)),
                      tokenizer=qwen)
    yield AgentLoop(sampler, bridge, qwen, fmt, RolloutConfig(group_size=2, max_calls=3, max_tokens=200,
                                                               max_turn_tokens=20), ("search",)), model
    bridge.close()


def example():
    return QAExample(id="ex", question="What is q?", answers=("a letter",))


def test_ids_trained_on_are_sampled_ids_plus_inserted_results(loop, qwen):
    agent, _ = loop
    trajs = agent.run([example()], seed=0, greedy=True)
    assert len(trajs) == 2
    call_ids = qwen.encode(CALL, add_special_tokens=False)
    for traj in trajs:
        assert traj.num_calls == 3 and traj.finish_reason == "max_calls"
        expected = encode_chat(qwen, to_messages(example(), ("search",)))
        for call in traj.tool_calls:
            assert call.name == "search" and call.arguments == "letter" and call.status == "ok"
            assert "q is a letter of the alphabet" in call.result
            expected += call_ids + qwen.encode(ToolFormat().wrap_result(call.result), add_special_tokens=False)
            assert traj.token_ids[slice(*call.call_span)].tolist() == call_ids
        expected += call_ids  # the 4th call exceeds max_calls: kept as plain model text
        assert traj.token_ids.tolist() == expected
        assert (traj.kinds[traj.kinds == TokenKind.TOOL_RESULT].size
                == sum(c.result_span[1] - c.result_span[0] for c in traj.tool_calls))


def test_sampler_stats_equal_a_full_forward_over_the_trajectory(loop):
    agent, model = loop
    traj = agent.run([example()], seed=0, greedy=True)[0]
    ids = jnp.asarray(traj.token_ids)[None]
    logits, _ = model(ids, jnp.arange(ids.shape[1])[None])
    logp, ent = logprob_and_entropy(logits[:, :-1], ids[:, 1:])
    mask = traj.model_mask()[1:]
    np.testing.assert_allclose(np.asarray(logp[0])[mask], traj.logprobs[1:][mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent[0])[mask], traj.entropies[1:][mask], atol=1e-5)
    assert np.all(traj.entropies[1:][mask] > 0)


def test_rollouts_are_reproducible_and_scored(loop):
    agent, _ = loop
    a = agent.run([example()], seed=5)
    b = agent.run([example()], seed=5)
    assert [t.token_ids.tolist() for t in a] == [t.token_ids.tolist() for t in b]
    assert all(t.reward == 0.0 and t.malformed for t in a)  # never answers: malformed, reward 0
