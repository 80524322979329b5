"""Evidence attribution (paper §4.1): which 0.1 s of each stream the offset prediction needs.

The official repository has no code for this; the method follows the paper's description.
For one clip with a known offset, one stream at a time (the other stays intact):

1. The 5 s window of the stream is cut into 50 intervals of 0.1 s.
2. K random masks (K = 256 by default) each replace every interval with probability 0.5
   by a *distractor* clip's content at the same positions: video frames, or audio
   samples before the log-mel, so the model sees real spectrograms of the mixture.
3. Each masked input is classified; a mask "keeps the prediction correct" when the
   predicted class is within `tolerance` (1) classes of the true one.
4. An interval's score is the share of the correct masks that KEPT it (left it
   unmasked). Intervals the model ignores score about 0.5 (masks are independent of
   correctness); intervals it needs score near 1; intervals whose presence confuses it
   score below 0.5. No correct mask at all gives NaN.

Where the intervals are (the convention, tested):
  * times are relative to the stream's own 5 s crop (the audio crop starts `offset_sec`
    after the video crop);
  * video frame `f` (presentation time `f / 25` s) belongs to interval
    `floor(f * 0.04 / 0.1) = (2 * f) // 5`, so intervals alternate 3 and 2 frames
    (0: frames 0-2, 1: frames 3-4, 2: frames 5-7, ...);
  * audio sample `n` belongs to interval `n // 1600`.
  The model's 14 segments cover frames 2..121 and samples 1280..78079 of the crop
  (official centred segments), so video interval 49 and audio interval 49 are never
  seen (they score about 0.5 and are flagged `seen: false`), and the first and last
  seen intervals are seen only in part.

Layers:
  * `attribute_stream(predict_masks, ...)`: the scoring rule on any function from bool
    masks `[b, N]` (True = replaced) to logits `[b, C]` (a model of known behaviour in
    the tests).
  * `attribute(predict, video, audio, distractor_video, distractor_audio, ...)`: any
    function of the raw crops (`[b, T, ...]`, `[b, L]`) -> logits; no caching.
  * `attribute_clip(model, params, frames, audio, ...)`: a Synchformer on a decoded clip
    (uint8 frames at 25 fps, 16 kHz audio). The intact stream's features are computed
    once and reused; per mask batch only the masked stream's extractor and `compare`
    run (jitted).
  * `plot_attribution`: a Fig. 3-like PNG (needs matplotlib, the `plots` extra).
  * `stream_peak`: where a stream's scores peak and whether the peak beats chance.
  * `isolated_event_check`: one synthetic event, does the attribution peak at it?
  * `add_attribute_parser` / `attribute_cli`: `synchformer-jax attribute`.
"""
from __future__ import annotations

import argparse
import dataclasses
import fractions
import functools
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from synchformer_jax.input import transforms

__all__ = [
    "INTERVAL_SEC", "frame_intervals", "sample_intervals", "sample_masks", "mix_stream",
    "interval_scores", "StreamAttribution", "attribute_stream", "attribute", "ClipAttribution",
    "attribute_clip", "plot_attribution", "stream_peak", "isolated_event_check", "add_attribute_parser",
    "attribute_cli",
]

INTERVAL_SEC = 0.1
VIDEO_FPS = transforms.VIDEO_FPS
AUDIO_RATE = transforms.AUDIO_RATE


# ------------------------------------------------------------------ intervals and masks


def _ratio(interval_sec: float) -> fractions.Fraction:
    return fractions.Fraction(interval_sec).limit_denominator(1_000_000)


def frame_intervals(num_frames: int, fps: int = VIDEO_FPS, interval_sec: float = INTERVAL_SEC) -> np.ndarray:
    """`[num_frames]` int: the interval of each frame, by its presentation time `f / fps`.

    `floor(f / fps / interval_sec)` in exact integer arithmetic: at 25 fps and 0.1 s,
    `(2 * f) // 5`, i.e. intervals of 3, 2, 3, 2, ... frames.
    """
    r = _ratio(interval_sec)
    f = np.arange(num_frames, dtype=np.int64)
    return (f * r.denominator) // (int(fps) * r.numerator)


def sample_intervals(num_samples: int, rate: int = AUDIO_RATE, interval_sec: float = INTERVAL_SEC) -> np.ndarray:
    """`[num_samples]` int: the interval of each sample (`n // 1600` at 16 kHz / 0.1 s)."""
    r = _ratio(interval_sec)
    n = np.arange(num_samples, dtype=np.int64)
    return (n * r.denominator) // (int(rate) * r.numerator)


def sample_masks(rng: np.random.Generator, num_masks: int, num_intervals: int, p_mask: float = 0.5) -> np.ndarray:
    """`[num_masks, num_intervals]` bool, True = interval replaced by the distractor."""
    return rng.random((num_masks, num_intervals)) < p_mask


def mix_stream(base, distractor, masks, interval_of, xp=np):
    """Replace the masked intervals of `base` by `distractor` at the same positions.

    Args:
      base, distractor: `[T, ...]` (frames `[T, H, W, 3]` or samples `[L]`), same shape.
      masks: `[b, N]` bool, True = take the distractor.
      interval_of: `[T]` int, the interval of each position (`frame_intervals` /
        `sample_intervals`).
      xp: `numpy` or `jax.numpy`.

    Returns `[b, T, ...]`.
    """
    take = xp.asarray(masks)[:, xp.asarray(interval_of)]  # [b, T]
    take = take.reshape(take.shape + (1,) * (base.ndim - 1))
    return xp.where(take, xp.asarray(distractor)[None], xp.asarray(base)[None])


def interval_scores(masks: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """`[N]`: share of the correct masks that kept each interval (NaN if none was correct)."""
    masks = np.asarray(masks, bool)
    correct = np.asarray(correct, bool)
    if not correct.any():
        return np.full(masks.shape[1], np.nan)
    return (~masks[correct]).mean(axis=0)


@dataclasses.dataclass
class StreamAttribution:
    """Attribution of one stream: `scores [N]` and what they were computed from."""
    scores: np.ndarray  # [N] float, NaN when no mask kept the prediction correct
    masks: np.ndarray  # [K, N] bool, True = replaced
    predictions: np.ndarray  # [K] int, predicted class per mask
    correct: np.ndarray  # [K] bool
    p_mask: float

    @property
    def num_correct(self) -> int:
        return int(self.correct.sum())

    def standard_error(self) -> float:
        """Binomial standard error of a score of an ignored interval (about 0.5)."""
        n = max(self.num_correct, 1)
        return math.sqrt(self.p_mask * (1 - self.p_mask) / n)


def stream_peak(attr: StreamAttribution, event_interval: int, *, window: tuple[int, int] = (-1, 2),
                min_z: float = 4.0) -> dict[str, Any]:
    """Where one stream's scores peak, and whether that peak is a real one at the event.

    Even a stream the model ignores has a highest score: with n correct masks every
    score is a share of n coin flips, so the largest of ~50 of them lands about 2.3
    standard errors (`0.5 / sqrt(n)`) above 0.5, at an interval set by the mask seed.
    The peak therefore counts only when it is within `window` intervals of
    `event_interval` AND its z-score `(peak - 0.5) / SE` is at least `min_z` (4: a
    chance peak that high among 50 intervals has probability ~2e-3). Scores are shares of
    the same n, so several intervals can share the highest one; the peak is then the one
    of them nearest the event (the scores cannot tell them apart).
    """
    scores = np.asarray(attr.scores, float)
    if np.all(np.isnan(scores)):
        return {"event_interval": int(event_interval), "peak_interval": -1, "peak_score": None, "peak_z": None,
                "event_score": None, "median_score": None, "num_correct": attr.num_correct,
                "significant": False, "peak_at_event": False}
    top = np.flatnonzero(scores == np.nanmax(scores))
    peak = int(top[np.argmin(np.abs(top - event_interval))])
    se = attr.standard_error()
    z = float((scores[peak] - 0.5) / se)
    at_event = window[0] <= peak - event_interval <= window[1]
    has_event = 0 <= event_interval < len(scores) and not np.isnan(scores[event_interval])
    return {"event_interval": int(event_interval), "peak_interval": peak, "peak_score": float(scores[peak]),
            "peak_z": z, "event_score": float(scores[event_interval]) if has_event else None,
            "median_score": float(np.nanmedian(scores)), "num_correct": attr.num_correct,
            "significant": z >= min_z, "peak_at_event": bool(at_event and z >= min_z)}


class DistractorError(ValueError):
    """The distractor clip cannot fill the masked intervals (its frames or length)."""


def check_counts(*, num_samples: int, batch_size: int, tolerance: int, p_mask: float) -> None:
    """ValueError for settings that give no scores: no masks (every score NaN), no batch,
    a negative tolerance (no prediction counts), a mask probability of 0 or 1 (no mask
    both keeps and replaces an interval)."""
    if num_samples < 1:
        raise ValueError(f"num_samples (masks per stream) must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size (masks per model call) must be >= 1, got {batch_size}")
    if tolerance < 0:
        raise ValueError(f"tolerance (classes from the true one) must be >= 0, got {tolerance}")
    if not 0.0 < p_mask < 1.0:
        raise ValueError(f"p_mask must be in (0, 1), got {p_mask}")


def attribute_stream(predict_masks: Callable[[np.ndarray], Any], num_intervals: int, true_class: int, *,
                     num_samples: int = 256, batch_size: int = 32, tolerance: int = 1,
                     p_mask: float = 0.5, seed: int | Sequence[int] = 0) -> StreamAttribution:
    """Scores of one stream from a function `masks [b, N] bool -> logits [b, C]`.

    Masks are drawn on the host (`numpy.random.default_rng(seed)`), and sent in batches
    of exactly `batch_size` (the last batch is padded by repeating its first mask, and
    the padding is dropped), so a jitted `predict_masks` compiles once.
    """
    check_counts(num_samples=num_samples, batch_size=batch_size, tolerance=tolerance, p_mask=p_mask)
    rng = np.random.default_rng(seed)
    masks = sample_masks(rng, num_samples, num_intervals, p_mask)
    preds = np.empty(num_samples, np.int64)
    for start in range(0, num_samples, batch_size):
        chunk = masks[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
        logits = np.asarray(predict_masks(chunk))
        if logits.ndim != 2 or logits.shape[0] != batch_size:
            raise ValueError(f"predict must return logits [{batch_size}, C]; got shape {logits.shape}")
        preds[start:start + n] = np.argmax(logits[:n], axis=-1)
    correct = np.abs(preds - int(true_class)) <= tolerance
    return StreamAttribution(interval_scores(masks, correct), masks, preds, correct, p_mask)


def attribute(predict: Callable[[np.ndarray, np.ndarray], Any], video: np.ndarray, audio: np.ndarray,
              distractor_video: np.ndarray, distractor_audio: np.ndarray, true_class: int, *,
              fps: int = VIDEO_FPS, rate: int = AUDIO_RATE, interval_sec: float = INTERVAL_SEC,
              num_samples: int = 256, batch_size: int = 32, tolerance: int = 1, p_mask: float = 0.5,
              seed: int = 0) -> dict[str, StreamAttribution]:
    """Both streams' attribution for any `predict(video [b, T, ...], audio [b, L]) -> logits [b, C]`.

    `video` / `audio` are the crops the prediction is made from (e.g. 125 frames and
    80 000 samples); the distractors have the same shapes. The stream not being masked
    is passed unchanged (broadcast over the batch). Nothing is cached: for a model use
    `attribute_clip`, which reuses the intact stream's features.
    """
    video, audio = np.asarray(video), np.asarray(audio)
    distractor_video, distractor_audio = np.asarray(distractor_video), np.asarray(distractor_audio)
    if video.shape != distractor_video.shape or audio.shape != distractor_audio.shape:
        raise ValueError(f"distractor shapes {distractor_video.shape}, {distractor_audio.shape} differ from the "
                         f"clip's {video.shape}, {audio.shape}")
    v_of = frame_intervals(video.shape[0], fps, interval_sec)
    a_of = sample_intervals(audio.shape[0], rate, interval_sec)
    b = batch_size
    audio_b = np.broadcast_to(audio[None], (b, *audio.shape))
    video_b = np.broadcast_to(video[None], (b, *video.shape))

    def predict_video(masks):
        return predict(mix_stream(video, distractor_video, masks, v_of), audio_b)

    def predict_audio(masks):
        return predict(video_b, mix_stream(audio, distractor_audio, masks, a_of))

    kw = dict(num_samples=num_samples, batch_size=batch_size, tolerance=tolerance, p_mask=p_mask)
    return {"video": attribute_stream(predict_video, int(v_of[-1]) + 1, true_class, seed=[seed, 0], **kw),
            "audio": attribute_stream(predict_audio, int(a_of[-1]) + 1, true_class, seed=[seed, 1], **kw)}


# -------------------------------------------------------------------- a Synchformer clip


@dataclasses.dataclass
class ClipAttribution:
    """`attribute_clip`'s result: per-stream scores plus what the plot and JSON need."""
    video: StreamAttribution
    audio: StreamAttribution
    grid: np.ndarray  # [C] offset of each class, seconds
    true_class: int
    predicted_class: int  # of the unmasked clip
    probabilities: np.ndarray  # [C] softmax of the unmasked clip
    v_start_sec: float  # video crop start in the clip (frame-snapped)
    a_start_sec: float  # audio crop start in the clip
    offset_sec: float
    tolerance: int
    video_seen: np.ndarray  # [N] bool: the interval has frames the segments use
    audio_seen: np.ndarray  # [N] bool
    video_crop: np.ndarray  # [T, h, w, 3] uint8, what the model sees (for the plot)
    audio_crop: np.ndarray  # [L] float32
    interval_sec: float = INTERVAL_SEC
    seed: int = 0
    events: Optional[list] = None  # synthetic events (clip time), for the plot
    distractor_audio_gain: float = 1.0  # the distractor's audio was scaled by this

    @property
    def predicted_offset_sec(self) -> float:
        return float(self.grid[self.predicted_class])

    @property
    def true_offset_sec(self) -> float:
        """The shift the audio crop really has (the applied `offset_sec`)."""
        return float(self.offset_sec)

    @property
    def true_class_offset_sec(self) -> float:
        """The offset of the class masks are scored against: the applied shift's nearest
        class, a different value when the shift lies between two classes."""
        return float(self.grid[self.true_class])

    @property
    def offset_on_grid(self) -> bool:
        return abs(round(self.true_class_offset_sec, 2) - self.offset_sec) < 1e-9

    def describe_truth(self) -> str:
        """`true offset +0.40 s (class 12)`, or for a shift between classes what it was
        scored against."""
        if self.offset_on_grid:
            return f"true offset {self.true_offset_sec:+.2f} s (class {self.true_class})"
        return (f"true offset {self.true_offset_sec:+.2f} s (between classes: scored against the nearest, "
                f"class {self.true_class} = {self.true_class_offset_sec:+.2f} s)")

    def to_json(self) -> dict[str, Any]:
        def stream(s: StreamAttribution, start: float, seen: np.ndarray) -> dict[str, Any]:
            return {"scores": [None if np.isnan(x) else round(float(x), 6) for x in s.scores],
                    "seen": seen.tolist(), "window_start_sec": round(start, 6),
                    "num_masks": int(s.masks.shape[0]), "num_correct": s.num_correct,
                    "standard_error_at_0.5": round(s.standard_error(), 6)}
        return {"interval_sec": self.interval_sec, "offset_sec": self.offset_sec,
                "true_class": self.true_class, "true_offset_sec": self.true_offset_sec,
                "true_class_offset_sec": self.true_class_offset_sec, "offset_on_grid": self.offset_on_grid,
                "predicted_class": self.predicted_class, "predicted_offset_sec": self.predicted_offset_sec,
                "predicted_probability": float(self.probabilities[self.predicted_class]),
                "tolerance_classes": self.tolerance, "seed": self.seed,
                "distractor_audio_gain": round(float(self.distractor_audio_gain), 6),
                "video": stream(self.video, self.v_start_sec, self.video_seen),
                "audio": stream(self.audio, self.a_start_sec, self.audio_seen),
                "events": self.events,
                "convention": "interval i of a stream covers [window_start + 0.1 i, window_start + 0.1 (i + 1)) "
                              "of the clip; video frame f of the crop is in interval (2 f) // 5, audio sample n "
                              "in n // 1600; score = share of the masks with a correct prediction (within "
                              "tolerance) that kept the interval; ~0.5 = not used, ~1 = needed"}


def _center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    i, j = transforms.center_crop_top_left(frames.shape[1], frames.shape[2], size)
    return transforms.crop_frames(frames, (i, j), size)


@dataclasses.dataclass(frozen=True)
class _MaskedFns:
    """Jitted pieces of `attribute_clip` for one model config and crop length."""
    v_of: np.ndarray  # [T] interval of each crop frame
    a_of: np.ndarray  # [L] interval of each crop sample
    seg_frames: np.ndarray  # [S, 16] crop frame of each segment frame
    seg_samples: np.ndarray  # [S, 10240] crop sample of each segment sample
    video_features: Callable  # (params, masks [b, N], base, distractor) -> vfeat [b, S, 8, D]
    audio_features: Callable  # (params, masks [b, N], base, distractor) -> afeat [b, S, 6, D]
    compare: Callable  # (params, vfeat [b, ...], afeat [b, ...]) -> logits [b, C]


@functools.lru_cache(maxsize=8)
def _masked_fns(cfg, v_crop_len: int, a_crop_len: int, chunk_size: Optional[int]) -> _MaskedFns:
    # Cached per config and shape so that repeated attributions (several clips, the
    # CLI) reuse the compiled extractors.
    import jax
    import jax.numpy as jnp

    from synchformer_jax.input import melspec, normalize
    from synchformer_jax.models import synchformer as sf

    model = sf.Synchformer(cfg)
    seg = transforms.generate_segments(v_crop_len, a_crop_len, n_segments=cfg.n_segments,
                                       segment_size_vframes=cfg.video.num_frames, is_start_random=False)
    seg_frames = seg.frame_indices
    seg_samples = seg.sample_starts[:, None] + np.arange(seg.a_ranges[0, 1] - seg.a_ranges[0, 0])[None]
    v_of, a_of = frame_intervals(v_crop_len), sample_intervals(a_crop_len)
    compute = jnp.dtype(cfg.dtype)

    @jax.jit
    def video_features(params, masks, base, dist):
        crops = mix_stream(base, dist, masks, v_of, jnp)  # uint8 [b, T, h, w, 3]
        seg_u8 = jnp.moveaxis(jnp.take(crops, jnp.asarray(seg_frames), axis=1), -1, -3)
        video = normalize.video_uint8_to_model_input(seg_u8, half=True, dtype=compute)
        return sf.extract_video_features(model, params, video, chunk_size=chunk_size)

    @jax.jit
    def audio_features(params, masks, base, dist):
        crops = mix_stream(base, dist, masks, a_of, jnp)  # float32 [b, L]
        audio = melspec.log_mel_jax(jnp.take(crops, jnp.asarray(seg_samples), axis=1))
        return sf.extract_audio_features(model, params, audio, chunk_size=chunk_size)

    @jax.jit
    def compare(params, vfeat, afeat):
        return sf.compare(model, params, vfeat, afeat)

    return _MaskedFns(v_of, a_of, seg_frames, seg_samples, video_features, audio_features, compare)


def attribute_clip(model, params, frames: np.ndarray, audio: np.ndarray, *, v_start_sec: float,
                   offset_sec: float, distractor_frames: np.ndarray, distractor_audio: np.ndarray,
                   distractor_start_sec: float = 0.0, num_samples: int = 256, batch_size: int = 16,
                   tolerance: int = 1, p_mask: float = 0.5, seed: int = 0,
                   chunk_size: Optional[int] = None, events: Optional[list] = None,
                   match_audio_level: bool = False) -> ClipAttribution:
    """Attribution of a Synchformer (offset head) on one decoded clip.

    Args:
      model: a `Synchformer` module (its `config` gives segments, crop size, class grid).
      params: its parameters.
      frames: `uint8 [T, H, W, 3]` at 25 fps; audio: `float32 [N]` at 16 kHz, sample 0
        at the time of frame 0 (as `media.conform` / `decode_media` return them).
      v_start_sec, offset_sec: the official fixed-offset setting (`example.py`): the
        video crop starts at `int(v_start_sec * 25)`, the audio crop at
        `int((v_start_sec + offset_sec) * 16000)`; the true class is the offset's nearest
        (an offset outside the class grid is a ValueError).
      distractor_frames, distractor_audio: another clip (any frame size of at least the
        model's crop; centre-cropped), whose 5 s from `distractor_start_sec` fill the
        masked intervals. A clip without audio-visual events is the natural choice.
      num_samples: masks per stream (K); batch_size: masks per model call.
      tolerance: a prediction within this many classes of the true one counts as correct.
      chunk_size: segments per extractor call (bounds memory; None = all at once).
      events: optional synthetic events (clip time) carried to the plot and JSON.
      match_audio_level: scale the distractor's audio so that its typical loudness (the
        median RMS of its 0.1-s intervals) is the clip's. A distractor much louder or
        quieter than the clip puts a loudness step at every mask edge, and a step is
        itself an audio event that a sync model may read as evidence (`audio_level_gain`).
    """
    from synchformer_jax.models.config import HEAD_OFFSET, KIND_SYNC

    check_counts(num_samples=num_samples, batch_size=batch_size, tolerance=tolerance, p_mask=p_mask)
    cfg = model.config
    if cfg.kind != KIND_SYNC or cfg.sync.head != HEAD_OFFSET:
        raise ValueError(f"attribution needs an offset model (kind {KIND_SYNC!r}, head {HEAD_OFFSET!r}); "
                         f"got kind {cfg.kind!r}, head {cfg.sync.head!r}")
    frames, audio = np.asarray(frames), np.asarray(audio, np.float32)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3]; got {frames.dtype} {frames.shape}")
    from synchformer_jax.predict import check_offset

    # Outside the grid the "true class" would be the end class, not the shift.
    check_offset(offset_sec, transforms.class_grid(cfg.sync.max_offset_sec, cfg.sync.num_offset_classes))
    crop = cfg.video.img_size
    plan = transforms.plan_sync_example(
        frames.shape[0], audio.shape[0], frames.shape[1], frames.shape[2], train=False,
        offset_sec=offset_sec, v_start_i_sec=v_start_sec, crop_size=crop, n_segments=cfg.n_segments,
        segment_size_vframes=cfg.video.num_frames, max_off_sec=cfg.sync.max_offset_sec,
        grid_size=cfg.sync.num_offset_classes)
    tc = plan.temporal
    base_v, base_a = transforms.take_temporal_crop(frames, audio, tc)
    base_v = np.ascontiguousarray(transforms.crop_frames(base_v, plan.top_left, crop))
    base_a = np.ascontiguousarray(base_a)

    d_frames, d_audio = np.asarray(distractor_frames), np.asarray(distractor_audio, np.float32)
    dv0, da0 = transforms.sec2frames(distractor_start_sec, VIDEO_FPS), transforms.sec2frames(distractor_start_sec,
                                                                                            AUDIO_RATE)
    if d_frames.dtype != np.uint8 or d_frames.ndim != 4:
        raise DistractorError(f"distractor frames must be uint8 [T, H, W, 3]; got {d_frames.dtype} {d_frames.shape}")
    if d_frames.shape[0] < dv0 + tc.v_crop_len or d_audio.shape[0] < da0 + tc.a_crop_len:
        raise DistractorError(f"the distractor is too short: needs {tc.v_crop_len} frames and {tc.a_crop_len} samples "
                         f"from {distractor_start_sec} s; has {d_frames.shape[0]} frames, {d_audio.shape[0]} samples")
    dist_v = np.ascontiguousarray(_center_crop(d_frames[dv0:dv0 + tc.v_crop_len], crop))
    dist_a = np.ascontiguousarray(d_audio[da0:da0 + tc.a_crop_len])
    gain = audio_level_gain(base_a, dist_a) if match_audio_level else 1.0
    if match_audio_level:
        dist_a = dist_a * np.float32(gain)

    fns = _masked_fns(cfg, tc.v_crop_len, tc.a_crop_len, chunk_size)
    if not (np.array_equal(fns.seg_frames, plan.segments.frame_indices)
            and np.array_equal(fns.seg_samples[:, 0], plan.segments.sample_starts)):
        raise AssertionError("segment layout differs from the test-time plan")
    v_of, a_of = fns.v_of, fns.a_of
    video_seen = np.zeros(int(v_of[-1]) + 1, bool)
    video_seen[np.unique(v_of[fns.seg_frames])] = True
    audio_seen = np.zeros(int(a_of[-1]) + 1, bool)
    audio_seen[np.unique(a_of[fns.seg_samples])] = True

    # The unmasked clip through the same compiled functions (an all-False mask batch:
    # b identical rows), so the masked and unmasked paths are one computation and the
    # intact stream's features are computed once, already batched.
    vfeat = fns.video_features(params, np.zeros((batch_size, len(video_seen)), bool), base_v, dist_v)
    afeat = fns.audio_features(params, np.zeros((batch_size, len(audio_seen)), bool), base_a, dist_a)
    logits = np.asarray(fns.compare(params, vfeat, afeat)[0], np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()

    def predict_video(masks):
        return fns.compare(params, fns.video_features(params, masks, base_v, dist_v), afeat)

    def predict_audio(masks):
        return fns.compare(params, vfeat, fns.audio_features(params, masks, base_a, dist_a))

    kw = dict(num_samples=num_samples, batch_size=batch_size, tolerance=tolerance, p_mask=p_mask)
    v_attr = attribute_stream(predict_video, len(video_seen), tc.offset_class, seed=[seed, 0], **kw)
    a_attr = attribute_stream(predict_audio, len(audio_seen), tc.offset_class, seed=[seed, 1], **kw)
    grid = transforms.class_grid(cfg.sync.max_offset_sec, cfg.sync.num_offset_classes)
    return ClipAttribution(
        video=v_attr, audio=a_attr, grid=grid, true_class=int(tc.offset_class),
        predicted_class=int(np.argmax(logits)), probabilities=probs, v_start_sec=tc.v_start_i / VIDEO_FPS,
        a_start_sec=tc.a_start_i / AUDIO_RATE, offset_sec=float(tc.offset_sec), tolerance=tolerance,
        video_seen=video_seen, audio_seen=audio_seen, video_crop=base_v, audio_crop=base_a, seed=seed,
        events=events, distractor_audio_gain=gain)


def audio_level_gain(reference: np.ndarray, distractor: np.ndarray, interval: int = 1600) -> float:
    """The gain that gives `distractor` the typical loudness of `reference`: the ratio of
    their median RMS over 0.1-s intervals (the median, so that a few loud events do not
    set the level). 1.0 when the distractor is silent (nothing to scale)."""
    def typical_rms(x: np.ndarray) -> float:
        x = np.asarray(x, np.float64)
        n = max(1, x.size // interval)
        return float(np.median(np.sqrt(np.mean(x[:n * interval].reshape(n, -1) ** 2, axis=1))))

    d = typical_rms(distractor)
    return typical_rms(reference) / d if d > 0 else 1.0


# ------------------------------------------------------------------------------- plots


def _log_mel_image(audio: np.ndarray) -> np.ndarray:
    """`[128, frames]` log-mel of the whole crop (the official front end, one STFT)."""
    from synchformer_jax.input import melspec

    half = melspec.N_FFT // 2
    x = np.pad(np.asarray(audio, np.float64), (half, half), mode="reflect")
    n = 1 + len(audio) // melspec.HOP_LENGTH
    start = np.arange(n)[:, None] * melspec.HOP_LENGTH + (melspec.N_FFT - melspec.WIN_LENGTH) // 2
    frames = x[start + np.arange(melspec.WIN_LENGTH)[None]] * melspec.hann_window()
    spec = np.fft.rfft(frames, n=melspec.N_FFT, axis=-1)
    mel = (spec.real ** 2 + spec.imag ** 2) @ melspec.mel_filterbank().astype(np.float64)
    return np.log(mel + melspec.LOG_EPS).T


def plot_attribution(result: ClipAttribution, path: str | os.PathLike, *, title: Optional[str] = None,
                     n_frames_shown: int = 10) -> pathlib.Path:
    """A Fig. 3-like PNG: frame strip, video scores, log-mel, audio scores.

    The x axis is clip time, so the audio panels sit `offset` to the right of the video
    panels; the true audio start (= where the audio crop begins) and the start the
    predicted offset implies are marked, as are synthetic events when known.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is only in the `plots` extra
        raise ImportError("plotting the attribution needs matplotlib: pip install 'synchformer-jax[plots]'") from e

    r = result
    dur_v = r.video_crop.shape[0] / VIDEO_FPS
    dur_a = r.audio_crop.shape[0] / AUDIO_RATE
    pred_start = r.v_start_sec + r.predicted_offset_sec
    lo = min(r.v_start_sec, r.a_start_sec, pred_start) - 0.05
    hi = max(r.v_start_sec + dur_v, r.a_start_sec + dur_a, pred_start) + 0.05
    fig = Figure(figsize=(12, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [1.3, 1, 1.3, 1]})

    # Frame strip: n frames evenly over the video window, each drawn over its own time slot.
    step = dur_v / n_frames_shown
    for k in range(n_frames_shown):
        f = min(int(round((k + 0.5) * step * VIDEO_FPS)), r.video_crop.shape[0] - 1)
        axes[0].imshow(r.video_crop[f], extent=(r.v_start_sec + k * step, r.v_start_sec + (k + 1) * step, 0, 1),
                       aspect="auto", interpolation="nearest")
    axes[0].set_ylim(0, 1)
    axes[0].set_yticks([])
    axes[0].set_ylabel("video")

    axes[2].imshow(_log_mel_image(r.audio_crop), origin="lower", aspect="auto", cmap="magma",
                   extent=(r.a_start_sec, r.a_start_sec + dur_a, 0, 128), interpolation="nearest")
    axes[2].set_ylabel("audio\n(log-mel)")
    axes[2].set_yticks([])

    for ax, s, start, seen, colour, name in (
            (axes[1], r.video, r.v_start_sec, r.video_seen, "tab:blue", "video"),
            (axes[3], r.audio, r.a_start_sec, r.audio_seen, "tab:orange", "audio")):
        n = len(s.scores)
        edges = start + INTERVAL_SEC * np.arange(n + 1)
        if s.num_correct:
            ax.stairs(s.scores, edges, baseline=None, color=colour, linewidth=1.8, label=f"{name} score")
            band = 2 * s.standard_error()  # +-2 standard errors of an unused interval
            ax.axhspan(0.5 - band, 0.5 + band, color="0.92", lw=0, zorder=0)
        for i in np.flatnonzero(~seen):  # intervals no segment covers
            ax.axvspan(edges[i], edges[i + 1], color="0.8", lw=0)
        ax.axhline(0.5, color="0.4", ls=":", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"{name}\nscore")
        note = f"{s.num_correct}/{s.masks.shape[0]} masks correct" + ("" if s.num_correct else ": no scores")
        ax.text(0.005, 0.04, note, transform=ax.transAxes, fontsize=8, color="0.3")

    for ax in axes[2:]:
        ax.axvline(r.a_start_sec, color="tab:green", lw=2, label=f"true audio start (offset {r.offset_sec:+.2f} s)")
        ax.axvline(pred_start, color="tab:red", lw=2, ls="--",
                   label=f"predicted audio start (offset {r.predicted_offset_sec:+.2f} s)")
    axes[0].axvline(r.v_start_sec, color="k", lw=1)
    for e in r.events or []:
        for ax in axes:
            ax.axvline(float(e["time_sec"]), color="white" if ax is axes[2] else "k", ls=":", lw=1.2)
    axes[3].legend(loc="upper right", fontsize=8)
    axes[3].set_xlim(lo, hi)
    axes[3].set_xlabel("clip time (s)")
    p = r.probabilities[r.predicted_class]
    fig.suptitle(title or (f"evidence attribution: {r.describe_truth()}, "
                           f"predicted {r.predicted_offset_sec:+.2f} s (class {r.predicted_class}, p={p:.2f})"))
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------ isolated-event check


def _demo_clip_size(img_size: int) -> int:
    # The demo renders 72 px clips for its 64 px crop; the same margin (9/8) elsewhere.
    return int(math.ceil(img_size * 9 / 8 / 2)) * 2


def isolated_event_check(model_dir: str | os.PathLike, *, seed: int = 0, event_time_sec: float = 5.0,
                         v_start_sec: float = 2.4, offset_sec: float = 0.4, kind: Optional[str] = None,
                         sound: str = "burst", num_samples: int = 1024, batch_size: int = 32,
                         clip_size: Optional[int] = None, peak_window: tuple[int, int] = (-1, 2),
                         min_z: float = 4.0, distractor_onset_sec: Optional[float] = None,
                         match_audio_level: bool = True,
                         plot_path: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Does the attribution of a (demo-trained) model peak at a lone synthetic event?

    Renders a 10 s synthetic clip with exactly one event at `event_time_sec` (clip
    time; `kind="onset"`: the demo's lamp switching on, `"pulse"`: the lamp on for
    0.12 s, else a flash/bounce/collide with `sound`; None: the cue the model was
    demo-trained on, from its folder's provenance, else "onset"), masks with a cue-free
    synthetic distractor of the same family, and
    compares each stream's highest-scoring interval with the interval holding the event
    onset (`stream_peak`). A peak counts as at the event when it is within `peak_window`
    intervals of the onset (-1..+2: the flash fades over 4 frames and the sound decays
    over up to 0.3 s after the onset) and stands `min_z` standard errors above 0.5.
    `num_samples` masks per stream: a peak needs z >= `min_z` with only the masks whose
    prediction stayed correct, and where the masks break many of them (one in six of
    the pulse demo's audio masks at seed 0 with a distractor 4x louder than the clip)
    256 masks leave too few for z 4 even at a score of ~0.7 (docs/benchmarks.md).
    `match_audio_level` (`attribute_clip`): on by default here, where the question is
    whether the model reads the event, not how it takes loudness steps the masks would
    add (the synthetic backgrounds' noise levels differ by up to 10x between clips).
    `distractor_onset_sec` (onset / pulse only): the distractor is a clip of the same
    kind, its lamp switching on at that clip time, cut from the video crop's start
    (so both lamps are off before, and on after, both onsets); the default None keeps
    its lamp off. Returns a JSON-able report with `passed`.
    """
    from synchformer_jax import pretrained, synthetic
    from synchformer_jax.models.synchformer import Synchformer

    loaded = pretrained.load_model(model_dir)
    model = Synchformer(loaded.config)
    size = clip_size or _demo_clip_size(loaded.config.video.img_size)
    if kind is None:
        trained_on = pretrained.read_provenance(model_dir).get("synthetic_clip") or {}
        kind = "pulse" if trained_on.get("cue") == synthetic.CUE_PULSE else "onset"
    # "onset": the CPU demo's cue (a lamp that switches on for good, with its hum);
    # "pulse": the same lamp and hum for 0.12 s only.
    cue = {"onset": synthetic.CUE_ONSET, "pulse": synthetic.CUE_PULSE}.get(kind, synthetic.CUE_EVENTS)
    event = {"kinds": [kind], "sounds": [sound]} if cue == synthetic.CUE_EVENTS else {}
    frames, audio, events = synthetic.make_clip_with_events(seed, [event_time_sec], height=size, width=size,
                                                            cue=cue, **event)
    if distractor_onset_sec is not None and cue == synthetic.CUE_EVENTS:
        raise ValueError(f"distractor_onset_sec needs kind 'onset' or 'pulse', got kind={kind!r}")
    d_times = [] if distractor_onset_sec is None else [distractor_onset_sec]
    d_frames, d_audio, _ = synthetic.make_clip_with_events(seed + 1, d_times, height=size, width=size, cue=cue)
    d_start = 0.0 if distractor_onset_sec is None else v_start_sec
    result = attribute_clip(model, loaded.params, frames, audio, v_start_sec=v_start_sec, offset_sec=offset_sec,
                            distractor_frames=d_frames, distractor_audio=d_audio, distractor_start_sec=d_start,
                            num_samples=num_samples, batch_size=batch_size, seed=seed, events=events,
                            match_audio_level=match_audio_level)
    event = events[0]
    report: dict[str, Any] = {"model": str(model_dir), "kind": kind, "num_samples": num_samples, "event": event,
                              "distractor_onset_sec": distractor_onset_sec,
                              "distractor_audio_gain": result.distractor_audio_gain,
                              "v_start_sec": result.v_start_sec,
                              "a_start_sec": result.a_start_sec, "true_class": result.true_class,
                              "predicted_class": result.predicted_class,
                              "prediction_correct": abs(result.predicted_class - result.true_class) <= 1}
    passed = report["prediction_correct"]  # attributing a wrong prediction shows nothing
    # The onset's interval, in integers: its frame / sample inside each crop.
    ev_frame = event["frame"] - int(round(result.v_start_sec * VIDEO_FPS))
    ev_sample = int(round(event["time_sec"] * AUDIO_RATE)) - int(round(result.a_start_sec * AUDIO_RATE))
    onsets = {"video": int(frame_intervals(ev_frame + 1)[-1]) if ev_frame >= 0 else -1,
              "audio": int(sample_intervals(ev_sample + 1)[-1]) if ev_sample >= 0 else -1}
    for name, s in (("video", result.video), ("audio", result.audio)):
        report[name] = stream_peak(s, onsets[name], window=peak_window, min_z=min_z)
        passed &= report[name]["peak_at_event"]
    report["passed"] = bool(passed)
    if plot_path is not None:
        report["plot"] = str(plot_attribution(result, plot_path))
    return report


# ------------------------------------------------------------------------------- CLI


def add_attribute_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attribute", help="evidence attribution (paper §4.1): per-0.1 s importance of each stream for the "
                          "offset prediction of one clip -> attribution.json + attribution.png")
    p.add_argument("video", help="media file (re-encoded in memory to 25 fps / 256 px / 16 kHz when needed)")
    p.add_argument("--checkpoint", required=True, help="model folder or official .pt / .safetensors (offset head)")
    p.add_argument("--v-start-sec", type=float, default=0.0, help="start of the 5 s video crop (official example.py)")
    p.add_argument("--offset-sec", type=float, default=0.0,
                   help="audio crop starts this much after the video crop (inside the class grid, best "
                        "one of its classes: masks are scored against the nearest class)")
    p.add_argument("--distractor", default="synthetic",
                   help="media file whose content fills masked intervals, or 'synthetic' (a procedural clip "
                        "without audio-visual events, at the video's frame size)")
    p.add_argument("--distractor-start-sec", type=float, default=0.0)
    p.add_argument("--match-audio-level", action="store_true",
                   help="scale the distractor's audio to the clip's typical loudness, so that mask edges "
                        "do not add loudness steps (audio events of their own)")
    p.add_argument("--samples", type=int, default=256, help="random masks per stream (K)")
    p.add_argument("--batch-size", type=int, default=16, help="masks per model call")
    p.add_argument("--chunk-size", type=int, default=None, help="segments per extractor call (memory bound)")
    p.add_argument("--tolerance", type=int, default=1, help="classes from the true one that still count as correct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="only the JSON (no matplotlib needed)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=attribute_cli, source="")


def attribute_cli(args: argparse.Namespace) -> int:
    from synchformer_jax import media, pretrained, synthetic
    from synchformer_jax.models.synchformer import Synchformer
    from synchformer_jax.predict import check_offset, off_grid_warning

    def usage(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    for flag, value in (("--v-start-sec", args.v_start_sec), ("--distractor-start-sec", args.distractor_start_sec)):
        if not (math.isfinite(value) and value >= 0):  # NaN fails every comparison
            return usage(f"{flag} must be a finite number >= 0, got {value}")
    if not math.isfinite(args.offset_sec):
        return usage(f"--offset-sec must be a finite number of seconds, got {args.offset_sec}")
    for flag, value, least in (("--samples", args.samples, 1), ("--batch-size", args.batch_size, 1),
                               ("--chunk-size", args.chunk_size, 1), ("--tolerance", args.tolerance, 0)):
        if value is not None and value < least:  # check_counts' rules, in the CLI's words
            return usage(f"{flag} must be >= {least}, got {value}")
    out = pathlib.Path(args.out)
    try:
        clip = media.conform(args.video)
        if args.distractor == "synthetic":
            dur = max(10.0, args.distractor_start_sec + 5.0)
            d_frames, d_audio, _ = synthetic.make_clip_with_events(
                args.seed + 1, [], duration_sec=dur, height=clip.frames.shape[1], width=clip.frames.shape[2])
        else:
            d = media.conform(args.distractor)
            d_frames, d_audio = d.frames, d.audio
    except media.MediaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.source = args.checkpoint  # main() names this in checkpoint errors
    loaded = pretrained.load_model(args.checkpoint)
    grid = transforms.class_grid(loaded.config.sync.max_offset_sec, loaded.config.sync.num_offset_classes)
    try:
        applied, k, on_grid = check_offset(args.offset_sec, grid)
    except ValueError as e:
        return usage(str(e))
    if not on_grid:
        print(off_grid_warning(applied, k, grid), file=sys.stderr)
    try:
        result = attribute_clip(Synchformer(loaded.config), loaded.params, clip.frames, clip.audio,
                                v_start_sec=args.v_start_sec, offset_sec=args.offset_sec, distractor_frames=d_frames,
                                distractor_audio=d_audio, distractor_start_sec=args.distractor_start_sec,
                                num_samples=args.samples, batch_size=args.batch_size, tolerance=args.tolerance,
                                seed=args.seed, chunk_size=args.chunk_size,
                                match_audio_level=args.match_audio_level)
    except DistractorError as e:
        print(f"error: {args.distractor}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {args.video}: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    record = result.to_json()
    record.update(video_file=str(args.video), checkpoint=str(args.checkpoint), distractor=str(args.distractor))
    (out / "attribution.json").write_text(json.dumps(record, indent=1))
    print(f"{result.describe_truth()}, predicted "
          f"{result.predicted_offset_sec:+.2f} s (class {result.predicted_class}); correct masks: video "
          f"{result.video.num_correct}/{args.samples}, audio {result.audio.num_correct}/{args.samples}")
    for name, stream in (("video", result.video), ("audio", result.audio)):
        if not stream.num_correct:
            print(f"note: no {name}-masked prediction was within --tolerance {args.tolerance} of the true class, "
                  f"so the {name} scores are undefined (null): the model does not find this offset once "
                  f"parts of the {name} are replaced (try a larger --tolerance or another clip)", file=sys.stderr)
    print(f"wrote {out / 'attribution.json'}")
    if not args.no_plot:
        try:
            print(f"wrote {plot_attribution(result, out / 'attribution.png')}")
        except ImportError as e:
            print(f"error: {e} (or pass --no-plot)", file=sys.stderr)
            return 1
    return 0
