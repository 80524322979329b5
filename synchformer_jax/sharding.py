"""Mesh from the config, parameter shardings (data parallel or FSDP), batch sharding.

Data parallel: parameters and optimizer state replicated, batch split over every device.
FSDP (`mesh.fsdp > 1`): each parameter with a dimension divisible by the `fsdp` axis is
split along its largest such dimension; XLA inserts the all-gathers and
reduce-scatters. The batch is split over both axes in either case.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from synchformer_jax.input.device import make_mesh

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def mesh_from_config(mesh: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The `(data, fsdp)` mesh of `config.mesh` over `devices` (default: all devices).

    A shape that does not fit the devices (e.g. a run resumed on fewer of them) is a
    one-line `cli.ConfigError` naming `mesh.data` / `mesh.fsdp` and a shape that fits.
    """
    devices = list(jax.devices() if devices is None else devices)
    problem = mesh_problem(mesh.data, mesh.fsdp, len(devices))
    if problem:
        from synchformer_jax.cli import ConfigError  # cli imports only the standard library and numpy

        raise ConfigError(problem)
    return make_mesh((mesh.data, mesh.fsdp), (DATA, FSDP), devices)


def mesh_problem(data: Any, fsdp: Any, n: int) -> str:
    """Why `mesh.data=data, mesh.fsdp=fsdp` does not fit `n` devices, with the fix ("" if it does).
    -1 takes the devices the other axis leaves (`input.device.make_mesh`)."""
    have = f"mesh.data={data!r}, mesh.fsdp={fsdp!r}"
    bad = [k for k, v in (("mesh.data", data), ("mesh.fsdp", fsdp))
           if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (v == -1 or v >= 1)]
    if bad:
        return (f"{have}: {' and '.join(bad)} must be a positive device count or -1 (the devices the other "
                f"axis leaves); e.g. --config.mesh.data=-1 --config.mesh.fsdp=1")
    if data == -1 and fsdp == -1:
        return f"{have}: at most one of mesh.data and mesh.fsdp may be -1; e.g. --config.mesh.fsdp=1"
    need = data * fsdp
    if need == n or need < 0 and n % -need == 0:
        return ""
    why = f"need {need} device{'s' * (need != 1)}" if need > 0 else f"need a multiple of {-need} devices"

    def divisor(at_most: int) -> int:  # the largest divisor of n that is <= at_most
        return max(d for d in range(1, n + 1) if n % d == 0 and d <= at_most)

    if fsdp == -1:
        fix = f"--config.mesh.data={divisor(data)} (mesh.fsdp=-1 takes the devices that mesh.data leaves)"
    elif divisor(fsdp) == fsdp:
        fix = f"--config.mesh.data=-1, keeping mesh.fsdp={fsdp} (-1: the devices that mesh.fsdp leaves)"
    else:
        fit = divisor(fsdp)
        fix = (f"--config.mesh.data=-1 --config.mesh.fsdp={fit} (-1: the devices that mesh.fsdp leaves"
               + ("; or --config.mesh.fsdp=1: data parallel)" if fit != 1 else "; data parallel)"))
    return f"{have} {why}, this run has {n}. Set {fix}"


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2 ** 14) -> P:
    """Split the largest dimension divisible by `fsdp`; small tensors stay replicated."""
    if fsdp <= 1 or int(np.prod(shape)) < min_size:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = FSDP
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (params or optimizer state)."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
