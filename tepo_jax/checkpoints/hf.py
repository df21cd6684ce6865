"""Hugging Face checkpoints (config.json + safetensors) <-> our NNX Decoder, both directions.

Loading goes in one fixed order:
  1. config.json (old or new form) -> ModelConfig;
  2. abstract model (nnx.eval_shape: shapes only, no memory);
  3. target sharding per parameter (the mesh's rules, or one device);
  4. the name map (`name_map.py`): HF name <-> our path with its transpose/reshape;
  5. for each tensor: view it in the memory-mapped shard, check the shape, and place it directly
     on its target sharding, converting each device's slice on its own (each device gets only
     its slice; neither the whole model nor a whole tensor is copied on the host first);
  6. merge into the module.
Export reads the same table backwards. Missing, unexpected or misshaped tensors are a
`CheckpointError` naming the tensor and the file.

A checkpoint directory may be a URL (gs://bucket/run/sft_final): the shards are memory-mapped,
so a remote one is read from a local copy, and one is written into a local directory that is
then uploaded (tepo_jax/paths.py).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from tepo_jax import paths
from tepo_jax.checkpoints.name_map import Rule, name_map
from tepo_jax.checkpoints.safetensors_io import (SafetensorsFormatError, SafetensorsReader,
                                                 shard_groups, write_safetensors)
from tepo_jax.models.config import ModelConfig, UnsupportedConfigError, from_hf_config, to_hf_config
from tepo_jax.sharding import param_shardings
from tepo_jax.models.decoder import Decoder

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_FLOAT_DTYPES = {np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


# ---------------------------------------------------------------------------- config


def _read_json(file) -> dict:
    try:
        return json.loads(paths.as_path(file).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON ({e})") from None


def _check_dir(path) -> str:
    path = os.fspath(path)
    if not paths.as_path(path).is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return path


def load_hf_config(path, *, dtype=None, param_dtype=None) -> ModelConfig:
    """ModelConfig from `path/config.json` (old `rope_scaling`/`torch_dtype` or new form)."""
    file = paths.as_path(_check_dir(path)) / CONFIG_FILE
    try:
        return from_hf_config(_read_json(file), dtype=dtype, param_dtype=param_dtype)
    except UnsupportedConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


# ---------------------------------------------------------------------------- reading


def _open_shards(path: str) -> dict[str, SafetensorsReader]:
    """tensor name -> reader of the file that holds it (single file or index.json shards)."""
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_file):
        weight_map = _check_weight_map(index_file, _read_json(index_file))
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    readers = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        try:
            readers[name] = SafetensorsReader(file)
        except SafetensorsFormatError as e:
            raise CheckpointError(str(e)) from None
    by_tensor = {}
    for name, reader in readers.items():
        for key in reader.keys():
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{reader.path}: tensor {key!r} not listed for this file in {INDEX_FILE}")
            by_tensor[key] = reader
    return by_tensor


def _check_weight_map(index_file, index) -> dict[str, str]:
    """The index's weight_map {tensor name: shard file name}: an object of plain file names
    inside the checkpoint directory (a checkpoint is self-contained: no absolute paths, no '..').
    Only the names are checked, so shards that are symlinks (the HF hub cache) still load."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: no 'weight_map' object")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index_file}: weight_map[{key!r}] must be a file name, got {name!r}")
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
            raise CheckpointError(f"{index_file}: weight_map[{key!r}] = {name!r} points outside the "
                                  "checkpoint directory")
    return weight_map


# Buffers some exporters store next to the weights (Llama-2-era conversions keep each layer's
# rotary inverse frequencies). transformers ignores them and so do we: rope comes from config.json.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _check_keys(path: str, rules: list[Rule], by_tensor: dict[str, SafetensorsReader],
                cfg: ModelConfig) -> None:
    """Every tensor the name map wants is stored, and nothing else is (bar ignored buffers and
    a tied checkpoint's copy of the embedding as lm_head.weight)."""
    expected = {r.hf_name for r in rules}
    missing = [r.hf_name for r in rules if r.hf_name not in by_tensor]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" + _and_more(missing)
                              + _where_missing(path, missing[0]))
    unexpected = sorted(k for k in by_tensor if k not in expected and not k.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        _check_tied_head(path, by_tensor)  # some exporters write the tied head anyway
        unexpected.remove("lm_head.weight")
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {by_tensor[unexpected[0]].path}"
                              + _and_more(unexpected))


def _and_more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _where_missing(path: str, key: str) -> str:
    """Which file should have held `key`: for a sharded checkpoint, whether the index names it
    (an index that lists a tensor its shard lacks points at a broken copy, not a wrong model)."""
    index_file = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index_file):
        return f"; {SINGLE_FILE} does not hold it"
    shard = _read_json(index_file)["weight_map"].get(key)  # checked by _open_shards already
    if shard is None:
        return f"; {INDEX_FILE} does not list it"
    return f"; {INDEX_FILE} lists it in {shard}, which does not hold it"


def _check_tied_head(path: str, by_tensor: dict[str, SafetensorsReader]) -> None:
    """A stored lm_head.weight in a tied checkpoint is accepted only if it equals the embedding:
    loading it tied would silently drop a different head (transformers then unties instead)."""
    head_reader, embed_reader = by_tensor["lm_head.weight"], by_tensor["model.embed_tokens.weight"]
    head, embed = head_reader.get("lm_head.weight"), embed_reader.get("model.embed_tokens.weight")
    if head.shape != embed.shape or head.ndim != 2:
        detail = f"has shape {list(head.shape)}, model.embed_tokens.weight {list(embed.shape)}"
    else:
        diff = _max_abs_diff(head, embed)
        if diff == 0:
            return
        detail = f"differs from model.embed_tokens.weight (max abs diff {diff:.6g})"
    raise CheckpointError(f"{path}: tie_word_embeddings is true but lm_head.weight {detail}; set "
                          "tie_word_embeddings to false in config.json to load the stored head")


def _max_abs_diff(a: np.ndarray, b: np.ndarray, block_bytes: int = 1 << 24) -> float:
    """max |a - b| in float32 over two [rows, cols] memory-mapped tensors, a block of rows at a
    time (a whole float32 copy of a 150k-vocab embedding would be gigabytes). NaN if either has one."""
    rows = max(1, block_bytes // (4 * max(1, a.shape[1])))
    out = np.float32(0)
    for i in range(0, a.shape[0], rows):
        d = np.abs(a[i:i + rows].astype(np.float32) - b[i:i + rows].astype(np.float32))
        out = np.maximum(out, d.max(initial=0))  # np.maximum keeps a NaN
    return float(out)


def _read_tensor(rule: Rule, reader: SafetensorsReader, target: jax.ShapeDtypeStruct) -> np.ndarray:
    """The checked tensor in our layout: a view of the memory-mapped file (the name map's
    transposes and head splits are strided views), not yet converted or copied."""
    want = rule.kind.hf_shape(tuple(target.shape))
    got = reader.shape(rule.hf_name)
    if got != want:
        raise CheckpointError(f"tensor {rule.hf_name!r} in {reader.path} has shape {list(got)}, "
                              f"expected {list(want)} from config.json")
    if reader.dtype(rule.hf_name) not in _FLOAT_DTYPES:
        raise CheckpointError(f"tensor {rule.hf_name!r} in {reader.path} has non-float dtype "
                              f"{reader.dtype(rule.hf_name)}")
    return rule.kind.to_ours(reader.get(rule.hf_name), tuple(target.shape))


def _all_finite(x: np.ndarray, block: int = 1 << 18) -> bool:
    """No NaN or inf in the contiguous float array `x`: one pass over its bits (exponent all
    ones: |bits| >= the bits of +inf), block by block so the temporaries stay in cache. About
    10 GB/s for every float dtype (numpy's isfinite does ~1 GB/s on bf16 and fp16)."""
    uint = np.dtype(f"u{x.dtype.itemsize}")
    inf = np.array(np.inf, x.dtype).view(uint)
    magnitude = uint.type((1 << (8 * uint.itemsize - 1)) - 1)  # all bits but the sign
    bits = x.reshape(-1).view(uint)
    return all((bits[i:i + block] & magnitude).max(initial=0) < inf for i in range(0, bits.size, block))


def _place(value: np.ndarray, sharding: jax.sharding.Sharding, dtype, name: str = "tensor") -> jax.Array:
    """Put a host array on `sharding`: each addressable device receives only its own slice,
    converted to `dtype` and made contiguous slice by slice, so a memory-mapped tensor is never
    copied whole into host memory (unless one device holds all of it).

    Each slice is checked for NaN / inf as it is converted (a CheckpointError naming `name`):
    one cheap pass over memory already being read, and it also catches values the conversion
    to `dtype` overflowed."""
    def slice_for(index):
        with np.errstate(over="ignore"):  # an overflowing cast gives inf, reported just below
            out = np.ascontiguousarray(value[index], dtype=dtype)
        if not _all_finite(out):
            stored_finite = _all_finite(np.ascontiguousarray(value[index]))
            raise CheckpointError(f"{name} has " + ("NaN or inf values" if not stored_finite else
                                                    f"values that overflow the parameter dtype {np.dtype(dtype)}"))
        return out

    return jax.make_array_from_callback(value.shape, sharding, slice_for)


def _target_shardings(abstract_state, mesh: Optional[Mesh]):
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, abstract_state)
    return param_shardings(abstract_state, mesh)


def load_hf(path, *, mesh: Optional[Mesh] = None, dtype=None, param_dtype=None,
            remat: bool = False) -> Decoder:
    """Load an HF Qwen2 / Llama checkpoint directory into a Decoder.

    `param_dtype` defaults to the stored dtype, `dtype` (compute) to `param_dtype`. With `mesh`,
    each parameter is placed on the mesh's sharding for it (and activations are constrained).
    """
    path = _check_dir(path)
    if paths.is_remote(path):  # the shards are memory-mapped: read a local copy
        with paths.local_copy(path) as local:
            return load_hf(local, mesh=mesh, dtype=dtype, param_dtype=param_dtype, remat=remat)
    cfg = load_hf_config(path, dtype=dtype, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), mesh=mesh, remat=remat))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.to_pure_dict(_target_shardings(abstract_state, mesh))
    targets = nnx.to_pure_dict(abstract_state)
    rules = name_map(cfg)
    by_tensor = _open_shards(path)
    _check_keys(path, rules, by_tensor, cfg)
    values = {}
    for rule in rules:
        target, sharding = _get(targets, rule.path), _get(shardings, rule.path)
        reader = by_tensor[rule.hf_name]
        values[rule.path] = _place(_read_tensor(rule, reader, target), sharding, target.dtype,
                                   name=f"tensor {rule.hf_name!r} in {reader.path}")
    if len(values) != len(jax.tree.leaves(targets)):
        raise CheckpointError(f"internal: name map covers {len(values)} of "
                              f"{len(jax.tree.leaves(targets))} parameters")
    for p, v in values.items():
        _set(targets, p, v)
    nnx.replace_by_pure_dict(abstract_state, targets)
    return nnx.merge(graphdef, abstract_state)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


# ---------------------------------------------------------------------------- writing


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_hf(model: Decoder, path, *, dtype=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write `model` as an HF checkpoint directory transformers' `from_pretrained` can load.

    `dtype` (e.g. jnp.bfloat16) is the stored dtype; default: the parameters' dtype.
    Shards of at most `max_shard_bytes` (one tensor may exceed it) plus an index when more
    than one. Only process 0 writes; every process must call it (arrays are gathered).
    """
    cfg: ModelConfig = model.cfg
    out_dtype = np.dtype(dtype or cfg.param_dtype)
    # First: a config that config.json cannot describe fails before anything is gathered or
    # any old checkpoint in `path` is removed.
    hf_config = to_hf_config(cfg, dtype=out_dtype)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rules = name_map(cfg)
    tensors = {}
    for rule in rules:
        value = _to_host(_get(state, rule.path)).astype(out_dtype, copy=False)
        tensors[rule.hf_name] = np.ascontiguousarray(rule.kind.to_hf(value))
    if jax.process_index() != 0:
        return
    _remove_stale(path)
    with paths.staged(path) as local:  # a remote path: written locally, then uploaded
        _write_files(local, hf_config, rules, tensors, max_shard_bytes)


def _write_files(path: str, hf_config: dict, rules: list[Rule], tensors: dict,
                 max_shard_bytes: int) -> None:
    """config.json and the safetensors shards (+ index) into the local directory `path`."""
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    groups = shard_groups(((r.hf_name, tensors[r.hf_name].nbytes) for r in rules), max_shard_bytes)
    if len(groups) == 1:
        write_safetensors(os.path.join(path, SINGLE_FILE), tensors)
        return
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(path, file), {n: tensors[n] for n in names})
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def _remove_stale(path) -> None:
    """Old weights in the target directory would be mixed with the new ones by a loader."""
    path = paths.as_path(path)
    if not path.is_dir():
        return
    for file in path.iterdir():
        if file.name.endswith(".safetensors") or file.name == INDEX_FILE:
            file.unlink()
