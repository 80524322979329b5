"""Cached stage II end to end: the feature-cache iterator feeding the real train step.

Rows per second, in one run, of:
* the iterator alone (`CacheTrainIterator` over full-size 10-s entries written to a
  temporary cache, every row read from the shard, `--workers` batch-making threads);
* the train step alone (`train.build_trainer(config).train_step` of the full-size stage-II
  model on one device batch held on the device: projections + sync transformer + Adam);
* the two as the training loop runs them, serial (the loss read after every step, as the
  loop did before 2026-11-24: host batch time and device step time add up) and queued
  (the loss of step n read after step n + 1 is dispatched, as `train_and_evaluate` does
  now: the host makes batch n + 1 while the device runs step n).

MFU of the loop: the cached training row's model FLOPs (`model_flops`, stage2_cached) per
second over `--peak-tflops` (default: the matmul rate measured here).

    python bench/cached_loop.py --batch 256 --steps 20 --workers 4 --dtype bfloat16   # a GPU
    python bench/cached_loop.py --batch 4 --steps 3 --clips 64                        # CPU dry run
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import full_size_cache  # noqa: E402
import jax  # noqa: E402
import model_flops  # noqa: E402

from synchformer_jax import experiment, feature_cache, sharding, train, xla_cpu  # noqa: E402
from synchformer_jax.input import device as device_lib  # noqa: E402


def _config(batch: int, dtype: str):
    c = experiment.default_config("sync")
    c.data.batch_size = batch
    c.train.compute_dtype = dtype
    c.mesh.data, c.mesh.fsdp = 1, 1
    return c


def _loop(it, step_fn, state, mesh, rng, steps: int, queued: bool):
    """(rows/s of `steps` training-loop iterations after one untimed, the state: the step
    donates the one it is given)."""
    pending = []

    def one(state):
        batch = device_lib.host_to_global(next(it), mesh, sharding.BATCH_AXES)
        state, metrics = step_fn(state, batch, rng)
        while pending:
            float(pending.pop()["loss"])
        pending.append(metrics)
        if not queued:
            float(pending.pop()["loss"])
        return state

    state = one(state)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = one(state)
    while pending:
        float(pending.pop()["loss"])
    jax.block_until_ready(state)
    return steps * it.batch_size / (time.perf_counter() - t0), state


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--clips", type=int, default=1000, help="full-size entries in the temporary cache (2.5 MB each)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: a matmul rate measured here)")
    a = p.parse_args(argv)
    if jax.default_backend() == "cpu":
        xla_cpu.disable_ynn_fusion()  # as the CLI does
    print(f"devices: {jax.devices()}, host cores: {os.cpu_count()}", flush=True)
    config = _config(a.batch, a.dtype)
    trainer = train.build_trainer(config)
    state, _ = train.initial_state(trainer, jax.random.key(0))
    rng = jax.random.key(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = full_size_cache.write(pathlib.Path(tmp) / "cache", a.clips, feature_cache.RECORD_OPTIONS)

        def iterator():
            return feature_cache.CacheTrainIterator(root, batch_size=a.batch, seed=0, memory_clips=0,
                                                    workers=a.workers)

        it = iterator()
        host = next(it)
        batch = device_lib.host_to_global(host, trainer.mesh, sharding.BATCH_AXES)
        t0 = time.perf_counter()
        step_fn = trainer.train_step.lower(state, batch, rng).compile()
        print(f"  compile {time.perf_counter() - t0:.1f} s", flush=True)
        state, m = step_fn(state, batch, rng)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            next(it)
        rows["iterator alone"] = a.steps * a.batch / (time.perf_counter() - t0)
        it.close()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = step_fn(state, batch, rng)
        jax.block_until_ready(state)
        rows["train step alone (batch on the device)"] = a.steps * a.batch / (time.perf_counter() - t0)
        for name, queued in (("loop, loss read every step (before)", False), ("loop, one step queued (now)", True),
                             ("loop, loss read every step (before), again", False),
                             ("loop, one step queued (now), again", True)):
            it = iterator()
            rows[name], state = _loop(it, step_fn, state, trainer.mesh, rng, a.steps, queued)
            it.close()
            print(f"  {name}: {rows[name]:,.1f} rows/s", flush=True)
    flops = model_flops.task_flops(experiment.model_config(config))["stage2_cached"]
    if a.peak_tflops:
        peak, src = a.peak_tflops * 1e12, "--peak-tflops"
    else:
        peak, src = model_flops.measure_peak_flops(a.dtype)[0], f"{a.dtype} matmul measured"
    print(f"\nfull-size cached stage II, batch {a.batch}, {a.dtype}, {a.workers} batch-making threads, "
          f"{jax.devices()[0].device_kind}; MFU at {flops / 1e9:.1f} GFLOP per row over {peak / 1e12:.1f} "
          f"TFLOP/s ({src})\n")
    print("| case | rows/s | MFU |")
    print("|---|---:|---:|")
    for name, rate in rows.items():
        device_work = name != "iterator alone"
        print(f"| {name} | {rate:,.1f} | {model_flops.mfu(rate * flops, peak) if device_work else ''} |")


if __name__ == "__main__":
    main()
