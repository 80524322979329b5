"""Full-size forward pass: synchformer-jax next to the official PyTorch Synchformer.

One run times both implementations on the same seeded input (full `configs/sync.yaml`
model, 237M parameters, B clips of 14 segments) and checks full-size parity: the torch
model is built with random official init (optionally re-randomised, see
`torch_official_worker.rerandomize_`), its weights go to the JAX model through
`torch_to_flax`, and the logits and per-modality features of both are compared.

The torch side runs in a SUBPROCESS of another Python (`--torch-python`, with torch and
the official code's construction deps) so that this process never imports torch. Without
`--torch-python` / `--official-repo` (or when they do not work) the torch column is
skipped with the reason printed, and the JAX model uses its own random init.

Threads: `--threads N` pins this process and the torch worker to the first N allowed CPUs
(`os.sched_setaffinity`, inherited by the subprocess) before jax is imported. XLA's CPU
client sizes its thread pool from the affinity mask, torch additionally gets
`torch.set_num_threads(N)`; with N=1 XLA also gets `--xla_cpu_multi_thread_eigen=false`.

Example (CPU, float32):
    python bench/forward_full.py --torch-python /path/to/torch-venv/bin/python \
        --official-repo /path/to/Synchformer --threads 2 --repeats 3 --json-out out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when imported by path
from hostinfo import cpu_model, pin_threads, reset_peak_rss, vm_hwm_bytes  # noqa: E402

from synchformer_jax import xla_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "torch_official_worker.py")
GIB = 1024 ** 3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", default=None, help="checkout of the official Synchformer repository")
    ap.add_argument("--torch-python", default=None,
                    help="python executable with torch + official deps (default: skip the torch column)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: all allowed CPUs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX compute dtype")
    ap.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                    help="jax_default_matmul_precision (default: highest for float32 — torch float32 "
                         "does not use TF32 for matmuls by default — and jax's default for bfloat16)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random input")
    ap.add_argument("--init-seed", type=int, default=1337, help="official set_seed value before construction")
    ap.add_argument("--official-init", action="store_true",
                    help="keep the official random init (default: re-randomise every weight so that "
                         "zero/one-initialised tensors take part in the parity check)")
    ap.add_argument("--work-dir", default=None, help="where inputs/weights/outputs go (default: a temp dir, removed)")
    ap.add_argument("--reuse-torch", action="store_true",
                    help="reuse torch results already in --work-dir (same input seed/batch) instead of rerunning")
    ap.add_argument("--no-jax", action="store_true", help="only the torch column")
    ap.add_argument("--json-out", default=None)
    return ap.parse_args(argv)


# ---- process-level measurements ---------------------------------------------------------
# ---- inputs -----------------------------------------------------------------------------
def make_inputs(seed: int, batch: int, segments: int = 14):
    """Video uniform in [-1, 1] (the normalised RGB range), audio ~ N(0, 0.5^2) (normalised log-mel)."""
    rng = np.random.default_rng(seed)
    video = rng.uniform(-1.0, 1.0, (batch, segments, 16, 3, 224, 224)).astype(np.float32)
    audio = (0.5 * rng.standard_normal((batch, segments, 1, 128, 66))).astype(np.float32)
    return video, audio


# ---- torch column -----------------------------------------------------------------------
def run_torch(args, work: str, threads: int):
    """Returns (result dict or None, reason string when skipped)."""
    if args.reuse_torch and os.path.exists(os.path.join(work, "torch_result.json")):
        with open(os.path.join(work, "torch_result.json")) as f:
            res = json.load(f)
        print(f"[torch] reusing results from {work}")
        return res, None
    if not args.torch_python:
        return None, "no --torch-python given"
    if not shutil.which(args.torch_python) and not os.path.exists(args.torch_python):
        return None, f"--torch-python {args.torch_python!r} not found"
    if not args.official_repo or not os.path.isfile(os.path.join(args.official_repo, "configs", "sync.yaml")):
        return None, f"--official-repo {args.official_repo!r} is not an official Synchformer checkout"
    probe = subprocess.run([args.torch_python, "-c", "import torch, einops, omegaconf, timm, transformers"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{args.torch_python} cannot import the official deps: {last}"
    cmd = [args.torch_python, WORKER, "--official-repo", os.path.abspath(args.official_repo), "--work-dir", work,
           "--threads", str(threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--seed", str(args.init_seed)]
    if not args.official_init:
        cmd.append("--rerandomize")
    if args.no_jax:
        cmd.append("--no-save-weights")
    print("[torch] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        return None, f"torch worker failed (exit {proc.returncode})"
    with open(os.path.join(work, "torch_result.json")) as f:
        return json.load(f), None


# ---- JAX column -------------------------------------------------------------------------
def run_jax(args, work: str, video: np.ndarray, audio: np.ndarray, have_torch_weights: bool, threads: int):
    import jax
    import jax.numpy as jnp
    import flax

    precision = args.matmul_precision or ("highest" if args.dtype == "float32" else "default")
    jax.config.update("jax_default_matmul_precision", precision)

    from synchformer_jax.models.config import ModelConfig
    from synchformer_jax.models.synchformer import Synchformer, init_params

    config = ModelConfig().replace(dtype=args.dtype)
    model = Synchformer(config)
    device = jax.devices()[0]

    t0 = time.perf_counter()
    if have_torch_weights:
        from safetensors.numpy import load_file
        from synchformer_jax.models.convert_torch import torch_to_flax
        sd = load_file(os.path.join(work, "state_dict.safetensors"))
        params = torch_to_flax(sd, config).params
        del sd
        weights = "official (torch) weights via torch_to_flax"
    else:
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(args.init_seed))
        weights = "synchformer-jax random init"
    params = jax.device_put(params, device)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0

    # The features come back through the model's `sow`s in the same jitted call, so the
    # timed function is exactly one forward pass (two extra [B,S,t,768] outputs).
    def forward(p, v, a):
        logits, state = model.apply({"params": p}, v, a, mutable=["intermediates"])
        inter = state["intermediates"]
        return logits, inter["vfeat"][0], inter["afeat"][0]

    v_dev = jax.device_put(jnp.asarray(video), device)
    a_dev = jax.device_put(jnp.asarray(audio), device)
    import gc
    gc.collect()
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(params, v_dev, a_dev).compile()
    compile_s = time.perf_counter() - t0
    print(f"[jax] compile: {compile_s:.2f} s", flush=True)

    rss_reset = reset_peak_rss()
    times, warm_times, cpu_times, first = [], [], [], None
    load_before = os.getloadavg()
    for i in range(args.warmup + args.repeats):
        c, t = time.process_time(), time.perf_counter()
        out = jax.block_until_ready(compiled(params, v_dev, a_dev))
        dt = time.perf_counter() - t
        if i >= args.warmup:
            cpu_times.append(time.process_time() - c)
        if first is None:
            first = out
        (warm_times if i < args.warmup else times).append(dt)
        print(f"[jax] run {i} ({'warm-up' if i < args.warmup else 'timed'}): {dt:.2f} s", flush=True)
    logits, vfeat, afeat = (np.asarray(jax.device_get(x), np.float32) for x in first)

    dev_peak = None
    try:
        stats = device.memory_stats() or {}
        dev_peak = stats.get("peak_bytes_in_use")
    except Exception:  # CPU devices have no memory stats
        pass
    med = statistics.median(times) if times else float("nan")
    result = {
        "implementation": "synchformer-jax",
        "device": "cpu" if device.platform == "cpu" else f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "dtype": args.dtype,
        "matmul_precision": precision,
        "threads": threads if device.platform == "cpu" else None,
        "batch": int(video.shape[0]),
        "weights": weights,
        "load_s": load_s,
        "compile_s": compile_s,
        "warmup_s": warm_times,
        "times_s": times,
        "median_s_per_batch": med,
        "best_s_per_clip": min(times) / video.shape[0] if times else None,
        "median_s_per_clip": med / video.shape[0],
        "clips_per_s": video.shape[0] / med,
        # CPU seconds / wall seconds of the timed runs (see the torch worker).
        "cpu_utilisation": sum(cpu_times) / sum(times) if times else None,
        "cpu_utilisation_per_run": [c / t for c, t in zip(cpu_times, times)],
        # Process CPU seconds per timed run: hardly affected by other load on the machine.
        "cpu_times_s": cpu_times,
        "loadavg_before": load_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_forward_bytes": vm_hwm_bytes() if rss_reset else None,
        "device_peak_bytes": dev_peak,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                     "flax": flax.__version__, "numpy": np.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # Matmul rate of this process in the compute dtype (bench/train_step.py), for MFU.
        "matmul_peak_flops": _measure_peak(args.dtype),
    }
    return result, {"logits": logits, "vfeat": vfeat, "afeat": afeat}


def _measure_peak(dtype: str) -> float:
    sys.path.insert(0, HERE)
    import model_flops

    return model_flops.measure_peak_flops(dtype)[0]


def model_flops_per_clip() -> float:
    """Analytic forward FLOPs of one clip of the official-size model (bench/side_by_side.py)."""
    sys.path.insert(0, HERE)
    import model_flops
    from synchformer_jax.models.config import ModelConfig

    return model_flops.task_flops(ModelConfig())["infer"]


def parity(jax_out, torch_out) -> dict:
    rep = {}
    for k in ("logits", "vfeat", "afeat"):
        a, b = jax_out[k].astype(np.float64), torch_out[k].astype(np.float64)
        if a.shape != b.shape:
            rep[k] = {"error": f"shape {a.shape} vs {b.shape}"}
            continue
        d = np.abs(a - b)
        rep[k] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                  "max_abs_ref": float(np.abs(b).max()), "std_ref": float(b.std())}
    if "logits" in rep and "max_abs_diff" in rep["logits"]:
        rep["argmax_equal"] = bool((jax_out["logits"].argmax(-1) == torch_out["logits"].argmax(-1)).all())
    return rep


def fmt_table(rows, par, peak=None) -> str:
    """MFU: analytic model FLOPs per clip / median s per clip / `peak` (the JAX process's
    measured matmul rate in its compute dtype; the same number for both rows)."""
    head = ("| implementation | device | dtype | threads | batch | median s/clip | best s/clip | clips/s | MFU | compile s "
            "| CPU util. | peak RSS GiB (fwd / process) | max abs diff logits | vfeat | afeat |")
    lines = [head, "|" + "---|" * 15]
    flops = model_flops_per_clip()
    for r in rows:
        is_jax = r["implementation"] == "synchformer-jax"
        diffs = ["ref", "ref", "ref"] if not is_jax else [
            f"{par[k]['max_abs_diff']:.2e}" if par and "max_abs_diff" in par.get(k, {}) else "n/a"
            for k in ("logits", "vfeat", "afeat")]
        fwd = r.get("peak_rss_forward_bytes")
        rss = f"{fwd / GIB:.2f} / {r['peak_rss_bytes'] / GIB:.2f}" if fwd else f"- / {r['peak_rss_bytes'] / GIB:.2f}"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        best = f"{r['best_s_per_clip']:.2f}" if r.get("best_s_per_clip") is not None else "-"
        util = f"{r['cpu_utilisation']:.2f}" if r.get("cpu_utilisation") is not None else "-"
        mfu = f"{100 * flops / r['median_s_per_clip'] / peak:.1f}%" if peak else "-"
        lines.append(f"| {r['implementation']} | {r['device']} | {r['dtype']} | {r.get('threads') or '-'} | "
                     f"{r['batch']} | {r['median_s_per_clip']:.2f} | {best} | {r['clips_per_s']:.4f} | "
                     f"{mfu} | {comp} | {util} | {rss} | "
                     + " | ".join(diffs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before jax (or anything threaded) starts: the affinity decides XLA's pool size.
    cpus = pin_threads(args.threads)
    threads = len(cpus)
    xla_cpu.disable_ynn_fusion()  # as the CLI does

    own_work = args.work_dir is None
    work = tempfile.mkdtemp(prefix="synchformer_bench_") if own_work else os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    try:
        video, audio = make_inputs(args.seed, args.batch)
        np.save(os.path.join(work, "video.npy"), video)
        np.save(os.path.join(work, "audio.npy"), audio)

        torch_res, skip_reason = run_torch(args, work, threads)
        if torch_res is None:
            print(f"[torch] column skipped: {skip_reason}", flush=True)
        elif torch_res.get("batch") != args.batch:
            raise SystemExit("reused torch results were made with another --batch")

        rows, par, jax_res = [], None, None
        if torch_res is not None:
            rows.append(torch_res)
        if not args.no_jax:
            have_w = torch_res is not None and os.path.exists(os.path.join(work, "state_dict.safetensors"))
            jax_res, jax_out = run_jax(args, work, video, audio, have_w, threads)
            rows.append(jax_res)
            if have_w:
                t = np.load(os.path.join(work, "torch_outputs.npz"))
                par = parity(jax_out, {k: t[k] for k in ("logits", "vfeat", "afeat")})

        table = fmt_table(rows, par, (jax_res or {}).get("matmul_peak_flops"))
        print()
        print(table if rows else "nothing was run (torch skipped and --no-jax)")
        if par:
            print("parity (JAX vs official torch float32, same weights and input):")
            for k in ("logits", "vfeat", "afeat"):
                print(f"  {k}: {par[k]}")
            print(f"  argmax equal: {par.get('argmax_equal')}")

        report = {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"nproc": os.cpu_count(), "cpus_used": cpus, "cpu_model": cpu_model(),
                        "platform": platform.platform()},
            "args": vars(args),
            "input": {"seed": args.seed, "video_shape": list(video.shape), "audio_shape": list(audio.shape)},
            "torch": torch_res, "torch_skipped_reason": skip_reason,
            "jax": jax_res, "parity": par, "table_markdown": table,
        }
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(report, f, indent=1)
            print(f"wrote {args.json_out}")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
