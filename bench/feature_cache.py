"""Stage-II feature cache: what it saves and what it costs (CPU numbers).

Cases:
* step time of the real stage-II train step (`train.build_trainer(config).train_step`,
  1-device mesh, float32 compute) on a raw host batch (uint8 frame span + waveform:
  on-device segmenting, log-mel, frozen extractors forward, transformer fwd+bwd, Adam)
  vs a cached batch (`vfeat`, `afeat` float16: projections + transformer only).
  `tiny`: `configs/demo.py` stage-II model (64 px) at batch 16; `full`: official sizes
  at batch 1 (`--full`; on a 2-core CPU the raw full-size step takes minutes).
* XLA:CPU's YNNPACK fusions are off, as in the CLI (`synchformer_jax/xla_cpu.py`);
* MFU of each step: its model FLOPs (bench/model_flops.py: `stage2` raw, `stage2_cached`
  cached) per second over `--peak-tflops` or the float32 matmul rate measured here;
* cache build time per 10-s clip (`feature_cache_build.build_feature_cache`, demo model,
  72-px synthetic clips, float16): (time for N clips - time for 1 clip) / (N - 1), so the
  extractor compile of each build cancels out; with the clips decoded inline and on 2
  threads ahead of the extractors (`decode_threads` 0 and 2).
* bytes per clip (float16): measured record size at tiny size; computed at full size
  (D = 768, 30 video x 8 tokens + 233 audio x 6 tokens per 10-s clip: the grid of
  `feature_cache.grid_for(14)`), and the AudioSet-scale total (2 M clips).

* rows/s of the cached training iterator over full-size entries (`--reads CLIPS`): the
  window's records vs the clip's whole entry, uncompressed vs zstd-1 shards.

    python bench/feature_cache.py [--steps 5] [--clips 4] [--full] [--reads 400]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ also when imported by path

import full_size_cache  # noqa: E402
import jax  # noqa: E402
import model_flops  # noqa: E402
import numpy as np  # noqa: E402

from synchformer_jax import experiment, feature_cache, feature_cache_build, train, xla_cpu  # noqa: E402


def _demo_config():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
    import demo  # noqa: PLC0415

    c = demo.get_config("sync")
    c.train.compute_dtype = "float32"
    return c


def _full_config(batch: int):
    c = experiment.default_config("sync")
    c.data.batch_size = batch
    c.train.compute_dtype = "float32"  # bfloat16 is emulated (slow) on CPUs
    return c


def _batches(config, rng: np.random.Generator):
    task = tasks_of(config)
    lay = task.example_spec.layout
    mc = task.model_config
    b, s, img = config.data.batch_size, mc.n_segments, mc.video.img_size
    raw = {"video": rng.integers(0, 256, (b, lay.video_span, img, img, 3), dtype=np.uint8),
           "audio": rng.standard_normal((b, lay.audio_span)).astype(np.float32) * 0.1,
           "offset_target": rng.integers(0, 21, (b,)).astype(np.int32),
           "mask": np.ones((b,), bool)}
    cached = {"vfeat": rng.standard_normal((b, s, 8, mc.video.embed_dim)).astype(np.float16),
              "afeat": rng.standard_normal((b, s, 6, mc.audio.hidden_size)).astype(np.float16),
              "offset_target": raw["offset_target"]}
    return raw, cached


def tasks_of(config):
    from synchformer_jax import tasks  # noqa: PLC0415

    return tasks.get_task(config.stage, experiment.model_config(config))


def step_times(config, steps: int) -> dict:
    from synchformer_jax import sharding  # noqa: PLC0415
    from synchformer_jax.input import device as device_lib  # noqa: PLC0415

    config.mesh.data, config.mesh.fsdp = 1, 1
    trainer = train.build_trainer(config)
    mesh = trainer.mesh
    state, _ = train.initial_state(trainer, jax.random.key(0))
    rng = jax.random.key(1)
    out = {}
    for name, host in zip(("raw", "cached"), _batches(config, np.random.default_rng(0))):
        batch = device_lib.host_to_global(host, mesh, sharding.BATCH_AXES)
        t0 = time.perf_counter()
        step = trainer.train_step.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        state, m = step(state, batch, rng)  # warm-up
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batch, rng)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        per_clip = model_flops.task_flops(experiment.model_config(config))
        flops = config.data.batch_size * per_clip["stage2" if name == "raw" else "stage2_cached"]
        out[name] = {"compile_s": compile_s, "step_s": float(np.median(times)), "flops": flops}
        print(f"  {name}: compile {compile_s:.1f} s, step {out[name]['step_s'] * 1e3:.1f} ms "
              f"(median of {steps})", flush=True)
    return out


def build_times(config, n_clips: int, decode_threads=(0, 2)) -> dict:
    """Per-clip build time for each decode-thread count, the same clips and params."""
    from synchformer_jax import synthetic  # noqa: PLC0415
    from synchformer_jax.input import shards as shard_lib  # noqa: PLC0415
    from synchformer_jax.models import synchformer as sf  # noqa: PLC0415

    mc = experiment.model_config(config)
    params = sf.init_params(mc, jax.random.key(0))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        made = synthetic.make_dataset(tmp / "clips", n_clips, 0, seed=3, num_shards=1,
                                      **dict(config.data.synthetic_clip))
        one = tmp / "one"
        one.mkdir()
        first = next(iter(shard_lib.iter_records(made["train"])))
        one_path = one / shard_lib.shard_name("one", "train", "array_record", 0, 1)
        shard_lib.write_shard(one_path, [first])
        for threads in decode_threads:
            kw = dict(batch_size=64, decode_threads=threads)
            m1 = feature_cache_build.build_feature_cache((params, mc), [str(one_path)], tmp / f"c1_{threads}", **kw)
            mn = feature_cache_build.build_feature_cache((params, mc), made["train"], tmp / f"cn_{threads}", **kw)
            per_clip = (mn["build_seconds"] - m1["build_seconds"]) / (n_clips - 1)
            out[threads] = {"per_clip_s": per_clip, "bytes_per_clip": mn["bytes_per_clip"],
                            "clips": mn["num_clips"], "first_clip_s": m1["build_seconds"]}
            print(f"  build, {threads} decode threads: {per_clip * 1e3:.0f} ms per clip", flush=True)
    return out


def _whole_clip_batch(it) -> None:
    """One batch as the one-record-per-clip format read it: every record of each row's clip."""
    cache = it.cache
    per = cache.records_per_clip
    for c, g, j in it.draw(it.step):
        vi, ai = cache.grid.window_entries(int(g), int(j))
        parts = [cache._record(int(c) * per + k) for k in range(per)]
        parts[0][vi]
        parts[1 + int(ai[0]) % cache.phases][ai // cache.phases]
    it.step += 1


def _rows_per_s(batch_fn, it, batch: int, seconds: float) -> float:
    batch_fn(it)  # warm: opens, first reads
    t0, rows = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        batch_fn(it)
        rows += batch
    return rows / (time.perf_counter() - t0)


def iterator_reads(n_clips: int, batch: int, seconds: float = 5.0) -> dict:
    """Rows/s of the cached training iterator over full-size 10-s entries, every row read
    from the shard (memory_clips=0; from the page cache here): the window's records only
    (the video record and one audio phase, ~0.65 MB) vs the clip's whole entry (2.5 MB,
    what the one-record-per-clip format read), each with the shard uncompressed (the
    format's `RECORD_OPTIONS`) and zstd-1 (the clip shards' options), in alternation; the
    window records with one batch-making thread per core (`workers`); and with every clip
    in memory."""
    from synchformer_jax.input import shards as shard_lib  # noqa: PLC0415

    cases = [("window records", lambda it: next(it), 0), ("whole clips", _whole_clip_batch, 0),
             (f"window records, {os.cpu_count()} worker threads", lambda it: next(it), os.cpu_count())]
    options = {"uncompressed": feature_cache.RECORD_OPTIONS, "zstd-1": shard_lib.ARRAY_RECORD_OPTIONS}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {k: full_size_cache.write(pathlib.Path(tmp) / k, n_clips, o) for k, o in options.items()}
        for comp, root in dirs.items():
            out[f"bytes_per_clip {comp}"] = os.path.getsize(next(root.glob("features-*"))) / n_clips
        for rep in range(2):  # alternated, so a neighbour's load spreads over every case
            for comp, root in dirs.items():
                for what, fn, workers in cases:
                    if workers and comp != "uncompressed":
                        continue
                    it = feature_cache.CacheTrainIterator(root, batch_size=batch, seed=rep, memory_clips=0,
                                                          workers=workers)
                    rate = _rows_per_s(fn, it, batch, seconds)
                    it.close()
                    out.setdefault(f"{what}, {comp}", []).append(rate)
                    print(f"  {what}, {comp}: {rate:,.0f} rows/s", flush=True)
        it = feature_cache.CacheTrainIterator(dirs["uncompressed"], batch_size=batch, seed=0, memory_clips=n_clips)
        out["in memory"] = [_rows_per_s(lambda i: next(i), it, batch, seconds)]
        print(f"  every clip in memory: {out['in memory'][0]:,.0f} rows/s", flush=True)
        src = feature_cache.FeatureCache(dirs["uncompressed"], memory_clips=0)._src
        idx = np.random.default_rng(0).integers(0, len(src), 1024).tolist()
        t0 = time.perf_counter()
        for i in idx:
            src[i]
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        src.get_many(idx)
        out["get_many_speedup"] = one / (time.perf_counter() - t0)
        print(f"  1024 uncompressed records one by one vs one get_many: {out['get_many_speedup']:.1f}x", flush=True)
    return out


def full_bytes_per_clip() -> dict:
    g = feature_cache.grid_for(14)
    nv, na = g.num_video_entries(250), g.num_audio_entries(160000)
    per = (nv * 8 + na * 6) * 768 * 2
    return {"nv": nv, "na": na, "bytes": per, "audioset_tb": per * 2_000_000 / 1e12}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--full", action="store_true", help="also the full-size batch-1 step (minutes on a CPU)")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-steps", action="store_true", help="only the build / bytes numbers")
    p.add_argument("--reads", type=int, default=0, metavar="CLIPS",
                   help="also the cached iterator's rows/s over CLIPS full-size entries (2.5 MB each, on disk)")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: measured float32 matmul rate)")
    a = p.parse_args(argv)
    xla_cpu.disable_ynn_fusion()  # as the CLI does
    print(f"devices: {jax.devices()}, cores: {os.cpu_count()}", flush=True)
    rows = []
    if not a.skip_steps:
        print("tiny (demo, 64 px, batch 16) step:", flush=True)
        rows.append(("tiny 64px b16", step_times(_demo_config(), a.steps)))
    if a.full and not a.skip_steps:
        print("full (official sizes, batch 1) step:", flush=True)
        rows.append(("full 224px b1", step_times(_full_config(1), max(1, min(a.steps, 2)))))
    build = None if a.skip_build else build_times(_demo_config(), a.clips)
    full = full_bytes_per_clip()
    reads = iterator_reads(a.reads, 256) if a.reads else None
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (model_flops.measure_peak_flops("float32")[0] if rows else None)
    peak_src = "--peak-tflops" if a.peak_tflops else "float32 matmul"

    print(f"\n| model | raw step | cached step | speed-up | MFU raw / cached ({(peak or 0) / 1e9:,.0f} GFLOP/s "
          f"{peak_src}) | compile raw / cached |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        raw, cached = r["raw"], r["cached"]
        print(f"| {name} | {raw['step_s'] * 1e3:.0f} ms | {cached['step_s'] * 1e3:.1f} ms | "
              f"{raw['step_s'] / cached['step_s']:.1f}x | {model_flops.mfu(raw['flops'] / raw['step_s'], peak)} / "
              f"{model_flops.mfu(cached['flops'] / cached['step_s'], peak)} | "
              f"{raw['compile_s']:.1f} s / {cached['compile_s']:.1f} s |")
    print("\n| item | value |")
    print("|---|---|")
    for threads, b in (build or {}).items():
        print(f"| cache build, demo model, per 10-s clip (72 px, CPU), {threads} decode threads | "
              f"{b['per_clip_s'] * 1e3:.0f} ms |")
    if build:
        b = next(iter(build.values()))
        print(f"| bytes per 10-s clip, demo model (D=96, float16), measured | {b['bytes_per_clip'] / 1e3:.1f} kB |")
    print(f"| entries per 10-s clip (full grid) | {full['nv']} video x 8 tokens, {full['na']} audio x 6 tokens |")
    print(f"| bytes per 10-s clip, full size (D=768, float16) | {full['bytes'] / 1e6:.2f} MB |")
    print(f"| AudioSet scale (2 M clips), full size float16 | {full['audioset_tb']:.2f} TB |")
    if reads:
        for comp in ("uncompressed", "zstd-1"):
            print(f"| cache shard bytes per full-size clip, {comp} | {reads[f'bytes_per_clip {comp}'] / 1e6:.2f} MB |")
        for key, rates in reads.items():
            if isinstance(rates, list):
                print(f"| cached iterator, full-size entries, batch 256, {key} | "
                      f"{' / '.join(f'{r:,.0f}' for r in rates)} rows/s |")
        print(f"| uncompressed records: one parallel read (get_many) vs one by one | {reads['get_many_speedup']:.1f}x |")

if __name__ == "__main__":
    main()
