"""grain input pipelines: deterministic, host-sharded and checkpointable.

    ds = make_dataset(records, seed=0, batch_size=8, shard_index=jax.process_index(),
                      shard_count=jax.process_count())
    it = iter(ds)
    batch = next(it)                 # a list of `batch_size` records
    state = it.get_state()           # save with the model checkpoint
    it2 = iter(ds); it2.set_state(state)   # resumes at exactly the same batch

Order of operations: source -> even host shard -> shuffle(seed) -> repeat(num_epochs,
reseeded per epoch) -> map(transform) -> batch. Sharding comes first, so each host reads only
its own strided part of the source; every host gets the same number of records (at most
`shard_count - 1` records at the end are dropped) so all hosts step in lockstep.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import grain


class DataSourceError(ValueError):
    """A data source that cannot be read; the message names the directory."""


def tfds_source(data_dir: str, name: str, splits: Sequence[str]):
    """Split `splits[0]` (else the first of the others present) of the prepared tfds dataset
    `name` in `data_dir`: a random-access source of record dicts (`records.from_dict`).
    The builder must be registered (import `tepo_jax.data.tfds_builders`)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 — tfds raises several types for an unknown dataset
        raise DataSourceError(f"{data_dir}: cannot open tfds dataset {name!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not prepared:
        raise DataSourceError(f"{data_dir}: no prepared tfds dataset {name!r} (tepo_jax.data.tfds_builders.build)")
    for split in splits:
        if split in builder.info.splits:
            return builder.as_data_source(split=split)
    raise DataSourceError(f"{data_dir}: tfds dataset {name!r} has no split {' or '.join(splits)} "
                          f"(it has {sorted(builder.info.splits)})")


def shard_indices(n: int, shard_index: int, shard_count: int) -> range:
    """Indices host `shard_index` of `shard_count` reads: strided, disjoint, equal size."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index} of {shard_count}")
    per_host = n // shard_count
    if per_host == 0:
        raise ValueError(f"{n} records cannot be split across {shard_count} hosts")
    return range(shard_index, per_host * shard_count, shard_count)


def make_dataset(source: Sequence[Any], *, seed: int, batch_size: int, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                 transform: Callable[[Any], Any] | None = None,
                 drop_remainder: bool = True) -> grain.IterDataset:
    """A grain IterDataset of batches (lists of records) over `source`.

    `source`: anything with len() and integer indexing — a list of records (e.g. from
    `jsonl.read_jsonl`) or a `tfds.data_source(...)[split]`. `num_epochs=None` repeats
    forever. The iterator's `get_state()` / `set_state()` checkpoint the position.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(source)
    idx = shard_indices(len(ds), shard_index, shard_count)
    ds = ds[idx.start:idx.stop:idx.step] if shard_count > 1 or len(idx) != len(ds) else ds
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
    return ds.to_iter_dataset()
