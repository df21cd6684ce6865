"""The multi-turn agent loop: sampler ⇄ tool bridge, G samples per prompt, exact token ids.

For every (prompt, sample) request the loop keeps a slot in the sampler and a
`TrajectoryBuilder`. Each sampler step returns the turns that stopped (a closing tool tag or
answer tag, EOS, or the turn budget); the loop parses each turn, records it, and either
finishes the trajectory or hands the call to the tool bridge. The calls that stopped in one
step run concurrently in the bridge *while the sampler decodes the other slots for one step*;
their results are then encoded and appended, and those slots decode on from their KV cache.

The schedule is a fixed function of the inputs (results are appended after exactly one
decode call, never "when ready"), and every request samples from its own seed, so a rollout
is reproducible whatever the tools' latency — which kill-and-resume relies on.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from typing import Optional, Sequence

from tepo_jax.data.prompts import to_messages
from tepo_jax.rewards import attach_reward, compute_reward
from tepo_jax.rollout.builder import TrajectoryBuilder
from tepo_jax.rollout.trajectory import Trajectory
from tepo_jax.sampling.config import FINISH_EOS, SamplingParams
from tepo_jax.sampling.sampler import Sampler, TurnOutput
from tepo_jax.tokenizer import encode_chat
from tepo_jax.tools import AnswerTurn, ParseError, ToolBridge, ToolCall, ToolFormat, ToolResult, ToolStatus


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 4          # G samples per prompt
    max_calls: int = 3           # tool calls per trajectory
    max_tokens: int = 384        # model tokens per trajectory
    max_turn_tokens: int = 96    # model tokens per turn
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def request_seed(*parts) -> int:
    """A stable 31-bit seed from (run seed, step, prompt index, sample index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class _Request:
    builder: TrajectoryBuilder
    prompt_ids: list[int]
    seed: int
    slot: Optional[int] = None


class AgentLoop:
    """Runs rollouts of a policy (the sampler's current params) with tools."""

    def __init__(self, sampler: Sampler, bridge: ToolBridge, tokenizer, fmt: ToolFormat,
                 config: RolloutConfig, tools: Sequence[str]):
        self.sampler, self.bridge, self.tokenizer, self.fmt = sampler, bridge, tokenizer, fmt
        self.config, self.tools = config, tuple(tools)

    # ---- public ----------------------------------------------------------------------------
    def run(self, examples: Sequence, *, seed: int, group_size: Optional[int] = None,
            greedy: bool = False) -> list[Trajectory]:
        """G trajectories per example (example-major order), scored with the task's reward."""
        g = group_size or self.config.group_size
        requests = [self._request(ex, i, s, seed) for i, ex in enumerate(examples) for s in range(g)]
        finished = self._drive(requests, greedy)
        return [self._score(traj, examples[traj.group_id]) for traj in finished]

    # ---- the loop --------------------------------------------------------------------------
    def _request(self, example, index: int, sample: int, seed: int) -> _Request:
        prompt = encode_chat(self.tokenizer, to_messages(example, self.tools))
        builder = TrajectoryBuilder(prompt, tokenizer=self.tokenizer, prompt_id=example.id,
                                    group_id=index, sample_index=sample, gold=example.gold,
                                    task=example.task)
        return _Request(builder, prompt, request_seed(seed, index, sample))

    def _params(self, req: _Request, greedy: bool) -> SamplingParams:
        budget = self.config.max_tokens - req.builder.model_tokens
        c = self.config
        return SamplingParams(temperature=0.0 if greedy else c.temperature, top_p=c.top_p, top_k=c.top_k,
                              greedy=greedy, max_tokens=min(c.max_turn_tokens, budget),
                              stop=self.fmt.stop_strings, seed=req.seed)

    def _drive(self, requests: list[_Request], greedy: bool) -> list[Trajectory]:
        queue, active, done = deque(requests), {}, {}
        pending_calls = None  # (future, [(request, call)]) of the previous step's calls
        while queue or active:
            while queue and self.sampler.free_slots:
                req = queue.popleft()
                req.slot = self.sampler.submit(req.prompt_ids, self._params(req, greedy), request_id=id(req))
                active[id(req)] = req
            outputs = self.sampler.step()
            if pending_calls is not None:  # the tools ran while the sampler decoded
                for req in self._append_results(*pending_calls, greedy=greedy):
                    done[id(req)] = req.builder.finish("max_tokens")  # no room left in the cache
                    self.sampler.release(req.slot)
                    del active[id(req)]
                pending_calls = None
            calls = []
            for out in outputs:
                req = active[out.request_id]
                traj = self._on_turn(req, out, calls)
                if traj is not None:
                    done[id(req)] = traj
                    self.sampler.release(req.slot)
                    del active[id(req)]
            if calls:
                tool_calls = [c for _, c in calls if isinstance(c, ToolCall)]
                pending_calls = (self.bridge.submit(tool_calls), calls)
        return [done[id(r)] for r in requests]

    def _on_turn(self, req: _Request, out: TurnOutput, calls: list) -> Optional[Trajectory]:
        """Record a finished turn; return the trajectory if it ends here, else queue its call."""
        b = req.builder
        text = self.tokenizer.decode(out.tokens.tolist(), skip_special_tokens=False)
        parsed = self.fmt.parse(text)
        wants_call = isinstance(parsed, (ToolCall, ParseError))
        # A call that cannot be followed by another turn is not run: it stays plain text.
        out_of_calls = b.num_calls >= self.config.max_calls
        out_of_tokens = b.model_tokens + len(out.tokens) >= self.config.max_tokens
        runs_call = wants_call and not out_of_calls and not out_of_tokens
        b.add_model_turn(out.tokens, out.logprobs, out.entropies, is_call=runs_call)
        if isinstance(parsed, AnswerTurn):
            return b.finish("answer")
        if wants_call and out_of_calls:
            return b.finish("max_calls")
        if not runs_call:
            return b.finish("eos" if out.finish_reason == FINISH_EOS and not wants_call else "max_tokens")
        calls.append((req, parsed))
        return None

    def _append_results(self, future, calls, *, greedy: bool) -> list[_Request]:
        """Insert each call's result; returns the requests that no longer fit the cache."""
        tool_results = iter(future.result())
        overflow = []
        for req, call in calls:
            if isinstance(call, ToolCall):
                result, name, argument = next(tool_results), call.tool, call.argument
            else:  # a malformed call: the parser's message is the result the model sees
                result = ToolResult(call.message, ToolStatus.PARSE_ERROR, 0.0, call.tool)
                name, argument = call.tool or "invalid", ""
            ids = self.tokenizer.encode(self.fmt.wrap_result(result.text), add_special_tokens=False)
            req.builder.add_tool_result(name, argument, result.text, result.status.value, ids)
            if len(req.builder.token_ids) >= self.sampler.config.max_len - 1:
                overflow.append(req)
            else:
                self.sampler.append(req.slot, ids, self._params(req, greedy))
        return overflow

    def _score(self, traj: Trajectory, example) -> Trajectory:
        return attach_reward(traj, compute_reward(traj.final_text, example.gold, example.task))
