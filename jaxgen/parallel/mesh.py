"""The device mesh `('data', 'fsdp', 'tensor')` (multi-process start-up: `jaxgen.parallel.distributed`).

Config: `cfg.parallel.mesh = dict(data=-1, fsdp=1, tensor=1)`; -1 (at most one axis) takes all remaining devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxgen.parallel.rules import MESH_AXES


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
