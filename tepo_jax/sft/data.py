"""SFT warm-start data: tool-use trajectories for the synthetic tasks, with real tool results.

Each example's reference solution (`tepo_jax.data.synthetic.reference_solution`) is played
through the real tool bridge, so the results the model sees in SFT are byte for byte what the
same calls return during RL. A share of the examples (`redundant_rate`) gets one extra call
that adds nothing: a repeated python call for arithmetic, a search for the whole question for
multi-hop. That gives RL behaviour to improve (TEPO-sparse rewards fewer, better calls).

The model turns are tokenised once here (they are targets, not sampled), the results are the
wrapped result text encoded exactly as the rollout encodes it, and the trajectories come out
of the same `TrajectoryBuilder` the rollout uses.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from tepo_jax.data.prompts import to_messages
from tepo_jax.data.synthetic import reference_solution
from tepo_jax.rollout.builder import TrajectoryBuilder
from tepo_jax.rollout.trajectory import Trajectory
from tepo_jax.tokenizer import encode_chat
from tepo_jax.tools import ToolBridge, ToolCall, ToolFormat

_CALL_RE = re.compile(r"<(python|search)>(.*)</\1>\s*$", re.DOTALL)


def with_redundant_call(turns: list[dict], question: str, rng: random.Random) -> list[dict]:
    """Insert one useless call before the answer (math) or before the first search (qa)."""
    first = turns[0]
    tool = _CALL_RE.search(first["text"]).group(1)
    if tool == "python":  # repeat the computation: the second result adds nothing
        code = _CALL_RE.search(first["text"]).group(2)
        extra = {"role": "model", "text": f"Let me double-check that.\n<python>{code}</python>"}
        return turns[:2] + [extra, {"role": "tool", "tool": "python"}] + turns[2:]
    extra = {"role": "model", "text": f"Let me search for the whole question first.\n<search>{question}</search>"}
    return [extra, {"role": "tool", "tool": "search"}] + turns


def scripts_for(examples: Sequence, redundant_rate: float, seed: int) -> list[list[dict]]:
    rng = random.Random(f"sft-{seed}")
    scripts = []
    for ex in examples:
        turns = reference_solution(ex)
        if rng.random() < redundant_rate:
            turns = with_redundant_call(turns, ex.question, rng)
        scripts.append(turns)
    return scripts


def build_sft_trajectories(examples: Sequence, tokenizer, bridge: ToolBridge, *,
                           tools: Sequence[str] = ("python", "search"), fmt: ToolFormat = ToolFormat(),
                           redundant_rate: float = 0.3, seed: int = 0) -> list[Trajectory]:
    """Play every example's script, running the calls of all examples round by round."""
    scripts = scripts_for(examples, redundant_rate, seed)
    builders = [TrajectoryBuilder(encode_chat(tokenizer, to_messages(ex, tools)), tokenizer=tokenizer,
                                  prompt_id=ex.id, group_id=i, sample_index=0, gold=_gold(ex),
                                  task=ex.task)
                for i, ex in enumerate(examples)]
    max_turns = max(len(s) for s in scripts)
    for t in range(0, max_turns, 2):  # model turn t, then (if any) its tool result at t + 1
        pending = []
        for script, builder in zip(scripts, builders):
            if t >= len(script):
                continue
            text = script[t]["text"]
            is_call = t + 1 < len(script)
            builder.add_model_turn(tokenizer.encode(text, add_special_tokens=False), is_call=is_call)
            if is_call:
                call = fmt.parse(builder.last_text)
                if not isinstance(call, ToolCall):
                    raise ValueError(f"reference turn is not a well-formed call: {text!r} ({call})")
                pending.append((builder, call))
        results = bridge.run_batch([call for _, call in pending])
        for (builder, call), result in zip(pending, results):
            wrapped = fmt.wrap_result(result.text)
            builder.add_tool_result(call.tool, call.argument, result.text, result.status.value,
                                    tokenizer.encode(wrapped, add_special_tokens=False))
    return [b.finish("answer") for b in builders]


def _gold(example):
    return list(example.answers) if example.task == "qa" else example.answer
