"""Meshes, per-parameter shardings, and sharded model creation.

Mesh axes are always the three named axes `data`, `fsdp`, `tensor` (size 1 when unused), so
every PartitionSpec in the model is valid on every mesh. Parameters declare their logical
spec when created (`out_sharding` metadata in `tepo_jax.models.decoder`); `param_shardings`
turns those into NamedShardings for a concrete mesh, dropping an axis from a dimension that
it does not divide (e.g. 2 KV heads on tensor=4), which is then replicated along that axis.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tepo_jax.models.config import ModelConfig
from tepo_jax.models.decoder import BATCH_AXES, Decoder

AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {self} does not divide {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {self} needs {int(np.prod(sizes))} devices, have {num_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices, all hosts).

    Axis types are Auto: the model uses sharding constraints, which Explicit axes reject.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = cfg.shape(len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from the dimensions they do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = [a for a in names if a in mesh.shape]
        size = int(np.prod([mesh.shape[a] for a in kept])) if kept else 1
        if kept and dim % size:
            kept = []
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*fitted)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding per parameter, from its declared spec fitted to its shape on `mesh`."""
    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                        specs, abstract_state)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_sharded_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0, remat: bool = False) -> Decoder:
    """Random-init model whose parameters are created directly on their target shardings."""
    def init() -> Decoder:
        return Decoder(cfg, rngs=nnx.Rngs(seed), mesh=mesh, remat=remat)

    graphdef, abstract = nnx.split(nnx.eval_shape(init))
    state = jax.jit(lambda: nnx.state(init()), out_shardings=param_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Multi-host JAX: explicit coordinator flags, or auto-detected (TPU pod metadata, SLURM)."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address is None and num_processes is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("jax.distributed: process %d of %d, %d global devices",
             jax.process_index(), jax.process_count(), jax.device_count())
