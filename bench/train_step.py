"""Training-step speed: step time, examples/s, MFU and peak memory of the real train step.

Each case runs `train.build_trainer(config)`'s jitted, donated `train_step` (the one
`train_and_evaluate` runs: on-device segmenting + log-mel, forward, backward of the
trainable subset, clipping, optimizer update) on a fixed synthetic host batch of the
pipeline's shapes (uint8 frame span, waveform span, targets), on a 1-device mesh.

Cases (`--cases`, comma separated):
* `tiny-I`, `tiny-II`: `configs/tiny.py` (stage I `segment_avclip`, stage II `sync`);
* `full-I`, `full-II`: the official sizes (`experiment.default_config`), batch
  `--full-batch` (default 1: on a CPU a full-size step takes minutes).

Per case, in a fresh process (so that peak RSS belongs to that case alone):
* compile s: `lower(...).compile()` of the train step;
* step s: median wall time of `--steps` steps after `--warmup` untimed ones
  (`block_until_ready` on the new state); ex/s = batch / step s;
* CPU s/step: process CPU time (all threads) per timed step. Other processes sharing the
  cores slow the wall time down but not the CPU time, so on a shared machine
  CPU s/step / cores is the better estimate of what an idle machine gives;
* GFLOP/step: `compiled.cost_analysis()["flops"]` where the backend reports it, else an
  analytic count (bench/model_flops.py: matmuls + attention, x3 for trained modules, x1 for frozen ones:
  column `flops src`);
* MFU (wall) = FLOP/step / step s / peak. Peak: `--peak-tflops`, else measured by a
  matmul microbenchmark in the compute dtype (so on a CPU it is what XLA's matmul
  reaches on the cores it gets, not a datasheet number); MFU (CPU, CPU backend only) =
  FLOP/step / CPU s/step / the microbenchmark's FLOP per CPU second, which load from
  other processes does not distort;
* XLA temp GiB: `compiled.memory_analysis()` temporaries; on a CPU a case whose
  temporaries exceed 80 % of MemAvailable is not run (reported as such);
* peak memory: on GPU/TPU `device.memory_stats()["peak_bytes_in_use"]`, always the
  process's peak RSS (host).

`--largest-batch` (accelerators; stage I by default, `--cases` to change) doubles the batch
until a step fails to compile or run out of memory, then bisects; every try runs in a fresh
process.

    python bench/train_step.py                                   # CPU: all four cases
    python bench/train_step.py --cases tiny-I,tiny-II --steps 5
    python bench/train_step.py --dtype bfloat16 --tiny-batch 64 --full-batch 8   # GPU
    python bench/train_step.py --dtype bfloat16 --largest-batch --cases full-I  # GPU
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when imported by path
from hostinfo import cpu_model  # noqa: E402
import model_flops  # noqa: E402

from synchformer_jax import xla_cpu  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = ("tiny-I", "tiny-II", "full-I", "full-II")


# ---------------------------------------------------------------- configs ------------
def case_config(case: str, batch: int, dtype: str, remat: bool):
    from synchformer_jax import experiment

    size, stage_name = case.split("-")
    stage = experiment.STAGE_AVCLIP if stage_name == "I" else experiment.STAGE_SYNC
    if size == "tiny":
        spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(stage)
    else:
        config = experiment.default_config(stage)
    with config.unlocked():
        config.data.batch_size = batch
        config.train.compute_dtype = dtype
        config.model.remat = remat
        config.mesh.data = 1  # one device: the per-device step
        config.mesh.fsdp = 1
    return config


def host_batch(task, batch: int, seed: int = 0) -> dict:
    """One host batch with the pipeline's keys, shapes and dtypes."""
    import numpy as np

    from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY

    layout = task.example_spec.layout
    crop = task.example_spec.crop_size
    rng = np.random.default_rng(seed)
    out = {
        "video": rng.integers(0, 256, (batch, layout.video_span, crop, crop, 3), dtype=np.uint8),
        "audio": (0.1 * rng.standard_normal((batch, layout.audio_span))).astype(np.float32),
        "mask": np.ones((batch,), np.bool_),
    }
    classes = task.model_config.sync.num_offset_classes
    out["offset_target"] = rng.integers(0, classes, (batch,)).astype(np.int32)
    if task.model_config.sync.head == HEAD_SYNCHRONIZABILITY:
        out["sync_target"] = rng.integers(0, 2, (batch,)).astype(np.int32)
    return out


# ---------------------------------------------------------------- analytic FLOPs -----
def analytic_flops(config, batch: int) -> float:
    """Model FLOPs of one train step of `batch` clips (bench/model_flops.py)."""
    from synchformer_jax import experiment
    from synchformer_jax.models.config import KIND_AVCLIP

    m = experiment.model_config(config)
    per_clip = model_flops.task_flops(m)
    return batch * per_clip["stage1" if m.kind == KIND_AVCLIP else "stage2"]


# ---------------------------------------------------------------- one case -----------
def run_case(case: str, args) -> dict:
    import jax
    import numpy as np

    from synchformer_jax import sharding, train
    from synchformer_jax.input import device as device_lib

    batch = args.tiny_batch if case.startswith("tiny") else args.full_batch
    config = case_config(case, batch, args.dtype, args.remat)
    trainer = train.build_trainer(config)
    state, _ = train.initial_state(trainer, jax.random.key(0))
    hb = host_batch(trainer.task, batch)
    gbatch = device_lib.host_to_global(hb, trainer.mesh, sharding.BATCH_AXES)
    rng = jax.random.key(1)

    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, gbatch, rng).compile()
    compile_s = time.perf_counter() - t
    temp_gib = None
    try:  # XLA's buffer plan: temporaries (activations kept for the backward, workspaces)
        temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    if jax.default_backend() == "cpu" and temp_gib is not None:
        avail = _mem_available_gib()
        if avail is not None and temp_gib > 0.8 * avail:
            return dict(case=case, batch=batch, error=f"needs ~{temp_gib:.1f} GiB of temporaries, "
                        f"{avail:.1f} GiB available: not run (try --remat)")
    flops, src = 0.0, "analytic"
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float((cost or {}).get("flops", 0.0))
        src = "xla" if flops > 0 else src
    except Exception:  # noqa: BLE001 - some backends do not implement it
        flops = 0.0
    analytic = analytic_flops(config, batch)
    if flops <= 0:
        flops = analytic

    def step(state):
        state, metrics = compiled(state, gbatch, rng)
        jax.block_until_ready(state)
        return state, metrics

    for _ in range(args.warmup):
        state, metrics = step(state)
    times, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        state, metrics = step(state)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    loss = float(metrics["loss"])
    dev = jax.devices()[0]
    peak_dev = None
    try:
        stats = dev.memory_stats() or {}
        peak_dev = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        pass
    step_s = statistics.median(times)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return dict(case=case, batch=batch, dtype=args.dtype, remat=args.remat, params=n_params, compile_s=compile_s,
                step_s=step_s, step_times=times, cpu_s_per_step=statistics.median(cpu),
                examples_per_s=batch / step_s, flops=flops, flops_src=src, analytic_flops=analytic,
                loss=loss, finite=bool(np.isfinite(loss)), xla_temp_gib=temp_gib,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                peak_device_gib=None if peak_dev is None else peak_dev / 2 ** 30,
                backend=jax.default_backend(), device=str(getattr(dev, "device_kind", dev)))


def _mem_available_gib():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def child_main(args) -> None:
    try:
        result = run_case(args.child, args)
    except Exception as e:  # noqa: BLE001 - reported to the parent (OOM in --largest-batch)
        result = {"case": args.child, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print("RESULT " + json.dumps(result), flush=True)


def spawn(case: str, args, **changes) -> dict:
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", case]
    opts = dict(vars(args), **changes)
    for key in ("steps", "warmup", "tiny_batch", "full_batch", "dtype", "threads"):
        if opts.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(opts[key])]
    if opts.get("remat"):
        argv.append("--remat")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-3:])}


# ---------------------------------------------------------------- reporting ----------
def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__}


def table(results: list[dict], peak: float, peak_cpu: float | None) -> str:
    """MFU (wall) = FLOP/step / step s / peak. MFU (CPU) = FLOP/step / CPU s/step / the
    microbenchmark's FLOP per CPU second: the fraction of the matmul rate the cores reached
    while they ran this step, whatever else shared them (CPU backend only)."""
    head = ("| case | batch | dtype | params | compile s | step s | CPU s/step | ex/s | GFLOP/step | flops src "
            "| MFU (wall) | MFU (CPU) | XLA temp GiB | peak RSS GiB | peak dev GiB | loss |")
    rows = [head, "|" + "|".join(["---"] + ["---:"] * (head.count("|") - 2)) + "|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | {r.get('batch', '')} |" + " |" * 13 + f" {r['error']} |")
            continue
        mfu = r["flops"] / r["step_s"] / peak
        mfu_cpu = "" if not peak_cpu or r["backend"] != "cpu" else \
            f"{100 * r['flops'] / r['cpu_s_per_step'] / peak_cpu:.1f}%"
        dev = "" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.2f}"
        temp = "" if r.get("xla_temp_gib") is None else f"{r['xla_temp_gib']:.2f}"
        rows.append(f"| {r['case']} | {r['batch']} | {r['dtype']}{' remat' if r['remat'] else ''} "
                    f"| {r['params'] / 1e6:.1f}M | {r['compile_s']:.1f} "
                    f"| {r['step_s']:.3g} | {r['cpu_s_per_step']:.3g} | {r['examples_per_s']:.3g} "
                    f"| {r['flops'] / 1e9:,.0f} | {r['flops_src']} | {100 * mfu:.1f}% | {mfu_cpu} | {temp} "
                    f"| {r['peak_rss_gib']:.2f} | {dev} | {r['loss']:.3f} |")
    return "\n".join(rows)


def largest_batch(case: str, args) -> dict:
    """Doubling, then bisection, on the per-device batch; each try in a fresh process."""
    ok, bad, tries = 0, None, []
    b = max(1, args.full_batch if case.startswith("full") else args.tiny_batch)
    while bad is None or bad - ok > 1:
        key = "full_batch" if case.startswith("full") else "tiny_batch"
        r = spawn(case, args, steps=1, warmup=1, **{key: b})
        fits = "error" not in r and r.get("finite", False)
        tries.append((b, fits, r.get("error", "")[:80]))
        print(f"  batch {b}: {'fits' if fits else 'fails'}", flush=True)
        if fits:
            ok = b
            b = b * 2 if bad is None else (ok + bad) // 2
        else:
            bad = b
            if b == 1:
                break
            b = (ok + bad) // 2
    return {"case": case, "largest_batch": ok, "tries": tries}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma separated, of {CASES}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--full-batch", type=int, default=1)
    p.add_argument("--full-steps", type=int, default=2, help="timed steps for full-size cases (slow on CPU)")
    p.add_argument("--full-warmup", type=int, default=0,
                   help="untimed steps for full-size cases (the step is compiled ahead of time, so the first "
                        "call does not compile; on a CPU its extra cost is small next to a minutes-long step)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16 on GPUs/TPUs; params stay float32)")
    p.add_argument("--remat", action="store_true", help="rematerialise transformer blocks (model.remat)")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU (default: matmul microbenchmark)")
    p.add_argument("--threads", type=int, help="pin to the first N allowed CPUs (CPU runs)")
    p.add_argument("--largest-batch", action="store_true", help="find the largest batch that fits (stage I)")
    p.add_argument("--json-out", help="write all results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:  # before jax starts: XLA sizes its CPU thread pool from the mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    xla_cpu.disable_ynn_fusion()  # as the CLI does (the children inherit XLA_FLAGS)
    if args.child:
        child_main(args)
        return 0

    import jax

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    meta = dict(date=datetime.date.today().isoformat(), machine=cpu_model(), cores=len(os.sched_getaffinity(0)),
                backend=jax.default_backend(), devices=[str(d) for d in jax.devices()], **versions())
    if args.largest_batch:
        if args.cases == ",".join(CASES):
            cases = ["full-I"]
        found = [largest_batch(c, args) for c in cases]
        for f in found:
            print(f"{f['case']} ({args.dtype}{', remat' if args.remat else ''}): largest per-device batch "
                  f"{f['largest_batch']}")
        if args.json_out:
            pathlib.Path(args.json_out).write_text(json.dumps(dict(meta=meta, largest=found), indent=1))
        return 0

    measured, peak_cpu = model_flops.measure_peak_flops(args.dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured
    peak_src = "--peak-tflops" if args.peak_tflops else f"matmul microbenchmark ({args.dtype})"
    print(f"{meta['machine']}, {meta['cores']} cores, {meta['backend']}; peak {peak / 1e9:,.0f} GFLOP/s "
          f"({peak_src}); matmul {peak_cpu / 1e9:,.0f} GFLOP per CPU second", flush=True)
    results = []
    for case in cases:
        full = case.startswith("full")
        r = spawn(case, args, steps=args.full_steps if full else args.steps,
                  warmup=args.full_warmup if full else args.warmup)
        results.append(r)
        summary = r["error"] if "error" in r else \
            f"step {r['step_s']:.3g} s, CPU {r['cpu_s_per_step']:.3g} s, compile {r['compile_s']:.1f} s"
        print(f"  {case}: {summary}", flush=True)
    print(table(results, peak, peak_cpu))
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(dict(meta=meta, peak_flops=peak, peak_src=peak_src,
                                                               peak_flops_per_cpu_s=peak_cpu, results=results),
                                                          indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
