"""The official Synchformer transforms as index arithmetic (pure Python / NumPy).

Every function here reproduces one transform of the official `dataset/transforms.py`
with its integer and float quirks (see `docs/official_spec.md` §4), but returns
*indices* (start frames / samples, crop origins) rather than transformed arrays, so the
host can ship uint8 frames and raw PCM and let the device segment and normalise. Small
`take_*` / `crop_*` helpers apply the indices to arrays.

Quirks kept on purpose (each one changes which frames / samples are used):

* `sec2frames(sec, fps) = int(sec * fps)` truncates the float64 product: 2.28 s * 25
  = 56.999... -> frame 56 (one frame early; ~5 % of the official fixed-offset rows).
* The fixed-offset branch computes the audio start from the *requested* seconds
  (`int((v_start_i_sec + offset) * 16000)`), the random branch from the frame-snapped
  seconds (`v_start_i / 25`).
* Offsets are `round(offset, 2)` (Python, float64) before use; labels come from the
  float32 grid `linspace(-2, 2, 21)` by float32 nearest-value search.
* A negative audio start of at most one video frame of samples (640) is clamped to 0.
* The ±0.05 s training jitter moves the audio crop but never the label.
* Centre crops use Python's `round` (banker's rounding on .5).

Randomness: functions take `rng`, either a `random.Random` (then the draws are the same
calls, in the same order, as the official code makes on Python's global `random`
module, so a seeded `random.Random` replays the official choices), a
`numpy.random.Generator`, or an int seed (-> `random.Random(seed)`).
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "VIDEO_FPS", "AUDIO_RATE", "RngLike", "sec2frames", "equalify_from_right",
    "center_crop_top_left", "random_crop_top_left", "spatial_crop", "crop_frames",
    "horizontal_flip", "class_grid", "quantize_offset", "TemporalCrop",
    "temporal_crop_and_offset", "synchronizability_crop_len_sec", "synchronizability_crop",
    "Segments", "generate_segments", "take_temporal_crop", "take_video_segments",
    "take_audio_segments", "ExamplePlan", "plan_sync_example", "plan_segment_avclip_example",
    "apply_plan",
]

VIDEO_FPS = 25
AUDIO_RATE = 16000

RngLike = Union[random.Random, np.random.Generator, int, None]


# ----------------------------------------------------------------------------- helpers


class _Draws:
    """The four draws the official code makes, on a `random.Random` or a numpy Generator."""

    def __init__(self, rng: RngLike, what: str):
        if rng is None:
            raise ValueError(f"{what} is random: pass rng (random.Random, numpy Generator or int seed)")
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = random.Random(int(rng))
        if not isinstance(rng, (random.Random, np.random.Generator)):
            raise TypeError(f"rng must be random.Random, numpy.random.Generator or int, got {type(rng)}")
        self.rng = rng

    def random(self) -> float:
        if isinstance(self.rng, random.Random):
            return self.rng.random()
        return float(self.rng.random())

    def uniform(self, a: float, b: float) -> float:
        # Python's definition `a + (b - a) * U[0, 1)` (also for a > b).
        if isinstance(self.rng, random.Random):
            return self.rng.uniform(a, b)
        return a + (b - a) * float(self.rng.random())

    def randint(self, a: int, b: int) -> int:
        """Inclusive on both ends, like `random.randint`."""
        if b < a:
            raise ValueError(f"empty range for randint({a}, {b})")
        if isinstance(self.rng, random.Random):
            return self.rng.randint(a, b)
        return int(self.rng.integers(a, b, endpoint=True))

    def choice(self, seq: Sequence):
        if isinstance(self.rng, random.Random):
            return self.rng.choice(seq)
        return seq[int(self.rng.integers(len(seq)))]


def _as_rng(rng: RngLike):
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return random.Random(int(rng))
    return rng


def sec2frames(sec: float, fps: float) -> int:
    """`int(sec * fps)`: truncation of the float product, as the official code."""
    return int(sec * fps)


def _pair(size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    th, tw = size
    return int(th), int(tw)


# --------------------------------------------------------------------- EqualifyFromRight


def equalify_from_right(n_frames: int, n_samples: int, video_fps: float = VIDEO_FPS,
                        audio_rate: int = AUDIO_RATE, clip_max_len_sec: float = 10.0) -> Tuple[int, int]:
    """Lengths `(v_len, a_len)` after the official `EqualifyFromRight` (trim from the end).

    `min_len = min(10 s, audio, video)`; `v_len = int(fps * min_len)`; the audio keeps
    `(rate // fps) * v_len` samples (640 per frame at 25 fps / 16 kHz), so both streams
    cover exactly `v_len` frames. Keep `frames[:v_len]`, `audio[:a_len]`.
    """
    min_len = min(clip_max_len_sec, n_samples / audio_rate, n_frames / video_fps)
    a_per_v = audio_rate // video_fps
    v_len = int(video_fps * min_len)
    a_len = int(a_per_v * v_len)
    if a_len > n_samples or v_len > n_frames:  # only for rates that are not multiples
        raise ValueError(f"cannot equalify {n_frames} frames @ {video_fps} with {n_samples} samples @ {audio_rate}")
    return v_len, a_len


class _ClipTooShort(ValueError):
    """A clip too short for a crop or the segments; `trimmed` says so without naming a
    stream, for `_blame_short_audio` ("75 frames are not longer than the 125-frame crop")."""

    def __init__(self, message: str, trimmed: str):
        super().__init__(message)
        self.trimmed = trimmed


def _blame_short_audio(exc: ValueError, n_frames: int, n_samples: int, v_len: int,
                       video_fps: float = VIDEO_FPS, audio_rate: int = AUDIO_RATE,
                       clip_max_len_sec: float = 10.0) -> ValueError:
    """`exc` (a clip too short for the crop or segments), saying so when the audio made it short.

    The crops see the lengths after `equalify_from_right`, so a 10-s video with 3 s of
    audio fails as "video of 75 frames ...": true of the trimmed clip, misleading about
    the file, whose video is fine and whose audio is what is missing. The reason then
    names the audio and says the rest of the clip's length about the trimmed clip only.
    """
    a_sec, v_sec = n_samples / audio_rate, n_frames / video_fps
    if a_sec >= min(v_sec, clip_max_len_sec):
        return exc
    trimmed = getattr(exc, "trimmed", None) or str(exc)
    return ValueError(f"audio of {a_sec:.2f} s ({n_samples} samples) is shorter than the video of {v_sec:.2f} s "
                      f"({n_frames} frames): after trimming both streams to the shorter one ({v_len} frames), "
                      f"{trimmed}")


# -------------------------------------------------------------------------- spatial crop


def center_crop_top_left(height: int, width: int, size=224) -> Tuple[int, int]:
    """Official centre crop origin: `int(round((H - th) / 2))` with banker's rounding."""
    th, tw = _pair(size)
    if height < th or width < tw:
        raise ValueError(f"frame {height}x{width} is smaller than the crop {th}x{tw}")
    return int(round((height - th) / 2.0)), int(round((width - tw) / 2.0))


def random_crop_top_left(height: int, width: int, size, rng: RngLike) -> Tuple[int, int]:
    """Official random crop origin: `randint(0, H - th)`, `randint(0, W - tw)` (inclusive).

    When the frame already has the crop size no number is drawn (as officially), which
    keeps the draw sequence of the later transforms unchanged.
    """
    th, tw = _pair(size)
    if height < th or width < tw:
        raise ValueError(f"frame {height}x{width} is smaller than the crop {th}x{tw}")
    if height == th and width == tw:
        return 0, 0
    draws = _Draws(rng, "random crop")
    i = draws.randint(0, height - th)
    j = draws.randint(0, width - tw)
    return i, j


def spatial_crop(height: int, width: int, size=224, rng: RngLike = None) -> Tuple[int, int]:
    """Crop origin `(i, j)`: random when `rng` is given (train), centre otherwise (test)."""
    if rng is None:
        return center_crop_top_left(height, width, size)
    return random_crop_top_left(height, width, size, rng)


def crop_frames(frames: np.ndarray, top_left: Tuple[int, int], size=224) -> np.ndarray:
    """`frames[..., i:i+th, j:j+tw, :]` for channel-last frames `[..., H, W, C]`."""
    th, tw = _pair(size)
    i, j = top_left
    return frames[..., i:i + th, j:j + tw, :]


def horizontal_flip(frames: np.ndarray) -> np.ndarray:
    """Mirror channel-last frames `[..., H, W, C]` left-right."""
    return frames[..., ::-1, :]


# ---------------------------------------------------------------------- offset classes


def class_grid(max_off_sec: float = 2.0, num_classes: int = 21) -> np.ndarray:
    """Offset classes: float64 `linspace(-max, max, n)` cast to float32 (as the official)."""
    if num_classes < 3:
        raise ValueError(f"num_classes={num_classes}: the official grid needs at least 3 classes")
    return np.linspace(-max_off_sec, max_off_sec, num_classes).astype(np.float32)


def quantize_offset(grid: np.ndarray, offset_sec: float) -> Tuple[np.float32, int]:
    """Nearest grid value and its index; the distance is computed in float32 and ties go
    to the first (lowest) index, as `(grid - off).abs().argmin()` on the float32 tensor."""
    grid = np.asarray(grid, dtype=np.float32)
    k = int(np.argmin(np.abs(grid - np.float32(offset_sec))))
    return grid[k], k


# ------------------------------------------------------------- TemporalCropAndOffset


@dataclasses.dataclass(frozen=True)
class TemporalCrop:
    """Where the audio and video crops start in the (equalified) streams, and the label.

    `v_start_i_sec` and `offset_sec` are what the official code writes to the targets:
    the requested (raw) seconds in the fixed-offset branch, the frame-snapped seconds in
    the random branch; `offset_sec` is rounded to 2 decimals.
    """
    v_start_i: int
    a_start_i: int
    v_crop_len: int
    a_crop_len: int
    offset_sec: float
    v_start_i_sec: float
    offset_label: np.float32
    offset_class: int
    a_jitter_i: int = 0
    is_synchronizable: Optional[bool] = None  # stage III only

    @property
    def v_end_i(self) -> int:
        return self.v_start_i + self.v_crop_len

    @property
    def a_end_i(self) -> int:
        return self.a_start_i + self.a_crop_len

    @property
    def frame_indices(self) -> np.ndarray:
        return np.arange(self.v_start_i, self.v_end_i, dtype=np.int64)


def _apply_audio_jitter(a_start_i: int, a_len: int, a_crop_len: int, a_fps: int,
                        max_jitter_sec: float, draws: _Draws) -> Tuple[int, int]:
    """Official `apply_a_jitter`: `a_start_i += randint(-min(a_start_i, J), min(room, J))`.

    Bounded by the clip on both sides, so the audio crop always stays inside the audio;
    the label is left as it is (the jitter is at most half a class step).
    """
    max_a_start_i = a_len - a_crop_len
    max_jitter_i = sec2frames(max_jitter_sec, a_fps)
    left = min(a_start_i, max_jitter_i)
    right = min(max_a_start_i - a_start_i, max_jitter_i)
    jitter = draws.randint(-left, right)
    a_start_i += jitter
    if not 0 <= a_start_i <= max_a_start_i:
        raise ValueError(f"audio start {a_start_i} after jitter is outside [0, {max_a_start_i}]")
    return a_start_i, jitter


def _clamp_negative_audio_start(a_start_i: int, a_fps: int, v_fps: int) -> int:
    # `int()` truncation of the snapped start (e.g. 1.505 s -> frame 37 = 1.48 s) with an
    # offset of -1.5 s gives a start a few samples below 0; up to one video frame of
    # samples is clamped to 0, anything larger is an error (official behaviour).
    if a_start_i < 0:
        if abs(a_start_i) <= a_fps / v_fps:
            return 0
        raise ValueError(f"audio crop would start {a_start_i} samples before the audio")
    return a_start_i


def _check_fixed_args(offset_sec, v_start_i_sec):
    if (offset_sec is None) != (v_start_i_sec is None):
        raise ValueError("give both offset_sec and v_start_i_sec (fixed offset) or neither (random)")
    return offset_sec is not None


def _random_video_start(off: float, v_len: int, v_crop_len: int, v_fps: int, draws: _Draws):
    """Uniform (not frame-snapped) start in seconds such that both crops fit, then snapped."""
    v_start_max_sec = (v_len - v_crop_len) / v_fps
    if not v_start_max_sec > 0:
        raise _ClipTooShort(f"video of {v_len} frames is not longer than the {v_crop_len}-frame crop",
                            f"{v_len} frames are not longer than the {v_crop_len}-frame crop")
    v_start_sec = draws.uniform(max(0, -off), min(v_start_max_sec, v_start_max_sec - off))
    if not 0 <= v_start_sec <= v_start_max_sec:
        raise _ClipTooShort(f"offset {off} s does not fit into a clip of {v_len} frames",
                            f"offset {off} s does not fit into {v_len} frames")
    v_start_i = sec2frames(v_start_sec, v_fps)
    return v_start_i, v_start_i / v_fps


def _check_crop_fits(v_start_i, v_crop_len, v_len, a_start_i, a_crop_len, a_len):
    if v_start_i + v_crop_len > v_len or v_start_i < 0:
        crop = f"video crop [{v_start_i}, {v_start_i + v_crop_len})"
        raise _ClipTooShort(f"{crop} is outside {v_len} frames", f"the {crop} is outside those {v_len} frames")
    if a_start_i + a_crop_len > a_len or a_start_i < 0:
        crop = f"audio crop [{a_start_i}, {a_start_i + a_crop_len})"
        raise _ClipTooShort(f"{crop} is outside {a_len} samples", f"the {crop} is outside those {a_len} samples")


def temporal_crop_and_offset(v_len: int, a_len: int, *, video_fps: float = VIDEO_FPS,
                             audio_rate: int = AUDIO_RATE, crop_len_sec: float = 5.0,
                             max_off_sec: float = 2.0, grid_size: int = 21,
                             max_jitter_sec: float = 0.0, offset_sec: Optional[float] = None,
                             v_start_i_sec: Optional[float] = None,
                             rng: RngLike = None) -> TemporalCrop:
    """Official `TemporalCropAndOffset` (offset_type 'grid') on equalified lengths.

    Fixed branch (`offset_sec` and `v_start_i_sec` given; evaluation / example.py):
    `v_start_i = int(v_start_i_sec * fps)`, `a_start_i = int((v_start_i_sec + offset) *
    rate)` with the requested seconds. Random branch (train): `offset = choice(grid)`,
    start `~ U(max(0, -off), min(max, max - off))` seconds, snapped to a frame, audio start
    from the snapped seconds. Then the small-negative clamp, then (if `max_jitter_sec`)
    the audio jitter, which does not change the label.

    Args:
      v_len, a_len: lengths after `equalify_from_right` (frames, samples).
      video_fps, audio_rate: stream rates (the fps is truncated to an int, as officially).
      crop_len_sec, max_off_sec, grid_size: 5 s crop, 21 classes in [-2, 2] s.
      max_jitter_sec: 0.05 for training, 0 for evaluation.
      offset_sec, v_start_i_sec: fixed setting (both or neither).
      rng: needed for the random branch and for the jitter.
    """
    v_fps = int(video_fps)
    a_fps = int(audio_rate)
    grid = class_grid(max_off_sec, grid_size)
    if max_jitter_sec and max_jitter_sec - 1e-6 > (float(grid[1]) - float(grid[0])) / 2:
        # A jitter larger than half a class step could move the audio into the next class.
        raise ValueError(f"max_jitter_sec={max_jitter_sec} exceeds half the class step")
    v_crop_len = sec2frames(crop_len_sec, v_fps)
    a_crop_len = sec2frames(crop_len_sec, a_fps)
    fixed = _check_fixed_args(offset_sec, v_start_i_sec)
    draws = None
    if fixed:
        off = round(float(offset_sec), 2)
        v_start_i = sec2frames(v_start_i_sec, v_fps)
        v_start_i_sec = float(v_start_i_sec)
    else:
        draws = _Draws(rng, "the random offset")
        off = round(draws.choice(grid.tolist()), 2)
        v_start_i, v_start_i_sec = _random_video_start(off, v_len, v_crop_len, v_fps, draws)
    a_start_i = sec2frames(v_start_i_sec + off, a_fps)
    a_start_i = _clamp_negative_audio_start(a_start_i, a_fps, v_fps)
    jitter = 0
    if max_jitter_sec and max_jitter_sec > 0:
        draws = draws or _Draws(rng, "the audio jitter")
        a_start_i, jitter = _apply_audio_jitter(a_start_i, a_len, a_crop_len, a_fps, max_jitter_sec, draws)
    _check_crop_fits(v_start_i, v_crop_len, v_len, a_start_i, a_crop_len, a_len)
    label, cls = quantize_offset(grid, off)
    return TemporalCrop(v_start_i, a_start_i, v_crop_len, a_crop_len, off, v_start_i_sec,
                        label, cls, jitter)


# ------------------------------------------------ TemporalCropAndOffsetForSyncability


def synchronizability_crop_len_sec(n_segments: int = 13, segment_size_vframes: int = 16,
                                   step_size_seg: float = 0.5, video_fps: float = VIDEO_FPS) -> float:
    """Seconds covered by `n_segments` overlapping segments, rounded to 2 decimals
    (13 x 16 frames at step 0.5 -> 7 segment lengths -> 4.48 s)."""
    trim_size_in_seg = n_segments - (1 - step_size_seg) * (n_segments - 1)
    return round(trim_size_in_seg * (segment_size_vframes / video_fps), 2)


def synchronizability_crop(v_len: int, a_len: int, *, video_fps: float = VIDEO_FPS,
                           audio_rate: int = AUDIO_RATE, n_segments: int = 13,
                           segment_size_vframes: int = 16, step_size_seg: float = 0.5,
                           max_off_sec: float = 2.0, grid_size: int = 21,
                           max_jitter_sec: float = 0.0, prob_synchronizable: float = 0.5,
                           offset_sec: Optional[float] = None,
                           v_start_i_sec: Optional[float] = None,
                           is_synchronizable: Optional[bool] = None,
                           rng: RngLike = None) -> TemporalCrop:
    """Official `TemporalCropAndOffsetForSyncabilityTraining` (stage III).

    The crop is exactly as long as the segments (4.48 s for 13 segments). With
    probability 0.5 the offset is a grid value (synchronizable); otherwise it is
    ±crop length (sign equiprobable), so the audio and video crops touch but do not
    overlap (up to the ±0.05 s jitter). Unlike stage II the jitter comes before the
    small-negative clamp, and the random start in seconds is drawn the same way.

    The official fixed-offset branch of this class crashes (the synchronizability flag
    only exists in the random branch); here a fixed setting is supported and
    `is_synchronizable` defaults to `|offset| <= max_off_sec`.
    """
    v_fps = int(video_fps)
    a_fps = int(audio_rate)
    grid = class_grid(max_off_sec, grid_size)
    if max_jitter_sec and max_jitter_sec - 1e-6 > (float(grid[1]) - float(grid[0])) / 2:
        raise ValueError(f"max_jitter_sec={max_jitter_sec} exceeds half the class step")
    crop_len_sec = synchronizability_crop_len_sec(n_segments, segment_size_vframes, step_size_seg, video_fps)
    v_crop_len = sec2frames(crop_len_sec, v_fps)
    a_crop_len = sec2frames(crop_len_sec, a_fps)
    jitter = 0
    if _check_fixed_args(offset_sec, v_start_i_sec):
        off = round(float(offset_sec), 2)
        sync = abs(off) <= max_off_sec if is_synchronizable is None else bool(is_synchronizable)
        v_start_i = sec2frames(v_start_i_sec, v_fps)
        v_start_i_sec = float(v_start_i_sec)
        a_start_i = sec2frames(v_start_i_sec + off, a_fps)
    else:
        draws = _Draws(rng, "the synchronizability offset")
        sync = draws.random() < prob_synchronizable
        if sync:
            off = draws.choice(grid.tolist())
        else:
            off = draws.choice([-crop_len_sec, crop_len_sec])
        off = round(off, 2)
        v_start_i, v_start_i_sec = _random_video_start(off, v_len, v_crop_len, v_fps, draws)
        a_start_i = sec2frames(v_start_i_sec + off, a_fps)
        if max_jitter_sec and max_jitter_sec > 0:
            a_start_i, jitter = _apply_audio_jitter(a_start_i, a_len, a_crop_len, a_fps, max_jitter_sec, draws)
    a_start_i = _clamp_negative_audio_start(a_start_i, a_fps, v_fps)
    _check_crop_fits(v_start_i, v_crop_len, v_len, a_start_i, a_crop_len, a_len)
    # The official code also records the (meaningless for ±4.48 s) nearest grid class.
    label, cls = quantize_offset(grid, off)
    return TemporalCrop(v_start_i, a_start_i, v_crop_len, a_crop_len, off, v_start_i_sec,
                        label, cls, jitter, bool(sync))


# -------------------------------------------------------------- GenerateMultipleSegments


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """`[start, end)` of every segment inside the temporally cropped clip.

    `v_ranges` are video frames, `a_ranges` audio samples, both `[n, 2]` int64.
    """
    v_ranges: np.ndarray
    a_ranges: np.ndarray
    v_start_i: int
    a_start_i: int
    a_jitter_i: int = 0

    def __eq__(self, other):
        if not isinstance(other, Segments):
            return NotImplemented
        return (np.array_equal(self.v_ranges, other.v_ranges)
                and np.array_equal(self.a_ranges, other.a_ranges)
                and (self.v_start_i, self.a_start_i, self.a_jitter_i)
                == (other.v_start_i, other.a_start_i, other.a_jitter_i))

    __hash__ = None

    @property
    def n_segments(self) -> int:
        return int(self.v_ranges.shape[0])

    @property
    def frame_indices(self) -> np.ndarray:
        """`[n, segment_frames]` int64 frame index of every model input frame."""
        size = int(self.v_ranges[0, 1] - self.v_ranges[0, 0])
        return self.v_ranges[:, :1] + np.arange(size, dtype=np.int64)[None]

    @property
    def sample_starts(self) -> np.ndarray:
        return self.a_ranges[:, 0].copy()


def generate_segments(v_len: int, a_len: int, *, video_fps: float = VIDEO_FPS,
                      audio_rate: int = AUDIO_RATE, segment_size_vframes: int = 16,
                      n_segments: Optional[int] = None, step_size_seg: float = 0.5,
                      is_start_random: bool = False, audio_jitter_sec: float = 0.0,
                      rng: RngLike = None) -> Segments:
    """Official `GenerateMultipleSegments` on a clip of `v_len` frames / `a_len` samples.

    Segments of 16 frames (`int(16 / 25 * 16000) = 10240` samples) with strides
    `int(step * 16)` / `int(step * 10240)`. The run of segments starts at
    `randint(0, max_start)` (train) or `max_start // 2` (test); the audio start is that
    frame converted through seconds (`640 * v0`). Stage I adds one shared audio shift of
    `randint(-J, J)`, `J = min(0.05 s, room on both sides)`.

    Args:
      n_segments: None = as many as fit (official default).
      step_size_seg: 0.5 (stages II/III, 50 % overlap) or 1.0 (stage I, no overlap).
    """
    v_fps = int(video_fps)
    a_fps = int(audio_rate)
    seg_v = int(segment_size_vframes)
    seg_a = sec2frames(seg_v / v_fps, a_fps)
    stride_v = int(step_size_seg * seg_v)
    stride_a = int(step_size_seg * seg_a)
    n_max = min(math.floor((v_len - seg_v) / stride_v) + 1, math.floor((a_len - seg_a) / stride_a) + 1)
    n = n_max if n_segments is None else int(n_segments)
    if n > n_max or n < 1:
        raise _ClipTooShort(f"cannot make {n} segments of {seg_v} frames from {v_len} frames / {a_len} samples",
                            f"{v_len} frames / {a_len} samples cannot hold {n} segments of {seg_v} frames")
    seq_len = n * step_size_seg + (1 - step_size_seg)
    v_seq_len = int(seq_len * seg_v)
    a_seq_len = int(seq_len * seg_a)
    max_v_start = v_len - v_seq_len
    draws = None
    if is_start_random:
        draws = _Draws(rng, "a random segment start")
        v0 = draws.randint(0, max_v_start)
    else:
        v0 = max_v_start // 2
    a0 = sec2frames(v0 / v_fps, a_fps)
    k = np.arange(n, dtype=np.int64)
    v_starts = v0 + stride_v * k
    a_starts = a0 + stride_a * k
    shift = 0
    if audio_jitter_sec > 0:
        draws = draws or _Draws(rng, "the audio jitter")
        j = min(sec2frames(audio_jitter_sec, a_fps), a0, a_len - a0 - a_seq_len)
        shift = draws.randint(-j, j)
        a_starts = a_starts + shift
    v_ranges = np.stack([v_starts, v_starts + seg_v], axis=1)
    a_ranges = np.stack([a_starts, a_starts + seg_a], axis=1)
    if (a_ranges < 0).any() or (a_ranges > a_len).any() or (v_ranges > v_len).any():
        raise ValueError(f"segments out of range: video {v_ranges.tolist()}, audio {a_ranges.tolist()}")
    return Segments(v_ranges, a_ranges, int(v0), int(a0), int(shift))


# ------------------------------------------------------------------------ array helpers


def take_temporal_crop(frames: np.ndarray, audio: np.ndarray, crop: TemporalCrop):
    """`(frames[v_start:v_end], audio[a_start:a_end])`."""
    return frames[crop.v_start_i:crop.v_end_i], audio[crop.a_start_i:crop.a_end_i]


def take_video_segments(frames: np.ndarray, segments: Segments) -> np.ndarray:
    """`[T, ...]` -> `[S, segment_frames, ...]` (a gather; frames are shared by overlaps)."""
    return np.asarray(frames)[segments.frame_indices]


def take_audio_segments(audio: np.ndarray, segments: Segments) -> np.ndarray:
    """`[N]` -> `[S, segment_samples]`."""
    size = int(segments.a_ranges[0, 1] - segments.a_ranges[0, 0])
    idx = segments.a_ranges[:, :1] + np.arange(size, dtype=np.int64)[None]
    return np.asarray(audio)[idx]


# --------------------------------------------------------------------- whole examples


@dataclasses.dataclass(frozen=True)
class ExamplePlan:
    """Every index needed to turn a decoded clip into one model example.

    Absolute indices refer to the decoded streams (before `EqualifyFromRight`, which
    only trims from the end): `segment_frame_indices` `[S, 16]` and
    `segment_sample_starts` `[S]`; frames are cropped spatially at `top_left` with
    `crop_size` and mirrored when `flip`.
    """
    v_len: int
    a_len: int
    top_left: Tuple[int, int]
    crop_size: Tuple[int, int]
    temporal: Optional[TemporalCrop]
    segments: Segments
    flip: bool = False

    @property
    def v_offset(self) -> int:
        return 0 if self.temporal is None else self.temporal.v_start_i

    @property
    def a_offset(self) -> int:
        return 0 if self.temporal is None else self.temporal.a_start_i

    @property
    def segment_frame_indices(self) -> np.ndarray:
        return self.v_offset + self.segments.frame_indices

    @property
    def segment_sample_starts(self) -> np.ndarray:
        return self.a_offset + self.segments.sample_starts

    @property
    def segment_samples(self) -> int:
        return int(self.segments.a_ranges[0, 1] - self.segments.a_ranges[0, 0])


def plan_sync_example(n_frames: int, n_samples: int, height: int, width: int, *,
                      train: bool, rng: RngLike = None, video_fps: float = VIDEO_FPS,
                      audio_rate: int = AUDIO_RATE, offset_sec: Optional[float] = None,
                      v_start_i_sec: Optional[float] = None, synchronizability: bool = False,
                      crop_size: int = 224, n_segments: Optional[int] = None,
                      segment_size_vframes: int = 16, step_size_seg: float = 0.5,
                      crop_len_sec: float = 5.0, max_off_sec: float = 2.0, grid_size: int = 21,
                      max_jitter_sec: float = 0.05, hflip_p: float = 0.5,
                      clip_max_len_sec: float = 10.0) -> ExamplePlan:
    """Stage II (`sync.yaml`) or, with `synchronizability=True`, stage III indices.

    Train: random 224 crop, random offset + start, ±0.05 s audio jitter, whole-clip
    horizontal flip with `hflip_p`, random segment start. Test: centre crop, fixed or
    random offset without jitter, centred segments. `n_segments` defaults to 14 (II) /
    13 (III). Python-`random` draws come in the official order (crop i, j; offset; start;
    jitter; segment start); the flip, drawn by torch officially, is drawn last.
    """
    if train and rng is None:
        raise ValueError("a training example is random: pass rng")
    rng = _as_rng(rng)  # one generator for all steps (an int seed must not restart each)
    if n_segments is None:
        n_segments = 13 if synchronizability else 14
    v_len, a_len = equalify_from_right(n_frames, n_samples, video_fps, audio_rate, clip_max_len_sec)
    top_left = spatial_crop(height, width, crop_size, rng if train else None)
    jitter = max_jitter_sec if train else 0.0
    try:
        if synchronizability:
            temporal = synchronizability_crop(
                v_len, a_len, video_fps=video_fps, audio_rate=audio_rate, n_segments=n_segments,
                segment_size_vframes=segment_size_vframes, step_size_seg=step_size_seg,
                max_off_sec=max_off_sec, grid_size=grid_size, max_jitter_sec=jitter,
                offset_sec=offset_sec, v_start_i_sec=v_start_i_sec, rng=rng)
        else:
            temporal = temporal_crop_and_offset(
                v_len, a_len, video_fps=video_fps, audio_rate=audio_rate, crop_len_sec=crop_len_sec,
                max_off_sec=max_off_sec, grid_size=grid_size, max_jitter_sec=jitter,
                offset_sec=offset_sec, v_start_i_sec=v_start_i_sec, rng=rng)
    except ValueError as exc:
        raise _blame_short_audio(exc, n_frames, n_samples, v_len, video_fps, audio_rate, clip_max_len_sec) from None
    segments = generate_segments(
        temporal.v_crop_len, temporal.a_crop_len, video_fps=video_fps, audio_rate=audio_rate,
        segment_size_vframes=segment_size_vframes, n_segments=n_segments,
        step_size_seg=step_size_seg, is_start_random=train, rng=rng)
    flip = bool(train and hflip_p > 0 and _Draws(rng, "the flip").random() < hflip_p)
    return ExamplePlan(v_len, a_len, top_left, _pair(crop_size), temporal, segments, flip)


def plan_segment_avclip_example(n_frames: int, n_samples: int, height: int, width: int, *,
                                train: bool, rng: RngLike = None, video_fps: float = VIDEO_FPS,
                                audio_rate: int = AUDIO_RATE, crop_size: int = 224,
                                n_segments: int = 14, segment_size_vframes: int = 16,
                                audio_jitter_sec: float = 0.05,
                                clip_max_len_sec: float = 10.0) -> ExamplePlan:
    """Stage I (`segment_avclip.yaml`) indices: no temporal crop, 14 non-overlapping
    segments (8.96 s) at a random (train) or middle start, audio jitter in training.

    TODO(transforms): the official training crop sometimes (p=0.2) takes a random 192 px
    crop and resizes it to 224 (bilinear), and color-jitters / flips each segment; those
    per-segment augmentations are not here (the plan holds the plain 224 crop).
    """
    if train and rng is None:
        raise ValueError("a training example is random: pass rng")
    rng = _as_rng(rng)  # one generator for all steps (an int seed must not restart each)
    v_len, a_len = equalify_from_right(n_frames, n_samples, video_fps, audio_rate, clip_max_len_sec)
    top_left = spatial_crop(height, width, crop_size, rng if train else None)
    try:
        segments = generate_segments(
            v_len, a_len, video_fps=video_fps, audio_rate=audio_rate,
            segment_size_vframes=segment_size_vframes, n_segments=n_segments, step_size_seg=1.0,
            is_start_random=train, audio_jitter_sec=audio_jitter_sec if train else 0.0, rng=rng)
    except ValueError as exc:
        raise _blame_short_audio(exc, n_frames, n_samples, v_len, video_fps, audio_rate, clip_max_len_sec) from None
    return ExamplePlan(v_len, a_len, top_left, _pair(crop_size), None, segments, False)


def apply_plan(frames: np.ndarray, audio: np.ndarray, plan: ExamplePlan):
    """Decoded `uint8 [T, H, W, 3]` and `float32 [N]` -> `uint8 [S, 16, h, w, 3]` and
    `float32 [S, 10240]` (the raw model example before normalisation / log-mel)."""
    video = crop_frames(np.asarray(frames)[plan.segment_frame_indices], plan.top_left, plan.crop_size)
    if plan.flip:
        video = horizontal_flip(video)
    idx = plan.segment_sample_starts[:, None] + np.arange(plan.segment_samples, dtype=np.int64)[None]
    return np.ascontiguousarray(video), np.asarray(audio)[idx]
