"""grain pipelines: record shards -> host batches (uint8 video, raw audio, labels).

Shape of a host batch (per host, `B` = per-host batch size):

    video  uint8   [B, V, 224, 224, 3]  the frames the segments cover, cropped (and flipped)
    audio  float32 [B, A]               the samples the segments cover (or [B, S, 1, 128, 66]
                                        log-mel with `host_audio="logmel"`)
    mask   bool    [B]                  False for padding rows (evaluation's last batch)
    offset_target int32 [B], offset_sec / v_start_i_sec float32 [B]   (stages II, III)
    sync_target   int32 [B]                                            (stage III)
    index  int64   [B]                  global example number (round * N + clip in eval)
    meta   dict    host-only: clip_id (str [B]), offset (str [B]: "fixed", "drawn" or ""
                   without offsets/padding), skipped (ids of broken records dropped since
                   the previous batch); never sent to devices

`V`, `A` are static per stage (`SegmentLayout`): stage II 120 frames / 76 800 samples
(14 segments of 16 frames, stride 8), stage III 112 / 71 680 (13 segments), stage I
224 / 143 360 (14 segments, no overlap). `assemble_on_device` turns a batch into the
model inputs `video [B, S, 16, 3, 224, 224]` and `audio [B, S, 1, 128, 66]` by gathering
the segments with static indices, normalising uint8 through the exact lookup table and
computing the log-mel on the device.

Why ship the unsegmented uint8 span and the raw waveform. Measured on the 2-core dev
machine (stage II, 10-s 256x256 synthetic clips, process CPU time, best of 3 runs over
16 clips; the machine was shared, so the times vary by about +-30 %):

    per example              host bytes   host CPU per example
    span u8 + waveform       18.37 MB     35-52 ms decode+crop, +2 ms batching   <- chosen
    segments u8 + waveform   34.03 MB     same +3 ms segment gather, +10 ms batching
    span u8 + log-mel        18.54 MB     same +17-19 ms `log_mel_np` (float64 STFT)
    float32 segments         135.3 MB     same +72 ms uint8 -> float conversion

The stage II/III segments overlap by half (stride 8 of 16 frames), so segmenting on
the host would copy every frame twice: 1.85x the bytes and ~5x the batching cost of
the span. Raw audio is 320 KB vs 473 KB of log-mel and saves a third of the host CPU
per example; on the device the log-mel is a gather and two matmuls. Both device steps
are exact where it matters: the gather copies bytes, the uint8 lookup table reproduces
the official float16 normalisation bit for bit, and `log_mel_jax` is within 1e-4 of
the official front end. H.264 decoding dominates what is left on the host; the decoder
stops after the last frame a plan needs and converts (YUV -> RGB) only the span, with
one reused swscale context per thread (a fresh one per clip cost ~60 ms, more than the
decode). Whole stage-II pipeline (`train_dataset`, batch 4): 12.9 clips/s with one
read thread and 22.1 clips/s with two on the 2 cores, i.e. ~11-13 clips/s per core;
two worker processes instead of threads gave 16.2 clips/s (the 18 MB batches cross
process boundaries), so on few cores prefer `read_threads`, and add `num_workers`
where the GIL-held parts (batching, grain bookkeeping) become the bottleneck.

Pipelines:
* `train_dataset`: ArrayRecord -> seeded global shuffle (reshuffled every epoch) ->
  per-example random plan (rng derived from the seed and the *global* index, so a
  restart, a different host count or a different worker count draws the same
  example) -> per-host slice -> worker order -> threaded map -> drop broken -> batch ->
  optional worker processes. `get_state` / `set_state` restore exactly (grain's
  index-based state). The batches, and their order, do not depend on `num_workers`
  either: grain gives each worker process every `num_workers`-th example and each
  worker batches its own, so `_WorkerBatchOrder` lays the host's examples out such
  that worker `w`'s `k`-th batch is the batch `k * num_workers + w` of one process. What
  still depends on the worker count: a worker refills a batch that lost a broken record
  from its own share (the first example of its next batch), so from the first broken
  record on, which examples share a batch (and, in a finite run, which few fall into
  the dropped partial batches) differs from a run with another worker count; and an
  iterator state restores only with the worker count that saved it.
* `eval_dataset`: every clip `rounds` times (round r reseeded deterministically:
  `default_rng([seed, r, clip])`), fixed offsets from record labels or a CSV mapping,
  the last batch padded with `mask=False`, and the same number of batches on every host.
* `tfrecord_indexed_train_dataset`: `train_dataset` over TFRecord shards, batch for batch
  the same for the same records (one header pass indexes the records, see below).
* `tfrecord_train_dataset`: streaming TFRecord shards, interleaved, window-shuffled, for
  storage where per-record seeks are expensive.
* `tfrecord_eval_dataset`: `eval_dataset` over TFRecord shards, example for example and
  batch for batch the same (same per-host split by record index, same draws, same
  order, same batch count): one pass over the record headers builds a byte-offset index
  (`sources.TFRecordIndexedSource`), then the ArrayRecord code path runs on it.
* Stage I (`ExampleSpec(stage="segment_avclip")`): 14 non-overlapping segments; pass
  `augment=Stage1Augment()` for the official per-segment colour / flip / audio
  augmentations (`input.augment`). Stage III: `stage="synchronizability"`.

Broken records (unreadable bytes or shards, bad header, NaN/inf audio, undecodable or
too-short video or audio) are logged with their clip id / source (or shard), counted
in `meta["skipped"]` of the next batch
(in evaluation, of a padding row when nothing follows them; at the end of a finite
training stream, of its last batch, `_SkipsOnLastBatch`; use `SkipReport` in the
training and evaluation loops), and never stop the pipeline.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
import logging
import math
import sys
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import av
from av.video.reformatter import VideoReformatter
import grain
import grain.experimental
import jax
import jax.numpy as jnp
import numpy as np

from synchformer_jax import records
from synchformer_jax.input import augment as augment_lib
from synchformer_jax.input import melspec, normalize, transforms
from synchformer_jax.input.shards import parse_shard_name
from synchformer_jax.input.sources import (ArrayRecordSource, Broken, TFRecordIndexedSource, TFRecordShardDataset,
                                           expand_paths)

__all__ = [
    "STAGES", "SegmentLayout", "ExampleSpec", "decode_video_bytes", "process_record",
    "collate", "SkipReport", "NoUsableRecordsError", "train_dataset", "eval_dataset", "tfrecord_train_dataset",
    "tfrecord_indexed_train_dataset", "tfrecord_eval_dataset",
    "read_fixed_offsets_csv", "assemble_on_device", "Stage1Augment", "mark_absl_flags_parsed",
]

_log = logging.getLogger(__name__)

STAGES = ("segment_avclip", "sync", "synchronizability")
Augment = Callable[[Dict[str, Any], transforms.ExamplePlan, np.random.Generator], Dict[str, Any]]
FixedOffsets = Union[None, str, Mapping[str, Tuple[float, float]]]


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Where each segment sits inside the shipped span (static, hashable for jit)."""
    n_segments: int
    frame_stride: int
    sample_stride: int
    segment_frames: int = 16
    segment_samples: int = 10240

    @property
    def video_span(self) -> int:
        return (self.n_segments - 1) * self.frame_stride + self.segment_frames

    @property
    def audio_span(self) -> int:
        return (self.n_segments - 1) * self.sample_stride + self.segment_samples

    def frame_index(self) -> np.ndarray:
        """`[S, 16]` frame of the span used by each segment position."""
        return (np.arange(self.n_segments)[:, None] * self.frame_stride
                + np.arange(self.segment_frames)[None]).astype(np.int32)

    def sample_index(self) -> np.ndarray:
        """`[S, 10240]` sample of the span used by each segment position."""
        return (np.arange(self.n_segments)[:, None] * self.sample_stride
                + np.arange(self.segment_samples)[None]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What one example is: the stage, train/eval and the official transform knobs."""
    stage: str = "sync"
    train: bool = True
    crop_size: int = 224
    n_segments: Optional[int] = None  # None: 14 (stages I, II) / 13 (stage III)
    segment_frames: int = 16
    crop_len_sec: float = 5.0
    max_off_sec: float = 2.0
    grid_size: int = 21
    max_jitter_sec: float = 0.05  # stage II/III training audio jitter (eval: none)
    hflip_p: float = 0.5  # stage II/III training whole-clip flip
    audio_jitter_sec: float = 0.05  # stage I training shared audio shift
    host_audio: str = "waveform"  # or "logmel" (host computes the log-mel; more bytes, more CPU)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.host_audio not in ("waveform", "logmel"):
            raise ValueError(f"host_audio must be 'waveform' or 'logmel', got {self.host_audio!r}")

    @property
    def segments(self) -> int:
        if self.n_segments is not None:
            return int(self.n_segments)
        return 13 if self.stage == "synchronizability" else 14

    @property
    def layout(self) -> SegmentLayout:
        step = 1.0 if self.stage == "segment_avclip" else 0.5
        seg_a = transforms.sec2frames(self.segment_frames / transforms.VIDEO_FPS, transforms.AUDIO_RATE)
        return SegmentLayout(self.segments, int(step * self.segment_frames), int(step * seg_a),
                             self.segment_frames, seg_a)

    def plan(self, n_frames: int, n_samples: int, height: int, width: int,
             rng: Optional[np.random.Generator], fixed: Optional[Tuple[float, float]] = None
             ) -> transforms.ExamplePlan:
        if self.stage == "segment_avclip":
            return transforms.plan_segment_avclip_example(
                n_frames, n_samples, height, width, train=self.train, rng=rng if self.train else None,
                crop_size=self.crop_size, n_segments=self.segments,
                segment_size_vframes=self.segment_frames, audio_jitter_sec=self.audio_jitter_sec)
        off, vstart = fixed if fixed is not None else (None, None)
        return transforms.plan_sync_example(
            n_frames, n_samples, height, width, train=self.train, rng=rng, offset_sec=off,
            v_start_i_sec=vstart, synchronizability=self.stage == "synchronizability",
            crop_size=self.crop_size, n_segments=self.segments,
            segment_size_vframes=self.segment_frames, crop_len_sec=self.crop_len_sec,
            max_off_sec=self.max_off_sec, grid_size=self.grid_size,
            max_jitter_sec=self.max_jitter_sec, hflip_p=self.hflip_p)


# ------------------------------------------------------------------------ one example


_local = threading.local()


def _reformatter():
    # A reused swscale context: `VideoFrame.to_ndarray(format="rgb24")` builds a new one
    # per container, which costs more than decoding the whole clip (~60 ms measured);
    # the output is identical. One per thread because the context is not thread-safe.
    r = getattr(_local, "reformatter", None)
    if r is None:
        r = _local.reformatter = VideoReformatter()
    return r


def decode_video_bytes(mp4: bytes, *, start: int = 0, stop_after: Optional[int] = None,
                       top_left: Optional[Tuple[int, int]] = None, size: Optional[Tuple[int, int]] = None,
                       container=None) -> np.ndarray:
    """Frames `start..` of in-memory video bytes as `uint8 [T, h, w, 3]` RGB, in
    presentation order (the frames `media.decode_media` returns for contract files).

    `stop_after`: stop after frame `stop_after` (inclusive), which is all a plan needs;
    frames before `start` are decoded but not converted; `top_left` + `size` crop each
    frame right after conversion, so the full frames are never held together.
    """
    own = container is None
    if own:
        container = av.open(io.BytesIO(mp4))
    try:
        stream = container.streams.video[0]
        # One thread per decode: the pipeline already decodes several clips in
        # parallel (threads / worker processes).
        stream.thread_type = "NONE"
        reformat = _reformatter().reformat
        out = []
        for n, frame in enumerate(container.decode(stream)):
            if n >= start:
                x = reformat(frame, format="rgb24").to_ndarray()
                if top_left is not None:
                    i, j = top_left
                    x = x[i:i + size[0], j:j + size[1]]
                out.append(x)
            if stop_after is not None and n >= stop_after:
                break
    finally:
        if own:
            container.close()
    if not out:
        raise ValueError(f"the video has no decodable frames from frame {start}")
    return np.stack(out)


def _fixed_for(rec: records.ClipRecord, fixed: FixedOffsets) -> Optional[Tuple[float, float]]:
    """The record's fixed (offset_sec, vstart_sec), or None: draw them (the random branch)."""
    if fixed is None:
        return None
    if isinstance(fixed, str):
        if fixed != "labels":
            raise ValueError(f"fixed_offsets must be None, 'labels' or a mapping, got {fixed!r}")
        lab = rec.labels
        has = ("offset_sec" in lab, "vstart_sec" in lab)
        if not any(has):
            # A clip prepared from a plain id list or a folder carries no offset: it gets
            # the draw the official evaluation makes without a fixed-offset list
            # (`load_fixed_offsets_on=[]`), seeded per (round, clip) like every eval draw.
            return None
        if not all(has):
            raise ValueError("record has only one of the labels offset_sec / vstart_sec")
        return float(lab["offset_sec"]), float(lab["vstart_sec"])
    if rec.clip_id not in fixed:
        raise ValueError("clip is not in the fixed-offset mapping")
    off, vstart = fixed[rec.clip_id]
    return float(off), float(vstart)


def process_record(data, rng: Optional[np.random.Generator], spec: ExampleSpec, *,
                   fixed: FixedOffsets = None, augment: Optional[Augment] = None,
                   index: int = -1):
    """Record bytes -> one host example (see the module doc), or `Broken`."""
    if isinstance(data, Broken):
        return data
    clip = "?"
    try:
        rec = records.decode(data)
        clip = rec.clip_id or "?"
        records.require_finite_audio(rec)
        if int(rec.fps) != transforms.VIDEO_FPS or int(rec.sample_rate) != transforms.AUDIO_RATE:
            raise ValueError(f"not at the input contract: {rec.fps} fps, {rec.sample_rate} Hz")
        with av.open(io.BytesIO(rec.video_mp4)) as container:
            ctx = container.streams.video[0].codec_context
            height, width = int(ctx.height), int(ctx.width)
            n_frames = int(rec.num_frames)
            if n_frames <= 0:
                raise ValueError("record does not give num_frames")
            fixed_offset = _fixed_for(rec, fixed)
            plan = spec.plan(n_frames, int(rec.audio.shape[0]), height, width, rng, fixed_offset)
            layout = spec.layout
            fidx = plan.segment_frame_indices
            v0 = int(fidx[0, 0])
            if not np.array_equal(fidx - v0, layout.frame_index()):
                raise AssertionError("plan and segment layout disagree")  # a bug, not bad data
            last = v0 + layout.video_span - 1
            # An augmentation that crops by itself (stage I's "sometimes upscale") gets
            # whole frames.
            full = bool(getattr(augment, "needs_full_frames", False))
            video = decode_video_bytes(b"", start=v0, stop_after=last, top_left=None if full else plan.top_left,
                                       size=plan.crop_size, container=container)
        if video.shape[0] != layout.video_span:
            raise ValueError(f"video decodes to {v0 + video.shape[0]} frames, the plan needs {last + 1}"
                             f" (record says {n_frames})")
        if plan.flip:
            video = video[:, :, ::-1]
        a0 = int(plan.segment_sample_starts[0])
        audio = np.asarray(rec.audio[a0:a0 + layout.audio_span], dtype=np.float32)
        if audio.shape[0] != layout.audio_span:
            raise ValueError(f"audio of {rec.audio.shape[0]} samples is too short for the plan")
        example: Dict[str, Any] = {"video": np.ascontiguousarray(video), "audio": audio}
        if plan.temporal is not None:
            example["offset_target"] = np.int32(plan.temporal.offset_class)
            example["offset_sec"] = np.float32(plan.temporal.offset_sec)
            example["v_start_i_sec"] = np.float32(plan.temporal.v_start_i_sec)
            if spec.stage == "synchronizability":
                example["sync_target"] = np.int32(bool(plan.temporal.is_synchronizable))
        if augment is not None:
            example = augment(example, plan, rng)
            want = (layout.video_span,) + tuple(plan.crop_size) + (3,)
            if example["video"].shape != want or example["audio"].shape != (layout.audio_span,):
                raise AssertionError(f"augmentation changed the example shape to {example['video'].shape}")
        if spec.host_audio == "logmel":
            seg = example["audio"][layout.sample_index()]
            example["audio"] = melspec.log_mel_np(seg)
        example["mask"] = np.bool_(True)
        example["index"] = np.int64(index)
        # Where the offset came from ("fixed": the record's labels or a mapping, "drawn":
        # the seeded random branch, "": a stage without offsets), for the evaluation report.
        offset = "" if plan.temporal is None else ("drawn" if fixed_offset is None else "fixed")
        example["meta"] = {"clip_id": rec.clip_id, "offset": offset}
        return example
    except AssertionError:
        raise  # an inconsistency in this code, not in the data: never hide it as a skip
    except Exception as exc:  # noqa: BLE001 - one bad clip must not stop a long run
        src = ""
        try:
            src = records.decode_header(data).get("source", "")
        except Exception:  # noqa: BLE001
            pass
        where = f"clip {clip!r}" + (f" ({src})" if src else "") + f" at index {index}"
        return Broken(where, f"{type(exc).__name__}: {exc}")


def _empty_example(spec: ExampleSpec) -> Dict[str, Any]:
    """A zero example with the spec's shapes: padding for evaluation batches."""
    lay = spec.layout
    c = spec.crop_size
    ex: Dict[str, Any] = {"video": np.zeros((lay.video_span, c, c, 3), np.uint8)}
    if spec.host_audio == "logmel":
        ex["audio"] = np.zeros((lay.n_segments, 1, melspec.N_MELS, melspec.N_FRAMES), np.float32)
    else:
        ex["audio"] = np.zeros((lay.audio_span,), np.float32)
    if spec.stage != "segment_avclip":
        ex.update(offset_target=np.int32(0), offset_sec=np.float32(0), v_start_i_sec=np.float32(0))
        if spec.stage == "synchronizability":
            ex["sync_target"] = np.int32(0)
    ex.update(mask=np.bool_(False), index=np.int64(-1), meta={"clip_id": "", "offset": ""})
    return ex


def collate(examples: Sequence[Dict[str, Any]], pad_to: Optional[int] = None,
            pad_example: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Stacks examples into a batch; pads to `pad_to` rows with `pad_example` (mask False)."""
    examples = list(examples)
    if pad_to is not None and len(examples) < pad_to:
        examples += [pad_example] * (pad_to - len(examples))
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "meta"}
    skipped: List[str] = []
    for e in examples:
        skipped.extend(e["meta"].get("skipped", ()))
    batch["meta"] = {"clip_id": np.array([e["meta"]["clip_id"] for e in examples]),
                     "offset": np.array([e["meta"].get("offset", "") for e in examples]),
                     "skipped": skipped}
    return batch


# ----------------------------------------------------------------- skipping broken ones


class NoUsableRecordsError(ValueError):
    """A repeating training stream met twice its data set's size of unusable records in a row."""


class _LeftoverSkips:
    """Skips with no example left to ride on: the end of a finite training stream (or of
    one worker's share of it). `_FullBatches` passes them on, `_SkipsOnLastBatch` folds
    them into a batch; they never reach the caller."""

    def __init__(self, items: List[str]):
        self.items = list(items)


class _DropBrokenIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, give_up_after: Optional[int] = None, data: str = "",
                 last_carrier: Optional[Dict[str, Any]] = None):
        super().__init__(parent)
        self._pending: List[str] = []
        self._give_up_after = give_up_after
        self._data = data
        self._last_carrier = last_carrier
        self._broken_in_a_row = 0

    def __next__(self):
        while True:
            try:
                x = next(self._parent)
            except StopIteration:
                # Broken records at the very end of a finite stream have no next example
                # to ride on. In evaluation one masked padding example carries them (it
                # fits in the batch count, since each of them took a real example's
                # place); in training, which must not see padding, a marker does.
                if not self._pending:
                    raise
                pending, self._pending = self._pending, []
                if self._last_carrier is None:
                    return _LeftoverSkips(pending)
                return dict(self._last_carrier, meta=dict(self._last_carrier["meta"], skipped=pending))
            if isinstance(x, Broken):
                _log.warning("skipping broken record: %s: %s", x.where, x.error)
                self._pending.append(f"{x.where}: {x.error}")
                self._broken_in_a_row += 1
                # A repeating training stream whose every record fails (clips too short
                # for the stage, say) would otherwise skip forever.
                if self._give_up_after and self._broken_in_a_row >= self._give_up_after:
                    raise NoUsableRecordsError(
                        f"{self._data}: {self._broken_in_a_row} records in a row (twice the data set) "
                        f"could not be used; the last: {x.where}: {x.error}")
                continue
            self._broken_in_a_row = 0
            if self._pending:
                x = dict(x)
                x["meta"] = dict(x["meta"], skipped=self._pending)
                self._pending = []
            return x

    def get_state(self):
        # The not-yet-reported skips are part of the state, so a restored iterator
        # reports exactly what the original would have.
        return {"parent": self._parent.get_state(), "pending": list(self._pending)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = list(state["pending"])


class _DropBroken(grain.IterDataset):
    """Removes `Broken` markers; their descriptions ride on the next example's meta, or,
    at the end of the stream, on `last_carrier` (a `mask=False` padding example) or,
    without one, on a `_LeftoverSkips` marker."""

    def __init__(self, parent: grain.IterDataset, give_up_after: Optional[int] = None, data: str = "",
                 last_carrier: Optional[Dict[str, Any]] = None):
        super().__init__(parent)
        self._give_up_after, self._data, self._last_carrier = give_up_after, data, last_carrier

    def __iter__(self):
        return _DropBrokenIterator(self._parent.__iter__(), self._give_up_after, self._data, self._last_carrier)


class _FullBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self):
        examples: List[Dict[str, Any]] = []
        while len(examples) < self._batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                x = _LeftoverSkips([])
            if isinstance(x, _LeftoverSkips):
                # The end: the dropped remainder's reports join the trailing skips.
                left = [s for e in examples for s in e["meta"].get("skipped", ())] + x.items
                if left:
                    return _LeftoverSkips(left)
                raise StopIteration
            examples.append(x)
        return collate(examples)

    def get_state(self):
        # Between batches nothing is held: the state is the parent's (as grain's batch).
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _FullBatches(grain.IterDataset):
    """Training batches (`collate`, the remainder dropped) whose stream ends, if it ends
    with reports left over (skips after the last full batch, or riding on the dropped
    remainder), with one `_LeftoverSkips` instead of losing them. Runs where the examples
    are made (in each worker process), before `_SkipsOnLastBatch`."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self):
        return _FullBatchesIterator(self._parent.__iter__(), self._batch_size)


class _SkipsOnLastBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._ahead: Optional[Dict[str, Any]] = None  # the next batch, read before the current one returns
        self._after: Optional[Any] = None  # the parent's state right after the last returned batch
        self._ended = False

    def _read(self) -> Tuple[Optional[Dict[str, Any]], List[str]]:
        """The next batch with the leftover skips met before it, or None and those skips."""
        skipped: List[str] = []
        for x in self._parent:
            if isinstance(x, _LeftoverSkips):
                skipped += x.items
                continue
            return _with_skips(x, skipped, first=True), []
        return None, skipped

    def __next__(self):
        if self._ended:
            raise StopIteration
        if self._ahead is None:
            self._ahead, lost = self._read()
            if self._ahead is None:
                self._ended = True
                if lost:
                    # No batch at all to carry them (a stream shorter than one batch).
                    _log.warning("%d broken record(s) skipped in a stream that yielded no batch; the first: %s",
                                 len(lost), lost[0])
                raise StopIteration
        out = self._ahead
        self._after = copy.deepcopy(self._parent.get_state())
        self._ahead, tail = self._read()
        if self._ahead is None:
            self._ended = True
            out = _with_skips(out, tail, first=False)
        return out

    def get_state(self):
        parent = self._after if self._after is not None else self._parent.get_state()
        # `ended`: the tail's reports already rode on the last batch; a restored
        # iterator must neither repeat them nor warn that they were lost.
        return {"parent": parent, "ended": int(self._ended)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._ahead, self._after, self._ended = None, None, bool(state["ended"])


class _SkipsOnLastBatch(grain.IterDataset):
    """A finite training stream's end-of-stream reports on its last batch.

    In the main process, after the worker processes: reads one batch ahead, so that the
    `_LeftoverSkips` of the stream's (or of a worker's) end ride on the next batch out
    or, when none follows, on the last one; the state is the one right after the
    returned batch, so a restored iterator re-reads the batch it had read ahead. Only
    for finite streams: an endless one has no end to wait for.
    """

    def __iter__(self):
        return _SkipsOnLastBatchIterator(self._parent.__iter__())


def _with_skips(batch: Dict[str, Any], skipped: List[str], first: bool) -> Dict[str, Any]:
    """`batch` with `skipped` added to its `meta["skipped"]` (before or after its own)."""
    if not skipped:
        return batch
    own = list(batch["meta"]["skipped"])
    return dict(batch, meta=dict(batch["meta"], skipped=skipped + own if first else own + skipped))


class SkipReport:
    """Main-process tally of broken records, fed with every batch (`update`).

    The worker that drops a record logs a warning; with worker processes that log may
    not reach the main process, so the training loop should feed every batch here and
    report `count` with its metrics.
    """

    def __init__(self):
        self.count = 0
        self.items: List[str] = []

    def update(self, batch: Mapping[str, Any]) -> int:
        skipped = list(batch.get("meta", {}).get("skipped", ()))
        self.count += len(skipped)
        for s in skipped:
            _log.info("broken record skipped (%d so far): %s", self.count, s)
        self.items.extend(skipped)
        return len(skipped)


class _FixedCountIterator(grain.DatasetIterator):
    def __init__(self, parent, num_batches: int, pad_batch: Dict[str, Any]):
        super().__init__(parent)
        self._n = num_batches
        self._pad = pad_batch
        self._emitted = 0

    def __next__(self):
        if self._emitted >= self._n:
            raise StopIteration
        try:
            batch = next(self._parent)
        except StopIteration:
            # This host ran out early (fewer clips after slicing, or skipped broken
            # ones): every host must run the same number of collective eval steps.
            batch = self._pad
        self._emitted += 1
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "emitted": self._emitted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._emitted = int(state["emitted"])


class _FixedCount(grain.IterDataset):
    def __init__(self, parent, num_batches: int, pad_batch: Dict[str, Any]):
        super().__init__(parent)
        self._n = num_batches
        self._pad = pad_batch

    def __iter__(self):
        return _FixedCountIterator(self._parent.__iter__(), self._n, self._pad)


# ---------------------------------------------------------------------------- datasets


class _RandomProcess:
    """`random_map` callable (a class so that worker processes can pickle it)."""

    def __init__(self, spec: ExampleSpec, augment: Optional[Augment]):
        self.spec, self.augment = spec, augment

    def __call__(self, data, rng):
        return process_record(data, rng, self.spec, augment=self.augment)


class _IndexedRandomProcess(_RandomProcess):
    def __call__(self, item, rng):
        index, data = item
        return process_record(data, rng, self.spec, augment=self.augment, index=index)


def _with_index(index, x):
    return index, x


class _EvalProcess:
    def __init__(self, source, spec: ExampleSpec, seed: int, fixed: FixedOffsets):
        self.source, self.spec, self.seed, self.fixed = source, spec, int(seed), fixed

    def __call__(self, index: int):
        n = len(self.source)
        rnd, clip = divmod(int(index), n)
        # One generator per (round, clip): a round's draws do not depend on the batch
        # size, host count, worker count or on which clips were broken.
        rng = np.random.default_rng([self.seed, rnd, clip])
        return process_record(self.source[clip], rng, self.spec, fixed=self.fixed, index=index)


class _WorkerBatchOrder(grain.MapDataset):
    """A host's examples reordered so that `num_workers` worker processes batch them as
    one process would: the same batches, in the same order.

    `mp_prefetch` gives worker `w` of `W` the slice `[w::W]` of the dataset it finds
    before `to_iter_dataset`, each worker batches its own slice, and the workers' outputs
    are interleaved round robin (grain 0.2.18: `process_prefetch.multiprocess_prefetch`,
    an `InterleaveIterDataset` with `cycle_length=W`; an exhausted worker drops out of
    the cycle). So worker `w`'s `k`-th batch is batch `k * W + w` out, and position `i`
    here (example `m = i // W` of worker `i % W`, row `m % B` of its batch `m // B`)
    holds example `(m // B * W + i % W) * B + m % B` of the parent: a lazy index map.

    A parent of `n` examples that does not fill whole rounds of `W` batches is padded to
    the next round with holes (None, which `to_iter_dataset` skips), so every example is
    read exactly once and the last round gives worker `w` exactly the rows of batch
    `k * W + w`: full batches for the first `n % (W * B) // B` workers, the remainder to
    the next one (dropped or padded, as without workers), nothing to the rest.
    """

    def __init__(self, parent: grain.MapDataset, num_workers: int, batch_size: int):
        super().__init__(parent)
        self._workers, self._batch = num_workers, batch_size
        self._n = len(parent)
        block = num_workers * batch_size
        padded = -(-self._n // block) * block
        # An endless (repeated) parent is `sys.maxsize` long already: cut it to whole rounds.
        self._len = padded if padded <= sys.maxsize else self._n // block * block

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        worker, m = index % self._workers, index // self._workers
        src = (m // self._batch * self._workers + worker) * self._batch + m % self._batch
        return None if src >= self._n else self._parent[src]

    def __str__(self) -> str:
        return f"_WorkerBatchOrder(num_workers={self._workers}, batch_size={self._batch})"


def _in_worker_order(ds: grain.MapDataset, num_workers: int, batch_size: int) -> grain.MapDataset:
    # One worker reads the whole dataset (grain does not slice it): nothing to reorder.
    return _WorkerBatchOrder(ds, num_workers, batch_size) if num_workers > 1 else ds


def _in_workers(ds: grain.IterDataset, num_workers: int, per_worker_buffer: int) -> grain.IterDataset:
    if num_workers > 0:
        mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=per_worker_buffer))
    return ds


def _finish_train(ds: grain.IterDataset, batch_size: int, num_workers: int, per_worker_buffer: int,
                  finite: bool, give_up_after: Optional[int] = None, data: str = "") -> grain.IterDataset:
    ds = _FullBatches(_DropBroken(ds, give_up_after, data), batch_size)
    ds = _in_workers(ds, num_workers, per_worker_buffer)
    return _SkipsOnLastBatch(ds) if finite else ds


def _describe(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} shards ({paths[0]}, ...)"


def _check_host(process_index: int, process_count: int):
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def train_dataset(paths, spec: ExampleSpec, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_epochs: Optional[int] = None,
                  num_workers: int = 0, read_threads: int = 4, prefetch_buffer_size: int = 16,
                  per_worker_buffer: int = 2, augment: Optional[Augment] = None,
                  start_example: int = 0) -> grain.IterDataset:
    """Training batches of `batch_size` examples (per host) from ArrayRecord shards.

    `num_epochs=None` repeats forever (each epoch reshuffled); with `num_epochs` set the
    last partial batch is dropped and the stream reads one batch ahead, so that a broken
    record's report after the last batch rides on that batch. Iterate with `iter(ds)`;
    `get_state()` / `set_state()` on the iterator resume exactly. The batches are the same
    for every `num_workers` (see the module doc for what broken records change).

    `start_example`: begin at this position of the global stream (all hosts' examples in
    the order one host would read them), with the examples that position has in the full
    stream: the continuation of a run that consumed that many examples, on any number of
    hosts (a restart on another slice size, where the saved per-host state does not fit).
    """
    _check_host(process_index, process_count)
    return _train_batches(ArrayRecordSource(paths), spec, batch_size=batch_size, seed=seed,
                          process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                          num_workers=num_workers, read_threads=read_threads,
                          prefetch_buffer_size=prefetch_buffer_size, per_worker_buffer=per_worker_buffer,
                          augment=augment, start_example=start_example)


def tfrecord_indexed_train_dataset(paths, spec: ExampleSpec, *, batch_size: int, seed: int,
                                   process_index: int = 0, process_count: int = 1,
                                   num_epochs: Optional[int] = None, num_workers: int = 0, read_threads: int = 4,
                                   prefetch_buffer_size: int = 16, per_worker_buffer: int = 2,
                                   augment: Optional[Augment] = None, verify_crc: bool = True,
                                   start_example: int = 0) -> grain.IterDataset:
    """`train_dataset` over TFRecord shards: the same batches for the same records.

    One pass over the record headers of all shards, on every host (a seek and 12 bytes per
    record; `sources.TFRecordIndexedSource`, as in `tfrecord_eval_dataset`), gives every
    record a global index, so TFRecord training gets what the ArrayRecord path has: a
    global shuffle reshuffled every epoch, per-example draws from the global position
    (independent of host and worker counts), decoding on `read_threads` threads and an
    index-based state that resumes exactly (the ArrayRecord iterator's state, too). Each
    example costs one seek and one read; where seeks are expensive (object stores) use
    the streaming `tfrecord_train_dataset` instead.

    A record with a bad data CRC is skipped and reported in `meta["skipped"]`; damage
    that ends a shard's framing costs the rest of that shard (one `Broken` slot).
    """
    _check_host(process_index, process_count)
    files = expand_paths(paths)
    _require_tfrecord(files)
    return _train_batches(TFRecordIndexedSource(files, verify=verify_crc), spec, batch_size=batch_size, seed=seed,
                          process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                          num_workers=num_workers, read_threads=read_threads,
                          prefetch_buffer_size=prefetch_buffer_size, per_worker_buffer=per_worker_buffer,
                          augment=augment, start_example=start_example)


def _train_batches(src, spec: ExampleSpec, *, batch_size: int, seed: int, process_index: int, process_count: int,
                   num_epochs: Optional[int], num_workers: int, read_threads: int, prefetch_buffer_size: int,
                   per_worker_buffer: int, augment: Optional[Augment], start_example: int = 0) -> grain.IterDataset:
    """The training pipeline over a random-access source (`len`, `src[i]`, `src.paths`)."""
    if start_example < 0:
        raise ValueError(f"start_example must be >= 0, got {start_example}")
    ds = grain.MapDataset.source(src).seed(seed).shuffle().repeat(num_epochs)
    # random_map before the host slice: each example's generator comes from its global
    # position, so the draws do not depend on the number of hosts.
    ds = ds.map_with_index(_with_index).random_map(_IndexedRandomProcess(spec, augment))
    if start_example:
        ds = ds[start_example:]  # after the indexed draws: the examples keep their global positions' draws
    ds = _in_worker_order(ds[process_index::process_count], num_workers, batch_size)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    return _finish_train(it, batch_size, num_workers, per_worker_buffer, finite=num_epochs is not None,
                         # Runs of broken records can straddle two reshuffled epochs (and a host sees
                         # only its slice), so only twice the whole data set in a row means none is usable.
                         give_up_after=2 * len(src), data=_describe(src.paths))


def eval_dataset(paths, spec: ExampleSpec, *, batch_size: int, seed: int = 0, rounds: int = 1,
                 fixed_offsets: FixedOffsets = None, process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0, read_threads: int = 4, prefetch_buffer_size: int = 16,
                 per_worker_buffer: int = 2) -> grain.IterDataset:
    """Evaluation batches: every clip `rounds` times, the last batch padded (`mask`).

    `fixed_offsets`: None (random offset per round, official `load_fixed_offsets_on=[]`
    with `iter_times=rounds`: 2 for LRS3, 25 for VGGSound-Sparse), `"labels"` (the
    record's `offset_sec` / `vstart_sec`; a record without both draws as with None), or
    a `{clip_id: (offset_sec, vstart_sec)}` mapping (`read_fixed_offsets_csv`).
    `meta["offset"]` says per example which it got ("fixed" / "drawn"); the dataset's
    `num_clips` is N (`index % N` is an example's clip). Every host yields
    `ceil(ceil(rounds * N / process_count) / batch_size)` batches, the same ones for every
    `num_workers` (`_WorkerBatchOrder`; broken records change the grouping, not what is scored).
    """
    _check_eval(spec, rounds, process_index, process_count)
    return _eval_batches(ArrayRecordSource(paths), spec, batch_size=batch_size, seed=seed, rounds=rounds,
                         fixed_offsets=fixed_offsets, process_index=process_index, process_count=process_count,
                         num_workers=num_workers, read_threads=read_threads,
                         prefetch_buffer_size=prefetch_buffer_size, per_worker_buffer=per_worker_buffer)


def tfrecord_eval_dataset(paths, spec: ExampleSpec, *, batch_size: int, seed: int = 0, rounds: int = 1,
                          fixed_offsets: FixedOffsets = None, process_index: int = 0, process_count: int = 1,
                          num_workers: int = 0, read_threads: int = 4, prefetch_buffer_size: int = 16,
                          per_worker_buffer: int = 2, verify_crc: bool = True) -> grain.IterDataset:
    """`eval_dataset` over TFRecord shards: the same batches, in the same order.

    Evaluation needs what a stream alone cannot give: the clip count `N` (every host must
    run `ceil(ceil(rounds * N / process_count) / batch_size)` batches for the collective
    eval steps) and a clip number per record (the per-(round, clip) draws). One pass over
    the record headers (12 bytes read per record, the data skipped; cached per file while
    its size and mtime hold) gives both, plus each record's byte offset, so that the
    records are then read exactly like ArrayRecord ones: the host split is by global
    index (`round * N + clip`, host `p` takes `p::process_count`), every record once per
    round across hosts, shorter hosts padded with masked batches. Sorted shards, then
    file order, define the clip numbers, so N and the numbering agree on every host.

    A record with a bad data CRC is a `Broken` slot, skipped and reported in
    `meta["skipped"]`; damage that ends a shard's framing (corrupt length, truncated
    tail) takes one `Broken` slot at that shard's end (`sources.TFRecordIndexedSource`).
    """
    _check_eval(spec, rounds, process_index, process_count)
    files = expand_paths(paths)
    _require_tfrecord(files)
    return _eval_batches(TFRecordIndexedSource(files, verify=verify_crc), spec, batch_size=batch_size, seed=seed,
                         rounds=rounds, fixed_offsets=fixed_offsets, process_index=process_index,
                         process_count=process_count, num_workers=num_workers, read_threads=read_threads,
                         prefetch_buffer_size=prefetch_buffer_size, per_worker_buffer=per_worker_buffer)


def _check_eval(spec: ExampleSpec, rounds: int, process_index: int, process_count: int):
    _check_host(process_index, process_count)
    if spec.train:
        raise ValueError("eval_dataset needs ExampleSpec(train=False)")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")


def _eval_batches(src, spec: ExampleSpec, *, batch_size: int, seed: int, rounds: int, fixed_offsets: FixedOffsets,
                  process_index: int, process_count: int, num_workers: int, read_threads: int,
                  prefetch_buffer_size: int, per_worker_buffer: int) -> grain.IterDataset:
    """The evaluation pipeline over a random-access source (`len`, `src[i]`)."""
    total = rounds * len(src)
    ds = grain.MapDataset.range(total).map(_EvalProcess(src, spec, seed, fixed_offsets))
    ds = _in_worker_order(ds[process_index::process_count], num_workers, batch_size)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    pad = _empty_example(spec)
    it = _DropBroken(it, last_carrier=pad).batch(
        batch_size, drop_remainder=False, batch_fn=functools.partial(collate, pad_to=batch_size, pad_example=pad))
    it = _in_workers(it, num_workers, per_worker_buffer)
    out = _FixedCount(it, _eval_num_batches(total, process_count, batch_size), collate([pad] * batch_size))
    # `index % num_clips` is an example's clip: what an evaluation needs to count the
    # clips it scored across rounds and hosts.
    out.num_clips = len(src)
    return out


def _eval_num_batches(total: int, process_count: int, batch_size: int) -> int:
    """Batches every host runs: those of the host with the most examples (host 0).

    The same with worker processes: `_WorkerBatchOrder` leaves only one worker a padded
    last batch. A broken record never adds one: it drops a real example, and at the end
    of a worker's share its report takes one example's place (`_DropBroken`).
    """
    return math.ceil(len(range(0, total, process_count)) / batch_size)


def _require_tfrecord(files: Sequence[str]):
    """A TFRecord reader over shards named as another format would read garbage."""
    for f in files:
        info = parse_shard_name(f)
        if info is not None and info["format"] != "tfrecord":
            raise ValueError(f"{f} is a {info['format']} shard, not TFRecord (check data.format)")


def tfrecord_train_dataset(paths, spec: ExampleSpec, *, batch_size: int, seed: int,
                           process_index: int = 0, process_count: int = 1,
                           num_epochs: Optional[int] = None, window_size: int = 256,
                           cycle_length: int = 4, num_workers: int = 0, verify_crc: bool = True,
                           per_worker_buffer: int = 2, augment: Optional[Augment] = None) -> grain.IterDataset:
    """Streaming training batches from TFRecord shards (no random access), for storage
    where a seek per record is expensive (object stores); elsewhere prefer
    `tfrecord_indexed_train_dataset` (global shuffle, threaded decoding).

    Shards are split between hosts (`files[process_index::process_count]`) and, inside a
    host, between worker processes; `cycle_length` shards are read interleaved and
    examples are shuffled in windows of `window_size` (a weaker shuffle than the
    ArrayRecord path's global one). State (byte offsets, window position, element
    counter) restores exactly. Records are decoded in the iterating thread, one at a
    time, unless `num_workers` > 0.
    """
    _check_host(process_index, process_count)
    _require_tfrecord(expand_paths(paths))
    files = expand_paths(paths)[process_index::process_count]
    if len(files) < max(1, num_workers):
        raise ValueError(f"host {process_index} has {len(files)} TFRecord shard(s) for {num_workers} workers;"
                         " write more shards (streaming splits work by shard)")
    shards = [TFRecordShardDataset(f, verify=verify_crc) for f in files]
    ds = grain.experimental.InterleaveIterDataset(shards, cycle_length=min(cycle_length, len(shards)))
    if num_epochs != 1:
        ds = grain.experimental.RepeatIterDataset(ds, num_epochs=num_epochs)
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window_size, seed=seed)
    ds = ds.random_map(_RandomProcess(spec, augment), seed=seed + 1)
    return _finish_train(ds, batch_size, num_workers, per_worker_buffer, finite=num_epochs is not None)


def read_fixed_offsets_csv(path) -> Dict[str, Tuple[float, float]]:
    """`{clip_id: (offset_sec, vstart_sec)}` from an official fixed-offset CSV.

    Accepts `path,offset_sec,vstart_sec` (data/fixed_offsets_*/*.csv) and
    `dataset_name,video_id,vstart_sec,offset_sec,is_sync` (VGGSound-Sparse clean, only
    rows with `is_sync == 1`, as the official dataset keeps).
    """
    out: Dict[str, Tuple[float, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if "is_sync" in row and str(row["is_sync"]).strip() != "1":
                continue
            key = row.get("path") or row.get("video_id")
            if key is None:
                raise ValueError(f"{path}: needs a 'path' or 'video_id' column")
            val = (float(row["offset_sec"]), float(row["vstart_sec"]))
            if key in out and out[key] != val:
                raise ValueError(f"{path}: {key} appears with two different offsets")
            out[key] = val
    return out


class Stage1Augment:
    """The stage-I augmentation hook: `augment.stage1_augment` on one example.

    Stage I segments do not overlap, so the shipped span is exactly the segments laid
    end to end: the video span reshapes to `[S, 16, ...]` and the audio span to
    `[S, 10240]`, the per-segment augmentations run, and the result goes back to spans.
    With `config.spatial_crop` (the official 192->224 "sometimes upscale" crop) the
    frames are decoded uncropped and the augmentation crops them.
    """

    def __init__(self, config: Optional[augment_lib.Stage1AugmentConfig] = None):
        self.config = config if config is not None else augment_lib.Stage1AugmentConfig()

    @property
    def needs_full_frames(self) -> bool:
        return bool(self.config.spatial_crop)

    def __call__(self, example, plan, rng):
        n = plan.segments.n_segments
        video, audio = example["video"], example["audio"]
        if video.shape[0] % n or audio.shape[0] % n:
            raise ValueError("Stage1Augment needs non-overlapping segments (stage I)")
        v, a = augment_lib.stage1_augment(video.reshape(n, -1, *video.shape[1:]), audio.reshape(n, -1),
                                          rng, self.config)
        return dict(example, video=np.ascontiguousarray(v.reshape(-1, *v.shape[2:])), audio=a.reshape(-1))


def mark_absl_flags_parsed():
    """grain's worker processes read an absl flag; outside `absl.app.run` that raises
    `UnparsedFlagAccessError` unless the flags are marked parsed."""
    from absl import flags  # noqa: PLC0415 - only needed for worker processes

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------- device


@functools.partial(jax.jit, static_argnames=("layout", "half", "dtype", "mel_method"))
def assemble_on_device(batch: Mapping[str, Any], layout: SegmentLayout, half: bool = True,
                       dtype=jnp.float32, mel_method: str = "fft"):
    """Host batch (uint8 span, waveform span) -> model inputs, on the device.

    Returns `video [B, S, 16, 3, H, W]` (official values: `half=True` for stages II/III,
    `False` for stage I evaluation) and `audio [B, S, 1, 128, 66]` float32. The gathers
    use static indices; the segment overlap is materialised only here.
    """
    video = jnp.asarray(batch["video"])  # [B, V, H, W, 3] uint8
    seg = jnp.take(video, jnp.asarray(layout.frame_index()), axis=1)  # [B, S, 16, H, W, 3]
    seg = jnp.moveaxis(seg, -1, -3)  # uint8 transpose: 4x cheaper than after the lookup
    v = normalize.video_uint8_to_model_input(seg, half=half, dtype=dtype)
    audio = jnp.asarray(batch["audio"])
    if audio.ndim == 2:  # waveform span [B, A]
        a = melspec.log_mel_jax(jnp.take(audio, jnp.asarray(layout.sample_index()), axis=1), method=mel_method)
    else:  # already log-mel [B, S, 1, 128, 66]
        a = audio.astype(jnp.float32)
    return v, a
