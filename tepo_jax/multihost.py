"""Multi-process (multi-host) pieces of a run: local sampler mesh, params to it, batch
assembly, gathering trajectories, agreeing on stops.

JAX's multi-controller runtime runs one process per host; jitted functions over the global
mesh are SPMD and every process must call them in the same order. The rollout's host control
flow (which slots stopped, when a tool result is appended) differs per host, so the sampler
cannot run on the global mesh. Instead, per RL step:

1. every process holds the same global prompt order and takes batch slots `p::P` of the step's
   global batch (`local_batch_slots`); a GRPO group stays on its host;
2. it samples them with its own sampler on a host-local `(data, fsdp, tensor)` mesh over
   `jax.local_devices()` (`local_mesh`), with its own tool bridge; per-request seeds use the
   GLOBAL batch slots, so what is sampled does not depend on the process count;
3. the policy reaches the local mesh through `LocalParams`: one jitted reshard of the train
   state's params onto a "hosts × local" mesh where they are replicated over hosts and laid
   out within each host as on the local mesh; each process then wraps its own shards as a
   local array without a copy. Memory: one extra copy of the params sharded over the host's
   devices (params / local devices per device), the same as a single-host sampler;
4. the trajectories are gathered to every process in global order (`gather_groups`), so
   advantages, ResT normalisation and metrics are computed over the whole batch exactly as in
   a single-process run, and process 0 writes one trajectory file;
5. every process packs the same global TrainBatch and `put_global` builds the global arrays
   from it, each process materialising only its own devices' rows.

With one process every function here is the identity (or plain `jax.device_put`), so
single-process runs are unchanged. Cost at pod scale: steps 4-5 hold the whole step's
trajectories and packed batch (host memory, not device memory) on every host, and step 4
moves them over the collectives once; that is small next to a step for the batch sizes of
RL on one slice (thousands of trajectories of a few thousand tokens: tens of MB).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from tepo_jax.config import ConfigError
from tepo_jax.sharding import AXES, MeshConfig, fit_spec


def process_count() -> int:
    return jax.process_count()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


# ----------------------------------------------------------------------------- data split

def local_batch_slots(n: int, process: Optional[int] = None, count: Optional[int] = None) -> list[int]:
    """Slots of a global batch of `n` items that `process` (default: this one) handles:
    p, p + P, p + 2P, … (strided: every process gets the same count when P divides n)."""
    p = jax.process_index() if process is None else process
    c = jax.process_count() if count is None else count
    return list(range(p, n, c))


def check_divisible(prompts_per_step: int, count: Optional[int] = None) -> None:
    """ConfigError unless every one of `count` (default: all) processes gets as many prompts."""
    count = jax.process_count() if count is None else count
    if prompts_per_step % count:
        raise ConfigError(f"config.data.prompts_per_step={prompts_per_step}: must be a multiple of the "
                          f"process count {count} (every host rolls out the same number of prompts)")


# Environment variables that say this process is one of several, set by: the TPU runtime of a
# multi-host slice (on GKE; Cloud TPU VMs get --distributed from launch/tpu.py), SLURM's srun,
# Open MPI's mpirun. jax.distributed.initialize() reads the rest from the same environment.
_CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def cluster_detected(env: Optional[dict] = None) -> bool:
    """True when the environment starts this process as one of several JAX processes."""
    env = os.environ if env is None else env
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return True
    return any(env.get(name, "").strip().isdigit() and int(env[name]) > 1 for name in _CLUSTER_SIZES)


# ----------------------------------------------------------------------------- local mesh

def local_mesh_config(cfg: MeshConfig, num_local: int) -> MeshConfig:
    """The sampler's mesh on one host: the configured tensor size (when it fits the host),
    every other local device on fsdp (params sharded, batch split over them)."""
    tensor = cfg.tensor if cfg.tensor > 0 and num_local % cfg.tensor == 0 else 1
    return MeshConfig(data=1, fsdp=num_local // tensor, tensor=tensor)


def _process_devices() -> list[list[jax.Device]]:
    """Every process's devices (sorted by id), in process order."""
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [sorted(by_process[p], key=lambda d: d.id) for p in sorted(by_process)]


def hosts_mesh(cfg: MeshConfig) -> Mesh:
    """Mesh ("hosts", data, fsdp, tensor): block p is process p's local mesh."""
    groups = _process_devices()
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"processes have different device counts: {sorted(sizes)}")
    shape = local_mesh_config(cfg, sizes.pop()).shape(len(groups[0]))
    devices = np.asarray(groups, dtype=object).reshape((len(groups),) + shape)
    return Mesh(devices, ("hosts",) + AXES, axis_types=(AxisType.Auto,) * 4)


def local_mesh(cfg: MeshConfig) -> Mesh:
    """This process's block of `hosts_mesh(cfg)`: a (data, fsdp, tensor) mesh of local devices."""
    full = hosts_mesh(cfg)
    return Mesh(full.devices[jax.process_index()], AXES, axis_types=(AxisType.Auto,) * 3)


class LocalParams:
    """Global (train-state) arrays -> the same values on this process's local mesh.

    Each leaf keeps its PartitionSpec (fitted to the local mesh). One jitted reshard per call,
    compiled once; its outputs' local shards are wrapped as local arrays without a copy.
    """

    def __init__(self, cfg: MeshConfig):
        self.hosts = hosts_mesh(cfg)
        self.local = Mesh(self.hosts.devices[jax.process_index()], AXES, axis_types=(AxisType.Auto,) * 3)
        self._reshard = None

    def _local_sharding(self, x) -> NamedSharding:
        return NamedSharding(self.local, fit_spec(x.sharding.spec, x.shape, self.local))

    def __call__(self, tree: Any) -> Any:
        if self._reshard is None:
            out = jax.tree.map(lambda x: NamedSharding(self.hosts, self._local_sharding(x).spec), tree)
            self._reshard = jax.jit(lambda t: t, out_shardings=out)
        replicated = self._reshard(tree)
        return jax.tree.map(self._wrap, replicated, tree)

    def _wrap(self, x: jax.Array, like: jax.Array) -> jax.Array:
        sharding = self._local_sharding(like)
        by_device = {s.device: s.data for s in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            x.shape, sharding, [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape)])


# ----------------------------------------------------------------------------- host <-> global

def put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Numpy leaves (the same global value on every process) -> global arrays on `sharding`;
    each process builds only its own devices' shards. Device arrays pass through."""
    if not is_multiprocess():
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- python objects

def allgather_objects(obj: Any) -> list:
    """[obj of process 0, obj of process 1, …] on every process (pickled over the collectives)."""
    if not is_multiprocess():
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [pickle.loads(everything[i, :n].tobytes()) for i, n in enumerate(sizes)]


def gather_groups(trajs: Sequence, batch_slots: Sequence[int]) -> list:
    """Every process's trajectories, in the global batch order, with `group_id` = global
    batch slot: what a single-process rollout of the whole batch returns. `trajs` are this
    process's, with group_id = index into its `batch_slots`."""
    if not is_multiprocess():
        return list(trajs)
    by_slot = {}
    for local_slots, local_trajs in allgather_objects((list(batch_slots), list(trajs))):
        for t in local_trajs:
            g = local_slots[t.group_id]
            by_slot.setdefault(g, []).append(dataclasses.replace(t, group_id=g))
    return [t for g in sorted(by_slot) for t in by_slot[g]]


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. SIGTERM reached only some hosts)."""
    if not is_multiprocess():
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))).any())
