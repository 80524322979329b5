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


def mesh_from_config(mesh: ml_collections.ConfigDict) -> Mesh:
    return make_mesh((mesh.data, mesh.fsdp), (DATA, FSDP))


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
