"""Per-segment feature cache for stage II (frozen extractors in eval mode).

Stage II trains the projections and the sync transformer on top of extractors that are
frozen *and* in eval mode, so the extractor output of a given segment never changes
during the stage. Those outputs are computed once per clip, on a fixed grid of segments
(`feature_cache_build`, `synchformer-jax cache`: resumable, in parts), and this module
serves training batches that are gathers of cached entries.

The grid (derived from `input.transforms`, asserted there, never hard-coded):

* The official eval window is a 5-s crop (`v_crop = 125` frames, `a_crop = 80 000`
  samples) whose `S` segments are centred: `generate_segments(125, 80000, S)` starts them
  at frame `v0` (2 for S = 14, 50 for S = 2) and sample `a0 = 640 * v0`, with strides of
  8 frames / 5 120 samples.
* Video entries: 16-frame segments starting at frames `p + 8 m` (`p = v0 % 8`).
  Audio entries: 10 240-sample segments starting at samples `640 * (p + n)`, i.e. one
  per video frame.
* A window whose video crop starts at frame `8 g` (on the segment-step grid) with offset
  class `j` (`o_j = grid[j] * 25` frames, a multiple of 5 since the class step is 0.2 s)
  has its audio crop at sample `640 * (8 g + o_j)`; its segments are video entries
  `g + (v0 - p) / 8 + k` and audio entries `8 g + o_j + v0 - p + 8 k`, `k < S`.

Truncations. The cache places audio on exact multiples of 640 samples. The official
formula `a_start_i = int((v_start_i / 25 + round(offset, 2)) * 16000)` (random branch;
the fixed branch starts from the requested seconds `v_start_sec` and truncates
`int(v_start_sec * 25)` too) is evaluated in float64 and can land one sample below
the exact value: `official_deviation()` enumerates it; over all grid windows of
clips up to 60 s the deviation is 0 or -1 sample (never more), and the video frame
index never differs when the window is given in integer frames (the random
branch). With requested seconds `8 g / 25` the fixed branch can truncate the video
start to `8 g - 1` (the `2.28 s -> frame 56` quirk); those windows are not cache
windows. In a 10-s clip 32 of the 297 grid windows (11 %) have the -1-sample audio
deviation; the cache uses the exact sample (a 1/16000 s difference, far below the
0.2-s class step and the official ±0.05-s training jitter).

Sampling: `CacheTrainIterator` draws clips, classes and starts with the official
stage-II distribution (clip, then class, then start, each uniform; see its doc), with
these restrictions vs the official train transforms (documented, on purpose): the cache
holds the centre crop only (official training: random crop and horizontal flip), video
starts on the 8-frame grid only (officially any frame; a clip only just long enough for
a class can lose it, e.g. -0.4 s in a 5.4-s clip), centred segments inside the crop
(officially a random segment start in `[0, 125 - v_seq]`), and no ±0.05 s audio jitter.
Evaluation stays on the raw path.

Window curriculum (`CacheTrainIterator(window_curriculum=...)`, synthetic demo only):
phases that draw only windows whose video segments are centred near the clip's single
event (its `anchor_sec`), widening phase by phase, before the uniform draw.

Storage: uncompressed ArrayRecord shards, `1 + P` records per clip in clip order
(`encode_clip`; `P = audio_entry_stride = 8`): the video entries `vfeat [Nv, 8, D]` (with
the clip id and counts), then the audio entries of each phase, `afeat[r::P] [~Na/P, 6, D]`.
A window's audio entries are `P` apart, so a training row reads the video record and one
audio record: ~0.65 MB of a 10-s clip's 2.5 MB at full size. + `index.npz` (per-clip
lengths / counts and `anchor_sec`, in clip order; caches from before `anchor_sec` load
with NaN anchors) + `manifest.json` (format version, grid, crop, storage dtype, model
config (its `dtype`: the compute dtype of the features), sha256 of the extractor params,
source shards with their size, mtime and sha256, bytes per clip, skipped records).

Damage: a shard whose record count is not what its build wrote, or records whose headers
are not the index's clips, stop training at start-up with the shard named and the fix
(`CacheMismatchError`). A single record that cannot be read is skipped in training: the
row that drew it is reported like a broken clip (`meta["skipped"]`, `skipped.jsonl`) and
replaced by a stand-in draw that depends only on the step and the row, so batches do not
depend on when the damage was found (`CacheTrainIterator.batch`).

Fit (`train_iterator`, `check_model_fit`): the model's segment grid and classes
(`model.n_segments`, `model.video.num_frames`, `model.sync.num_offset_classes`,
`model.sync.max_offset_sec`), extractor widths and compute dtype (`train.compute_dtype`)
must be the cache's; a mismatch is a `CacheMismatchError` naming both and the fix.

Staleness (`verify_for_training`, called by the trainer once its state exists): a cache
only stands in for the clips when it was computed by the run's own frozen extractors
from the run's own training shards. Both are checked at training start: the sha256 of
the run's extractor params against the recorded one, and the configured shards against
the recorded sources by content (a shard whose path, size and mtime are as recorded
counts as unchanged, as make and rsync decide; any other shard is hashed), so a moved
copy passes and a rewritten shard does not.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import struct
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from synchformer_jax.input import transforms
from synchformer_jax.input.shards import sha256_file

__all__ = ["CacheGrid", "grid_for", "official_deviation", "audio_phases", "encode_clip", "decode_part",
           "FeatureCache", "CacheTrainIterator", "train_iterator",
           "extractor_params_sha256", "shard_record", "same_source", "verify_for_training", "CacheMismatchError",
           "BrokenRecordError",
           "check_model_fit", "built_compute_dtype",
           "MANIFEST", "INDEX"]

_log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.npz"
_MAGIC = b"SFJC"
_PREFIX = struct.Struct("<4sI")
# 2: a clip is 1 + `audio_phases` records (video, then the audio of each phase), stored
# uncompressed; 1 (one zstd record per clip) read 4x the bytes a window needs and spent
# most of its read time decompressing what zstd shrank by ~8 %.
FORMAT_VERSION = 2
# One record per chunk (random access to each), no compression: float16 features barely
# compress and reading them uncompressed is a page-cache copy.
RECORD_OPTIONS = "group_size:1,uncompressed"
_MAX_STAND_INS = 100  # replacements tried for one training row whose record cannot be read


# ------------------------------------------------------------------------------ the grid


@dataclasses.dataclass(frozen=True)
class CacheGrid:
    """Where the cache entries sit and how a window maps onto them (see the module doc)."""
    n_segments: int
    segment_frames: int  # 16
    segment_samples: int  # 10240
    samples_per_frame: int  # 640
    step_frames: int  # 8: the segment stride = the window-start grid
    v0: int  # first segment's frame inside the 125-frame crop (centred)
    phase: int  # v0 % step_frames: video entries at phase + step * m, audio at spf * (phase + n)
    v_crop: int  # 125
    a_crop: int  # 80000
    offset_frames: Tuple[int, ...]  # per class, the offset in video frames (multiples of 5)

    @property
    def video_entry0(self) -> int:
        """Video entry of the first segment of the window starting at frame 0."""
        return (self.v0 - self.phase) // self.step_frames

    @property
    def audio_entry0(self) -> int:
        return self.v0 - self.phase

    @property
    def audio_entry_stride(self) -> int:
        return self.step_frames  # 5120 samples / 640

    def num_video_entries(self, v_len: int) -> int:
        return max(0, (v_len - self.phase - self.segment_frames) // self.step_frames + 1)

    def num_audio_entries(self, a_len: int) -> int:
        spf = self.samples_per_frame
        return max(0, (a_len - spf * self.phase - self.segment_samples) // spf + 1)

    def video_starts(self, nv: int) -> np.ndarray:
        return self.phase + self.step_frames * np.arange(nv, dtype=np.int64)

    def audio_starts(self, na: int) -> np.ndarray:
        return self.samples_per_frame * (self.phase + np.arange(na, dtype=np.int64))

    def valid_pairs(self, v_len: int, a_len: int, nv: Optional[int] = None, na: Optional[int] = None) -> np.ndarray:
        """`[G, K]` bool: window start `8 g` with class `j` fits the clip (official crop
        bounds, exact audio start >= 0) and all its entries are cached."""
        nv = self.num_video_entries(v_len) if nv is None else nv
        na = self.num_audio_entries(a_len) if na is None else na
        n_g = max(0, (v_len - self.v_crop) // self.step_frames + 1)
        g = np.arange(n_g, dtype=np.int64)[:, None]
        o = np.asarray(self.offset_frames, dtype=np.int64)[None]
        a_frame = self.step_frames * g + o
        ok = (a_frame >= 0) & (self.samples_per_frame * a_frame + self.a_crop <= a_len)
        ok &= (self.step_frames * g + self.v_crop <= v_len)
        ok &= (g + self.video_entry0 + self.n_segments - 1 < nv)
        ok &= (a_frame + self.audio_entry0 + self.audio_entry_stride * (self.n_segments - 1) < na)
        return ok

    def window_centre_sec(self, g) -> np.ndarray:
        """Centre time (s from the clip start) of the video segments of the windows starting
        at frames `8 g`: the segments, not the 5-s crop, are what the model sees, and they
        span frames `8 g + v0` to `8 g + v0 + step * (S - 1) + segment_frames` (exclusive;
        2 .. 122 of the 125-frame crop for S = 14, centre 62)."""
        span = self.step_frames * (self.n_segments - 1) + self.segment_frames
        g = np.asarray(g, dtype=np.float64)
        return (self.step_frames * g + self.v0 + span / 2) / transforms.VIDEO_FPS

    def window_entries(self, g: int, j: int) -> Tuple[np.ndarray, np.ndarray]:
        """Video and audio entry indices `[S]` of window (start `8 g`, class `j`)."""
        k = np.arange(self.n_segments, dtype=np.int64)
        v = g + self.video_entry0 + k
        a = self.step_frames * g + self.offset_frames[j] + self.audio_entry0 + self.audio_entry_stride * k
        return v, a

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def grid_for(n_segments: int, *, segment_frames: int = 16, crop_len_sec: float = 5.0,
             max_off_sec: float = 2.0, grid_size: int = 21) -> CacheGrid:
    """The cache grid of stage II with `n_segments`, derived from the transforms code."""
    v_fps, a_fps = transforms.VIDEO_FPS, transforms.AUDIO_RATE
    spf = a_fps // v_fps
    assert spf * v_fps == a_fps, "audio rate must be a multiple of the frame rate"
    v_crop = transforms.sec2frames(crop_len_sec, v_fps)
    a_crop = transforms.sec2frames(crop_len_sec, a_fps)
    seg = transforms.generate_segments(v_crop, a_crop, n_segments=n_segments, segment_size_vframes=segment_frames,
                                       step_size_seg=0.5, is_start_random=False)
    v0, a0 = int(seg.v_start_i), int(seg.a_start_i)
    seg_v = int(seg.v_ranges[0, 1] - seg.v_ranges[0, 0])
    seg_a = int(seg.a_ranges[0, 1] - seg.a_ranges[0, 0])
    # The stride, from the transform itself (a 2-segment run when the model has one).
    seg2 = transforms.generate_segments(v_crop, a_crop, n_segments=max(2, n_segments),
                                        segment_size_vframes=segment_frames, step_size_seg=0.5,
                                        is_start_random=False)
    step_v = int(seg2.v_ranges[1, 0] - seg2.v_ranges[0, 0])
    step_a = int(seg2.a_ranges[1, 0] - seg2.a_ranges[0, 0])
    assert a0 == spf * v0, f"centred audio start {a0} is not the video start {v0} in samples"
    assert step_a == spf * step_v, f"audio stride {step_a} is not the video stride {step_v} in samples"
    assert a_crop == spf * v_crop, "5-s crops must cover the same frames"
    grid = transforms.class_grid(max_off_sec, grid_size)
    offs = []
    for value in grid.tolist():
        off = round(value, 2) * v_fps
        o = int(round(off))
        assert abs(off - o) < 1e-6, f"offset class {value} s is not a whole number of frames"
        offs.append(o)
    return CacheGrid(int(n_segments), seg_v, seg_a, spf, step_v, v0, v0 % step_v, v_crop, a_crop, tuple(offs))


def official_deviation(grid: CacheGrid, max_len_sec: float = 60.0, max_off_sec: float = 2.0,
                       grid_size: int = 21) -> Dict[str, int]:
    """Official vs cache placement over every grid window (audio start >= 0) of clips up
    to `max_len_sec`.

    `audio_random`: `int((v_start_i / 25 + round(off, 2)) * 16000) - 640 * (v_start_i + o)`
    (the random/train branch; `v_start_i` is an integer frame there).
    `audio_fixed`, `video_fixed`: the fixed-offset branch with `v_start_sec = v_start_i / 25`.
    Returns min/max of each in samples / frames.
    """
    v_fps, a_fps = transforms.VIDEO_FPS, transforms.AUDIO_RATE
    values = transforms.class_grid(max_off_sec, grid_size).tolist()
    out = {"audio_random_min": 0, "audio_random_max": 0, "audio_fixed_min": 0, "audio_fixed_max": 0,
           "video_fixed_min": 0, "video_fixed_max": 0}
    for vs in range(0, int(max_len_sec * v_fps) + 1, grid.step_frames):
        sec = vs / v_fps
        vfix = transforms.sec2frames(sec, v_fps) - vs
        out["video_fixed_min"] = min(out["video_fixed_min"], vfix)
        out["video_fixed_max"] = max(out["video_fixed_max"], vfix)
        for value, o in zip(values, grid.offset_frames):
            exact = grid.samples_per_frame * (vs + o)
            if exact < 0:  # not a window (the official clamp only covers > -640)
                continue
            d = transforms.sec2frames(sec + round(value, 2), a_fps) - exact
            out["audio_random_min"] = min(out["audio_random_min"], d)
            out["audio_random_max"] = max(out["audio_random_max"], d)
            out["audio_fixed_min"] = min(out["audio_fixed_min"], d)
            out["audio_fixed_max"] = max(out["audio_fixed_max"], d)
    return out


# --------------------------------------------------------------------------- records


def audio_phases(grid: CacheGrid) -> int:
    """Audio records per clip: a window's audio entries are `audio_entry_stride` apart, so
    each window reads entries of one residue (phase) modulo the stride only."""
    return grid.audio_entry_stride


def encode_clip(clip_id: str, vfeat: np.ndarray, afeat: np.ndarray, v_len: int, a_len: int,
                phases: int) -> List[bytes]:
    """One clip's records: the video entries, then the audio entries of each phase
    `r < phases` (`afeat[r::phases]`). Each is a self-describing header + array bytes."""
    def record(part: dict, array: np.ndarray) -> bytes:
        array = np.ascontiguousarray(array)
        head = dict(part, clip_id=clip_id, dtype=array.dtype.str, shape=list(array.shape))
        h = json.dumps(head, separators=(",", ":")).encode()
        return b"".join([_PREFIX.pack(_MAGIC, len(h)), h, array.tobytes()])

    video = record({"part": 0, "v_len": int(v_len), "a_len": int(a_len), "nv": int(vfeat.shape[0]),
                    "na": int(afeat.shape[0])}, vfeat)
    return [video] + [record({"part": 1 + r}, afeat[r::phases]) for r in range(phases)]


def decode_part(data: bytes) -> Tuple[dict, np.ndarray]:
    """One record of `encode_clip` -> (header, array view of the record's bytes)."""
    view = memoryview(data)
    magic, n = _PREFIX.unpack_from(view)
    if magic != _MAGIC:
        raise ValueError(f"not a feature-cache record (magic {bytes(magic)!r})")
    head = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + n]))
    return head, np.frombuffer(view[_PREFIX.size + n:], np.dtype(head["dtype"])).reshape(head["shape"])


# ----------------------------------------------------------------------------- build


EXTRACTORS = ("vfeat_extractor", "afeat_extractor")


def extractor_params_sha256(params) -> str:
    """sha256 over the float32 bytes of the extractor params (sorted paths)."""
    from flax import traverse_util

    h = hashlib.sha256()
    flat = traverse_util.flatten_dict(params)
    for path in sorted(flat):
        if path[0] not in EXTRACTORS:
            continue
        a = np.asarray(flat[path], dtype=np.float32)
        h.update("/".join(path).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- staleness


class CacheMismatchError(ValueError):
    """The cache was not computed by this run's frozen extractors from its training shards."""


class BrokenRecordError(CacheMismatchError):
    """One record of the cache cannot be read (`record`: its number)."""

    def __init__(self, message: str, record: int):
        super().__init__(message)
        self.record = record


def shard_record(path) -> Dict[str, Any]:
    """What the manifest keeps of one source shard: absolute path, size, mtime, sha256.
    The hash is one more sequential read of a shard the build decodes whole anyway."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
            "sha256": sha256_file(path)}


def _shard_digest(path: str, recorded_by_path: Dict[str, dict], recorded_sizes: set) -> Optional[str]:
    """The content sha256 of a configured shard, hashing only when it cannot be avoided;
    None when it cannot be any recorded source (its size matches none)."""
    st = os.stat(path)
    rec = recorded_by_path.get(os.path.abspath(path))
    if rec is not None and rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns:
        return rec["sha256"]
    if st.st_size not in recorded_sizes:
        return None
    return sha256_file(path)


def same_source(recorded: dict, path: str) -> bool:
    """`path` holds the shard `recorded` (a `shard_record`): by path, size and mtime, or
    else by content (a moved copy)."""
    return _shard_digest(path, {recorded.get("path"): recorded}, {recorded.get("size")}) == recorded.get("sha256")


def _shard_problems(manifest: dict, source_shards: Sequence[str]) -> List[str]:
    """How the configured shards differ from the cache's sources (empty: the same clips)."""
    configured = [os.fspath(p) for p in source_shards]
    recorded = manifest.get("source_shard_files")
    if recorded is None:
        # A cache from before the shards were recorded with checksums: paths only.
        old = sorted(os.path.abspath(p) for p in manifest.get("source_shards", []))
        if old == sorted(os.path.abspath(p) for p in configured):
            _log.warning("feature cache predates shard checksums: the clips of its %d source shards are not "
                         "checked for changes since it was built (rebuild it to get the check)", len(old))
            return []
        now = {os.path.abspath(p) for p in configured}
        return [x for x in (_listed("configured shards not among its sources", sorted(now - set(old))),
                            _listed("sources not configured", sorted(set(old) - now))) if x]
    by_path = {r["path"]: r for r in recorded}
    sizes = {r["size"] for r in recorded}
    unmatched = {}  # sha256 -> recorded paths not yet matched
    for r in recorded:
        unmatched.setdefault(r["sha256"], []).append(r["path"])
    extra, changed = [], []
    for p in configured:
        try:
            digest = _shard_digest(p, by_path, sizes)
        except OSError as exc:
            extra.append(f"{p} ({type(exc).__name__}: {exc.strerror or exc})")
            continue
        if digest is not None and unmatched.get(digest):
            unmatched[digest].pop()
        elif os.path.abspath(p) in by_path:
            changed.append(p)
        else:
            extra.append(p)
    missing = sorted(q for paths in unmatched.values() for q in paths
                     if q not in {os.path.abspath(c) for c in changed})
    return [x for x in (_listed("changed since the cache was built", changed),
                        _listed("configured shards not among its sources", extra),
                        _listed("sources not configured", missing)) if x]


def _listed(what: str, items: Sequence[str], first: int = 3) -> str:
    if not items:
        return ""
    more = f", ... ({len(items)} in all)" if len(items) > first else ""
    return f"{what}: {', '.join(items[:first])}{more}"


def _host_copy(tree):
    """Host numpy copies of (possibly sharded, multi-host) arrays."""
    import jax

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def verify_for_training(cache_dir, params, source_shards: Sequence[str], *, accept_other_shards: bool = False,
                        extractors_from: str = "") -> None:
    """Refuse a cache that does not stand in for this run's clips (`CacheMismatchError`).

    `params`: the run's parameters (their frozen extractors must be the ones the cache
    was built with: the head would otherwise learn on features that the evaluated and
    saved model never computes, so there is no switch for that). `source_shards`: the
    configured training shards, compared by content with the recorded sources.
    `accept_other_shards`: log the shard difference instead of refusing, for shards that
    hold the same clips in other files (a TFRecord copy of the ArrayRecord sources, a
    re-written set): rebuilding a cache means running both extractors over every clip.
    `extractors_from`: where the run's extractors came from (`init_from`), for the message.
    """
    cache_dir = pathlib.Path(cache_dir)
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    problems = []
    built = manifest.get("extractor_params_sha256")
    have = extractor_params_sha256(_host_copy({k: params[k] for k in EXTRACTORS if k in params}))
    if built != have:
        origin = f"from init_from {extractors_from}" if extractors_from else "randomly initialised: no init_from"
        problems.append(f"it was built by frozen extractors with params sha256 {str(built)[:12]}..., this run's "
                        f"extractors ({origin}) have {have[:12]}...: the head would learn on features the "
                        "trained model does not compute. Rebuild the cache from this run's init_from "
                        "(synchformer-jax cache --config <this config>) or set init_from to the model it was "
                        "built from")
    shard_problems = _shard_problems(manifest, source_shards)
    if shard_problems:
        what = f"its clips are not the configured training shards ({'; '.join(shard_problems)})"
        if accept_other_shards:
            _log.warning("feature cache %s: %s; accepted (data.feature_cache_accept_other_shards)", cache_dir, what)
        else:
            problems.append(what + ". Set data.train_shards to the cache's sources, rebuild the cache from the "
                            "configured shards, or set data.feature_cache_accept_other_shards=True when they "
                            "hold the same clips in other files")
    if problems:
        raise CacheMismatchError(f"feature cache {cache_dir} does not fit this run: " + "; and ".join(problems))


# ------------------------------------------------------------------------------ reading


class FeatureCache:
    """Random access to a built cache: `len` (clips), `cache[i]` (a clip's whole entry),
    `windows(triples)` (training rows, reading only the records they need), the index."""

    def __init__(self, cache_dir, memory_clips: int = 256):
        from synchformer_jax.input.sources import ArrayRecordSource

        self.dir = pathlib.Path(cache_dir)
        if not (self.dir / MANIFEST).is_file():
            built = sorted(p.name for p in self.dir.glob("*.json")) if self.dir.is_dir() else []
            why = (f"{len(built)} shards built, no {MANIFEST}: a build still running in parts, or interrupted "
                   "(run `synchformer-jax cache` again with the same settings: it builds what is missing)"
                   if built else "no such folder" if not self.dir.is_dir() else f"no {MANIFEST} (not a feature cache)")
            raise CacheMismatchError(f"feature cache {self.dir}: {why}")
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        version = self.manifest.get("format_version", 1)
        if version != FORMAT_VERSION:
            raise CacheMismatchError(
                f"feature cache {self.dir}: record format {version}, this synchformer-jax reads format "
                f"{FORMAT_VERSION} (a clip split into video and audio-phase records): build it again with "
                "synchformer-jax cache --overwrite")
        g = dict(self.manifest["grid"])
        g["offset_frames"] = tuple(g["offset_frames"])
        self.grid = CacheGrid(**g)
        self.phases = audio_phases(self.grid)
        self.records_per_clip = 1 + self.phases
        with np.load(self.dir / INDEX) as z:
            self.index = {k: z[k] for k in z.files}
        # Caches built before the anchors were stored: no clip has one.
        self.index.setdefault("anchor_sec", np.full(len(self.index["nv"]), np.nan))
        self._src = ArrayRecordSource([str(self.dir / s["file"]) for s in self.manifest["shards"]])
        self._check_counts()
        self._memory: "OrderedDict[int, np.ndarray]" = OrderedDict()  # record number -> array
        self._memory_lock = threading.Lock()  # the iterator's threads share the cache
        self._memory_records = int(memory_clips) * self.records_per_clip
        self._pairs: Dict[Tuple[int, int, int, int], np.ndarray] = {}
        self.broken: Dict[int, str] = {}  # record number -> why it cannot be read

    def _check_counts(self) -> None:
        """Every shard holds the records its build wrote, and they are the index's clips."""
        fix = ("run synchformer-jax cache again: it builds again every shard whose size differs from its "
               "sidecar's")
        for shard, have in zip(self.manifest["shards"], self._src.shard_lengths()):
            if have != shard["num_records"]:
                why = "cannot be opened" if have is None else f"holds {have} records"
                raise CacheMismatchError(f"feature cache {self.dir}: shard {shard['file']} {why}, its build wrote "
                                         f"{shard['num_records']} (damaged or replaced): {fix}")
        n_clips = len(self.index["nv"])
        if len(self._src) != n_clips * self.records_per_clip:
            raise CacheMismatchError(
                f"feature cache {self.dir}: its shards hold {len(self._src)} records but its index lists "
                f"{n_clips} clips of {self.records_per_clip} records each (index and shards of different "
                f"builds): {fix}")

    def __len__(self) -> int:
        return len(self.index["nv"])

    def __getitem__(self, i: int) -> dict:
        return self.entries([i])[int(i)]

    def _read(self, n: int):
        """Record `n` as bytes (or `Broken`). One by one: for these uncompressed records
        that is 2-3x the rate of array_record's parallel read (its thread pool costs more
        than the page-cache copy it spreads; bench/feature_cache.py --reads)."""
        return self._src[n]

    def _record(self, n: int) -> np.ndarray:
        """The array of record `n` (clip * records_per_clip + part), from memory or read;
        a read record's clip id is checked against the index."""
        from synchformer_jax.input.sources import Broken

        n = int(n)
        with self._memory_lock:
            if n in self._memory:
                self._memory.move_to_end(n)
                return self._memory[n]
        if n in self.broken:
            raise BrokenRecordError(self.broken[n], n)
        data = self._read(n)
        clip, part = divmod(n, self.records_per_clip)
        if isinstance(data, Broken):
            self.broken[n] = (f"feature cache {self.dir}: clip {clip} ({data.where}) cannot be read: {data.error}. "
                              "Rebuild its shard: delete that shard's .json sidecar and run synchformer-jax cache "
                              "again")
            raise BrokenRecordError(self.broken[n], n)
        head, array = decode_part(data)
        if head["part"] != part or head["clip_id"] != str(self.index["clip_id"][clip]):
            raise CacheMismatchError(
                f"feature cache {self.dir}: record {n} holds part {head['part']} of clip {head['clip_id']!r}, "
                f"the index expects part {part} of {str(self.index['clip_id'][clip])!r} (shards and index of "
                "different builds): build it again with synchformer-jax cache --overwrite")
        if self._memory_records > 0:
            with self._memory_lock:
                self._memory[n] = array
                if len(self._memory) > self._memory_records:
                    self._memory.popitem(last=False)
        return array

    def entries(self, clips: Sequence[int]) -> Dict[int, dict]:
        """Whole entries of `clips` (`vfeat [Nv, 8, D]`, `afeat [Na, 6, D]`, the index row)."""
        out = {}
        for c in dict.fromkeys(int(c) for c in clips):
            base = c * self.records_per_clip
            vfeat = self._record(base)
            phases = [self._record(base + 1 + r) for r in range(self.phases)]
            afeat = np.empty((int(self.index["na"][c]),) + phases[0].shape[1:], phases[0].dtype)
            for r, part in enumerate(phases):
                afeat[r::self.phases] = part
            out[c] = dict({k: self.index[k][c].item() for k in self.index}, vfeat=vfeat, afeat=afeat)
        return out

    def windows(self, triples: np.ndarray, stand_in=None, skipped: Optional[List[str]] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
        """`vfeat [B, S, 8, D]`, `afeat [B, S, 6, D]` of the windows `triples [B, 3]`
        (clip, g, j), gathered straight into the batch from the video record and the one
        audio-phase record of each row. Row by row: holding a whole batch's records at
        once halves the read rate (fresh memory for every record).

        A row whose record cannot be read raises `BrokenRecordError`, or, given
        `stand_in(r, k)` (the k-th replacement (clip, g, j) of row r, k = 1, 2, ...), is
        replaced in `triples` by the first stand-in whose records read, and each broken
        record met is described in `skipped`."""
        per, p, s = self.records_per_clip, self.phases, self.grid.n_segments
        vfeat = afeat = None
        for r in range(len(triples)):
            for k in range(_MAX_STAND_INS + 1):
                c, g, j = (int(x) for x in triples[r])
                vi, ai = self.grid.window_entries(g, j)
                try:
                    v = self._record(c * per)
                    a = self._record(c * per + 1 + int(ai[0]) % p)
                    break
                except BrokenRecordError as exc:
                    if stand_in is None:
                        raise
                    if skipped is not None:
                        skipped.append(f"{exc} (row {r} of the batch: a stand-in window was drawn)")
                    triples[r] = stand_in(r, k + 1)
            else:
                raise CacheMismatchError(f"feature cache {self.dir}: {_MAX_STAND_INS} stand-ins in a row could not "
                                         f"be read ({len(self.broken)} broken records so far): rebuild the cache")
            if vfeat is None:
                vfeat = np.empty((len(triples), s) + v.shape[1:], v.dtype)
                afeat = np.empty((len(triples), s) + a.shape[1:], a.dtype)
            np.take(v, vi, axis=0, out=vfeat[r])
            np.take(a, ai // p, axis=0, out=afeat[r])
        return vfeat, afeat

    def valid_pairs(self, clip: int) -> np.ndarray:
        """`CacheGrid.valid_pairs` of one clip, computed once per distinct clip length (an
        AudioSet-sized cache has millions of clips but few lengths)."""
        idx = self.index
        key = tuple(int(idx[k][clip]) for k in ("v_len", "a_len", "nv", "na"))
        if key not in self._pairs:
            self._pairs[key] = self.grid.valid_pairs(*key)
            self._pairs[key].setflags(write=False)
        return self._pairs[key]

    def pair_counts(self) -> np.ndarray:
        """Valid (window, class) pairs per clip."""
        rows = np.stack([self.index[k] for k in ("v_len", "a_len", "nv", "na")], axis=1).astype(np.int64)
        if not len(rows):
            return np.zeros(0, np.int64)
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        counts = np.array([int(self.valid_pairs(int(c)).sum()) for c in first], np.int64)
        return counts[inverse.reshape(-1)]

    def window(self, clip: int, g: int, j: int) -> Tuple[np.ndarray, np.ndarray]:
        """`vfeat [S, 8, D]`, `afeat [S, 6, D]` of one window."""
        v, a = self.windows(np.array([[clip, g, j]]))
        return v[0], a[0]


def _curriculum(phases) -> Tuple[Tuple[int, float], ...]:
    """`window_curriculum` checked: `((num_steps, jitter_sec), ...)`."""
    out = []
    for phase in phases or ():
        try:
            n, jitter = (float(x) for x in phase)
        except (TypeError, ValueError):
            n = jitter = float("nan")
        if not (np.isfinite(n) and n >= 1 and n == int(n) and np.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"window_curriculum: each phase is (num_steps >= 1, jitter_sec >= 0), got {phase!r}")
        out.append((int(n), jitter))
    return tuple(out)


class CacheTrainIterator:
    """Endless stage-II training batches from a feature cache, checkpointable.

    Step `n` draws the global batch (`batch_size * process_count` rows) of
    (clip, window start, offset class) triples with `default_rng([seed, n])`; host `p`
    keeps rows `[p * B, (p + 1) * B)`. The draws do not depend on the host count beyond
    that split, and `get_state() = {"step": n}` restores exactly.

    The draw is the official stage-II sampling on the cache's grid: a clip uniformly
    (the official loader visits every clip once per epoch, whatever its length), then an
    offset class uniformly among the classes with a window in that clip (officially
    `random.choice` over the 21 classes; on clips of >= 9 s every class has one), then a
    window start uniformly among those that fit that class (officially a uniform start
    in the feasible range, so the +-2 s classes are as frequent as 0 s although fewer
    starts fit them). Clips without any valid window are never drawn.

    `window_curriculum`: phases `(num_steps, jitter_sec)` run before that draw
    (the synthetic demo's schedule for clips with one event; docs/benchmarks.md "Stage-II
    plateau"). In a phase, every row draws a clip uniformly among the clips with an
    anchor (`index["anchor_sec"]`, the time of the record's only event) and at least one
    valid window whose video segments are centred within `jitter_sec` of it
    (`CacheGrid.window_centre_sec`), then one such (window, class) pair uniformly. With
    the event's place in the video window (nearly) fixed, the class follows from its
    place in the audio window alone, which the model picks up far sooner than the
    difference of two places it must first find.

    `keep_centred`: in every step after the first phase, the unrestricted tail included
    (as the probe that found the schedule did), this share of the global batch's rows,
    evenly spaced so that every host's slice keeps about the share, draws with the first
    phase's jitter: the widening then does not wash out what the centred windows taught.
    0 makes the tail the plain draw, step for step.
    """

    def __init__(self, cache: Union[str, os.PathLike, FeatureCache], *, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, memory_clips: int = 256, workers: int = 0,
                 window_curriculum: Sequence[Tuple[int, float]] = (), keep_centred: float = 0.0):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache, memory_clips)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        counts = self.cache.pair_counts()
        self.total = int(counts.sum())  # valid (clip, window, class) triples
        self.clips = np.flatnonzero(counts)  # the clips with a window; the others are too short
        if not len(self.clips):
            raise ValueError(f"{self.cache.dir}: no clip has a valid stage-II window")
        self.phases = _curriculum(window_curriculum)
        self.keep_centred = float(keep_centred)
        if not 0.0 <= self.keep_centred <= 1.0:
            raise ValueError(f"keep_centred must be a share in [0, 1], got {keep_centred!r}")
        if self.keep_centred and not self.phases:
            raise ValueError("keep_centred needs a window_curriculum (its first phase's jitter)")
        self._phase_ends = np.cumsum([n for n, _ in self.phases])
        self._near = {jitter: self._windows_near(jitter) for _, jitter in self.phases}
        n = self.batch_size * self.process_count
        n_keep = int(round(self.keep_centred * n))
        self._keep_rows = (np.arange(n_keep, dtype=np.int64) * n) // max(1, n_keep)
        self.step = 0
        # Batches of the next `workers` steps are made on threads while step n is consumed
        # (the record reads and gathers release the GIL: 2 threads make 1.5-1.8x the rows
        # of one on 2 cores); each is a function of its step, so the order and the resume
        # state (the steps consumed) do not depend on the threads.
        self.workers = int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers!r}")
        self._pool = (concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="feature-cache")
                      if self.workers else None)
        self._ahead: Dict[int, concurrent.futures.Future] = {}

    def _windows_near(self, jitter: float):
        """`(clips, [pairs [m, 2]], counts)`: the anchored clips with valid (g, j) pairs
        whose video window centre lies within `jitter` s of the anchor, and those pairs."""
        idx, grid = self.cache.index, self.cache.grid
        anchored = np.flatnonzero(np.isfinite(idx["anchor_sec"]))
        clips, pairs = [], []
        for c in anchored:
            ok = np.argwhere(self.cache.valid_pairs(int(c)))
            # 1e-6 s: centres and anchors sit on the 0.04-s frame grid; a jitter equal to a
            # distance between them must count despite float rounding.
            near = ok[np.abs(grid.window_centre_sec(ok[:, 0]) - idx["anchor_sec"][c]) <= jitter + 1e-6]
            if len(near):
                clips.append(int(c))
                pairs.append(near)
        if not clips:
            raise ValueError(f"{self.cache.dir}: window_curriculum jitter {jitter} s: no clip has a valid window "
                             f"whose video segments are centred within {jitter} s of its anchor ({len(anchored)} "
                             f"of {len(self.cache)} clips have one: the time of the record's only event)")
        return np.asarray(clips, np.int64), pairs, np.asarray([len(p) for p in pairs], np.int64)

    def phase_at(self, step: int) -> Optional[int]:
        """The curriculum phase of `step`; None: the unrestricted draw."""
        i = int(np.searchsorted(self._phase_ends, int(step), side="right"))
        return i if i < len(self.phases) else None

    def _official(self, rng: np.random.Generator, n: int, rows: slice) -> np.ndarray:
        """Rows `rows` of `n` official draws (clip, then class, then start; class doc)."""
        clip_u = rng.integers(0, len(self.clips), size=n)[rows]
        class_u, start_u = rng.random((2, n))[:, rows]
        out = np.zeros((len(clip_u), 3), np.int64)
        for r, (ci, uj, ug) in enumerate(zip(clip_u, class_u, start_u)):
            clip = int(self.clips[ci])
            ok = self.cache.valid_pairs(clip)
            classes = np.flatnonzero(ok.any(axis=0))
            j = classes[int(uj * len(classes))]
            starts = np.flatnonzero(ok[:, j])
            out[r] = (clip, starts[int(ug * len(starts))], j)
        return out

    def _draw_near(self, rng: np.random.Generator, jitter: float, n: int) -> np.ndarray:
        clips, pairs, counts = self._near[jitter]
        c = rng.integers(0, len(clips), size=n)
        k = rng.integers(0, counts[c])
        out = np.zeros((n, 3), np.int64)
        for r, (ci, ki) in enumerate(zip(c, k)):
            out[r] = (clips[ci], *pairs[ci][ki])
        return out

    def draw(self, step: int) -> np.ndarray:
        """`[B, 3]` (clip, g, j) of this host at `step`."""
        rng = np.random.default_rng([self.seed, int(step)])
        n = self.batch_size * self.process_count
        lo, hi = self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size
        phase = self.phase_at(step)
        if phase is None:
            out = self._official(rng, n, slice(lo, hi))
        else:
            out = self._draw_near(rng, self.phases[phase][1], n)[lo:hi]
        if phase != 0 and len(self._keep_rows):
            kept = self._draw_near(rng, self.phases[0][1], len(self._keep_rows))
            mine = (self._keep_rows >= lo) & (self._keep_rows < hi)
            out[self._keep_rows[mine] - lo] = kept[mine]
        return out

    def __iter__(self):
        return self

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        """This host's batch of `step`. A row whose record cannot be read is skipped and
        reported (`meta["skipped"]`, as the clip pipeline reports broken clips) and gets a
        stand-in: the plain draw of `default_rng([seed, step, global row, k])`, k = 1, 2, ...
        until one reads, so the batch stays a function of its step and the files."""
        triples = self.draw(step)
        skipped: List[str] = []
        first_row = self.process_index * self.batch_size

        def stand_in(r: int, k: int) -> np.ndarray:
            return self._official(np.random.default_rng([self.seed, step, first_row + r, k]), 1, slice(0, 1))[0]

        vfeat, afeat = self.cache.windows(triples, stand_in, skipped)
        return {"vfeat": vfeat, "afeat": afeat, "offset_target": triples[:, 2].astype(np.int32),
                "meta": {"skipped": skipped}}

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._pool is None:
            out = self.batch(self.step)
        else:
            for ahead in range(self.step, self.step + self.workers):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._pool.submit(self.batch, ahead)
            out = self._ahead.pop(self.step).result()
        self.step += 1
        return out

    def get_state(self) -> dict:
        return {"step": int(self.step)}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self._drop_ahead()

    def _drop_ahead(self) -> None:
        """Forget the batches being made ahead (of steps that are no longer next)."""
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def built_compute_dtype(manifest: dict) -> Optional[str]:
    """The dtype the cached features were computed in: the building extractors'
    `model_config["dtype"]` (the manifest's `dtype` is the storage dtype); None for a
    manifest without it."""
    dtype = (manifest.get("model_config") or {}).get("dtype")
    return str(dtype) if dtype else None


def _max_offset_sec(grid: CacheGrid) -> float:
    return round(max((abs(o) for o in grid.offset_frames), default=0) / transforms.VIDEO_FPS, 2)


def check_model_fit(cache_dir, manifest: dict, grid: CacheGrid, model_config) -> None:
    """Refuse (`CacheMismatchError`) a cache whose windows, feature widths or compute dtype
    are not the model's: its segment grid (`model.n_segments`, `model.video.num_frames`,
    `model.sync.num_offset_classes`, `model.sync.max_offset_sec`), the extractor widths, and
    the dtype the extractors computed in (`train.compute_dtype`: bfloat16 features are not
    float32 ones, and evaluation and the saved model compute the run's)."""
    sync = model_config.sync
    built = [("model.n_segments", grid.n_segments, model_config.n_segments),
             ("model.video.num_frames", grid.segment_frames, model_config.video.num_frames),
             ("model.sync.num_offset_classes", len(grid.offset_frames), sync.num_offset_classes),
             ("model.sync.max_offset_sec", _max_offset_sec(grid), sync.max_offset_sec)]
    dims = manifest["feature_dims"]
    built += [("model.video.embed_dim", dims["video"], model_config.video.embed_dim),
              ("model.audio.hidden_size", dims["audio"], model_config.audio.hidden_size)]
    differ = [(k, b, w) for k, b, w in built if (abs(b - w) > 1e-9 if isinstance(b, float) else b != w)]
    problems = []
    if differ:
        problems.append("it was built for " + ", ".join(f"{k}={b}" for k, b, _ in differ) + ", this run has "
                        + ", ".join(f"{k}={w}" for k, _, w in differ) + ". Rebuild the cache for this model "
                        "(synchformer-jax cache --config <this config>) or set "
                        + " ".join(f"--config.{k}={b}" for k, b, _ in differ))
    else:
        want = grid_for(model_config.n_segments, segment_frames=model_config.video.num_frames,
                        max_off_sec=sync.max_offset_sec, grid_size=sync.num_offset_classes)
        if want != grid:  # the same settings but another grid: built by other transforms code
            problems.append(f"its segment grid ({grid.to_dict()}) is not the one this code derives for the model "
                            f"({want.to_dict()}). Rebuild the cache (synchformer-jax cache --config <this config>)")
    built_dtype, run_dtype = built_compute_dtype(manifest), str(model_config.dtype)
    if built_dtype is None:
        _log.warning("feature cache %s predates recording its compute dtype: not checked against this run's %s "
                     "(train.compute_dtype); rebuild it to get the check", cache_dir, run_dtype)
    elif built_dtype != run_dtype:
        problems.append(f"its features were computed in {built_dtype}, this run computes in {run_dtype} "
                        f"(train.compute_dtype): the sync head would train on {built_dtype} features while "
                        f"evaluation and the saved model compute {run_dtype} ones. Rebuild the cache with the "
                        f"extractors computing in {run_dtype} (synchformer-jax cache --config <this config>) or set "
                        f"--config.train.compute_dtype={built_dtype}")
    if problems:
        raise CacheMismatchError(f"feature cache {cache_dir} does not fit this run: " + "; and ".join(problems))


def train_iterator(cache_dir, model_config, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, window_curriculum: Sequence[Tuple[int, float]] = (),
                   keep_centred: float = 0.0, workers: int = 0) -> CacheTrainIterator:
    """The trainer's cached stage-II iterator; checks the cache fits the model."""
    it = CacheTrainIterator(cache_dir, batch_size=batch_size, seed=seed, process_index=process_index,
                            process_count=process_count, window_curriculum=window_curriculum,
                            keep_centred=keep_centred, workers=workers)
    m = it.cache.manifest
    check_model_fit(cache_dir, m, it.cache.grid, model_config)
    if m["crop"]["size"] != model_config.video.img_size:
        _log.warning("feature cache %s was built at %d px, the model takes %d px", cache_dir, m["crop"]["size"],
                     model_config.video.img_size)
    short = len(it.cache) - len(it.clips)
    if short:
        _log.warning("feature cache %s: %d of %d clips have no stage-II window (a stream shorter than the "
                     "%.1f-s crop); they are not drawn", cache_dir, short, len(it.cache),
                     it.cache.grid.v_crop / transforms.VIDEO_FPS)
    _log.info("feature cache %s: %d clips, %d (clip, window, class) triples; extractor params sha256 %s",
              cache_dir, len(it.clips), it.total, m["extractor_params_sha256"])
    if it.phases:
        _log.info("window curriculum %s (steps, jitter s), then every window; keep_centred %.2f",
                  list(it.phases), it.keep_centred)
    return it
