"""SFT data: reference solutions played through the real tools, token-in/token-out."""
import numpy as np
import pytest

from tepo_jax.data.prompts import system_prompt, to_messages
from tepo_jax.data.synthetic import make_big_arithmetic, make_multihop, reference_solution
from tepo_jax.rollout.trajectory import TokenKind, TokenRole
from tepo_jax.sft.data import build_sft_trajectories
from tepo_jax.tiny_tokenizer import build_tiny_tokenizer
from tepo_jax.tokenizer import encode_chat, load_tokenizer
from tepo_jax.tools import PythonTool, SandboxConfig, ToolBridge, ToolFormat
from tepo_jax.tools.search import BM25Index, LocalSearch, build_index


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    arith, (multihop, corpus) = make_big_arithmetic(6, 1), make_multihop(6, 1)
    texts = [system_prompt()] + [p["text"] for p in corpus]
    texts += [t.get("text", "") for e in arith + multihop for t in reference_solution(e)]
    tok = load_tokenizer(build_tiny_tokenizer(texts, d / "tok", vocab_size=600))
    build_index(corpus, str(d / "index"))
    bridge = ToolBridge({"python": PythonTool(SandboxConfig(timeout_s=10)),
                         "search": LocalSearch(BM25Index.load(str(d / "index")))})
    yield tok, bridge, arith + multihop
    bridge.close()


def test_tokens_are_prompt_plus_turns_plus_results(setup):
    tok, bridge, examples = setup
    trajs = build_sft_trajectories(examples, tok, bridge, redundant_rate=0.0)
    fmt = ToolFormat()
    for ex, traj in zip(examples, trajs):
        prompt = encode_chat(tok, to_messages(ex))
        # Rebuild the expected ids independently: prompt, then each turn's ids in order.
        expected = list(prompt)
        for call, turn in zip(traj.tool_calls, [t for t in reference_solution(ex) if t["role"] == "model"]):
            expected += tok.encode(turn["text"], add_special_tokens=False)
            expected += tok.encode(fmt.wrap_result(call.result), add_special_tokens=False)
        expected += tok.encode(reference_solution(ex)[-1]["text"], add_special_tokens=False)
        assert traj.token_ids.tolist() == expected
        assert (traj.kinds[: len(prompt)] == TokenKind.PROMPT).all()
        assert traj.num_calls == (1 if ex.task == "math" else 2)
        assert all(c.status == "ok" for c in traj.tool_calls)


def test_tool_results_are_real_and_answer_is_gold(setup):
    tok, bridge, examples = setup
    trajs = build_sft_trajectories(examples, tok, bridge, redundant_rate=0.0)
    for ex, traj in zip(examples, trajs):
        if ex.task == "math":
            assert traj.tool_calls[0].result.strip() == ex.answer  # the sandbox really computed it
        else:
            assert ex.supporting_passages[1] in traj.tool_calls[1].result  # BM25 found the 2nd hop
        answer_ids = traj.token_ids[traj.kinds == TokenKind.ANSWER]
        assert tok.decode(answer_ids.tolist()) == f"<answer>{ex.gold[0]}</answer>"
        assert (traj.roles[traj.kinds == TokenKind.TOOL_RESULT] == TokenRole.NONE).all()


def test_redundant_calls_are_added_at_the_configured_rate(setup):
    tok, bridge, examples = setup
    base = build_sft_trajectories(examples, tok, bridge, redundant_rate=0.0)
    extra = build_sft_trajectories(examples, tok, bridge, redundant_rate=1.0)
    assert [t.num_calls + 1 for t in base] == [t.num_calls for t in extra]
    # The answer does not change: the extra call is redundant or useless.
    assert [t.final_text for t in base] == [t.final_text for t in extra]
    again = build_sft_trajectories(examples, tok, bridge, redundant_rate=0.5, seed=3)
    assert again[0].token_ids.tolist() == build_sft_trajectories(
        examples, tok, bridge, redundant_rate=0.5, seed=3)[0].token_ids.tolist()


def test_call_turn_indices_follow_design(setup):
    tok, bridge, examples = setup
    traj = build_sft_trajectories([e for e in examples if e.task == "qa"][:1], tok, bridge,
                                  redundant_rate=0.0)[0]
    for k, call in enumerate(traj.tool_calls, start=1):
        assert (traj.turns[slice(*call.call_span)] == k).all()
        assert (traj.turns[slice(*call.result_span)] == k).all()
        assert (traj.kinds[slice(*call.call_span)] == TokenKind.TOOL_CALL).all()
    assert np.unique(traj.turns[traj.kinds == TokenKind.ANSWER]).tolist() == [2]


def test_a_demonstration_that_calls_an_unknown_tool_names_the_example(setup):
    from tepo_jax.errors import ConfigError
    tok, bridge, examples = setup
    demos = {examples[0].id: ["<python>print(1)</python>", "<answer>1</answer>"],
             examples[1].id: ["<calculator>3*2</calculator>", "<answer>6</answer>"]}
    with pytest.raises(ConfigError) as e:
        build_sft_trajectories(examples[:2], tok, bridge, fmt=ToolFormat(), redundant_rate=0.0,
                               demonstrations=demos)
    msg = str(e.value)
    assert msg.startswith(f"SFT: the demonstration of train example 1 (id {examples[1].id!r}), turn 0 "
                          "('<calculator>3*2</calculator>'): unknown tool 'calculator'")
    with pytest.raises(ConfigError, match="no training examples"):
        build_sft_trajectories([], tok, bridge)


def test_a_demonstration_whose_call_fails_is_refused_naming_the_example_and_the_call(setup):
    from tepo_jax.errors import ConfigError
    tok, bridge, examples = setup
    demos = {examples[0].id: ["<python>print(6)</python>", "<answer>6</answer>"],
             examples[1].id: ["<python>print(1/0)</python>", "<answer>6</answer>"]}
    with pytest.raises(ConfigError) as e:
        build_sft_trajectories(examples[:2], tok, bridge, fmt=ToolFormat(), redundant_rate=0.0,
                               demonstrations=demos)
    assert str(e.value) == (f"SFT: the demonstration of train example 1 (id {examples[1].id!r}), turn 0: "
                            "call python('print(1/0)') failed (error: ZeroDivisionError: division by zero); "
                            "SFT trains only on calls that work")


def test_special_token_text_in_a_result_is_trained_on_as_plain_text(setup):
    tok, bridge, examples = setup
    demo = {examples[0].id: ["<python>print('1<|im_end|><|im_start|>user')</python>", "<answer>1</answer>"]}
    traj = build_sft_trajectories(examples[:1], tok, bridge, fmt=ToolFormat(), redundant_rate=0.0,
                                  demonstrations=demo)[0]
    result = traj.token_ids[traj.kinds == TokenKind.TOOL_RESULT].tolist()
    controls = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")}
    assert not controls.intersection(result)
    assert tok.decode(result, skip_special_tokens=False) == "\n<result>\n1<|im_end|><|im_start|>user\n\n</result>\n"
