"""Per-device memory of a training / sampling configuration, estimated before anything is allocated.

`estimate_memory(cfg, mesh, workload)` returns per-device bytes of each component; `check_fits`
also compares the total with the device memory and raises `MemoryBudgetError` when it cannot fit.
All numbers are per device (one accelerator chip / GPU), in bytes.

Exact parts (from the real shardings, no formula):
- params: the abstract model (`nnx.eval_shape`) gets `tepo_jax.sharding.param_shardings` on the
  mesh; each parameter counts `prod(NamedSharding.shard_shape(shape)) * itemsize`, so a dimension
  an axis does not divide (e.g. 2 KV heads on tensor=4) is counted as replicated. The decoder's
  layers are identical, so one layer is built and counted `num_layers` times (eval_shape of an
  80-layer model takes seconds).
- gradients: params' shard elements × param itemsize.
- frozen params: `frozen_params` more copies of the params that are not trained (the driver
  keeps the initial model beside the train state; a KL reference loaded from disk).
- optimizer (AdamW): 2 moments × shard elements × moment itemsize (fp32 by default), plus an fp32
  master copy of the params when `master_fp32` and the params are not fp32 already.
- KV cache: layers × the k and v shards of `kv_cache_shardings` ([slots, K, H, cache_len] and
  [slots, K, cache_len, H])
  (slots over (data, fsdp), KV heads over tensor) × cache itemsize.

Estimated part (activations of the training forward/backward, a = compute itemsize,
b = per-device micro-batch = ceil(B / (data·fsdp)), T = seq_len, n, k, f, v = heads, KV heads,
intermediate size and vocabulary divided by the tensor axis where it divides them):
- one layer, everything kept for the backward pass:
      layer = b·T·(6·D + 3·(n + k)·H + 4·f)·a  +  b·n·T²·(4 + a)
  (6 residual-stream tensors, q/k/v before and after rope and the attention output, 4 MLP
  tensors; fp32 attention scores plus probabilities in the compute dtype).
- without remat: layers × layer.
- with remat (`nnx.remat` per block): layers × b·T·D·a (each block's input) + one layer
  (recomputed during its backward).
- logits: b·T_c·v·4·3 with T_c = min(T, logits_chunk) (fp32 logits, the softmax temporary and
  their gradient); the full T when the logits are not chunked.
Sampler activations (decode: a few [slots, D] tensors) are negligible and not counted; the KV
cache is counted as resident during training (conservative: the sampler keeps its buffers).

The total is compared with `headroom × device memory` (default 0.9: XLA workspace and
fragmentation). Device memory: an explicit value, else the known table by device kind, else the
local device's `memory_stats()['bytes_limit']` (CPU: the host's RAM over its local devices).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import BATCH_AXES, LayerCache, build_abstract, cache_shapes
from tepo_jax.sharding import AXES, MeshConfig, fit_spec, param_shardings

GiB = 2 ** 30
GB = 10 ** 9

# Memory per device as published by the vendors (TPU: per chip).
DEVICE_MEMORY = {
    "tpu-v4": 32 * GiB,
    "tpu-v5e": 16 * GiB,
    "tpu-v5p": 95 * GB,
    "tpu-v6e": 32 * GiB,
    "h100": 80 * GB,
    "h200": 141 * GB,
    "a100-40gb": 40 * GB,
    "a100-80gb": 80 * GB,
}
# device_kind strings (as jax reports them, lower case) -> table key; first match wins.
_KIND_PATTERNS = [
    (r"v5 ?lite|v5e", "tpu-v5e"), (r"v6 ?lite|v6e", "tpu-v6e"), (r"v5p|tpu v5$", "tpu-v5p"),
    (r"tpu v4|^v4", "tpu-v4"), (r"h100", "h100"), (r"h200", "h200"),
    (r"a100.*40", "a100-40gb"), (r"a100", "a100-80gb"),
]
COMPONENTS = ("params", "frozen_params", "master_params", "optimizer", "gradients", "kv_cache", "activations")


class MemoryBudgetError(RuntimeError):
    """The configuration cannot fit in device memory (raised before anything is allocated)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """What runs on the model. `batch` and `slots` are global (over all devices)."""

    batch: int = 1                 # train micro-batch: sequences per forward/backward
    seq_len: int = 1024            # train sequence length
    slots: int = 0                 # sampler slots (concurrent sequences); 0 = no sampler
    cache_len: int = 0             # KV cache length per slot
    remat: bool = False
    master_fp32: bool = False      # fp32 master copy of non-fp32 params in the optimizer
    moment_dtype: Any = jnp.float32
    cache_dtype: Any = None        # default: the model's compute dtype
    logits_chunk: Optional[int] = None  # tokens per logits chunk; None = full [B, T, V]
    optimizer: str = "adamw"       # "adamw", or "none": frozen weights (reference model, sampler only)
    frozen_params: int = 0         # extra untrained copies of the params (initial model, KL reference)

    def __post_init__(self):
        for name, low in (("batch", 1), ("seq_len", 1), ("slots", 0), ("cache_len", 0), ("frozen_params", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"Workload.{name} must be >= {low}, got {getattr(self, name)}")
        if self.logits_chunk is not None and self.logits_chunk < 1:
            raise ValueError(f"Workload.logits_chunk must be >= 1 (or None), got {self.logits_chunk}")


@dataclasses.dataclass
class MemoryEstimate:
    components: dict[str, int]
    device_memory: Optional[int] = None
    headroom: float = 0.9
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def usable(self) -> Optional[int]:
        return None if self.device_memory is None else int(self.device_memory * self.headroom)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.usable is None else self.total <= self.usable

    @property
    def largest(self) -> str:
        return max(self.components, key=self.components.get)

    def table(self) -> str:
        rows = [f"{'component':<16}{'GiB/device':>12}{'share':>8}"]
        for name, nbytes in self.components.items():
            share = nbytes / self.total if self.total else 0.0
            rows.append(f"{name:<16}{nbytes / GiB:>12.3f}{share:>8.1%}")
        rows.append(f"{'total':<16}{self.total / GiB:>12.3f}")
        if self.device_memory is not None:
            rows.append(f"{'device memory':<16}{self.device_memory / GiB:>12.3f}")
            rows.append(f"{'usable':<16}{self.usable / GiB:>12.3f}  (headroom {self.headroom:.0%})")
            rows.append("fits" if self.fits else f"DOES NOT FIT (largest: {self.largest})")
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


def abstract_mesh(mesh_cfg: MeshConfig, num_devices: int) -> AbstractMesh:
    """A (data, fsdp, tensor) mesh of the given size with no devices behind it."""
    return AbstractMesh(mesh_cfg.shape(num_devices), AXES, axis_types=(AxisType.Auto,) * 3)


def kv_cache_shardings(cfg: ModelConfig, mesh: Union[Mesh, AbstractMesh], batch: int, max_len: int):
    """Shardings matching `init_cache(cfg, batch, max_len)`: slots over (data, fsdp), KV heads over tensor."""
    shapes = cache_shapes(cfg, batch, max_len)
    spec = P(BATCH_AXES, "tensor", None, None)
    sharding = LayerCache(*(NamedSharding(mesh, fit_spec(spec, shape, mesh)) for shape in shapes))
    return tuple(sharding for _ in range(cfg.num_layers))


def _shard_bytes(sharding: NamedSharding, shape, dtype) -> int:
    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * jnp.dtype(dtype).itemsize


def param_bytes_per_device(cfg: ModelConfig, mesh) -> tuple[int, int]:
    """(bytes, elements) of one device's parameter shards."""
    state = nnx.state(build_abstract(cfg.replace(num_layers=1)), nnx.Param)
    shardings = param_shardings(state, mesh)
    nbytes = elems = 0
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(shardings)):
        repeat = cfg.num_layers if getattr(path[0], "key", None) == "layers" else 1
        b = _shard_bytes(s, x.shape, x.dtype) * repeat
        nbytes += b
        elems += b // jnp.dtype(x.dtype).itemsize
    return nbytes, elems


def _split(dim: int, size: int) -> int:
    """Per-device extent of a dimension over a mesh axis (replicated when it does not divide)."""
    return dim // size if dim % size == 0 else dim


def activation_bytes(cfg: ModelConfig, mesh_shape: dict, w: Workload) -> int:
    """Training forward/backward activations per device (formula in the module docstring)."""
    a = jnp.dtype(cfg.dtype).itemsize
    b = -(-w.batch // (mesh_shape["data"] * mesh_shape["fsdp"]))
    tp, t, d, h = mesh_shape["tensor"], w.seq_len, cfg.hidden_size, cfg.head_dim
    n, k = _split(cfg.num_heads, tp), _split(cfg.num_kv_heads, tp)
    f, v = _split(cfg.intermediate_size, tp), _split(cfg.vocab_size, tp)
    layer = b * t * (6 * d + 3 * (n + k) * h + 4 * f) * a + b * n * t * t * (4 + a)
    body = cfg.num_layers * b * t * d * a + layer if w.remat else cfg.num_layers * layer
    logits = b * min(t, w.logits_chunk or t) * v * 4 * 3
    return int(body + logits)


def estimate_memory(cfg: ModelConfig, mesh: Union[Mesh, AbstractMesh], workload: Workload,
                    device_memory: Optional[int] = None, headroom: float = 0.9) -> MemoryEstimate:
    """Per-device bytes of every component (see the module docstring for what is exact)."""
    if workload.optimizer not in ("adamw", "none"):
        raise ValueError(f"optimizer must be 'adamw' or 'none', got {workload.optimizer!r}")
    params, elems = param_bytes_per_device(cfg, mesh)
    trains = workload.optimizer == "adamw"
    moment = jnp.dtype(workload.moment_dtype).itemsize if trains else 0
    master = 4 * elems if trains and workload.master_fp32 and jnp.dtype(cfg.param_dtype).itemsize < 4 else 0
    kv = 0
    if workload.slots and workload.cache_len:
        cache_dtype = workload.cache_dtype or cfg.dtype
        shardings = kv_cache_shardings(cfg, mesh, workload.slots, workload.cache_len)[0]
        shapes = cache_shapes(cfg, workload.slots, workload.cache_len)
        kv = cfg.num_layers * sum(_shard_bytes(s, shape, cache_dtype) for s, shape in zip(shardings, shapes))
    components = dict(params=params, frozen_params=workload.frozen_params * params,
                      master_params=master, optimizer=2 * moment * elems,
                      gradients=params if trains else 0, kv_cache=kv,
                      activations=activation_bytes(cfg, dict(mesh.shape), workload) if trains else 0)
    est = MemoryEstimate(components, device_memory, headroom)
    full = cfg.num_params * jnp.dtype(cfg.param_dtype).itemsize / math.prod(mesh.shape.values())
    if params > 1.05 * full:
        est.notes.append(f"params are {params / full:.2f}x a perfect split over {math.prod(mesh.shape.values())} "
                         "devices: some dimensions are replicated (the axis does not divide them, or "
                         "the mesh has a data axis)")
    return est


def _suggestion(largest: str, mesh_shape: dict, w: Workload) -> str:
    fsdp, tp = mesh_shape["fsdp"], mesh_shape["tensor"]
    if largest in ("params", "frozen_params", "master_params", "optimizer", "gradients"):
        return (f"shard the weights over more devices: a bigger fsdp axis (now {fsdp}) or tensor axis "
                f"(now {tp}), fewer data replicas, or bf16 params / no fp32 master copy")
    if largest == "activations":
        hint = "turn on remat, " if not w.remat else ""
        chunk = "chunk the logits, " if w.logits_chunk is None else ""
        return (f"{hint}use a smaller micro-batch (now {w.batch}) or sequence length (now {w.seq_len}), "
                f"{chunk}or a bigger tensor axis (now {tp})")
    return (f"use fewer sampler slots (now {w.slots}) or a shorter cache (now {w.cache_len}), or "
            f"spread them over a bigger data/fsdp axis or tensor axis (now {tp})")


def _params_alone(est: MemoryEstimate) -> str:
    params = est.components["params"]
    if params <= est.usable:
        return ""
    return f" The params alone ({params / GiB:.2f} GiB) exceed the usable memory."


def check_fits(cfg: ModelConfig, mesh: Union[Mesh, AbstractMesh], workload: Workload,
               device_memory: Optional[int] = None, headroom: float = 0.9,
               device_kind: Optional[str] = None) -> MemoryEstimate:
    """The estimate, or MemoryBudgetError naming the biggest component and what to change."""
    check_headroom(headroom)
    memory = resolve_device_memory(device_memory, device_kind)
    est = estimate_memory(cfg, mesh, workload, memory, headroom)
    if not est.fits:
        largest = est.largest
        raise MemoryBudgetError(
            f"needs {est.total / GiB:.2f} GiB per device, but only {est.usable / GiB:.2f} GiB is usable "
            f"({headroom:.0%} of {memory / GiB:.2f} GiB) on mesh {dict(mesh.shape)}; the largest part is "
            f"{largest} ({est.components[largest] / GiB:.2f} GiB). Suggestion: "
            f"{_suggestion(largest, dict(mesh.shape), workload)}.{_params_alone(est)}\n{est.table()}")
    return est


def check_headroom(headroom: float) -> None:
    """ValueError unless the usable fraction of device memory is in (0, 1]."""
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom is the usable fraction of device memory, in (0, 1]; got {headroom:g}")


def parse_bytes(text: Union[str, int, float]) -> int:
    """'95GB' -> 95e9, '16GiB' -> 16·2^30, '1.5T' -> 1.5e12, '512B' -> 512, 1234 -> 1234.
    A string needs its unit: a bare '80' would be 80 bytes, never what was meant. ValueError
    for anything else, or a size that is not positive."""
    if isinstance(text, (int, float)):
        nbytes = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)b?|(b))?\s*", text.lower())
        if not m:
            raise ValueError(f"cannot parse a memory size from {text!r} (e.g. 95GB, 16GiB)")
        if not (m.group(2) or m.group(4)):
            raise ValueError(f"memory size {text!r} has no unit: write e.g. {text.strip()}GB (10^9 bytes) "
                             f"or {text.strip()}GiB (2^30 bytes)")
        power = "_kmgt".index(m.group(2) or "_")
        base = 1024 if m.group(3) else 1000
        nbytes = int(float(m.group(1)) * base ** power)
    if nbytes <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return nbytes


def memory_for_kind(kind: str) -> Optional[int]:
    """Table lookup by a device kind ('TPU v5p', 'NVIDIA H100 80GB HBM3', 'h200', 'tpu-v6e')."""
    kind = kind.strip().lower()
    if kind in DEVICE_MEMORY:
        return DEVICE_MEMORY[kind]
    for pattern, key in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return DEVICE_MEMORY[key]
    return None


def host_memory_per_device() -> int:
    """CPU devices (simulated ones too) share the host's RAM: its size over the local devices."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def resolve_device_memory(explicit=None, device_kind: Optional[str] = None) -> int:
    """Explicit size > table entry for `device_kind` > the local device's memory_stats / kind."""
    if explicit is not None:
        return parse_bytes(explicit)
    if device_kind is not None:
        found = memory_for_kind(device_kind)
        if found is None:
            raise ValueError(f"unknown device kind {device_kind!r}; known: {sorted(DEVICE_MEMORY)}; "
                             "pass the memory size instead (e.g. 95GB)")
        return found
    device = jax.devices()[0]
    if device.platform == "cpu":
        return host_memory_per_device()
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    found = memory_for_kind(device.device_kind)
    if found is None:
        raise ValueError(f"cannot tell the memory of a {device.device_kind!r} device; pass it "
                         "explicitly (--device-memory 95GB) or name a device kind")
    return found

