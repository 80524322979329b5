"""Throughput of `synchformer-jax predict` and of cached-feature DeSync scoring.

predict: N synthetic 10-s contract clips (H.264 25 fps 256x256 + AAC 16 kHz, written
once into --work-dir) go through `predict.run`, the library path of the command
(conform/decode in threads, window inputs, batched model, aggregation), with random
weights of the tiny or the full-size (237M) model. The first run includes compilation;
the second, on the same files, is the steady state. Reported: clips/s, windows/s,
wall and process-CPU seconds per clip.

DeSync: V videos x M audio tracks (8 s each, av-benchmark protocol): the video
features are computed once per video (`DesyncScorer.video_features`), then every track
costs the audio extractor on 24 segments plus `compare` on two windows
(`DesyncScorer.score`). Reported: seconds per video for the features, tracks/s for
the scoring (both warm, i.e. after a first compiled call).

MFU: the model FLOPs of what was done (bench/model_flops.py: a window's forward for
predict; 24 Motionformer segments per video, 24 AST segments + two windows of the sync
transformer per DeSync track) per second, over `--peak-tflops` or the matmul rate
measured here in the model's compute dtype. For predict it is end to end: decoding and
window assembly are in the wall time.

    python bench/predict_throughput.py --size tiny --threads 2 --clips 8
    python bench/predict_throughput.py --size full --threads 2 --clips 1 --v-start-sec 0 \
        --batch-size 1 --desync-videos 1 --desync-tracks 2
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when imported by path
from hostinfo import pin_threads  # noqa: E402
import model_flops  # noqa: E402

from synchformer_jax import xla_cpu  # noqa: E402


def write_clip(path: pathlib.Path, seed: int, seconds: float = 10.0) -> None:
    """A synthetic clip (events in picture and sound) as a contract-conforming mp4."""
    import av
    import numpy as np

    from synchformer_jax import synthetic

    frames, audio, _ = synthetic.make_clip(seed, duration_sec=seconds)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"preset": "veryfast", "crf": "20"}
        a_s = c.add_stream("aac", rate=16000, layout="mono")
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = i
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
        wave = np.concatenate([audio, np.zeros(3200, np.float32)])  # a little past the last frame
        for s in range(0, wave.shape[0], 1024):
            f = av.AudioFrame.from_ndarray(wave[None, s:s + 1024].copy(), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, s
            c.mux(a_s.encode(f))
        c.mux(a_s.encode(None))


def random_params(config, seed: int = 0):
    """Random float32 params of the config's shapes (NumPy; no compiled init)."""
    import numpy as np
    from flax import traverse_util

    from synchformer_jax.models import synchformer as sf

    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(sf.abstract_params(config))
    out = {}
    for path, leaf in flat.items():
        shape, name = leaf.shape, path[-1]
        if name == "scale":
            x = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        elif name == "bias":
            x = 0.05 * rng.standard_normal(shape, np.float32)
        elif name == "kernel":
            x = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(np.prod(shape[:-1])))
        else:
            x = 0.5 * rng.standard_normal(shape, np.float32)
        out[path] = x.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--threads", type=int, help="pin to this many CPUs (default: all allowed)")
    ap.add_argument("--clips", type=int, default=8, help="10-s clips for predict (0: skip predict)")
    ap.add_argument("--v-start-sec", type=float, help="one window per clip at this start (default: sliding)")
    ap.add_argument("--stride-sec", type=float, default=2.5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--desync-videos", type=int, default=4, help="0: skip DeSync")
    ap.add_argument("--desync-tracks", type=int, default=16, help="audio tracks per video")
    ap.add_argument("--work-dir", help="keep / reuse the generated clips here")
    ap.add_argument("--peak-tflops", type=float, help="peak for MFU (default: measured matmul rate)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    cpus = pin_threads(args.threads)
    xla_cpu.disable_ynn_fusion()  # as the CLI does

    import jax
    import numpy as np

    from synchformer_jax import inference, predict
    from synchformer_jax.models import synchformer as sf
    from synchformer_jax.models.config import ModelConfig, tiny_config

    jax.config.update("jax_default_matmul_precision", "highest")
    config = tiny_config() if args.size == "tiny" else ModelConfig()
    params = jax.device_put(random_params(config))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else model_flops.measure_peak_flops(config.dtype)[0]
    parts = model_flops.part_flops(config)
    window_flops = model_flops.task_flops(config)["infer"]
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="predict_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    n_make = max(args.clips, args.desync_videos)
    paths = []
    for i in range(n_make):
        p = work / f"clip{i:03d}.mp4"
        if not p.exists():
            write_clip(p, seed=1000 + i)
        paths.append(p)
    result = {"size": args.size, "threads": len(cpus), "cpus": cpus, "device": str(jax.devices()[0]),
              "jax": jax.__version__, "python": platform.python_version(), "machine": platform.processor() or
              platform.machine(), "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
              "peak_tflops": peak / 1e12, "peak_src": "--peak-tflops" if args.peak_tflops else
              f"measured matmul ({config.dtype})"}

    if args.clips:
        model = predict.PredictModel.from_params(f"random {args.size}", config, params)
        settings = predict.make_settings(v_start_sec=args.v_start_sec, stride_sec=args.stride_sec,
                                         batch_size=args.batch_size)
        files = [str(p) for p in paths[:args.clips]]

        def go():
            recs = predict.run(files, [model], settings, emit=lambda r: None, error=print,
                               batch_size=args.batch_size, workers=args.workers, progress=False)
            assert all(r["ok"] for r in recs), [r["error"] for r in recs if not r["ok"]]
            return sum(len(r["windows"]) for r in recs)

        windows, first_wall, first_cpu = timed(go)
        windows, wall, cpu = timed(go)
        result["predict"] = {
            "clips": len(files), "windows": windows, "batch_size": args.batch_size,
            "v_start_sec": args.v_start_sec, "stride_sec": None if args.v_start_sec is not None else args.stride_sec,
            "first_run_wall_s": round(first_wall, 2), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "clips_per_s": round(len(files) / wall, 4), "windows_per_s": round(windows / wall, 4),
            "wall_s_per_clip": round(wall / len(files), 3), "cpu_s_per_clip": round(cpu / len(files), 3),
            "mfu_end_to_end": model_flops.mfu(windows * window_flops / wall, peak)}
        print(json.dumps({"predict": result["predict"]}), flush=True)

    if args.desync_videos:
        from synchformer_jax import media

        model = sf.Synchformer(config)
        scorer = inference.DesyncScorer(model, params, chunk_size=None)
        v, m = args.desync_videos, args.desync_tracks
        clips = [media.decode_media(p) for p in paths[:v]]
        frames = np.stack([c.frames[:inference.DESYNC_FRAMES] for c in clips])
        frames = np.asarray(jax.jit(inference.desync_resize_crop)(frames))  # 256x256 -> 224x224
        base = [c.audio[:inference.DESYNC_SAMPLES + 16000] for c in clips]
        shifts = np.linspace(-16000, 16000, m).astype(int)  # up to +-1 s
        tracks = np.stack([np.stack([np.roll(a, s)[:inference.DESYNC_SAMPLES] for s in shifts]) for a in base])
        jax.block_until_ready(scorer.video_features(frames))  # compile
        vfeat, vwall, vcpu = timed(lambda: jax.block_until_ready(scorer.video_features(frames)))
        jax.block_until_ready(scorer.score(vfeat, tracks))  # compile
        res, swall, scpu = timed(lambda: jax.block_until_ready(scorer.score(vfeat, tracks)))
        result["desync"] = {
            "videos": v, "tracks_per_video": m, "video_features_wall_s_per_video": round(vwall / v, 3),
            "video_features_cpu_s_per_video": round(vcpu / v, 3), "score_wall_s": round(swall, 3),
            "tracks_per_s": round(v * m / swall, 3), "cpu_s_per_track": round(scpu / (v * m), 4),
            "mean_desync_sec": round(float(np.mean(res.desync_sec)), 4),
            "mfu_video_features": model_flops.mfu(
                v * inference.DESYNC_SEGMENTS * parts["motionformer_per_segment"]["total"] / vwall, peak),
            "mfu_score": model_flops.mfu(v * m * (inference.DESYNC_SEGMENTS * parts["ast_per_segment"]["total"]
                                                  + 2 * parts["sync_transformer_per_clip"]["total"]) / swall, peak)}
        print(json.dumps({"desync": result["desync"]}), flush=True)

    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("predict", "desync")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
