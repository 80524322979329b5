"""Building a stage-II feature cache (`synchformer_jax.feature_cache`): resumable, in parts.

`build_feature_cache(model, shards, out_dir)` runs the frozen extractors over every
segment of the cache grid of every clip and writes one output shard per source shard.
At AudioSet scale (2 M clips, ~11 TFLOP of extractor work per 10-s clip at full size)
one build is hours of accelerator time, so:

* **Resumable.** Each finished output shard gets a sidecar (`<shard>.json`: its index
  rows, skipped clips, the source shard's size / mtime / sha256 and the build key: the
  record format, extractors' sha256, grid, crop, storage and compute dtypes). A rerun skips every shard
  whose sidecar has the same key and an unchanged source, and rebuilds the rest; an
  interrupted shard (no sidecar) is written again.
* **In parts.** `part=(i, n)` builds the source shards `si` with `si % n == i`, so `n`
  processes (one per accelerator or host, `synchformer-jax cache --part i/n`) share one
  build in one folder without talking to each other. Whichever finishes last finds every
  sidecar present and writes `index.npz` and `manifest.json` (the manifest last: it is
  what makes the folder a cache); the others return None.
* **Decode ahead.** Records are decoded and cut into segments on `decode_threads` threads
  while the accelerator runs the extractors on earlier clips.
* **Loses nothing.** A broken or too-short clip is skipped and listed in the manifest;
  a folder holding shards of other extractors or settings is refused (`CacheMismatchError`)
  unless `overwrite=True`, and a rebuild first removes the manifest, so a half-rebuilt
  folder is never taken for a cache.

`build_for_config(config, train_paths)`: the cache of a stage-II config, computed by the
extractors that stage starts from (its `init_from`, copied into the trainer's initial
state) in its own compute dtype: what `train` checks a cache against.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import pathlib
import time
from collections import deque
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from synchformer_jax import records
from synchformer_jax.feature_cache import (FORMAT_VERSION, INDEX, MANIFEST, RECORD_OPTIONS, CacheGrid,
                                           CacheMismatchError, audio_phases, encode_clip, extractor_params_sha256,
                                           grid_for, official_deviation, same_source, shard_record)
from synchformer_jax.input import transforms
from synchformer_jax.input.shards import write_atomic, write_json_atomic

__all__ = ["build_feature_cache", "build_for_config", "parse_part", "SIDECAR_SUFFIX"]

_log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
OUTPUT_NAME = "features"


def _load(model) -> Tuple[Any, Any]:
    if isinstance(model, (str, os.PathLike)):
        from synchformer_jax import pretrained

        loaded = pretrained.load_model(model)
        return loaded.params, loaded.config
    params, config = model
    return params, config


class _Extractors:
    """Jitted frozen extractors over fixed-size chunks (one compile per stream)."""

    def __init__(self, params, config, chunk: int):
        import jax
        import jax.numpy as jnp

        from synchformer_jax.input import melspec, normalize
        from synchformer_jax.models import synchformer as sf

        model = sf.build_model(config)
        self.chunk = int(chunk)

        @jax.jit
        def video(p, seg_u8):  # [N, 16, H, W, 3] uint8
            x = jnp.moveaxis(seg_u8, -1, -3)
            x = normalize.video_uint8_to_model_input(x, half=True, dtype=jnp.float32)
            # float32 input, as `Task.model_inputs` gives the model (it casts inside).
            return model.apply({"params": p}, x, method="video_segment_features")

        @jax.jit
        def audio(p, wav):  # [N, 10240]
            spec = melspec.log_mel_jax(wav)[:, 0]
            return model.apply({"params": p}, spec, method="audio_segment_features")

        self.params = params
        self._video, self._audio = video, audio

    def _run(self, fn, x: np.ndarray, out_dtype) -> np.ndarray:
        n = x.shape[0]
        outs = []
        for i in range(0, n, self.chunk):  # dispatch every chunk first, then wait for them
            part = x[i:i + self.chunk]
            pad = self.chunk - part.shape[0]
            if pad:
                part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
            outs.append((fn(self.params, part), self.chunk - pad))
        return np.concatenate([np.asarray(y, dtype=out_dtype)[:keep] for y, keep in outs])

    def video(self, seg_u8, out_dtype):
        return self._run(self._video, seg_u8, out_dtype)

    def audio(self, wav, out_dtype):
        return self._run(self._audio, wav, out_dtype)


def _clip_inputs(rec: records.ClipRecord, grid: CacheGrid, img_size: int):
    """Decoded record -> (video segments uint8 [Nv,16,h,w,3], audio segments [Na,10240], v_len, a_len)."""
    import av

    from synchformer_jax.input import pipeline

    if int(rec.fps) != transforms.VIDEO_FPS or int(rec.sample_rate) != transforms.AUDIO_RATE:
        raise ValueError(f"not at the input contract: {rec.fps} fps, {rec.sample_rate} Hz")
    n_frames = int(rec.num_frames)
    if n_frames <= 0:
        raise ValueError("record does not give num_frames")
    v_len, a_len = transforms.equalify_from_right(n_frames, int(rec.audio.shape[0]))
    with av.open(io.BytesIO(rec.video_mp4)) as container:
        ctx = container.streams.video[0].codec_context
        top_left = transforms.center_crop_top_left(int(ctx.height), int(ctx.width), img_size)
        frames = pipeline.decode_video_bytes(b"", start=0, stop_after=v_len - 1, top_left=top_left,
                                             size=(img_size, img_size), container=container)
    v_len = min(v_len, frames.shape[0])  # windows past the decodable frames would break the raw path too
    nv, na = grid.num_video_entries(v_len), grid.num_audio_entries(a_len)
    if nv < grid.n_segments:
        # Both streams were cut to the shorter one: say so when the audio was it.
        a_sec, v_sec = rec.audio.shape[0] / transforms.AUDIO_RATE, n_frames / transforms.VIDEO_FPS
        why = f" (its {a_sec:.2f} s of audio cut the {v_sec:.2f}-s video)" if a_sec < v_sec else ""
        raise ValueError(f"clip of {v_len} frames is too short for {grid.n_segments} segments{why}")
    fidx = grid.video_starts(nv)[:, None] + np.arange(grid.segment_frames)[None]
    sidx = grid.audio_starts(na)[:, None] + np.arange(grid.segment_samples)[None]
    audio = np.asarray(rec.audio[:a_len], np.float32)
    return frames[fidx], audio[sidx], v_len, a_len


def _anchor_sec(labels: Optional[Dict[str, Any]]) -> float:
    """The time of the record's only event (the synthetic onset / pulse clips), NaN for
    none or several: a window curriculum can only centre windows on a single event."""
    events = (labels or {}).get("events")
    if isinstance(events, (list, tuple)) and len(events) == 1 and isinstance(events[0], dict) \
            and "time_sec" in events[0]:
        return float(events[0]["time_sec"])
    return float("nan")


# ------------------------------------------------------------------ one source shard


def _decoded(data, grid: CacheGrid, img: int):
    """One source record -> (clip_id, inputs) or (clip_id, exception); runs on a thread."""
    from synchformer_jax.input.sources import Broken

    clip = "?"
    try:
        if isinstance(data, Broken):
            raise ValueError(data.error)
        rec = records.decode(data)
        clip = rec.clip_id or "?"
        return clip, (rec, _clip_inputs(rec, grid, img))
    except Exception as exc:  # noqa: BLE001 - one bad clip must not stop the build
        return clip, exc


def _decode_ahead(src, grid: CacheGrid, img: int, threads: int) -> Iterator[Tuple[int, str, Any]]:
    """`(i, clip_id, inputs or exception)` for every record of `src`, in order, decoded
    `threads` at a time (PyAV decodes outside the GIL) a few records ahead of the consumer."""
    if threads <= 0:
        for i in range(len(src)):
            yield (i, *_decoded(src[i], grid, img))
        return
    ahead: deque = deque()
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cache-decode") as pool:
        for i in range(len(src)):
            ahead.append((i, pool.submit(_decoded, src[i], grid, img)))
            if len(ahead) > 2 * threads:
                j, future = ahead.popleft()
                yield (j, *future.result())
        while ahead:
            j, future = ahead.popleft()
            yield (j, *future.result())


def _build_shard(path: str, out_path: pathlib.Path, ext: _Extractors, grid: CacheGrid, img: int, dtype,
                 decode_threads: int) -> dict:
    """Every clip of one source shard -> one output shard; returns the sidecar's body."""
    from synchformer_jax.input import shards as shard_lib
    from synchformer_jax.input.sources import ArrayRecordSource

    t0 = time.perf_counter()
    src = ArrayRecordSource([path])
    index: Dict[str, list] = {"clip_id": [], "v_len": [], "a_len": [], "nv": [], "na": [], "anchor_sec": []}
    skipped: List[str] = []
    n_bytes = 0
    with shard_lib.ShardWriter(out_path, "array_record", RECORD_OPTIONS) as writer:
        for i, clip, got in _decode_ahead(src, grid, img, decode_threads):
            try:
                if isinstance(got, Exception):
                    raise got
                rec, (vseg, aseg, v_len, a_len) = got
                vfeat, afeat = ext.video(vseg, dtype), ext.audio(aseg, dtype)
            except Exception as exc:  # noqa: BLE001 - one bad clip must not stop the build
                msg = f"{path}#{i} clip {clip!r}: {type(exc).__name__}: {exc}"
                _log.warning("feature cache: skipping %s", msg)
                skipped.append(msg)
                continue
            for payload in encode_clip(rec.clip_id, vfeat, afeat, v_len, a_len, audio_phases(grid)):
                n_bytes += len(payload)
                writer.write(payload)
            for k, v in (("clip_id", rec.clip_id), ("v_len", int(v_len)), ("a_len", int(a_len)),
                         ("nv", int(vfeat.shape[0])), ("na", int(afeat.shape[0])),
                         ("anchor_sec", _anchor_sec(rec.labels))):
                index[k].append(v)
        shard = writer.close()
    # NaN anchors as null: the sidecar is strict JSON.
    index["anchor_sec"] = [None if np.isnan(a) else a for a in index["anchor_sec"]]
    return {"shard": shard, "index": index, "skipped": skipped, "bytes": n_bytes,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ sidecars, manifest


def _read_sidecar(path: pathlib.Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a torn or foreign file: built again
        _log.warning("feature cache: unreadable sidecar %s (%s); its shard is built again", path, e)
        return None


def _output_intact(path: pathlib.Path, side: dict) -> bool:
    """The output shard is there at the size its sidecar recorded (a cheap check; the
    sha256 in the sidecar is for a full audit)."""
    try:
        return path.stat().st_size == side["shard"]["bytes"]
    except (OSError, KeyError, TypeError):
        return False


def _key_difference(have: dict, want: dict) -> str:
    return ", ".join(f"{k}: {have.get(k)!r} (building {want[k]!r})" for k in want if have.get(k) != want[k])


def _finalise(out_dir: pathlib.Path, paths: Sequence[str], names: Sequence[str], key: dict,
              config, grid: CacheGrid, max_off: float) -> Optional[dict]:
    """`index.npz` + `manifest.json` from the sidecars once every shard has one; None
    (and what is missing) while another part is still building."""
    sides, missing = [], []
    for path, name in zip(paths, names):
        side = _read_sidecar(out_dir / (name + SIDECAR_SUFFIX))
        if side is None or side.get("key") != key or not same_source(side["source"], path) \
                or not _output_intact(out_dir / name, side):
            missing.append(name)
        sides.append(side)
    if missing:
        _log.info("feature cache %s: %d of %d shards still to build (other parts), e.g. %s", out_dir,
                  len(missing), len(names), missing[0])
        return None
    index = {k: [v for s in sides for v in s["index"][k]] for k in sides[0]["index"]}
    n_clips = len(index["clip_id"])
    n_bytes = sum(s["bytes"] for s in sides)

    def write_index(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, clip_id=np.array(index["clip_id"], dtype=str),
                     anchor_sec=np.array([np.nan if a is None else a for a in index["anchor_sec"]], np.float64),
                     **{k: np.array(index[k], np.int64) for k in ("v_len", "a_len", "nv", "na")})

    write_atomic(out_dir / INDEX, write_index)
    manifest = {
        "format_version": FORMAT_VERSION,
        "grid": key["grid"],
        "crop": key["crop"],
        "video_normalisation": "official float16 (half=True)",
        "dtype": key["dtype"],  # storage; the compute dtype is model_config["dtype"]
        "feature_dims": {"video": int(config.video.embed_dim), "audio": int(config.audio.hidden_size)},
        "model_config": config.to_dict(),
        "extractor_params_sha256": key["extractor_params_sha256"],
        "source_shards": [str(p) for p in paths],
        "source_shard_files": [s["source"] for s in sides],
        "shards": [s["shard"] for s in sides],
        "num_clips": n_clips,
        "skipped": [m for s in sides for m in s["skipped"]],
        "bytes_per_clip": (n_bytes / n_clips) if n_clips else 0.0,
        "build_seconds": sum(s["seconds"] for s in sides),  # summed over shards (and parts)
        "official_deviation": official_deviation(grid, max_off_sec=max_off, grid_size=len(grid.offset_frames)),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)  # last: its presence makes the folder a cache
    return manifest


def parse_part(text: str) -> Tuple[int, int]:
    """`"i/n"` -> `(i, n)` with `0 <= i < n`."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        i = n = -1
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"part {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def build_feature_cache(model, shard_paths, out_dir, *, batch_size: int = 64, dtype=np.float16,
                        n_segments: Optional[int] = None, max_off_sec: Optional[float] = None,
                        part: Tuple[int, int] = (0, 1), decode_threads: int = 4,
                        overwrite: bool = False) -> Optional[dict]:
    """Extract and store the frozen-extractor features of every clip of `shard_paths`
    (this part's shards; see the module doc). Returns the manifest once the whole cache
    is built, None while other parts still have shards to build.

    `model`: a model folder / official checkpoint path, or `(params, model_config)`.
    `batch_size`: segments per extractor call. `dtype`: the storage dtype.
    """
    from synchformer_jax.input import shards as shard_lib
    from synchformer_jax.input.sources import expand_paths

    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part {index}/{count}: expected 0 <= i < n")
    params, config = _load(model)
    n_segments = int(n_segments or config.n_segments)
    max_off = float(config.sync.max_offset_sec if max_off_sec is None else max_off_sec)
    grid = grid_for(n_segments, segment_frames=config.video.num_frames, max_off_sec=max_off,
                    grid_size=config.sync.num_offset_classes)
    img = int(config.video.img_size)
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):  # entries name their dtype by `dtype.str`, which bfloat16 lacks
        raise ValueError(f"feature cache storage dtype must be float16 or float32, got {dtype.name}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = expand_paths(shard_paths)
    if not paths:
        raise ValueError(f"feature cache: no source shards in {shard_paths!r}")
    names = [shard_lib.shard_name(OUTPUT_NAME, "train", "array_record", si, len(paths)) for si in range(len(paths))]
    # What a shard was built with; JSON-normalised so that a sidecar's copy compares equal.
    key = json.loads(json.dumps({
        "format_version": FORMAT_VERSION, "extractor_params_sha256": extractor_params_sha256(params),
        "grid": grid.to_dict(),
        "crop": {"kind": "centre", "size": img, "flip": False}, "dtype": dtype.name,
        "compute_dtype": str(config.dtype), "num_source_shards": len(paths)}))
    todo = []
    for si in range(index, len(paths), count):
        side = _read_sidecar(out_dir / (names[si] + SIDECAR_SUFFIX))
        if side is not None and side.get("key") == key and same_source(side["source"], paths[si]) \
                and _output_intact(out_dir / names[si], side):
            continue
        if side is not None and side.get("key") != key and not overwrite:
            raise CacheMismatchError(
                f"feature cache {out_dir}: {names[si]} was built with other settings "
                f"({_key_difference(side.get('key') or {}, key)}); build into another folder, or pass "
                "overwrite=True (synchformer-jax cache --overwrite) to rebuild it")
        todo.append(si)
    if todo:
        (out_dir / MANIFEST).unlink(missing_ok=True)  # a half-rebuilt folder is not a cache
        ext = _Extractors(params, config, batch_size)
    mine = len(range(index, len(paths), count))
    _log.info("feature cache %s: part %d/%d, %d of its %d shards to build (%d source shards in all)", out_dir,
              index, count, len(todo), mine, len(paths))
    for n, si in enumerate(todo):
        body = _build_shard(paths[si], out_dir / names[si], ext, grid, img, dtype, decode_threads)
        body.update(key=key, source=shard_record(paths[si]))
        write_json_atomic(out_dir / (names[si] + SIDECAR_SUFFIX), body)
        _log.info("feature cache %s: %s done (%d of %d of this part): %d clips, %d skipped, %.1f s", out_dir,
                  names[si], n + 1, len(todo), len(body["index"]["clip_id"]), len(body["skipped"]), body["seconds"])
    return _finalise(out_dir, paths, names, key, config, grid, max_off)


def build_for_config(config, train_paths: Sequence[str], *, out_dir=None, **kw) -> Optional[dict]:
    """The stage-II cache of `config` (`data.feature_cache`, or `out_dir`) over `train_paths`,
    made by the extractors the stage starts from (its `init_from`, copied into the
    trainer's initial state and kept frozen, so every entry is what the stage would
    compute itself), in the stage's own `train.compute_dtype` (training refuses features
    of another). `kw`: `build_feature_cache`'s options."""
    import jax

    from synchformer_jax import train

    out_dir = out_dir or config.data.get("feature_cache", "")
    if not out_dir:
        raise ValueError("no folder for the feature cache: set data.feature_cache (or pass out_dir)")
    if not config.get("init_from", ""):
        _log.warning("feature cache: the config has no init_from, so the cache holds the features of randomly "
                     "initialised extractors (stage II starts from trained ones: set --config.init_from)")
    trainer = train.build_trainer(config)
    state, notes = train.initial_state(trainer, jax.random.key(config.seed))
    for note in notes:
        _log.info(note)
    params = jax.device_get(state.params)
    return build_feature_cache((params, trainer.task.model_config), train_paths, out_dir, **kw)
