"""The multi-turn agent loop: sampler ⇄ tool bridge, G samples per prompt, exact token ids.

For every (prompt, sample) request the loop keeps a slot in the sampler and a
`TrajectoryBuilder`. Each `sampler.advance()` returns the turns that stopped (a closing tool tag or
answer tag, EOS, or the turn budget); the loop parses each turn, records it, and either
finishes the trajectory or hands the call to the tool bridge. The calls that stopped in one
step run concurrently in the bridge *while the sampler decodes the other slots for one step*;
their results are then encoded and appended, and those slots decode on from their KV cache.

The schedule is a fixed function of the inputs (results are appended after exactly one
decode call, never "when ready"), and every request samples from its own seed, so a rollout
is reproducible whatever the tools' latency — which kill-and-resume relies on.

One path for every call format (the `CallFormat` protocol, tools/format.py): the format
parses a turn into zero or more calls; all of them run as one bridge batch (in call order,
malformed ones becoming their PARSE_ERROR result), and `fmt.wrap_results([...])` is inserted
as ONE result block, recorded as ONE ToolCallRecord (TEPO's call_k; `call_record`). The tag
format has at most one call per turn; JSON function calls may have several
(docs/function_calling.md). Prompts are the example's own messages with its tools when it
carries them (`encode_prompt`), and the reward reads the last turn, or every model turn when
the format says so (`scores_all_turns`: calls and answer sit in different turns).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import deque
from typing import Mapping, Optional, Sequence

import numpy as np

from tepo_jax.data.prompts import to_messages
from tepo_jax.rewards import TaskRewards
from tepo_jax.rollout.builder import TrajectoryBuilder
from tepo_jax.rollout.trajectory import Trajectory, attach_reward, model_mask
from tepo_jax.sampling.config import FINISH_EOS, FINISH_STOP_STRING, SamplingParams
from tepo_jax.sampling.sampler import Sampler, TurnOutput
from tepo_jax.tokenizer import encode_chat
from tepo_jax.tools import ParseError, ToolBridge
from tepo_jax.tools.format import CallFormat, call_record, encode_results

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 4          # G samples per prompt
    max_calls: int = 3           # tool calls per trajectory
    max_tokens: int = 384        # model tokens per trajectory
    max_turn_tokens: int = 96    # model tokens per turn
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_config(cls, config) -> "RolloutConfig":
        """The rollout of an experiment config (`config.rollout`)."""
        r = config.rollout
        return cls(group_size=r.group_size, max_calls=r.max_calls, max_tokens=r.max_tokens,
                   max_turn_tokens=r.max_turn_tokens, temperature=r.temperature, top_p=r.top_p,
                   top_k=r.top_k)


def encode_prompt(tokenizer, example, tools: Sequence[str] = ("python", "search"),
                  style: str = "full", descriptions: Mapping[str, str] = {}) -> list[int]:
    """Prompt ids of `example`: its own chat messages and tool schemas when it carries them
    (function-calling examples), else the tag-format system + user prompt for `tools` in
    `style` (data.prompts.PROMPT_STYLES); `descriptions` describe a user's own tools."""
    if hasattr(example, "messages"):
        return encode_chat(tokenizer, list(example.messages), tools=list(example.tools) or None)
    return encode_chat(tokenizer, to_messages(example, tools, style, descriptions))


def model_text(traj: Trajectory, tokenizer) -> str:
    """The trajectory's model turns decoded one by one and joined by newlines, in order
    (tool results left out): what a multi-turn function-call reward reads."""
    mask = model_mask(traj.kinds)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return "\n".join(tokenizer.decode(traj.token_ids[a:b].tolist(), skip_special_tokens=False)
                     for a, b in zip(edges[::2], edges[1::2]))


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

    def __init__(self, sampler: Sampler, bridge: ToolBridge, tokenizer, fmt: CallFormat,
                 config: RolloutConfig, tools: Sequence[str], rewards: TaskRewards = TaskRewards(),
                 prompt_style: str = "full", tool_descriptions: Mapping[str, str] = {}):
        self.sampler, self.bridge, self.tokenizer, self.fmt = sampler, bridge, tokenizer, fmt
        self.config, self.tools, self.rewards = config, tuple(tools), rewards
        self.prompt_style, self.tool_descriptions = prompt_style, dict(tool_descriptions)

    # ---- public ----------------------------------------------------------------------------
    def run(self, examples: Sequence, *, seed: int, group_size: Optional[int] = None,
            greedy: bool = False, batch_slots: Optional[Sequence[int]] = None,
            step: int = 0) -> list[Trajectory]:
        """G trajectories per example (example-major order), scored with the task's reward at
        RL step `step` (scheduled rewards, e.g. ResT's function-calling ranges, read it).

        `batch_slots`: the examples' slots in the global batch (default 0, 1, …); the
        per-request seeds use them, so a multi-host run, where each host rolls out its share
        of the batch, samples exactly what a single-host run samples.
        """
        g = group_size or self.config.group_size
        requests = [self._request(ex, i, s, seed) for i, ex in enumerate(examples) for s in range(g)]
        if batch_slots is not None:
            for k, r in enumerate(requests):  # request k = (example k // g, sample k % g)
                r.seed = request_seed(seed, int(batch_slots[k // g]), k % g)
        finished = self._drive(requests, greedy)
        return [self._score(traj, examples[traj.group_id], step) for traj in finished]

    # ---- the loop --------------------------------------------------------------------------
    def _request(self, example, index: int, sample: int, seed: int) -> _Request:
        meta = dict(tokenizer=self.tokenizer, prompt_id=example.id, group_id=index,
                    sample_index=sample, gold=example.gold, task=example.task)
        prompt = encode_prompt(self.tokenizer, example, self.tools, self.prompt_style, self.tool_descriptions)
        builder = TrajectoryBuilder(prompt, markup=self.fmt.markup(), **meta)
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
            outputs = self.sampler.advance()
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
            if calls:  # every call of every turn, malformed ones included, as one batch
                tool_calls = [c for _, turn_calls in calls for c in turn_calls]
                pending_calls = (self.bridge.submit(tool_calls), calls)
        return [done[id(r)] for r in requests]

    def _on_turn(self, req: _Request, out: TurnOutput, calls: list) -> Optional[Trajectory]:
        """Record a finished turn; return the trajectory if it ends here, else queue its
        calls. A call that cannot be followed by another turn is not run: it stays text."""
        b = req.builder
        text = self.tokenizer.decode(out.tokens.tolist(), skip_special_tokens=False)
        turn_calls = self._parse_calls(text)
        out_of_calls = b.num_calls >= self.config.max_calls
        out_of_tokens = b.model_tokens + len(out.tokens) >= self.config.max_tokens
        runs_call = bool(turn_calls) and not out_of_calls and not out_of_tokens
        b.add_model_turn(out.tokens, out.logprobs, out.entropies, is_call=runs_call)
        if not turn_calls:
            ended = out.finish_reason in (FINISH_EOS, FINISH_STOP_STRING)
            if self.fmt.is_answer(text, ended):
                return b.finish("answer")
            return b.finish("eos" if out.finish_reason == FINISH_EOS else "max_tokens")
        if out_of_calls:
            return b.finish("max_calls")
        if not runs_call:
            return b.finish("max_tokens")
        calls.append((req, turn_calls))
        return None

    def _parse_calls(self, text: str) -> list:
        """The turn's calls. The formats turn malformed model text into ParseErrors; should a
        parser still raise on some degenerate sample, that turn gets one ParseError (the
        model reads it as the call's result) instead of ending the run."""
        try:
            return self.fmt.parse_calls(text)
        except Exception as e:  # a parser bug must not end training
            log.warning("call format %s failed on a model turn (%s: %s); the turn gets a parse "
                        "error. Turn text starts: %r", type(self.fmt).__name__,
                        type(e).__name__, e, text[:200], exc_info=True)
            return [ParseError(f"could not parse the tool call ({type(e).__name__})")]

    def _append_results(self, future, calls, *, greedy: bool) -> list[_Request]:
        """Insert one result block per call turn; returns the requests that no longer fit
        the cache."""
        tool_results = iter(future.result())
        overflow = []
        for req, turn_calls in calls:
            results = [next(tool_results) for _ in turn_calls]
            ids = encode_results(self.tokenizer, self.fmt, [r.text for r in results])
            req.builder.add_tool_result(*call_record(self.fmt, turn_calls, results), ids)
            if len(req.builder.token_ids) >= self.sampler.config.max_len - 1:
                overflow.append(req)
            else:
                self.sampler.append(req.slot, ids, self._params(req, greedy))
        return overflow

    def _score(self, traj: Trajectory, example, step: int) -> Trajectory:
        text = model_text(traj, self.tokenizer) if self.fmt.scores_all_turns else traj.final_text
        return attach_reward(traj, self.rewards(text, example.gold, example.task, step, trajectory=traj))
