"""`synchformer-jax predict PATH...`: offsets (and synchronizability) of video files.

Inputs are files of any format FFmpeg reads, folders (searched recursively for video
extensions) and glob patterns. Each file is brought to the input contract in memory
(`media.conform`: 25 fps, shorter side 256, 16 kHz mono), cut into windows exactly like
the official `example.py` (`inference.window_inputs`), and the windows of many files
are scored together in device batches of `--batch-size`. The output schema is in
`docs/predict.md`.

Windows: `--v-start-sec T` scores one window starting at T (with `--offset-sec O` the
audio is taken O seconds later, the official synthetic shift); otherwise windows start
every `--stride-sec` seconds (default 2.5) from the first start whose window (and shifted
audio) fits, plus one at the last start that fits. An offset model takes offsets inside
its class grid only (outside it has no class for them: a usage error); an offset between
two classes is applied as given, with a warning, and labelled with the nearest class.

Per video the aggregate is the mean of the window probability vectors; its argmax is
the video's offset and the mean probability of that class its confidence (likewise the
mean of the windows' synchronizability probabilities).

A file that cannot be scored (missing, not a video, damaged, no audio stream, shorter
than one window) gets one line `error: PATH: problem` on stderr and an entry with
`"ok": false`; the other files are scored and the exit code is 1 at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import functools
import glob
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

SCHEMA = "synchformer-jax/predict/1"
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".mts",
    ".m2ts", ".3gp", ".3g2", ".ogv", ".ogg", ".vob", ".mxf", ".asf", ".f4v", ".divx",
})
DEFAULT_STRIDE_SEC = 2.5


class PredictError(ValueError):
    """A problem with one input file (one line, naming the file)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_offset(offset_sec: float, grid) -> tuple[float, int, bool]:
    """`offset_sec` as the official test transform applies it to a model with class `grid`.

    Returns `(applied, class, on_grid)`: the shift is `round(offset_sec, 2)` (official),
    its class the nearest grid value (the label the official code gives it), and
    `on_grid` tells whether it is one of the shifts the model was trained on (the
    official random offsets are the grid values rounded to 2 decimals).

    Raises:
      ValueError: a non-finite offset, or one outside the grid's range: the model has no
        class for it (official `example.py` only warns, then labels it with the end class).
    """
    from synchformer_jax.input import transforms

    offset_sec = float(offset_sec)
    if not math.isfinite(offset_sec):
        raise ValueError(f"--offset-sec must be a finite number of seconds, got {offset_sec}")
    values = np.round(np.asarray(grid, np.float64), 2)
    applied = round(offset_sec, 2)
    if not values[0] - 1e-9 <= applied <= values[-1] + 1e-9:
        raise ValueError(f"--offset-sec {offset_sec:g} is outside the model's class grid "
                         f"[{values[0]:g}, {values[-1]:g}] s: it has no class for that offset")
    _, k = transforms.quantize_offset(grid, applied)
    return applied, int(k), bool(abs(values[k] - applied) < 1e-9)


def off_grid_warning(applied: float, k: int, grid) -> str:
    """The one-line warning for an offset between two classes."""
    step = float(grid[1]) - float(grid[0])
    return (f"warning: --offset-sec {applied:+.2f} s is not a class of the model's grid ({float(grid[0]):+.2f} ... "
            f"{float(grid[-1]):+.2f} s in {step:.2f} s steps): the audio is shifted by {applied:+.2f} s, which is "
            f"labelled with the nearest class, {k} ({float(grid[k]):+.2f} s), as the official code labels it")


# ------------------------------------------------------------------------- inputs


def expand_inputs(paths: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """`(path, problem)` for every input: folders recursively (video extensions only,
    sorted), glob patterns (sorted), files as given (any extension). A path that does
    not exist and matches nothing comes back with a problem instead of being dropped."""
    out: list[tuple[str, Optional[str]]] = []
    seen: set[str] = set()

    def add(p: str, problem: Optional[str] = None) -> None:
        if problem is None and p in seen:
            return
        seen.add(p)
        out.append((p, problem))

    for raw in paths:
        p = pathlib.Path(raw)
        if p.is_dir():
            # Broken links are listed too: media reports them, rather than them vanishing.
            found = sorted(str(f) for f in p.rglob("*") if (f.is_file() or (f.is_symlink() and not f.exists()))
                           and f.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                add(raw, "folder holds no video files (extensions: " + " ".join(sorted(VIDEO_EXTENSIONS)) + ")")
            for f in found:
                add(f)
        elif p.exists():
            add(raw)
        elif glob.has_magic(raw):
            matches = sorted(m for m in glob.glob(raw, recursive=True) if os.path.isfile(m))
            if not matches:
                add(raw, "no files match this pattern")
            for m in matches:
                add(m)
        else:
            add(raw, "no such file")
    return out


# ----------------------------------------------------------------------- models


def local_mesh(num_devices: Optional[int] = None):
    """A 1-D `data` mesh over the first `num_devices` local devices (default: all). Each
    process scores its own files, so prediction never spans hosts."""
    import jax

    from synchformer_jax.input.device import make_mesh

    devices = jax.local_devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise PredictError(f"--devices {num_devices}: this process has {len(devices)} local device(s)")
        devices = devices[:num_devices]
    return make_mesh(devices=devices)


@functools.lru_cache(maxsize=8)
def _jitted(config, kind: str, topk: int, mesh) -> Callable:
    """Jitted `(params, frames uint8 [B, L, h, w, 3], audio [B, S, 1, F, T])` for one model,
    data parallel over `mesh` (params replicated, windows split along the batch); cached
    so that repeated runs in one process compile once per batch shape."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from synchformer_jax import inference, sharding
    from synchformer_jax.models.synchformer import Synchformer

    model = Synchformer(config)
    n_seg = config.n_segments

    def offset_fn(params, frames, audio):
        video = inference.segments_from_frames(frames, n_seg)
        out = inference.predict_offsets(model, params, video, audio, topk=topk)
        return out.logits, out.probs

    def sync_fn(params, frames, audio):
        video = inference.segments_from_frames(frames, n_seg)
        return inference.synchronizability_logits(model, params, video, audio)

    batch = NamedSharding(mesh, PartitionSpec(sharding.DATA))
    return jax.jit(offset_fn if kind == "offset" else sync_fn,
                   in_shardings=(sharding.replicated(mesh), batch, batch), out_shardings=batch)


class PredictModel:
    """One loaded checkpoint: config, params replicated on the devices of `mesh` (default:
    all local devices), its jitted data-parallel scorer."""

    def __init__(self, path: str, overrides: dict[str, Any], role: str, topk: int, *, loaded=None, mesh=None):
        import jax

        from synchformer_jax import inference, pretrained, sharding
        from synchformer_jax.models.config import HEAD_OFFSET, HEAD_SYNCHRONIZABILITY, KIND_SYNC

        loaded = loaded or pretrained.load_model(path, overrides=overrides)
        config = loaded.config
        if config.kind != KIND_SYNC:
            raise pretrained.CheckpointError(
                f"{path}: a stage-I ({config.kind}) model has no offset or synchronizability head; "
                "predict needs a stage II or III checkpoint")
        if role == "sync" and config.sync.head != HEAD_SYNCHRONIZABILITY:
            raise pretrained.CheckpointError(f"{path}: --sync-checkpoint needs a synchronizability (stage III) "
                                             f"model, this one has the {config.sync.head!r} head")
        self.path, self.config = path, config
        self.kind = "offset" if config.sync.head == HEAD_OFFSET else "sync"
        self.mesh = mesh if mesh is not None else local_mesh()
        self.num_devices = int(self.mesh.size)
        self.params = jax.device_put(loaded.params, sharding.replicated(self.mesh))
        self.fn = _jitted(config, self.kind, topk, self.mesh)
        self.grid = inference.offset_grid(config)
        self.window_sec = _crop_len(config)

    @classmethod
    def from_params(cls, name: str, config, params, role: str = "main", topk: int = 5,
                    mesh=None) -> "PredictModel":
        """A model already in memory (library use, benchmarks)."""
        from synchformer_jax import pretrained

        return cls(name, {}, role, topk, loaded=pretrained.LoadedModel(config, params, {}, []), mesh=mesh)

    def describe(self) -> dict[str, Any]:
        c = self.config
        d = {"path": self.path, "head": c.sync.head, "n_segments": c.n_segments, "window_sec": self.window_sec,
             "dtype": c.dtype}
        if self.kind == "offset":
            d["num_classes"] = c.sync.num_offset_classes
            d["max_offset_sec"] = c.sync.max_offset_sec
            d["class_grid_sec"] = [round(float(g), 6) for g in self.grid]
        return d


def _crop_len(config) -> float:
    from synchformer_jax.input import transforms
    from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY

    if config.sync.head == HEAD_SYNCHRONIZABILITY:
        return transforms.synchronizability_crop_len_sec(config.n_segments)
    return 5.0  # TemporalCropAndOffset(crop_len_sec=5)


# ---------------------------------------------------------------------- batching


def _bucket(n: int, batch_size: int, num_devices: int = 1) -> int:
    """Padded global batch for `n` windows: `num_devices` x a power of two up to
    `batch_size` windows per device (few compiled shapes, an equal share per device)."""
    per_device = -(-max(1, n) // num_devices)
    return num_devices * min(batch_size, 1 << max(0, math.ceil(math.log2(per_device))))


class _Batcher:
    """Collects windows of one model, runs full batches (`batch_size` windows per device),
    keeps one batch in flight so that the host prepares the next batch while the devices
    compute."""

    def __init__(self, model: PredictModel, batch_size: int, deliver: Callable[[Any, dict], None]):
        self.model, self.batch_size, self.deliver = model, batch_size, deliver
        self.keys: list = []
        self.frames: list = []
        self.audio: list = []
        self.inflight = None

    def add(self, key, frames: np.ndarray, audio: np.ndarray) -> None:
        self.keys.append(key)
        self.frames.append(frames)
        self.audio.append(audio)
        if len(self.keys) >= self.batch_size * self.model.num_devices:
            self._dispatch()

    def _dispatch(self) -> None:
        if not self.keys:
            return
        n = len(self.keys)
        size = _bucket(n, self.batch_size, self.model.num_devices)
        frames = np.stack(self.frames + [np.zeros_like(self.frames[0])] * (size - n))
        audio = np.stack(self.audio + [np.zeros_like(self.audio[0])] * (size - n))
        out = self.model.fn(self.model.params, frames, audio)  # asynchronous dispatch
        keys = self.keys
        self.keys, self.frames, self.audio = [], [], []
        self.collect()
        self.inflight = (keys, out)

    def collect(self) -> None:
        if self.inflight is None:
            return
        keys, out = self.inflight
        self.inflight = None
        if self.model.kind == "offset":
            logits, probs = (np.asarray(x) for x in out)
            for i, key in enumerate(keys):
                self.deliver(key, {"logits": logits[i], "probs": probs[i]})
        else:
            logits = np.asarray(out)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            p = e / e.sum(-1, keepdims=True)
            for i, key in enumerate(keys):
                self.deliver(key, {"sync_logits": logits[i], "sync_prob": float(p[i, 1])})

    def flush(self) -> None:
        self._dispatch()
        self.collect()


# ----------------------------------------------------------------------- results


def _topk(grid: np.ndarray, logits: np.ndarray, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"offset_sec": round(float(grid[c]), 6), "class": int(c), "prob": float(probs[c]),
             "logit": float(logits[c])} for c in order]


class _Video:
    def __init__(self, index: int, path: str):
        self.index, self.path = index, path
        self.record: dict[str, Any] = {"path": path, "ok": True, "error": None}
        self.windows: list[dict[str, Any]] = []
        self.pending = 0
        self.planned = False  # all windows are queued

    @property
    def done(self) -> bool:
        return self.planned and self.pending == 0

    def fail(self, message: str) -> None:
        self.record.update(ok=False, error=_one_line(message))
        self.planned = True


def _finish(video: _Video, offset_model: Optional[PredictModel], topk: int) -> dict[str, Any]:
    rec = dict(video.record)
    if not rec["ok"]:
        rec.update(windows=[], aggregate=None)
        return rec
    windows = []
    for w in video.windows:
        out = {k: w[k] for k in ("v_start_sec", "offset_applied_sec", "v_start_frame", "a_start_sample")}
        if offset_model is not None:
            out["offset_applied_class"] = w["offset_applied_class"]
            out["topk"] = _topk(offset_model.grid, w["logits"], w["probs"], topk)
            out["logits"] = [float(x) for x in w["logits"]]
            out["probs"] = [float(x) for x in w["probs"]]
        else:
            out["offset_applied_class"] = None
            out["topk"] = None
        out["sync_prob"] = w.get("sync_prob")
        windows.append(out)
    agg: dict[str, Any] = {"num_windows": len(windows)}
    if offset_model is not None:
        mean = np.mean([w["probs"] for w in video.windows], axis=0)
        best = int(np.argmax(mean))
        agg.update(offset_sec=round(float(offset_model.grid[best]), 6), **{"class": best},
                   confidence=float(mean[best]), probs=[float(x) for x in mean],
                   topk=[{k: v for k, v in t.items() if k != "logit"}
                         for t in _topk(offset_model.grid, np.zeros_like(mean), mean, topk)],
                   window_agreement=float(np.mean([int(np.argmax(w["probs"])) == best for w in video.windows])))
    sync = [w["sync_prob"] for w in video.windows if w.get("sync_prob") is not None]
    agg["sync_prob"] = float(np.mean(sync)) if sync else None
    rec.update(windows=windows, aggregate=agg)
    return rec


# ------------------------------------------------------------------------ windows


def _window_fits(clip, config, offset: float, frame: int) -> bool:
    """Whether the window starting at `frame`, its audio shifted by `offset`, lies inside
    the clip: the official crop arithmetic (`inference.window_inputs`) without cutting."""
    from synchformer_jax import inference
    from synchformer_jax.input import transforms
    from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY

    t = inference.frame_exact_sec(frame)
    if transforms.sec2frames(t + round(offset, 2), inference.AUDIO_RATE) < 0:
        # The official code moves an audio start up to one frame before the clip to 0,
        # which would apply another shift than asked for; a window a frame later does not.
        return False
    try:
        transforms.plan_sync_example(
            clip.num_frames, clip.audio.shape[0], clip.frames.shape[1], clip.frames.shape[2], train=False,
            offset_sec=offset, v_start_i_sec=t,
            synchronizability=config.sync.head == HEAD_SYNCHRONIZABILITY, crop_size=config.video.img_size,
            n_segments=config.n_segments, max_off_sec=config.sync.max_offset_sec,
            grid_size=config.sync.num_offset_classes, clip_max_len_sec=math.inf)
    except ValueError:
        return False
    return True


def _window_starts(clip, lead, settings) -> Iterator[tuple[float, int]]:
    """`(v_start_sec, frame)` of the windows to score for one clip: every stride from the
    first start that fits to the last one, which is always included. With an offset the
    shifted audio moves both ends (a negative one needs a later first start, a positive
    one an earlier last), so they are searched for, not taken as 0 and the video's end."""
    from synchformer_jax import inference
    from synchformer_jax.input import transforms

    if settings["v_start_sec"] is not None:
        t = float(settings["v_start_sec"])
        yield t, int(t * inference.VIDEO_FPS)
        return
    stride = max(1, math.floor(settings["stride_sec"] * inference.VIDEO_FPS + 0.5))
    crop = int(_crop_len(lead.config) * inference.VIDEO_FPS)
    offset = float(settings["offset_sec"])
    # The official EqualifyFromRight length (its float truncation can drop the last frame).
    v_len, _ = transforms.equalify_from_right(clip.num_frames, clip.audio.shape[0], clip_max_len_sec=math.inf)
    first = next((f for f in range(0, v_len - crop + 1) if _window_fits(clip, lead.config, offset, f)), None)
    if first is None:
        return
    last = next(f for f in range(v_len - crop, first - 1, -1) if _window_fits(clip, lead.config, offset, f))
    starts = list(range(first, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)  # one more window ending where the last one fits, so that the end is covered
    for f in starts:
        yield inference.frame_exact_sec(f), f


def _plan_windows(video: _Video, clip, models: list[PredictModel], settings, batchers: list[_Batcher]) -> None:
    """Cut the clip into windows and queue them; raises PredictError if none fits."""
    from synchformer_jax import inference

    lead = models[0]
    offset = float(settings["offset_sec"])
    sliding = settings["v_start_sec"] is None
    reasons = []
    for t, frame in _window_starts(clip, lead, settings):
        try:
            inputs = [inference.window_inputs(clip.frames, clip.audio, t, offset, config=m.config) for m in models]
        except ValueError as e:
            if not sliding:
                raise PredictError(f"window at {t:g} s with offset {offset:g} s does not fit: {e}") from e
            reasons.append(str(e))
            continue
        first = inputs[0]
        w = {"v_start_sec": round(frame / inference.VIDEO_FPS, 6) if sliding else t,
             "offset_applied_sec": first.offset_sec, "v_start_frame": first.v_start_frame,
             "a_start_sample": first.a_start_sample,
             "offset_applied_class": first.offset_class if lead.kind == "offset" else None}
        video.windows.append(w)
        key = (video, len(video.windows) - 1)
        for m, b, x in zip(models, batchers, inputs):
            video.pending += 1
            b.add(key, x.frames, x.audio)
    if not video.windows:
        need = _crop_len(lead.config)
        why = f" ({reasons[0]})" if reasons else ""
        raise PredictError(f"too short for one {need:g} s window with offset {offset:g} s: "
                           f"{clip.duration_sec:.2f} s{why}")
    video.planned = True


# -------------------------------------------------------------------------- output


def _fmt_table(rec: dict[str, Any]) -> str:
    if not rec["ok"]:
        # The error line names the path already (docs/predict.md).
        prefix = f"{rec['path']}: "
        error = rec["error"][len(prefix):] if rec["error"].startswith(prefix) else rec["error"]
        return f"{prefix}ERROR {error}"
    ws = rec["windows"]
    lines = [f"{rec['path']}  ({rec['duration_sec']:.2f} s, {len(ws)} window{'s' if len(ws) != 1 else ''}"
             f"{', re-encoded' if rec.get('reencoded') else ''}{', silent audio' if rec.get('silent') else ''})"]
    has_off = ws and ws[0]["topk"] is not None
    has_sync = ws and ws[0]["sync_prob"] is not None
    k = len(ws[0]["topk"]) if has_off else 0
    head = f"  {'start s':>8} {'applied s':>9}"
    if has_off:
        head += "  " + "  ".join(f"{'top-' + str(i + 1):<15}" for i in range(k))
    if has_sync:
        head += f"  {'p(sync)':>7}"
    lines.append(head)
    for w in ws:
        row = f"  {w['v_start_sec']:8.2f} {w['offset_applied_sec']:9.2f}"
        if has_off:
            row += "  " + "  ".join(f"{t['offset_sec']:+5.2f} s ({t['prob']:.3f})" for t in w["topk"])
        if has_sync:
            row += f"  {w['sync_prob']:7.3f}"
        lines.append(row)
    a = rec["aggregate"]
    summary = "  video: "
    if has_off:
        summary += (f"offset {a['offset_sec']:+.2f} s (class {a['class']}), confidence {a['confidence']:.3f}, "
                    f"{a['window_agreement'] * 100:.0f}% of windows agree")
    if has_sync:
        summary += (", " if has_off else "") + f"p(sync) {a['sync_prob']:.3f}"
    lines.append(summary)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- run


def _conform(path: str, max_duration_sec: Optional[float]):
    from synchformer_jax import media

    return media.conform(path, max_duration_sec=max_duration_sec)


def run(paths: Sequence[str], models: list[PredictModel], settings: dict[str, Any], *,
        emit: Callable[[dict[str, Any]], None], error: Callable[[str], None], batch_size: int = 8,
        workers: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """Score `paths`; `emit(record)` is called per video in input order, `error(line)` per
    failed file. Returns the records."""
    from tqdm import tqdm

    from synchformer_jax import media

    inputs = expand_inputs(paths)
    offset_model = next((m for m in models if m.kind == "offset"), None)
    videos = [_Video(i, p) for i, (p, _) in enumerate(inputs)]
    results: list[Optional[dict[str, Any]]] = [None] * len(videos)
    next_emit = [0]
    bar = tqdm(total=len(videos), unit="video", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def flush_done() -> None:
        while next_emit[0] < len(videos) and videos[next_emit[0]].done:
            v = videos[next_emit[0]]
            rec = _finish(v, offset_model, settings["topk"])
            results[v.index] = rec
            if not rec["ok"]:
                error(rec["error"] if rec["error"].startswith(v.path) else f"{v.path}: {rec['error']}")
            emit(rec)
            bar.update(1)
            next_emit[0] += 1

    def deliver(key, out) -> None:
        video, i = key
        video.pending -= 1
        if video.record["ok"]:  # a failed video's queued windows are run and dropped
            video.windows[i].update(out)

    batchers = [_Batcher(m, batch_size, deliver) for m in models]
    lookahead = max(1, workers) + 1
    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queue: dict[int, futures.Future] = {}

        def submit(i: int) -> None:
            if i < len(videos) and inputs[i][1] is None:
                queue[i] = pool.submit(_conform, inputs[i][0], settings["max_duration_sec"])

        for i in range(min(lookahead, len(videos))):
            submit(i)
        for i, video in enumerate(videos):
            submit(i + lookahead)
            problem = inputs[i][1]
            if problem is not None:
                video.fail(f"{video.path}: {problem}")
                flush_done()
                continue
            try:
                clip = queue.pop(i).result()
                video.record.update(duration_sec=round(clip.duration_sec, 6), num_frames=clip.num_frames,
                                    reencoded=bool(clip.reencoded), silent=bool(clip.silent))
                _plan_windows(video, clip, models, settings, batchers)
                del clip
            except media.MediaError as e:
                video.fail(str(e))
            except (PredictError, ValueError, OSError, MemoryError) as e:
                video.fail(f"{video.path}: {e}")
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                video.fail(f"{video.path}: {type(e).__name__}: {e}")
            flush_done()
        for b in batchers:
            b.flush()
        flush_done()
    bar.close()
    return [r for r in results if r is not None]


def make_settings(*, v_start_sec: Optional[float] = None, offset_sec: float = 0.0,
                  stride_sec: Optional[float] = DEFAULT_STRIDE_SEC, topk: int = 5, batch_size: int = 8,
                  max_duration_sec: Optional[float] = None) -> dict[str, Any]:
    """The settings `run` takes (and the JSON document reports)."""
    return {"v_start_sec": v_start_sec, "offset_sec": float(offset_sec),
            "stride_sec": None if v_start_sec is not None else stride_sec, "topk": int(topk),
            "batch_size": int(batch_size), "max_duration_sec": max_duration_sec}


def cmd_predict(args: argparse.Namespace) -> int:
    from synchformer_jax.cli import _parse_overrides

    def usage(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if args.v_start_sec is not None and args.stride_sec is not None:
        return usage("give --v-start-sec (one window) or --stride-sec (sliding windows), not both")
    stride = DEFAULT_STRIDE_SEC if args.stride_sec is None else args.stride_sec
    # NaN passes every `<=` test and would fail per file, deep in the window arithmetic.
    if not (math.isfinite(stride) and stride > 0):
        return usage("--stride-sec must be a finite number > 0")
    if args.v_start_sec is not None and not (math.isfinite(args.v_start_sec) and args.v_start_sec >= 0):
        return usage(f"--v-start-sec must be a finite number >= 0, got {args.v_start_sec}")
    if not math.isfinite(args.offset_sec):
        return usage(f"--offset-sec must be a finite number of seconds, got {args.offset_sec}")
    if args.max_duration_sec is not None and not (math.isfinite(args.max_duration_sec) and args.max_duration_sec > 0):
        return usage(f"--max-duration-sec must be a finite number > 0, got {args.max_duration_sec}")
    try:
        mesh = local_mesh(args.devices)
    except PredictError as e:
        return usage(str(e))
    main = PredictModel(args.checkpoint, _parse_overrides(args.set), "main", args.topk, mesh=mesh)
    models = [main]
    if args.sync_checkpoint:
        if main.kind == "sync":
            return usage(f"{args.checkpoint} is already a synchronizability model; give an offset model as "
                         "--checkpoint to use --sync-checkpoint")
        models.append(PredictModel(args.sync_checkpoint, _parse_overrides(args.sync_set), "sync", args.topk,
                                   mesh=mesh))
    offset_model = next((m for m in models if m.kind == "offset"), None)
    sync_model = next((m for m in models if m.kind == "sync"), None)
    topk = args.topk
    if offset_model is not None:
        # A synchronizability model alone has no offset classes: any shift is an input.
        try:
            applied, k, on_grid = check_offset(args.offset_sec, offset_model.grid)
        except ValueError as e:
            return usage(str(e))
        if not on_grid:
            print(off_grid_warning(applied, k, offset_model.grid), file=sys.stderr)
        topk = min(topk, len(offset_model.grid))  # the lists hold at most every class
    settings = make_settings(v_start_sec=args.v_start_sec, offset_sec=args.offset_sec, stride_sec=stride,
                             topk=topk, batch_size=args.batch_size, max_duration_sec=args.max_duration_sec)
    header = {"schema": SCHEMA, "model": offset_model.describe() if offset_model else None,
              "sync_model": sync_model.describe() if sync_model else None,
              "settings": settings}

    from tqdm import tqdm

    def emit(rec: dict[str, Any]) -> None:
        if args.jsonl:
            sys.stdout.write(json.dumps(dict(rec, schema=SCHEMA)) + "\n")
            sys.stdout.flush()
        elif not args.json:
            tqdm.write(_fmt_table(rec), file=sys.stdout)

    def error(line: str) -> None:
        tqdm.write(f"error: {_one_line(line)}", file=sys.stderr)

    records = run(args.paths, models, settings, emit=emit, error=error, batch_size=args.batch_size,
                  workers=args.workers, progress=not args.no_progress)
    failed = sum(1 for r in records if not r["ok"])
    if args.json:
        doc = dict(header, videos=records, num_videos=len(records), num_errors=failed)
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        sys.stdout.flush()
    if failed:
        print(f"{failed} of {len(records)} input(s) could not be scored", file=sys.stderr)
        return 1
    return 0


def add_predict_parser(sub) -> None:
    """Register `predict` on the `synchformer-jax` subparsers."""
    from synchformer_jax.cli import _positive_int

    p = sub.add_parser("predict", help="offset (and synchronizability) of video files: per window top-k, "
                                       "per video an aggregate; table, --json or --jsonl")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="video files (any format), folders (recursive, video extensions) or glob patterns")
    p.add_argument("--checkpoint", required=True,
                   help="model folder or official .pt/.pth/.safetensors (offset or synchronizability head)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override for --checkpoint, e.g. video.num_heads=4 (repeatable)")
    p.add_argument("--sync-checkpoint", help="a synchronizability (stage III) model scored on the same windows "
                                             "next to the offset model of --checkpoint")
    p.add_argument("--sync-set", action="append", metavar="KEY=VALUE", help="overrides for --sync-checkpoint")
    p.add_argument("--v-start-sec", type=float, help="score one window starting here (official --v_start_i_sec)")
    p.add_argument("--offset-sec", type=float, default=0.0,
                   help="take the audio this much later than the video (official --offset_sec; default 0); "
                        "inside the offset model's class grid (-2 ... +2 s), best one of its classes")
    p.add_argument("--stride-sec", type=float,
                   help=f"sliding windows every this many seconds (default {DEFAULT_STRIDE_SEC})")
    p.add_argument("--topk", type=_positive_int, default=5, help="offset classes listed per window (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per device batch (default 8)")
    p.add_argument("--devices", type=_positive_int,
                   help="data parallel over the first N local devices (default: all of them)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads running ahead of the model")
    p.add_argument("--max-duration-sec", type=float, help="use at most this much of each video")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON document on stdout (docs/predict.md)")
    out.add_argument("--jsonl", action="store_true", help="one JSON line per video on stdout, as they finish")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(fn=cmd_predict)
