"""`TrainBatch`: the arrays one train step consumes, and the host-side packer that builds it.

Every field is [B, T] and describes the token in that slot:

    array[b, t] describes token tokens[b, t].
    logprob[t] = log p(tokens[t] | tokens[<t] of the same segment), predicted from position
    t − 1 of the same segment. The first token of a segment has no prediction: its loss mask
    must be 0 (the train step also forces it to 0, see `prediction_mask`).

This is the layout `Trajectory` already uses (its `logprobs[t]` / `entropies[t]` belong to
token t), so trajectory arrays go into a batch without any shift.

Fields:
  tokens         int32    token ids (prompt, model and tool-result tokens; 0 in padding)
  positions      int32    position inside its own segment (0, 1, 2, … restarting per segment)
  segment_ids    int32    1, 2, 3, … per packed sequence in a row; 0 = padding
  loss_mask      float32  1 on model tokens (reasoning, tool call, answer), 0 on prompt,
                          tool-result and padding tokens
  advantages     float32  per-token advantage (from `tepo_jax.rl.advantages`)
  old_logprobs   float32  the sampler's logprob of the token (or a recomputed one)
  ref_logprobs   float32  frozen reference model's logprob, for the KL term (zeros if unused)
  token_weights  float32  ResT weights, mean 1 over model tokens (ones if unused)

Shapes are bucketed (`pack_sequences`) so that the jitted step sees few distinct shapes.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import numpy as np


class TrainBatch(NamedTuple):
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    old_logprobs: np.ndarray
    ref_logprobs: np.ndarray
    token_weights: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


FIELD_DTYPES = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32,
                "loss_mask": np.float32, "advantages": np.float32, "old_logprobs": np.float32,
                "ref_logprobs": np.float32, "token_weights": np.float32}


@dataclasses.dataclass
class SequenceData:
    """One trajectory's per-token arrays, all of length L (token t at index t)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    old_logprobs: np.ndarray
    ref_logprobs: Optional[np.ndarray] = None
    token_weights: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.tokens)

    def arrays(self) -> dict[str, np.ndarray]:
        n = len(self.tokens)
        out = {"tokens": self.tokens, "loss_mask": self.loss_mask, "advantages": self.advantages,
               "old_logprobs": self.old_logprobs,
               "ref_logprobs": np.zeros(n) if self.ref_logprobs is None else self.ref_logprobs,
               "token_weights": np.ones(n) if self.token_weights is None else self.token_weights}
        for name, a in out.items():
            if np.shape(a) != (n,):
                raise ValueError(f"{name} has shape {np.shape(a)}, expected ({n},)")
        if n and out["loss_mask"][0] != 0:
            raise ValueError("loss_mask[0] must be 0: the first token of a sequence has no prediction")
        return out


class Placement(NamedTuple):
    """Where a sequence went: batch row, first column, length."""

    row: int
    start: int
    length: int


class PackedBatch(NamedTuple):
    batch: TrainBatch            # numpy arrays; `jax.device_put(batch, batch_sharding)` next
    placements: list[Placement]  # placements[i] = where sequence i went

    def unpack(self, values: np.ndarray) -> list[np.ndarray]:
        """Per-sequence slices of a [B, T] array (e.g. recomputed logprobs) in input order."""
        values = np.asarray(values)
        return [values[p.row, p.start:p.start + p.length] for p in self.placements]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets ascending); beyond the last, the next multiple of it."""
    for b in buckets:
        if n <= b:
            return b
    last = buckets[-1]
    return -(-n // last) * last


def power_of_two_buckets(min_size: int, max_size: int) -> tuple[int, ...]:
    out, b = [], min_size
    while b < max_size:
        out.append(b)
        b *= 2
    return tuple(out) + (max_size,)


def sequence_length_buckets(min_size: int, max_size: int) -> tuple[int, ...]:
    """Powers of two and the midpoint 1.5x between each pair: 128, 192, 256, 384, 512, ...

    Padding a row up to its bucket wastes at most a third of the row instead of half (160 real
    tokens pad to 192, not 256); the train step's cost is linear in the padded tokens, while a
    run meets at most one more compiled shape per doubling of its longest sequence.
    """
    out = []
    for b in power_of_two_buckets(min_size, max_size):   # ascending; the last is max_size
        out += [b, b * 3 // 2] if b * 3 // 2 < max_size else [b]
    return tuple(out)


def _assign_rows(lengths: Sequence[int], seq_len: int, pack: bool) -> list[tuple[int, int]]:
    """(row, start) per sequence: first-fit decreasing when packing, one per row otherwise."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    used: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        row = next((r for r, u in enumerate(used) if pack and u + lengths[i] <= seq_len), None)
        if row is None:
            row = len(used)
            used.append(0)
        where[i] = (row, used[row])
        used[row] += lengths[i]
    return where


def pack_sequences(seqs: Sequence[SequenceData], *, seq_len: Optional[int] = None,
                   num_rows: Optional[int] = None, pack: bool = True,
                   length_buckets: Sequence[int] = sequence_length_buckets(128, 32768),
                   row_multiple: int = 1, row_buckets: Optional[Sequence[int]] = None) -> PackedBatch:
    """Pack (or pad) sequences into a `TrainBatch` of numpy arrays with bucketed shapes.

    T = `seq_len`, or the smallest length bucket that holds the longest sequence.
    With `pack`, several sequences share a row (segment ids 1, 2, …; positions restart per
    segment); otherwise one sequence per row. B = `num_rows`, or the number of rows used rounded
    up to `row_buckets` (default: powers of two) and to a multiple of `row_multiple` (use the
    number of batch shards × micro-batches). Padding rows/columns have segment id 0 and mask 0.
    """
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence")
    lengths = [len(s) for s in seqs]
    t = seq_len or bucket(max(lengths), length_buckets)
    if max(lengths) > t:
        raise ValueError(f"a sequence of length {max(lengths)} does not fit seq_len={t}")
    where = _assign_rows(lengths, t, pack)
    rows_used = 1 + max(r for r, _ in where)
    b = num_rows or bucket(rows_used, row_buckets or power_of_two_buckets(1, 1 << 20))
    b = -(-b // row_multiple) * row_multiple
    if rows_used > b:
        raise ValueError(f"{len(seqs)} sequences need {rows_used} rows, num_rows={b}")
    out = {name: np.zeros((b, t), dtype) for name, dtype in FIELD_DTYPES.items()}
    out["token_weights"][:] = 1.0
    segment_count = np.zeros(b, np.int32)
    placements = []
    for s, (row, start), n in zip(seqs, where, lengths):
        segment_count[row] += 1
        cols = slice(start, start + n)
        for name, a in s.arrays().items():
            out[name][row, cols] = a
        out["positions"][row, cols] = np.arange(n)
        out["segment_ids"][row, cols] = segment_count[row]
        placements.append(Placement(row, start, n))
    return PackedBatch(TrainBatch(**out), placements)


def sequence_from_trajectory(traj, advantages: np.ndarray, *, token_weights: Optional[np.ndarray] = None,
                             ref_logprobs: Optional[np.ndarray] = None) -> SequenceData:
    """A `SequenceData` from a `tepo_jax.rollout.Trajectory` (same per-token layout, no shift).

    loss_mask = the trajectory's model tokens; old_logprobs = the sampler's logprobs.
    """
    return SequenceData(tokens=np.asarray(traj.token_ids), loss_mask=traj.model_mask().astype(np.float32),
                        advantages=np.asarray(advantages), old_logprobs=np.asarray(traj.logprobs),
                        ref_logprobs=ref_logprobs, token_weights=token_weights)
