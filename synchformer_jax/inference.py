"""Inference: model inputs from decoded clips, offset / synchronizability predictions,
the av-benchmark DeSync metric from cached features, and placement search in long videos.

Everything that runs on the device is a pure function of `(model, params, arrays)` and
can be wrapped in `jax.jit` (bind the model with `functools.partial`); host helpers
(`window_inputs`, `video_feature_bank`, `place_audio`) prepare indices and arrays with
NumPy and call those functions.

Conventions (official, `docs/official_spec.md` §4, §8):

* offset = audio start - video start of a crop (`a_start = v_start + offset`); a
  positive offset means the audio shows what the picture shows `offset` seconds later.
  Classes are `linspace(-max, max, K)` (float32), class `K // 2` is 0 s for odd K.
* a stage-II window is a 5 s crop whose 14 segments (16 frames, step 8) start 2 frames
  into the crop, i.e. the model sees 120 frames / 4.8 s; a stage-III
  (synchronizability) window is a 4.48 s crop of 13 segments. Synchronizability class
  1 is "synchronizable".
* model video inputs are `[B, S, 16, 3, 224, 224]` float (`RGBToHalfToZeroOne` +
  `RGBNormalize` in float16, reproduced by `input.normalize`'s lookup table), audio
  `[B, S, 1, 128, 66]` normalised log-mel. Functions here also take uint8 frames
  channel-last (`[B, S, 16, 224, 224, 3]`) and convert them on the device, which moves
  a quarter of the bytes to the accelerator.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from synchformer_jax.input import melspec, normalize, transforms
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import HEAD_OFFSET, HEAD_SYNCHRONIZABILITY, KIND_SYNC, ModelConfig

__all__ = [
    "VIDEO_FPS", "AUDIO_RATE", "SEGMENT_FRAMES", "SEGMENT_STEP_FRAMES", "SEGMENT_SAMPLES",
    "SEGMENT_STEP_SAMPLES", "offset_grid", "WindowInputs", "window_inputs", "window_sample_count",
    "frame_exact_sec", "segments_from_frames", "video_to_model_input", "OffsetPrediction",
    "predict_offsets", "synchronizability_logits", "synchronizability_probability",
    "DESYNC_CLIP_SEC", "DESYNC_FRAMES", "DESYNC_SAMPLES", "DESYNC_SEGMENTS", "DesyncLengths",
    "desync_lengths", "desync_resize_crop", "desync_window_starts", "desync_video_features",
    "desync_audio_input", "DesyncResult", "desync_from_features", "desync", "DesyncScorer",
    "mmaudio_sync_features", "center_crop", "video_feature_bank", "search_logits",
    "placement_scores", "combine_chunk_scores", "Placement", "place_audio",
]

VIDEO_FPS = transforms.VIDEO_FPS  # 25
AUDIO_RATE = transforms.AUDIO_RATE  # 16000
SEGMENT_FRAMES = 16
SEGMENT_STEP_FRAMES = 8
SEGMENT_SAMPLES = 10240  # int(16 / 25 * 16000)
SEGMENT_STEP_SAMPLES = 5120
SAMPLES_PER_FRAME = AUDIO_RATE // VIDEO_FPS  # 640

Params = Any


def _require_sync(config: ModelConfig) -> None:
    if config.kind != KIND_SYNC:
        raise ValueError(f"inference needs a stage II/III model (kind {KIND_SYNC!r}), got kind {config.kind!r}")


def offset_grid(config: ModelConfig) -> np.ndarray:
    """The offset classes of `config` in seconds, `[K] float32` (official float32 linspace)."""
    return transforms.class_grid(config.sync.max_offset_sec, config.sync.num_offset_classes)


def window_sample_count(n_segments: int) -> tuple[int, int]:
    """Frames and samples spanned by `n_segments` overlapping segments (120 / 76800 for 14)."""
    return (SEGMENT_FRAMES + SEGMENT_STEP_FRAMES * (n_segments - 1),
            SEGMENT_SAMPLES + SEGMENT_STEP_SAMPLES * (n_segments - 1))


def frame_exact_sec(frame: int, fps: int = VIDEO_FPS) -> float:
    """The smallest float `t >= frame / fps` with `int(t * fps) == frame`.

    The official start arithmetic is `int(sec * fps)`, and `57 / 25 * 25` is
    56.99999999999999 (frame 56); windows placed on frame numbers use this instead of
    `frame / fps` so that they start where they say. The audio start
    `int((t + offset) * 16000)` moves by at most one ulp of `t`, i.e. not at all.
    """
    t = frame / fps
    while int(t * fps) < frame:
        t = float(np.nextafter(t, np.inf))
    return t


# ---------------------------------------------------------------------------------------
# Model inputs of one window, exactly as the official test transforms (example.py path)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WindowInputs:
    """One window of a clip, ready for the model.

    `frames` are the contiguous uint8 frames the segments cover (`[L, 224, 224, 3]`,
    L = 120 for 14 segments; segment k is `frames[8k : 8k + 16]`), already cropped
    spatially; `audio` is the normalised log-mel `[S, 1, 128, 66]` float32 (host,
    float64 STFT: the closest to the official float32 front end, see `melspec`).
    `plan` holds every official index (crop starts, segment indices, label).
    """

    frames: np.ndarray
    audio: np.ndarray
    plan: transforms.ExamplePlan

    @property
    def n_segments(self) -> int:
        return self.plan.segments.n_segments

    @property
    def v_start_frame(self) -> int:
        """First frame of the temporal crop (`int(v_start_sec * 25)`)."""
        return self.plan.temporal.v_start_i

    @property
    def a_start_sample(self) -> int:
        """First sample of the audio crop (`int((v_start_sec + offset) * 16000)`, clamped)."""
        return self.plan.temporal.a_start_i

    @property
    def offset_sec(self) -> float:
        """The applied offset, rounded to 2 decimals as officially."""
        return float(self.plan.temporal.offset_sec)

    @property
    def offset_class(self) -> int:
        """Class of the applied offset (the label the official code would train with)."""
        return int(self.plan.temporal.offset_class)

    @property
    def segment_frame_indices(self) -> np.ndarray:
        """`[S, 16]` indices into the decoded clip's frames."""
        return self.plan.segment_frame_indices

    def video_segments(self) -> np.ndarray:
        """uint8 `[S, 16, 224, 224, 3]` (a gather; overlapping frames are copied)."""
        return segments_from_frames(self.frames, self.n_segments, xp=np)

    def model_video(self) -> np.ndarray:
        """The official float video input `[S, 16, 3, 224, 224]` float32."""
        return np.moveaxis(normalize.video_uint8_to_model_input_np(self.video_segments()), -1, -3)


def window_inputs(frames: np.ndarray, audio: np.ndarray, v_start_sec: float, offset_sec: float = 0.0, *,
                  config: Optional[ModelConfig] = None, n_segments: Optional[int] = None,
                  synchronizability: Optional[bool] = None, crop_size: Optional[int] = None,
                  clip_max_len_sec: Optional[float] = None) -> WindowInputs:
    """Decoded clip at the input contract -> model inputs of the window at `v_start_sec`.

    The official `example.py` flow with `--v_start_i_sec v_start_sec --offset_sec
    offset_sec`: `EqualifyFromRight` -> centre crop 224 -> `TemporalCropAndOffset` in its
    fixed-offset branch (video from frame `int(v_start_sec * 25)`, audio from sample
    `int((v_start_sec + offset) * 16000)`, i.e. `offset_sec` is applied as a synthetic
    shift) -> centred segments -> float16 RGB normalisation / log-mel. With a
    synchronizability model the stage-III crop (4.48 s, 13 segments) is used instead.

    Args:
      frames: uint8 `[T, H, W, 3]` at 25 fps with the shorter side 256 (`media.conform`).
      audio: float32 `[N]` mono at 16 kHz, sample 0 at the time of frame 0.
      v_start_sec, offset_sec: window start and the shift applied to the audio.
      config: takes `n_segments`, the head (synchronizability or not), the class grid and
        the crop size from a model config; the explicit arguments override it.
      clip_max_len_sec: the official `EqualifyFromRight` caps clips at 10 s, which only
        decides whether a window is allowed (it trims from the end); None (default)
        allows windows anywhere in a longer clip. Inside the first 10 s both agree.

    Raises:
      ValueError: the window (or the shifted audio crop) does not fit into the clip.
    """
    frames = np.asarray(frames)
    audio = np.asarray(audio, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3]; got {frames.dtype} {frames.shape}")
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N]; got shape {audio.shape}")
    if config is not None:
        _require_sync(config)
        n_segments = config.n_segments if n_segments is None else n_segments
        if synchronizability is None:
            synchronizability = config.sync.head == HEAD_SYNCHRONIZABILITY
        crop_size = config.video.img_size if crop_size is None else crop_size
        max_off, grid_size = config.sync.max_offset_sec, config.sync.num_offset_classes
    else:
        max_off, grid_size = 2.0, 21
    synchronizability = bool(synchronizability)
    plan = transforms.plan_sync_example(
        frames.shape[0], audio.shape[0], frames.shape[1], frames.shape[2], train=False,
        offset_sec=float(offset_sec), v_start_i_sec=float(v_start_sec), synchronizability=synchronizability,
        crop_size=crop_size or 224, n_segments=n_segments, max_off_sec=max_off, grid_size=grid_size,
        clip_max_len_sec=math.inf if clip_max_len_sec is None else clip_max_len_sec)
    idx = plan.segment_frame_indices
    first = int(idx[0, 0])
    span = int(idx[-1, -1]) - first + 1
    if not np.array_equal(idx - first, segments_from_frames(np.arange(span), idx.shape[0], xp=np)):
        raise ValueError("segments are not 16 frames at a step of 8")  # stage-I layouts are not windows
    video = transforms.crop_frames(frames[first:first + span], plan.top_left, plan.crop_size)
    starts = plan.segment_sample_starts
    wave = audio[starts[:, None] + np.arange(plan.segment_samples, dtype=np.int64)[None]]
    return WindowInputs(np.ascontiguousarray(video), melspec.log_mel_np(wave), plan)


# ---------------------------------------------------------------------------------------
# Device-side helpers (jit-able)
# ---------------------------------------------------------------------------------------


def segments_from_frames(frames, n_segments: int, size: int = SEGMENT_FRAMES, step: int = SEGMENT_STEP_FRAMES,
                         xp=jnp):
    """`[..., L, H, W, C]` -> `[..., S, size, H, W, C]`, segment k = frames `[k*step, k*step+size)`.

    A static gather (jit-able with `xp=jnp`); L must be at least `size + step * (S - 1)`.
    """
    need = size + step * (n_segments - 1)
    axis = frames.ndim - 4 if frames.ndim >= 4 else frames.ndim - 1
    if frames.shape[axis] < need:
        raise ValueError(f"{n_segments} segments need {need} frames, got {frames.shape[axis]}")
    idx = (np.arange(n_segments)[:, None] * step + np.arange(size)[None]).reshape(-1)
    out = xp.take(frames, xp.asarray(idx), axis=axis)
    return out.reshape(*frames.shape[:axis], n_segments, size, *frames.shape[axis + 1:])


def video_to_model_input(video, half: bool = True, dtype=jnp.float32):
    """uint8 `[..., T, H, W, 3]` -> official float `[..., T, 3, H, W]`; float input passes.

    `half=True`: the stage II/III float16 normalisation; `False`: float32 (what
    av-benchmark's DeSync uses).
    """
    video = jnp.asarray(video)
    if video.dtype != jnp.uint8:
        return video
    return jnp.moveaxis(normalize.video_uint8_to_model_input(video, half=half, dtype=dtype), -1, -3)


class OffsetPrediction(NamedTuple):
    """Per example: `logits [B, K]`, `probs [B, K]` (softmax, float32), and the `k` most
    probable classes `topk_classes [B, k]` with `topk_probs` and `topk_offsets_sec`."""

    logits: jax.Array
    probs: jax.Array
    topk_classes: jax.Array
    topk_probs: jax.Array
    topk_offsets_sec: jax.Array


def predict_offsets(model, params: Params, video, audio, *, topk: int = 5) -> OffsetPrediction:
    """Offset probabilities of windows over the model's class grid.

    Args:
      model: a `Synchformer` with the offset head (its config gives the grid).
      video: `[B, S, 16, 3, 224, 224]` float model input, or uint8 `[B, S, 16, 224, 224, 3]`
        (normalised on the device like the official float16 path).
      audio: `[B, S, 1, 128, 66]` normalised log-mel.
      topk: how many classes to rank (clipped to K).

    jit-able with `model` and `topk` static: `jax.jit(functools.partial(predict_offsets,
    model, topk=5))(params, video, audio)`.
    """
    config = model.config
    _require_sync(config)
    if config.sync.head != HEAD_OFFSET:
        raise ValueError(f"predict_offsets needs the offset head, the model has {config.sync.head!r}")
    logits = model.apply({"params": params}, video_to_model_input(video), jnp.asarray(audio)).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    k = max(1, min(int(topk), logits.shape[-1]))
    top_probs, top_classes = jax.lax.top_k(probs, k)
    grid = jnp.asarray(offset_grid(config))
    return OffsetPrediction(logits, probs, top_classes, top_probs, grid[top_classes])


def synchronizability_logits(model, params: Params, video, audio) -> jax.Array:
    """`[B, 2]` logits of a stage-III model (class 1 = synchronizable)."""
    config = model.config
    _require_sync(config)
    if config.sync.head != HEAD_SYNCHRONIZABILITY:
        raise ValueError(f"the model has the {config.sync.head!r} head, not the synchronizability head")
    return model.apply({"params": params}, video_to_model_input(video), jnp.asarray(audio)).astype(jnp.float32)


def synchronizability_probability(model, params: Params, video, audio) -> jax.Array:
    """`[B]` probability that the window is synchronizable (stage-III 2-way head);
    inputs as `predict_offsets` (13-segment windows for the official stage-III model)."""
    return jax.nn.softmax(synchronizability_logits(model, params, video, audio), axis=-1)[..., 1]


# ---------------------------------------------------------------------------------------
# DeSync (av-benchmark, `docs/users.md` §2.2; from files: `desync_eval`)
# ---------------------------------------------------------------------------------------

DESYNC_CLIP_SEC = 8.0  # av-benchmark's `--audio_length` of the published numbers
DESYNC_FRAMES = 200  # 8 s at 25 fps
DESYNC_SAMPLES = 128000  # 8 s at 16 kHz
DESYNC_SEGMENTS = 24  # (200 - 16) / 8 + 1 == (128000 - 10240) / 5120 + 1


class DesyncLengths(NamedTuple):
    """What av-benchmark uses of a clip for `--audio_length clip_sec`: the first `frames`
    (at 25 fps) and `samples` (at 16 kHz), cut into `segments` from frame / sample 0."""

    clip_sec: float
    frames: int
    samples: int
    segments: int


def desync_lengths(clip_sec: float = DESYNC_CLIP_SEC, window: int = 14) -> DesyncLengths:
    """av-benchmark's lengths for clips of `clip_sec` seconds: `int(25 L)` frames,
    `int(16000 L)` samples, `S = (frames - 16) // 8 + 1` segments (the audio gives the same
    S: `(samples - 10240) // 5120 + 1`). 8 s: 200 / 128000 / 24; 10 s: 250 / 160000 / 30.
    Clips must hold one window of `window` segments (4.8 s for 14)."""
    # `float * L` then int(), the order av-benchmark uses, so L = 8.3 rounds as there.
    frames, samples = int(float(VIDEO_FPS) * clip_sec), int(float(AUDIO_RATE) * clip_sec)
    if frames < SEGMENT_FRAMES or samples < SEGMENT_SAMPLES:
        raise ValueError(f"a {clip_sec} s clip is shorter than one segment (0.64 s)")
    segments = (frames - SEGMENT_FRAMES) // SEGMENT_STEP_FRAMES + 1
    if (samples - SEGMENT_SAMPLES) // SEGMENT_STEP_SAMPLES + 1 != segments:  # cannot happen: 640 samples a frame
        raise AssertionError(f"video and audio segment counts differ for {clip_sec} s")
    if segments < window:
        min_sec = window_sample_count(window)[0] / VIDEO_FPS
        raise ValueError(f"a {clip_sec} s clip has {segments} segments, fewer than one window of {window} "
                         f"(DeSync needs clips of at least {min_sec} s)")
    return DesyncLengths(float(clip_sec), frames, samples, segments)


def desync_resize_crop(frames, size: int = 224):
    """uint8 `[..., H, W, 3]` at any size -> uint8 `[..., 224, 224, 3]` as av-benchmark.

    Shorter side to `size` (longer side `int(size * long / short)`) with antialiased
    bicubic (Keys a = -0.5, support widened by the downscale factor: the kernel of
    torchvision v2 / PIL), then the centre crop with `left = round_half_even((W - size) / 2)`.
    Like the uint8 kernels of PIL and torchvision the two passes are separate,
    horizontal first, each rounded to uint8; they use fixed-point weights where this uses
    float32, so a few pixels differ by one grey level (tested against PIL). jit-able;
    frames already at 224 x 224 pass unchanged.
    """
    frames = jnp.asarray(frames)
    h, w = frames.shape[-3], frames.shape[-2]
    short, long = min(h, w), max(h, w)
    long_new = int(size * long / short)
    nh, nw = (size, long_new) if h <= w else (long_new, size)
    lead = frames.shape[:-3]

    def rounded(x):
        return jnp.clip(jnp.round(x), 0, 255)

    x = frames.astype(jnp.float32)
    if nw != w:
        x = rounded(jax.image.resize(x, (*lead, h, nw, 3), method="cubic", antialias=True))
    if nh != h:
        x = rounded(jax.image.resize(x, (*lead, nh, nw, 3), method="cubic", antialias=True))
    frames = x.astype(jnp.uint8)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return frames[..., top:top + size, left:left + size, :]


def desync_window_starts(n_segments_total: int = DESYNC_SEGMENTS, window: int = 14) -> tuple[int, int]:
    """First segment of the two DeSync windows: `[:14]` and `[-14:]` (0 and 10 for 8 s,
    0 and 16 for 10 s)."""
    if n_segments_total < window:
        raise ValueError(f"{n_segments_total} segments are fewer than one window of {window}")
    return 0, n_segments_total - window


def desync_video_features(model, params: Params, frames, *, chunk_size: Optional[int] = None,
                          clip_sec: float = DESYNC_CLIP_SEC) -> jax.Array:
    """Video features of the DeSync protocol, computed once per video.

    Args:
      frames: uint8 `[B, T, 224, 224, 3]` at 25 fps (`desync_resize_crop` output),
        T >= `int(25 * clip_sec)` (200 for 8 s); only those first frames are used.
    Returns:
      `[B, S, 8, D]`, S = `desync_lengths(clip_sec).segments` (24 for 8 s): segments of
      16 frames at a step of 8 from frame 0, float32 normalisation `(x / 255 - 0.5) / 0.5`
      (av-benchmark), not the float16 one.
    """
    lengths = desync_lengths(clip_sec, model.config.n_segments)
    frames = jnp.asarray(frames)
    if frames.ndim != 5 or frames.shape[1] < lengths.frames:
        raise ValueError(f"frames must be [B, T>={lengths.frames}, H, W, 3] for {clip_sec} s; got {frames.shape}")
    seg = segments_from_frames(frames[:, :lengths.frames], lengths.segments)
    return sf.extract_video_features(model, params, video_to_model_input(seg, half=False), chunk_size=chunk_size)


def mmaudio_sync_features(model, params: Params, frames, *, chunk_size: Optional[int] = None) -> jax.Array:
    """MMAudio's Synchformer visual conditioning: uint8 `[B, T, 224, 224, 3]` at 25 fps ->
    `[B, S * 8, D]` float32, S = (T - 16) // 8 + 1 (8 s: 200 frames -> `[B, 192, 768]`).

    The segments of `desync_video_features` (16 frames, step 8, from frame 0, float32
    normalisation, Motionformer after spatial aggregation, no temporal aggregation) laid
    out one token per (segment, time step), segment-major: MMAudio's reshape of
    `[B, S, 8, D]`. Only `vfeat_extractor` params are read (a
    `--modules vfeat_extractor` conversion is enough). MMAudio's demo runs this in
    bfloat16; here it is whatever `model.config.dtype` says. jit-able.
    """
    frames = jnp.asarray(frames)
    if frames.ndim != 5 or frames.shape[1] < SEGMENT_FRAMES:
        raise ValueError(f"frames must be [B, T>={SEGMENT_FRAMES}, H, W, 3]; got {frames.shape}")
    n_segments = (frames.shape[1] - SEGMENT_FRAMES) // SEGMENT_STEP_FRAMES + 1
    seg = segments_from_frames(frames, n_segments)
    feats = sf.extract_video_features(model, params, video_to_model_input(seg, half=False), chunk_size=chunk_size)
    return feats.reshape(feats.shape[0], -1, feats.shape[-1])


def desync_audio_input(waveforms, clip_sec: float = DESYNC_CLIP_SEC) -> jax.Array:
    """Mono 16 kHz `[..., N]` -> `[..., S, 1, 128, 66]`: the first `int(16000 * clip_sec)`
    samples (N must reach them; 128000 for 8 s) in S segments of 10240 at a step of 5120
    from sample 0 (S = 24 for 8 s), official log-mel in float32; jit-able."""
    lengths = desync_lengths(clip_sec)
    x = jnp.asarray(waveforms, jnp.float32)
    if x.shape[-1] < lengths.samples:
        raise ValueError(f"DeSync needs {lengths.samples} samples ({clip_sec:g} s at 16 kHz), got {x.shape[-1]}")
    idx = np.arange(lengths.segments)[:, None] * SEGMENT_STEP_SAMPLES + np.arange(SEGMENT_SAMPLES)[None]
    return melspec.log_mel_jax(x[..., jnp.asarray(idx)])


class DesyncResult(NamedTuple):
    """`logits [B, M, 2, K]` of the two windows, `offsets_sec [B, M, 2]` (argmax through
    the grid) and `desync_sec [B, M]` = mean of `|offsets_sec|` over the two windows.
    av-benchmark's DeSync of a set is the mean of `desync_sec` over its clips."""

    logits: jax.Array
    offsets_sec: jax.Array
    desync_sec: jax.Array


def desync_from_features(model, params: Params, vfeat, afeat, *,
                         compare_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None) -> DesyncResult:
    """DeSync from cached features: `vfeat [B, S, 8, Dv]` (per video) against
    `afeat [B, M, S, 6, Da]` (M audio tracks per video); only the projections and the
    sync transformer run, on the windows `[:14]` and `[-14:]` of the S (= 24) segments.

    `compare_fn(v [N, 14, 8, Dv], a [N, 14, 6, Da]) -> logits [N, K]` defaults to the
    model's `compare`.
    """
    vfeat, afeat = jnp.asarray(vfeat), jnp.asarray(afeat)
    if afeat.ndim == vfeat.ndim:  # one track per video
        afeat = afeat[:, None]
    b, m, s = afeat.shape[:3]
    if vfeat.shape[0] != b or vfeat.shape[1] != s:
        raise ValueError(f"vfeat {vfeat.shape} and afeat {afeat.shape} disagree on videos / segments")
    window = model.config.n_segments
    starts = desync_window_starts(s, window)
    compare_fn = compare_fn or functools.partial(sf.compare, model, params)
    v = jnp.stack([vfeat[:, w:w + window] for w in starts], axis=1)  # [B, 2, W, 8, D]
    a = jnp.stack([afeat[:, :, w:w + window] for w in starts], axis=2)  # [B, M, 2, W, 6, D]
    v = jnp.broadcast_to(v[:, None], (b, m, *v.shape[1:]))  # features are shared, not recomputed
    logits = compare_fn(v.reshape(-1, *v.shape[3:]), a.reshape(-1, *a.shape[3:]))
    logits = logits.reshape(b, m, len(starts), -1).astype(jnp.float32)
    grid = jnp.asarray(offset_grid(model.config))
    offsets = grid[jnp.argmax(logits, axis=-1)]
    return DesyncResult(logits, offsets, jnp.mean(jnp.abs(offsets), axis=-1))


def expected_desync_sec(config: ModelConfig, logits) -> jax.Array:
    """A differentiable stand-in for DeSync: `E|offset|` under `softmax(logits)` over the
    class grid, averaged over the windows. `logits`: `[..., W, K]` (`DesyncResult.logits`)
    -> `[...]` seconds.

    DeSync itself takes the argmax class, which has no gradient; a generator trained with
    Synchformer as a loss or scored as a reward needs one through the audio waveform
    (`desync(...)` is differentiable up to its argmax: log-mel, extractor and sync
    transformer are). For confident predictions it equals `desync_sec`.
    """
    grid = jnp.abs(jnp.asarray(offset_grid(config), jnp.float32))
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(probs * grid, axis=-1), axis=-1)


def desync(model, params: Params, vfeat, audio, *, chunk_size: Optional[int] = None,
           clip_sec: float = DESYNC_CLIP_SEC) -> DesyncResult:
    """av-benchmark's DeSync of M audio tracks per video against cached video features.

    Args:
      vfeat: `[B, S, 8, D]` from `desync_video_features` (computed once per video; S = 24
        for 8 s).
      audio: mono 16 kHz waveforms `[B, M, N >= int(16000 * clip_sec)]` (or `[B, N]` for
        one track), or their `desync_audio_input` spectrograms `[B, M, S, 1, 128, 66]`.
      chunk_size: audio segments per extractor call (bounds activation memory).
      clip_sec: av-benchmark's `--audio_length` (the video features must be of the same).

    Only the audio extractor and `compare` run per track. jit-able (model static).
    """
    audio = jnp.asarray(audio)
    if audio.ndim in (2, 5):  # one track per video
        audio = audio[:, None]
    spec = desync_audio_input(audio, clip_sec) if audio.ndim == 3 else audio
    b, m = spec.shape[:2]
    afeat = sf.extract_audio_features(model, params, spec.reshape(b * m, *spec.shape[2:]), chunk_size=chunk_size)
    return desync_from_features(model, params, vfeat, afeat.reshape(b, m, *afeat.shape[1:]))


class DesyncScorer:
    """Jitted DeSync for one model: `video_features(frames)` once per video, then
    `score(vfeat, audio)` for as many generated audio tracks as needed.

        scorer = DesyncScorer(model, params)
        vfeat = scorer.video_features(desync_resize_crop(frames_u8[None]))   # [1, 24, 8, D]
        result = scorer.score(vfeat, tracks)   # tracks [1, M, 128000] -> result.desync_sec [1, M]

    `clip_sec`: av-benchmark's `--audio_length` (default 8 s). `matmul_precision` (e.g.
    "highest") runs both under `jax.default_matmul_precision`: on GPUs JAX's default
    multiplies float32 matrices in TF32, av-benchmark's PyTorch in full float32; None
    keeps JAX's default (the same on CPUs).
    """

    def __init__(self, model, params: Params, *, chunk_size: Optional[int] = None,
                 clip_sec: float = DESYNC_CLIP_SEC, matmul_precision: Optional[str] = None):
        _require_sync(model.config)
        self.model, self.params = model, params
        self.lengths = desync_lengths(clip_sec, model.config.n_segments)
        self.matmul_precision = matmul_precision
        self._video = jax.jit(functools.partial(desync_video_features, model, chunk_size=chunk_size,
                                                clip_sec=clip_sec))
        self._score = jax.jit(functools.partial(desync, model, chunk_size=chunk_size, clip_sec=clip_sec))

    def _precision(self):
        # The precision is part of what jit traces under, so the context must be around the call.
        if self.matmul_precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)

    def video_features(self, frames) -> jax.Array:
        with self._precision():
            return self._video(self.params, frames)

    def score(self, vfeat, audio) -> DesyncResult:
        with self._precision():
            return self._score(self.params, vfeat, audio)


# ---------------------------------------------------------------------------------------
# Placement search in long videos (official issue #7)
# ---------------------------------------------------------------------------------------


def center_crop(frames: np.ndarray, size: int = 224) -> np.ndarray:
    """Official test-time centre crop of uint8 `[T, H, W, 3]` frames."""
    top_left = transforms.center_crop_top_left(frames.shape[1], frames.shape[2], size)
    return transforms.crop_frames(frames, top_left, size)


@functools.lru_cache(maxsize=16)
def _jitted_segment_features(model):
    def fn(params, seg_u8):
        return sf.extract_video_features(model, params, video_to_model_input(seg_u8[None]))[0]
    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _jitted_audio_features(model):
    return jax.jit(functools.partial(sf.extract_audio_features, model))


def video_feature_bank(model, params: Params, frames: np.ndarray, *, first_frame: int = 0,
                       num_starts: Optional[int] = None, step_frames: int = 1, chunk_size: int = 16) -> jax.Array:
    """Video features of the 16-frame segment starting at every `step_frames`-th frame.

    Entry j is the segment starting at frame `first_frame + j * step_frames`; the window
    whose first segment starts at frame t (14 segments, step 8) is entries
    `(t - first_frame) / step_frames + k * 8 / step_frames`, k = 0..13.

    Args:
      frames: uint8 `[T, 224, 224, 3]` (`center_crop` of the contract frames).
      num_starts: default: every start that fits.
      chunk_size: segments per extractor call (the last call is padded, no recompile).
    Returns:
      `[num_starts, 8, D]` on the device.
    """
    if SEGMENT_STEP_FRAMES % step_frames:
        raise ValueError(f"step_frames must divide {SEGMENT_STEP_FRAMES}, got {step_frames}")
    t = frames.shape[0]
    max_starts = (t - SEGMENT_FRAMES - first_frame) // step_frames + 1
    num_starts = max_starts if num_starts is None else int(num_starts)
    if num_starts < 1 or num_starts > max_starts:
        raise ValueError(f"{num_starts} segment starts from frame {first_frame} do not fit into {t} frames")
    fn = _jitted_segment_features(model)
    starts = first_frame + step_frames * np.arange(num_starts)
    out = []
    for c in range(0, num_starts, chunk_size):
        s = starts[c:c + chunk_size]
        s = np.concatenate([s, np.full(chunk_size - len(s), s[-1])])  # pad: same shape every call
        seg = np.asarray(frames)[s[:, None] + np.arange(SEGMENT_FRAMES)[None]]
        out.append(fn(params, seg)[: min(chunk_size, num_starts - c)])
    return jnp.concatenate(out, axis=0)


def search_logits(compare_fn: Callable[[jax.Array, jax.Array], jax.Array], bank, afeat, num_windows: int, *,
                  step_frames: int = 1, n_segments: int = 14, batch: int = 64) -> jax.Array:
    """Logits `[P, K]` of P windows from a feature bank and ONE audio query.

    Window i starts at bank entry i (frame `first_frame + i * step_frames`) and takes
    entries `i + k * (8 // step_frames)`; the query features `afeat [S, 6, D]` are the same
    for every window. `compare_fn(v [N, S, 8, D], a [N, S, 6, D]) -> [N, K]` (the model's
    `compare`, or anything of that shape). jit-able with the ints static.
    """
    hop = SEGMENT_STEP_FRAMES // step_frames
    bank, afeat = jnp.asarray(bank), jnp.asarray(afeat)
    need = num_windows + hop * (n_segments - 1)
    if bank.shape[0] < need:
        raise ValueError(f"{num_windows} windows need {need} bank entries, got {bank.shape[0]}")
    pad = (-num_windows) % batch
    idx = np.arange(num_windows + pad)[:, None] + hop * np.arange(n_segments)[None]
    idx = np.minimum(idx, bank.shape[0] - 1).reshape(-1, batch, n_segments)

    def one(chunk_idx):
        v = bank[chunk_idx]  # [batch, S, 8, D]
        a = jnp.broadcast_to(afeat[None], (chunk_idx.shape[0], *afeat.shape))
        return compare_fn(v, a).astype(jnp.float32)

    out = jax.lax.map(one, jnp.asarray(idx))
    return out.reshape(-1, out.shape[-1])[:num_windows]


def placement_scores(logits, grid_sec: np.ndarray, *, step_frames: int = 1, method: str = "vote",
                     fps: int = VIDEO_FPS) -> np.ndarray:
    """Score of every candidate placement from the window logits `[P, K]` (host, NumPy).

    The query's window-local time 0 belongs at video frame p. A window starting at t
    sees offset p - t, so:
      * `zero`: score(p) = log p_t=p(offset class 0 s) (a plain sliding-window check);
      * `vote`: score(p) = mean over classes k of log p_t(k) for t = p - grid_k, i.e.
        every window within +-max offset of p votes with the class that would put the
        query at p (classes whose frame shift is not a multiple of `step_frames`, and
        windows outside the searched range, are left out of the mean).
    Returns `[P]` scores for p = the window starts.
    """
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    p_count, k_count = logp.shape
    shift = np.rint(np.asarray(grid_sec, np.float64) * fps).astype(np.int64)  # class offsets in frames
    if method == "zero":
        return logp[:, int(np.argmin(np.abs(shift)))]
    if method != "vote":
        raise ValueError(f"method must be 'vote' or 'zero', got {method!r}")
    total = np.zeros(p_count)
    count = np.zeros(p_count)
    for k in range(k_count):
        if shift[k] % step_frames:
            continue
        d = shift[k] // step_frames  # window index t = p - d
        p = np.arange(p_count)
        t = p - d
        ok = (t >= 0) & (t < p_count)
        total[ok] += logp[t[ok], k]
        count[ok] += 1
    return np.where(count > 0, total / np.maximum(count, 1), -np.inf)


@dataclasses.dataclass
class Placement:
    """Result of `place_audio`.

    `best_sec` is the estimated start of the query in the video; `starts_sec [P]` the
    candidate query starts with their `scores [P]`; `logits [P, K]` those of the windows
    of the query's first 4.8-s chunk (window i starts `pad_sec` before candidate i).
    A query longer than one window is scored in chunks: `chunk_starts_sec [C]` (query
    time) and `chunk_scores [C, P]` (each chunk's score for the query starting at
    `starts_sec`); `scores` is their mean. One chunk (`[0.]`) for queries up to 4.8 s.
    """

    best_sec: float
    starts_sec: np.ndarray
    scores: np.ndarray
    logits: np.ndarray
    pad_sec: float
    method: str
    num_video_segments: int  # extractor calls spent on the video (bank entries)
    chunk_starts_sec: np.ndarray
    chunk_scores: np.ndarray


def _query_window(query: np.ndarray, n_segments: int) -> tuple[np.ndarray, int]:
    """Query audio -> one window of samples, centred if shorter; returns (wave, pad frames)."""
    _, need = window_sample_count(n_segments)
    query = np.asarray(query, np.float32)
    if query.shape[0] >= need:
        return query[:need], 0
    pad_frames = ((need - query.shape[0]) // 2) // SAMPLES_PER_FRAME  # keep the grid of frames
    left = pad_frames * SAMPLES_PER_FRAME
    wave = np.zeros(need, np.float32)
    wave[left:left + query.shape[0]] = query
    return wave, pad_frames


def _query_chunks(query: np.ndarray, n_segments: int, step_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Query audio -> `(waves [C, window samples], chunk start frames [C], pad frames)`.

    Up to one window: the single (centred, zero-padded) window of `_query_window`.
    Longer: back-to-back 4.8-s chunks from the start plus one flush with the end, every
    chunk start on the `step_frames` grid (the last < step frames of audio are dropped),
    so that each chunk's window is a candidate window of the same feature bank.
    """
    span_frames, need = window_sample_count(n_segments)
    query = np.asarray(query, np.float32)
    if query.shape[0] <= need:
        wave, pad = _query_window(query, n_segments)
        return wave[None], np.zeros(1, np.int64), pad
    last = ((query.shape[0] // SAMPLES_PER_FRAME - span_frames) // step_frames) * step_frames
    starts = np.array(sorted(set(range(0, last, span_frames)) | {last}), np.int64)
    waves = np.stack([query[f * SAMPLES_PER_FRAME: f * SAMPLES_PER_FRAME + need] for f in starts])
    return waves, starts, 0


def combine_chunk_scores(chunk_scores: np.ndarray, chunk_frames: np.ndarray, step_frames: int,
                         num_candidates: int) -> np.ndarray:
    """`[C, W]` per-window placement scores of C query chunks -> `[C, P]` aligned to the
    query start: chunk c of a query starting at candidate p sits at window
    `p + chunk_frames[c] / step_frames`."""
    idx = np.asarray(chunk_frames, np.int64) // step_frames
    return np.stack([np.asarray(sc)[i:i + num_candidates] for sc, i in zip(chunk_scores, idx)])


def place_audio(model, params: Params, frames: np.ndarray, query: np.ndarray, *,
                around_sec: Optional[float] = None, radius_sec: Optional[float] = None, step_frames: int = 1,
                method: str = "vote", chunk_size: int = 16, batch: int = 64) -> Placement:
    """Find where a short audio clip belongs in a long video (official issue #7).

    Scores every candidate start at `step_frames` video frames (1 = 40 ms) between
    `around_sec - radius_sec` and `around_sec + radius_sec` (default: the whole video).

    What is cached, and what it costs. A window whose first segment starts at frame t
    uses the segments starting at t, t+8, ..., t+104. Shifting the window by one frame
    (40 ms) gives 14 *new* segments, none shared with the window before, so features
    from the usual stride-8 segmentation cannot be reused at 40 ms resolution. What is
    shared is a segment starting at a given frame: it belongs to 14 windows (t, t-8,
    ..., t-104). So the video features are computed once per segment START FRAME (a bank
    of `P + 104` entries for P candidates at step 1), and every window is a gather from
    the bank. The query audio is the same in every window, so its 14 segment features are
    computed once. Per candidate only `compare` (projections + 3-layer transformer over
    198 tokens, ~2 % of one video segment's extractor FLOPs at full size) runs.
    Video extractor calls: P + 104 instead of 14 P for independent windows (~14x less),
    but 8x more than the T / 8 segments of a plain stride-8 pass over the video:
    5 minutes at 40 ms steps is ~7 500 segments, i.e. what 535 independent 5-s windows
    cost. `step_frames` in {2, 4, 8} divides the bank (and the resolution) by that factor;
    a coarse pass at 8 then a fine pass around the best candidate is the cheap recipe.
    Memory: the bank is `[P + 104, 8, D]` float32 (25 KB per entry at D = 768).

    The query: a shorter one than 4.8 s (the span of 14 segments) is zero-padded on both
    sides to 4.8 s (the pad is a whole number of frames) and the reported start is that
    of the query itself, not of the padded window; a 1-s query fills a fifth of the
    window, so expect flatter scores than for a full window. A longer query is cut into
    4.8-s chunks (back to back, plus one flush with its end; `_query_chunks`); each chunk
    is scored against the same bank, and a candidate's score is the mean of its chunks'
    scores at their places (`combine_chunk_scores`), so more audio sharpens the search
    at the cost of one audio window and P compare calls per chunk.

    Args:
      frames: contract frames uint8 `[T, H, W, 3]` (centre-cropped here), 25 fps.
      query: mono 16 kHz float32 `[N]`.
      method: `vote` (all offset classes of the windows within +-2 s vote, see
        `placement_scores`) or `zero` (the 0-s class of the window at the candidate).
    """
    config = model.config
    _require_sync(config)
    if config.sync.head != HEAD_OFFSET:
        raise ValueError("placement search needs the offset head")
    n_seg = config.n_segments
    frames = np.asarray(frames)
    if frames.shape[1] != config.video.img_size or frames.shape[2] != config.video.img_size:
        frames = center_crop(frames, config.video.img_size)
    waves, chunk_frames, pad_frames = _query_chunks(query, n_seg, step_frames)
    q_last = int(chunk_frames[-1])  # query-local start of the last chunk
    span_frames, _ = window_sample_count(n_seg)
    last_t = frames.shape[0] - span_frames - q_last  # last candidate start (frame)
    if last_t < 0:
        raise ValueError(f"the video has {frames.shape[0]} frames, fewer than the query's span "
                         f"({span_frames + q_last} frames)")
    lo, hi = 0, last_t
    if around_sec is not None:
        r = (radius_sec if radius_sec is not None else 2.0) + config.sync.max_offset_sec * (method == "vote")
        centre = int(round(around_sec * VIDEO_FPS)) - pad_frames
        lo, hi = max(0, centre - int(round(r * VIDEO_FPS))), min(last_t, centre + int(round(r * VIDEO_FPS)))
        if lo > hi:
            raise ValueError(f"no window around {around_sec} s fits into the video")
    num_candidates = (hi - lo) // step_frames + 1
    num_windows = num_candidates + q_last // step_frames  # the last chunk's windows too
    hop = SEGMENT_STEP_FRAMES // max(1, step_frames)
    bank = video_feature_bank(model, params, frames, first_frame=lo, step_frames=step_frames,
                              num_starts=num_windows + hop * (n_seg - 1), chunk_size=chunk_size)
    starts = np.arange(n_seg) * SEGMENT_STEP_SAMPLES
    spec = melspec.log_mel_np(waves[:, starts[:, None] + np.arange(SEGMENT_SAMPLES)[None]])
    afeats = _jitted_audio_features(model)(params, jnp.asarray(spec))  # [C, S, 6, D]
    compare_fn = functools.partial(sf.compare, model, params)
    search = jax.jit(functools.partial(search_logits, compare_fn, num_windows=num_windows,
                                       step_frames=step_frames, n_segments=n_seg, batch=batch))
    chunk_logits = [np.asarray(search(bank, afeats[c])) for c in range(len(chunk_frames))]
    per_window = [placement_scores(lg, offset_grid(config), step_frames=step_frames, method=method)
                  for lg in chunk_logits]
    chunk_scores = combine_chunk_scores(per_window, chunk_frames, step_frames, num_candidates)
    scores = chunk_scores.mean(axis=0)
    logits = chunk_logits[0][:num_candidates]
    window_starts = lo + step_frames * np.arange(num_candidates)
    starts_sec = (window_starts + pad_frames) / VIDEO_FPS
    if around_sec is not None and radius_sec is not None:  # the vote margin is not a candidate
        keep = np.abs(starts_sec - around_sec) <= radius_sec + 1e-9
        if keep.any():
            scores = np.where(keep, scores, -np.inf)
    best = int(np.argmax(scores))
    return Placement(float(starts_sec[best]), starts_sec, scores, logits, pad_frames / VIDEO_FPS, method,
                     int(bank.shape[0]), chunk_frames / VIDEO_FPS, chunk_scores)
