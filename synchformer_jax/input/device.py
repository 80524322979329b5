"""Host batches -> global `jax.Array`s sharded over a device mesh.

Every process hands over its own rows (`B_host` = per-host batch); the global array has
`B_host * process_count` rows, split along the batch axis over the mesh's data axes
(`NamedSharding(mesh, P("data"))`, or `P(("data", "fsdp"))` for a 2-D mesh whose second
axis also splits the batch). `jax.make_array_from_process_local_data` places each local
row on the local device that owns it, so no host ever holds the global batch.

Meshes are built with `AxisType.Auto` axes: since jax 0.9 `jax.make_mesh` defaults to
explicit ("sharding in types") axes, while the training code annotates inputs and lets
XLA partition (users.md §4.5).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["HOST_ONLY_KEYS", "make_mesh", "batch_sharding", "host_to_global", "global_batch_size"]

HOST_ONLY_KEYS = ("meta",)  # per-example strings and skip reports stay on the host


def make_mesh(shape: Optional[Sequence[int]] = None, axis_names: Sequence[str] = ("data",),
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A 1-D or 2-D mesh over `devices` (default: all devices).

    `shape=None` puts every device on the first axis and size 1 on the others; a `-1`
    entry takes the remaining devices (e.g. `(-1, 2)` with `("data", "fsdp")`).
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_names = tuple(axis_names)
    n = len(devices)
    if shape is None:
        shape = (n,) + (1,) * (len(axis_names) - 1)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} does not match axis names {axis_names}")
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if n % rest:
            raise ValueError(f"{n} devices do not split into {shape}")
        shape[shape.index(-1)] = n // rest
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}")
    try:
        # Physical-topology-aware device order (ICI rings on TPU) when it applies.
        dev = mesh_utils.create_device_mesh(tuple(shape), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # shapes the topology helper rejects
        dev = np.array(devices).reshape(shape)
    return Mesh(dev, axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names))


def batch_sharding(mesh: Mesh, batch_axes: Union[str, Sequence[str]] = ("data",)) -> NamedSharding:
    """Leading (batch) axis split over `batch_axes`, the rest replicated."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def global_batch_size(per_host: int, mesh: Mesh, batch_axes: Union[str, Sequence[str]] = ("data",)) -> int:
    """Rows of the global batch; checks that the per-host batch splits over the local devices."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    total = per_host * jax.process_count()
    if total % shards:
        raise ValueError(f"global batch {total} does not split over {shards} batch shards {axes}: set "
                         f"data.batch_size (data.eval_batch_size when evaluating) to a multiple of {shards}")
    return total


def host_to_global(batch: Mapping[str, Any], mesh: Mesh,
                   batch_axes: Union[str, Sequence[str]] = ("data",)) -> dict:
    """Process-local batch (dict of `[B_host, ...]` arrays) -> dict of global `jax.Array`s.

    Keys in `HOST_ONLY_KEYS` are dropped (they are not arrays a device can hold).
    """
    sharding = batch_sharding(mesh, batch_axes)
    out = {}
    for k, v in batch.items():
        if k in HOST_ONLY_KEYS:
            continue
        v = np.asarray(v)
        if v.ndim == 0:
            raise ValueError(f"batch field {k!r} is a scalar; every field needs a batch axis")
        global_batch_size(v.shape[0], mesh, batch_axes)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
