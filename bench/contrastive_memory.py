"""Per-device memory of the stage-I InfoNCE loss (value and gradients) at pod scale.

Compile-only on fake CPU devices: XLA's buffer plan (`memory_analysis().temp_size_in_bytes`)
for the loss of `--clips-per-device` clips x 14 segments per device, embeddings of width
`--dim`, over `--devices` data-parallel devices, for

* per-device negative pools (the official recipe: no communication),
* global negatives with the embeddings split over the batch (the trainer's layout), and
* global negatives with replicated embeddings (what an unsharded similarity matrix costs).

    python bench/contrastive_memory.py --devices 8,64,256

Each device count runs in its own process (the fake device count is fixed at start-up).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def child(devices: int, clips: int, segments: int, dim: int, replicated: bool) -> None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from synchformer_jax import losses

    mesh = Mesh(np.array(jax.devices()).reshape(devices), ("data",))
    b = devices * clips
    n = b * segments
    cases = [("device", devices, P("data")), ("global", 1, P("data"))]
    if replicated:
        cases.append(("global, replicated inputs", 1, P()))
    for name, pools, spec in cases:
        emb = jax.ShapeDtypeStruct((b, segments, dim), jnp.float32, sharding=NamedSharding(mesh, spec))
        tau = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
        loss = jax.value_and_grad(lambda v, a, t, g=pools: losses.segment_infonce(v, a, t, num_groups=g),
                                  argnums=(0, 1))
        plan = jax.jit(loss).lower(emb, emb, tau).compile().memory_analysis()
        print(f"| {devices} | {b} | {n:,} | {name} | {plan.temp_size_in_bytes / 1e6:,.1f} | "
              f"{n * n * 4 / 1e6:,.1f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="8,64,256", help="comma-separated device counts")
    ap.add_argument("--clips-per-device", type=int, default=8)
    ap.add_argument("--segments", type=int, default=14)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--replicated-up-to", type=int, default=64,
                    help="also plan replicated embeddings up to this many devices (slow above)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.clips_per_device, args.segments, args.dim,
              args.child <= args.replicated_up_to)
        return 0
    print("| devices | clips | segments N | negatives | temp MB per device | whole [N, N] float32 MB |")
    print("|---:|---:|---:|---|---:|---:|", flush=True)
    for d in (int(x) for x in args.devices.split(",") if x):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(d),
                        "--clips-per-device", str(args.clips_per_device), "--segments", str(args.segments),
                        "--dim", str(args.dim), "--replicated-up-to", str(args.replicated_up_to)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
