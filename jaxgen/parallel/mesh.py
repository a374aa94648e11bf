"""The device mesh `('data', 'fsdp', 'tensor')` and multi-process start-up.

Config: `cfg.parallel.mesh = dict(data=-1, fsdp=1, tensor=1)`; -1 (at most one axis) takes all remaining devices.
Call `initialize_distributed()` first thing in a binary, before anything touches a device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxgen.parallel.rules import MESH_AXES

# Environment variables by which jax.distributed's cluster auto-detection recognises a launcher, and the variable that
# holds the launch's process count (None: the variables' presence means several processes).
_CLUSTER_ENV: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("JAX_COORDINATOR_ADDRESS",), None),  # a manual launch; num_processes / process_id passed or auto-detected
    (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"), "SLURM_NTASKS"),
    (("OMPI_MCA_orte_hnp_uri",), "OMPI_COMM_WORLD_SIZE"),  # Open MPI's mpirun
    (("MEGASCALE_COORDINATOR_ADDRESS",), None),  # multi-slice TPU
)
_TPU_HOSTS_ENV = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")  # comma-separated hosts of a TPU pod slice


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of `('data', 'fsdp', 'tensor')` from a config mapping (missing axes: 1; one -1: the rest)."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"parallel.mesh: unknown axes {unknown}; the mesh axes are {MESH_AXES}")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(
            f"parallel.mesh: sizes must be positive, with at most one -1 (all remaining), got {dict(axes)}"
        )
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"parallel.mesh {dict(axes)}: the fixed axes ({fixed} devices) do not divide the "
                f"{num_devices} devices, so -1 has no size"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"parallel.mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {fixed} devices but there are "
            f"{num_devices} (jax.device_count()); make the product match or set one axis to -1"
        )
    return tuple(sizes)


def create_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `('data', 'fsdp', 'tensor')` of all devices (or `devices`), laid out by `jax.make_mesh` (which
    follows the physical topology on TPU). The axes are `Auto`: jit's partitioner propagates shardings from the
    annotations."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def multi_process_env() -> bool:
    """Whether the environment shows a launch of several processes (SLURM, Open MPI, a TPU pod slice,
    JAX_COORDINATOR_ADDRESS, multi-slice TPU)."""
    for present, count in _CLUSTER_ENV:
        if all(v in os.environ for v in present):
            return count is None or int(os.environ.get(count, "1")) > 1
    return any(len([h for h in os.environ.get(v, "").split(",") if h.strip()]) > 1 for v in _TPU_HOSTS_ENV)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
) -> bool:
    """`jax.distributed.initialize(...)` when the run has several processes: `num_processes > 1`, `force`, or a
    multi-process launcher found in the environment (SLURM, Open MPI, a TPU pod slice, JAX_COORDINATOR_ADDRESS).
    Idempotent, and a no-op on one process. Call it before anything touches a device. Returns whether the
    distributed runtime is up."""
    if jax.distributed.is_initialized():
        return True
    several = num_processes > 1 if num_processes is not None else multi_process_env()
    if not (several or force):
        return False
    kw = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None})
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
