"""Host CPU throughput of the input pipelines and of `prepare`, in clips per second per core.

One command measures four tasks (two more on request) on `--threads N` CPU cores (the
process is pinned to the first N allowed CPUs with `os.sched_setaffinity`, which threads
and spawned worker processes inherit):

* `train stage II`: `input.pipeline.train_dataset` with `ExampleSpec(stage="sync")`
  (14 segments of 16 frames, stride 8: a 120-frame span), `read_threads=N`, batches of
  `--batch-size`, records in ArrayRecord shards.
* `train stage I`: the same with `ExampleSpec(stage="segment_avclip")` (14 non-overlapping
  segments: a 224-frame span) and `augment=Stage1Augment()` (the defaults of
  `segment_avclip.yaml`: 192->224 "sometimes upscale" crop, so frames are decoded whole,
  colour jitter, grayscale, per-segment flips, audio augmentations).
* `prepare (conforming)`: `prepare.prepare` with `num_workers=N` on mp4 files that already
  follow the input contract (H.264 yuv420p 25 fps, 256 px, AAC 16 kHz mono): kept byte for
  byte, decoded once to check them and to fill the record's audio.
* `prepare (re-encode)`: the same on mp4 files at `--src-fps` (30) / `--src-rate` (44.1 kHz
  stereo): every clip is decoded, resampled, re-encoded (libx264 + AAC) and decoded again.
* `--tfrecord-compare` (instead of the four): the two TFRecord training paths of
  `data.format = "tfrecord"` on TFRecord copies of the same records, stage II as above:
  `train stage II tfrecord indexed` (`tfrecord_indexed_train_dataset`, the default
  `data.tfrecord_access`, `read_threads=N`) and `train stage II tfrecord stream`
  (`tfrecord_train_dataset`, `num_workers=0`: every record decoded in the iterating
  thread, as train.py runs it by default); prints both examples/s and their ratio. The
  stream's shuffle window (`--stream-window`, train.py's 256 records) is filled, read and
  CRC-checked (~5 ms per 10-s record), during the warm-up and refilled only after that
  many examples, so a run shorter than the window leaves the reading out of the stream's
  timed part (the indexed path reads and checks each record as it decodes it); a window
  of a few records puts it back.

Data: `synthetic.make_dataset` clips (10 s, 256x256 by default) written to a temp folder, or
to `--work-dir` and reused by later runs with the same settings. The prepare sources are
the same synthetic clips (`synthetic.make_clip`) muxed with PyAV; the TFRecord shards
are the ArrayRecord shards' payloads rewritten, made when first needed.

Each (task, repeat) runs in a fresh spawned process, so no prefetch thread or worker
process of one measurement runs during the next. Reported per task:

* clips/s (wall) and clips/s per core (= clips/s / N): the best of `--repeats` runs, the
  usual estimate on a machine that other processes share (they only ever slow a run down);
* CPU s/clip: process CPU time (all threads, plus reaped worker processes for prepare) per
  clip, the median over the repeats. It does not depend on other load, so
  `1 / (CPU s/clip)` is the clips/s one fully used core would give, and CPU util
  (CPU s / wall s / N, of the best run) below ~1 shows that the run did not get its cores
  (or that the task waits on something other than the CPU).

Pipelines are timed in steady state: `--warmup` batches are taken first, then
`--batches` batches. prepare is timed end to end over `--prepare-clips` clips, worker
start-up (spawned processes importing numpy / PyAV) included.

    python bench/pipeline_throughput.py --threads 1 --work-dir /tmp/pt_data
    python bench/pipeline_throughput.py --threads 2 --work-dir /tmp/pt_data --json-out pt2.json
    python bench/pipeline_throughput.py --threads 2 --work-dir /tmp/pt_data --tfrecord-compare
"""
from __future__ import annotations

import argparse
import fractions
import json
import multiprocessing as mp
import os
import pathlib
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when imported by path
from hostinfo import cpu_model  # noqa: E402

DATA_VERSION = 1  # bump when the generated data changes

DEFAULT_TASKS = ("train stage II", "train stage I", "prepare (conforming)", "prepare (re-encode)")
TFRECORD_TASKS = ("train stage II tfrecord indexed", "train stage II tfrecord stream")
TASKS = DEFAULT_TASKS + TFRECORD_TASKS


def pin(threads: int) -> list:
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs are allowed for this process")
    os.sched_setaffinity(0, cpus[:threads])
    return cpus[:threads]


# --------------------------------------------------------------------------- data


def _write_mp4(path, frames, audio, fps: int, rate: int, channels: int) -> None:
    """Frames (25 fps) + mono audio (16 kHz) -> H.264 yuv420p + AAC mp4 at `fps` / `rate`.

    Other rates are reached by sample-and-hold of the frames and linear interpolation of
    the audio (a stand-in for what a camera or YouTube would give; only the format matters).
    """
    import av
    import numpy as np

    from synchformer_jax import synthetic

    n_out = int(round(frames.shape[0] * fps / synthetic.FPS))
    src_idx = np.minimum((np.arange(n_out) * synthetic.FPS) // fps, frames.shape[0] - 1)
    if rate != synthetic.SAMPLE_RATE:
        t = np.arange(int(round(audio.shape[0] * rate / synthetic.SAMPLE_RATE))) / rate
        audio = np.interp(t, np.arange(audio.shape[0]) / synthetic.SAMPLE_RATE, audio).astype(np.float32)
    wav = np.repeat(audio[None], channels, axis=0)
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "veryfast", "threads": "1"})
        h, w = frames.shape[1:3]
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.thread_count = 1
        aus = out.add_stream("aac", rate=rate, layout=layout)
        aus.bit_rate = 64000 * channels
        packets = []
        for k, i in enumerate(src_idx):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = k
            frame.time_base = fractions.Fraction(1, fps)
            packets.extend(vs.encode(frame))
        packets.extend(vs.encode(None))
        for s in range(0, wav.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, s:s + 1024]), format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = s
            frame.time_base = fractions.Fraction(1, rate)
            packets.extend(aus.encode(frame))
        packets.extend(aus.encode(None))
        packets.sort(key=lambda p: (p.dts if p.dts is not None else 0) * p.time_base)
        out.mux(packets)


def _make_sources(args) -> None:
    seed, out_dir, height, width, src_fps, src_rate = args
    from synchformer_jax import synthetic

    frames, audio, _ = synthetic.make_clip(seed, height=height, width=width)
    _write_mp4(pathlib.Path(out_dir, "conforming", f"clip_{seed:05d}.mp4"), frames, audio, 25, 16000, 1)
    _write_mp4(pathlib.Path(out_dir, "reencode", f"clip_{seed:05d}.mp4"), frames, audio, src_fps, src_rate, 2)


def ensure_data(work_dir: pathlib.Path, a) -> dict:
    """Records (ArrayRecord) and prepare sources in `work_dir`, reused when settings match."""
    settings = {"version": DATA_VERSION, "clips": a.clips, "prepare_clips": a.prepare_clips,
                "height": a.height, "width": a.width, "src_fps": a.src_fps, "src_rate": a.src_rate}
    marker = work_dir / "data.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("settings") == settings:
            return info
    shutil.rmtree(work_dir / "tfrecord", ignore_errors=True)  # copies of the old records
    for sub in ("records", "conforming", "reencode"):
        shutil.rmtree(work_dir / sub, ignore_errors=True)
        (work_dir / sub).mkdir(parents=True)
    from synchformer_jax import synthetic

    t0 = time.time()
    # All allowed CPUs for generation, whatever --threads says (it is not measured).
    workers = len(os.sched_getaffinity(0))
    paths = synthetic.make_dataset(work_dir / "records", n_train=a.clips, n_eval=0, seed=0, num_shards=2,
                                   workers=workers, height=a.height, width=a.width)
    jobs = [(10_000 + i, str(work_dir), a.height, a.width, a.src_fps, a.src_rate) for i in range(a.prepare_clips)]
    if workers > 1:
        import concurrent.futures as cf

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(_make_sources, jobs))
    else:
        for j in jobs:
            _make_sources(j)
    info = {"settings": settings,
            "train": [os.path.relpath(p, work_dir) for p in paths["train"]]}
    marker.write_text(json.dumps(info, indent=1) + "\n")
    print(f"made the data in {time.time() - t0:.0f} s: {work_dir}", file=sys.stderr)
    return info


def ensure_tfrecord(work_dir: pathlib.Path, info: dict) -> list:
    """TFRecord copies of the record shards (same payloads, same shard layout) in
    `work_dir/tfrecord`, written once; the stage II records of both formats are identical,
    so only the reader differs between the tasks."""
    from synchformer_jax.input import shards

    out = []
    for rel in info["train"]:
        meta = shards.parse_shard_name(rel)
        dst = work_dir / "tfrecord" / shards.shard_name(meta["name"], "train", "tfrecord", meta["index"],
                                                        meta["num_shards"])
        if not dst.is_file():  # write_shard is atomic: an existing file is complete
            dst.parent.mkdir(parents=True, exist_ok=True)
            shards.write_shard(dst, shards.iter_records([str(work_dir / rel)]), "tfrecord")
        out.append(str(dst))
    return out


# --------------------------------------------------------------------------- measurements


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _measure_pipeline(task, threads, paths, batch_size, warmup, batches, stream_window=256):
    from synchformer_jax.input import pipeline

    if task.startswith("train stage II"):
        spec, augment = pipeline.ExampleSpec(stage="sync"), None
    else:
        spec, augment = pipeline.ExampleSpec(stage="segment_avclip"), pipeline.Stage1Augment()
    kw = dict(batch_size=batch_size, seed=0, num_workers=0, augment=augment)
    if task.endswith("tfrecord stream"):
        ds = pipeline.tfrecord_train_dataset(paths, spec, window_size=stream_window, **kw)
    elif task.endswith("tfrecord indexed"):
        ds = pipeline.tfrecord_indexed_train_dataset(paths, spec, read_threads=threads, **kw)
    else:
        ds = pipeline.train_dataset(paths, spec, read_threads=threads, **kw)
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    c0, t0 = time.process_time(), time.perf_counter()
    skipped = 0
    for _ in range(batches):
        b = next(it)
        skipped += len(b["meta"]["skipped"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if skipped:
        raise RuntimeError(f"{task}: {skipped} records were skipped as broken")
    shape = tuple(b["video"].shape)
    return {"clips": batches * batch_size, "wall_s": wall, "cpu_s": cpu, "batch_video_shape": shape}


def _measure_prepare(task, threads, src_dir, out_dir):
    from synchformer_jax import prepare

    shutil.rmtree(out_dir, ignore_errors=True)
    c0 = time.process_time() + _cpu_children()
    t0 = time.perf_counter()
    res = prepare.prepare([src_dir], out_dir, split="train", num_workers=threads, progress=False)
    wall = time.perf_counter() - t0
    # prepare shuts its pool down without waiting: reap the workers so that their CPU
    # time shows in RUSAGE_CHILDREN.
    deadline = time.time() + 60
    while mp.active_children() and time.time() < deadline:
        time.sleep(0.05)
    cpu = time.process_time() + _cpu_children() - c0
    split = res.manifest["splits"]["train"]
    if split["num_skipped"]:
        raise RuntimeError(f"{task}: prepare skipped {split['num_skipped']} clips: {split['skipped'][:2]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"clips": split["num_records"], "wall_s": wall, "cpu_s": cpu}


def _child(task, threads, kwargs, queue):
    try:
        pin(threads)
        if task.startswith("train"):
            r = _measure_pipeline(task, threads, **kwargs)
        else:
            r = _measure_prepare(task, threads, **kwargs)
        queue.put(("ok", r))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def measure(task, threads, kwargs) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(task, threads, kwargs, q))
    p.start()
    status, r = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{task}: {r}")
    return r


# --------------------------------------------------------------------------- report


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("jax", "grain", "av", "numpy", "array-record"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def summarise(task, threads, runs) -> dict:
    best = max(runs, key=lambda r: r["clips"] / r["wall_s"])
    cps = best["clips"] / best["wall_s"]
    cpu_per_clip = statistics.median(r["cpu_s"] / r["clips"] for r in runs)
    return {"task": task, "threads": threads, "clips": best["clips"], "wall_s": best["wall_s"],
            "clips_per_s": cps, "clips_per_s_per_core": cps / threads, "cpu_s_per_clip": cpu_per_clip,
            "cpu_limited_clips_per_s_per_core": 1.0 / cpu_per_clip,
            "cpu_util": best["cpu_s"] / best["wall_s"] / threads, "runs": runs}


def table(rows) -> str:
    head = ("| task | N | clips | wall s | clips/s | clips/s/core | CPU s/clip | 1/(CPU s/clip) | CPU util |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['task']} | {r['threads']} | {r['clips']} | {r['wall_s']:.1f} | {r['clips_per_s']:.2f} | "
                     f"{r['clips_per_s_per_core']:.2f} | {r['cpu_s_per_clip']:.3f} | "
                     f"{r['cpu_limited_clips_per_s_per_core']:.2f} | {r['cpu_util']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="cores to pin to = read threads / prepare workers")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help=f"comma-separated subset of: {', '.join(TASKS)}")
    ap.add_argument("--tfrecord-compare", action="store_true",
                    help="time the TFRecord indexed and stream training paths (replaces --tasks) and print the ratio")
    ap.add_argument("--work-dir", help="keep / reuse the generated data here (default: a temp folder)")
    ap.add_argument("--clips", type=int, default=32, help="synthetic 10-s clips in the record shards")
    ap.add_argument("--prepare-clips", type=int, default=24, help="source files per prepare task")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--src-fps", type=int, default=30, help="frame rate of the re-encode sources")
    ap.add_argument("--src-rate", type=int, default=44100, help="sample rate of the re-encode sources")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches")
    ap.add_argument("--batches", type=int, default=16, help="timed batches per pipeline run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-window", type=int, default=256,
                    help="shuffle window of the TFRecord stream task (train.py: 256)")
    ap.add_argument("--json-out")
    a = ap.parse_args(argv)
    tasks = list(TFRECORD_TASKS) if a.tfrecord_compare else [t.strip() for t in a.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if a.prepare_clips < 1 and any(t.startswith("prepare") for t in tasks):
        ap.error("the prepare tasks need --prepare-clips >= 1")
    if a.clips < 1 and any(t.startswith("train") for t in tasks):
        ap.error("the pipeline tasks need --clips >= 1")
    allowed = len(os.sched_getaffinity(0))
    if not 1 <= a.threads <= allowed:
        ap.error(f"--threads must be in [1, {allowed}] (CPUs allowed for this process)")

    tmp = None
    if a.work_dir:
        work_dir = pathlib.Path(a.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pipeline_throughput_")
        work_dir = pathlib.Path(tmp.name)
    try:
        info = ensure_data(work_dir, a)
        paths = [str(work_dir / p) for p in info["train"]]
        tf_paths = ensure_tfrecord(work_dir, info) if any("tfrecord" in t for t in tasks) else []
        rows = []
        for task in tasks:
            if task.startswith("train"):
                kwargs = dict(paths=tf_paths if "tfrecord" in task else paths, batch_size=a.batch_size,
                              warmup=a.warmup, batches=a.batches)
                if task.endswith("stream"):
                    kwargs["stream_window"] = a.stream_window
            else:
                sub = "conforming" if "conforming" in task else "reencode"
                kwargs = dict(src_dir=str(work_dir / sub), out_dir=str(work_dir / f"out_{sub}"))
            runs = [measure(task, a.threads, kwargs) for _ in range(a.repeats)]
            rows.append(summarise(task, a.threads, runs))
            print(f"{task}: " + ", ".join(f"{r['clips'] / r['wall_s']:.2f}" for r in runs) + " clips/s",
                  file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()

    with open("/proc/loadavg", encoding="utf-8") as f:
        load = f.read().split()[:3]
    env = {"threads": a.threads, "nproc": os.cpu_count(), "cpu_model": cpu_model(), "versions": versions(),
           "date": time.strftime("%Y-%m-%d"), "loadavg_after": load, "clip": f"10 s {a.height}x{a.width}",
           "batch_size": a.batch_size, "repeats": a.repeats, "src_fps": a.src_fps, "src_rate": a.src_rate,
           "stream_window": a.stream_window}
    print(f"# {env['date']}  nproc={env['nproc']}  {env['cpu_model']}  threads={a.threads}  "
          f"load avg after: {' '.join(load)}")
    print("# " + "  ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(table(rows))
    by_task = {r["task"]: r for r in rows}
    if all(t in by_task for t in TFRECORD_TASKS):
        idx, stream = (by_task[t]["clips_per_s"] for t in TFRECORD_TASKS)
        print(f"TFRecord training, examples/s: indexed (read_threads={a.threads}) {idx:.2f}, "
              f"stream (num_workers=0) {stream:.2f}, indexed / stream {idx / stream:.2f}x")
    if a.json_out:
        pathlib.Path(a.json_out).write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
