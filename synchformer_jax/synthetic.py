"""Procedural sparse-cue audio-visual clips: the embedded default dataset.

Why procedural: the project must train, evaluate and test end to end from a clean
checkout, without downloading VGGSound or LRS3. The clips imitate what makes
VGGSound-Sparse hard: the only evidence for the audio-visual offset is a handful of
short, irregularly timed events (2-5 per 10 s, at least `min_gap_sec` apart), so a model
has to find *when* the sound and the picture change together, not match textures.

One clip (`make_clip(seed)`), deterministic from the seed:

* video, 25 fps, `uint8 [T, H, W, 3]` with H = W = 256 by default (shorter side 256 as the
  input contract demands; the pipeline crops 224): a slowly drifting colour gradient,
  static grain, one silent distractor square that glides around, and per event one of
  - "bounce": a ball that follows parabolas and touches the floor exactly at its events,
  - "collide": two blocks that slide together, touch at the event and slide apart,
  - "flash": the whole frame brightens for one frame and fades over ~4 frames;
* audio, 16 kHz mono float32: background noise plus, at every event, one sound whose
  timbre varies per event: decaying noise burst (impact), damped tone (click/ring) or a
  falling chirp.

Event times sit on the video frame grid (multiples of 0.04 s), so the visual contact
frame and the audio onset are exactly simultaneous in the unshifted clip.

`cue="onset"` (the CPU demo's clips, configs/demo.py) replaces the events by one onset
that persists: a large lamp switches on for good and its hum (a harmonic tone) starts in
the same frame, over the same drifting background and silent square. The tiny demo
model learns this within minutes, where the sparse events keep it on its loss plateau
(docs/benchmarks.md "Stage-II plateau").

`cue="pulse"` is the onset clip whose lamp switches off again after `pulse_frames`
frames (default 3 = 0.12 s) and whose hum sounds only for that span: one short, isolated
event per clip, as sparse as the events but with a single, known time. That time (the
record's only event) anchors the feature cache's window curriculum
(`feature_cache.CacheTrainIterator`, `window_curriculum`), which first draws windows
centred on it: on a lone pulse the model otherwise stays on its plateau for long.
A training set of pulses: `make_dataset(..., cue="pulse")`, in a config
`data.synthetic_clip = dict(cue="pulse")`.

`make_dataset` encodes each clip's frames as H.264 mp4 in memory (PyAV / libx264),
wraps it with the PCM in a `records.ClipRecord` and writes shards through the same
writer as real data (`input.shards`). Evaluation records carry a
fixed offset (`labels["offset_sec"]`, `labels["vstart_sec"]`) so the fixed-offset
protocol runs on them too.
"""
from __future__ import annotations

import io
import math
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import av
import numpy as np

from synchformer_jax import records
from synchformer_jax.input import shards

__all__ = ["FPS", "SAMPLE_RATE", "make_clip", "make_clip_with_events", "encode_mp4", "make_record", "make_dataset"]

FPS = 25
SAMPLE_RATE = 16000
EVENT_KINDS = ("bounce", "collide", "flash")
SOUND_KINDS = ("burst", "tone", "chirp")
CUE_EVENTS, CUE_ONSET, CUE_PULSE = "events", "onset", "pulse"
CUES = (CUE_EVENTS, CUE_ONSET, CUE_PULSE)
RAMP_SEC = 0.005  # the hum's attack (and the pulse's release): sharp but click-free


def _event_frames(rng: np.random.Generator, n_frames: int, min_events: int, max_events: int,
                  min_gap_frames: int, margin_frames: int) -> np.ndarray:
    """Sorted, irregular event frames at least `min_gap_frames` apart (rejection-free:
    draw the free slack and spread it with a random composition)."""
    n = int(rng.integers(min_events, max_events + 1))
    span = n_frames - 2 * margin_frames
    slack = span - (n - 1) * min_gap_frames
    if slack < 0:
        n = max(1, span // min_gap_frames + 1)
        slack = span - (n - 1) * min_gap_frames
    # Random split of the slack into n + 1 non-negative gaps (Dirichlet), rounded down.
    gaps = np.floor(rng.dirichlet(np.ones(n + 1)) * slack).astype(np.int64)
    starts = margin_frames + np.cumsum(gaps[:n]) + np.arange(n) * min_gap_frames
    return starts.astype(np.int64)


def _ball_height(t: np.ndarray, bounce_t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Height above the floor (0 = touching), `[T]`: parabolas between consecutive bounces,
    a fall from above before the first one and a settling hop after the last one."""
    h = np.zeros_like(t)
    if bounce_t.size == 0:
        return h + 0.55  # no bounce: the ball hangs still (a silent, static distractor)
    knots = np.concatenate([[bounce_t[0] - 1.2], bounce_t, [bounce_t[-1] + 0.6]])
    for a, b in zip(knots[:-1], knots[1:]):
        sel = (t >= a) & (t < b)
        peak = min(0.75, 0.25 + 0.3 * (b - a))  # longer gaps throw the ball higher
        x = (t[sel] - a) / (b - a)
        h[sel] = peak * 4.0 * x * (1.0 - x)
    first = t < knots[1]
    # Before the first bounce the ball drops from rest (half a parabola), not a full hop.
    x = np.clip((t[first] - knots[0]) / (knots[1] - knots[0]), 0, 1)
    h[first] = 0.7 * (1.0 - x ** 2)
    h[t >= knots[-1]] = 0.0
    return h


def _gap_profile(t: np.ndarray, event_t: np.ndarray, approach_sec: float = 0.5) -> np.ndarray:
    """Distance (0..1) between the two colliding blocks: 0 exactly at each event,
    opening linearly within `approach_sec` around it, 1 elsewhere."""
    if event_t.size == 0:
        return np.ones_like(t)
    d = np.min(np.abs(t[:, None] - event_t[None, :]), axis=1)
    return np.clip(d / approach_sec, 0.0, 1.0)


def _paint_disc(img: np.ndarray, cy: float, cx: float, r: float, colour) -> None:
    """Draws a filled disc into `img [H, W, 3]` touching only its bounding box (cheap)."""
    h, w = img.shape[:2]
    y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    img[y0:y1, x0:x1][yy * yy + xx * xx <= r * r] = colour


def _paint_box(img: np.ndarray, y0: float, y1: float, x0: float, x1: float, colour) -> None:
    h, w = img.shape[:2]
    y0, y1 = max(0, int(round(y0))), min(h, int(round(y1)))
    x0, x1 = max(0, int(round(x0))), min(w, int(round(x1)))
    if y0 < y1 and x0 < x1:
        img[y0:y1, x0:x1] = colour


def _background(rng: np.random.Generator, t: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """A diagonal gradient with fixed grain whose colours drift slowly (a nuisance change
    that carries no timing information): `(base int16 [H, W, 3], shift float [T, 3])`."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    c0 = rng.uniform(30, 120, 3)
    c1 = rng.uniform(30, 120, 3)
    ramp = ((yy + xx) / float(height + width))[..., None]  # [H, W, 1]
    grain = rng.normal(0, 4, (height, width, 1))
    base = np.round(c0 * (1 - ramp) + c1 * ramp + grain).astype(np.int16)  # [H, W, 3]
    shift = rng.uniform(10, 40, 3) * np.sin(2 * np.pi * t[:, None] / rng.uniform(6, 20) + rng.uniform(0, 6.3, 3))
    return base, shift


def _distractor(rng: np.random.Generator, t: np.ndarray, height: int, width: int):
    """A silent square on a smooth Lissajous path, never tied to a sound:
    `(centre y [T], centre x [T], half side, colour)`."""
    fy, fx, ph = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 6.3)
    dy = height * (0.3 + 0.2 * np.sin(2 * np.pi * fy * t + ph))
    dx = width * (0.5 + 0.35 * np.sin(2 * np.pi * fx * t))
    return dy, dx, 14 * height / 256.0, rng.uniform(60, 200, 3).astype(np.uint8)


def _render_video(rng: np.random.Generator, n_frames: int, height: int, width: int,
                  events: List[Dict[str, Any]]) -> np.ndarray:
    t = np.arange(n_frames, dtype=np.float64) / FPS
    base, shift = _background(rng, t, height, width)

    times = {k: np.array([e["time_sec"] for e in events if e["kind"] == k]) for k in EVENT_KINDS}
    # Flashes: +110 at the event frame, decaying over the next frames (same on all channels).
    for j in np.round(times["flash"] * FPS).astype(np.int64):
        seg = np.arange(j, min(n_frames, j + 5))
        shift[seg] += (110.0 * np.exp(-(seg - j) / 1.2))[:, None]
    shift = np.round(shift).astype(np.int16)  # [T, 3]

    floor = height * 0.85
    s = height / 256.0  # geometry scales with the frame
    dy, dx, d_half, d_col = _distractor(rng, t, height, width)
    # Ball: touches the floor exactly at the bounce events.
    r = 16 * s
    hgt = _ball_height(t, times["bounce"], rng)
    bx = width * (0.25 + 0.5 * (0.5 + 0.5 * np.sin(2 * np.pi * t / rng.uniform(7, 15) + rng.uniform(0, 6.3))))
    by = floor - r - hgt * (floor - 2 * r)
    b_col = rng.uniform(150, 255, 3).astype(np.uint8)
    # Colliding blocks: meet in the middle at the collide events.
    gap = _gap_profile(t, times["collide"])
    cy, bw, cx = height * 0.18, 18 * s, width * 0.5

    video = np.empty((n_frames, height, width, 3), np.uint8)
    tmp = np.empty((height, width, 3), np.int16)
    for i in range(n_frames):  # per frame: whole-frame ops are small, objects touch boxes only
        np.add(base, shift[i], out=tmp)
        np.clip(tmp, 0, 255, out=tmp)
        img = video[i]
        img[...] = tmp
        _paint_box(img, floor, floor + 3 * s, 0, width, 200)  # the floor
        _paint_box(img, dy[i] - d_half, dy[i] + d_half, dx[i] - d_half, dx[i] + d_half, d_col)
        _paint_disc(img, by[i], bx[i], r, b_col)
        lx1, rx0 = cx - gap[i] * width * 0.3, cx + gap[i] * width * 0.3
        _paint_box(img, cy - bw, cy + bw, lx1 - 2 * bw, lx1, (230, 60, 60))
        _paint_box(img, cy - bw, cy + bw, rx0, rx0 + 2 * bw, (60, 60, 230))
    return video


def _sound(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One event sound (float32, <= 0.3 s), sharp onset at sample 0."""
    dur = rng.uniform(0.08, 0.3)
    n = int(dur * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    decay = np.exp(-t / rng.uniform(0.015, 0.08))
    if kind == "burst":
        x = rng.normal(0, 1, n)
        # A one-pole low-pass with a random cut-off varies the impact's colour.
        a = rng.uniform(0.0, 0.9)
        if a > 0:
            y = np.empty(n)
            acc = 0.0
            for i in range(n):  # short (<= 4800 samples): a plain loop is cheap enough
                acc = a * acc + (1 - a) * x[i]
                y[i] = acc
            x = y / (np.std(y) + 1e-9)
    elif kind == "tone":
        f = rng.uniform(300, 3000)
        x = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(2 * np.pi * 2.01 * f * t)
    else:  # chirp: falling frequency sweep
        f0, f1 = rng.uniform(1500, 4000), rng.uniform(200, 800)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * dur))
        x = np.sin(phase)
    x = x * decay
    return (rng.uniform(0.3, 0.8) * x / (np.max(np.abs(x)) + 1e-9)).astype(np.float32)


def _render_audio(rng: np.random.Generator, n_samples: int, events: List[Dict[str, Any]]) -> np.ndarray:
    # Background: white noise at a random level plus a faint hum, both untimed.
    audio = rng.normal(0, rng.uniform(0.002, 0.02), n_samples).astype(np.float32)
    t = np.arange(n_samples, dtype=np.float32) / SAMPLE_RATE
    audio += np.float32(rng.uniform(0, 0.01)) * np.sin(2 * np.pi * rng.uniform(50, 200) * t).astype(np.float32)
    for e in events:
        s = _sound(rng, e["sound"])
        i = int(round(e["time_sec"] * SAMPLE_RATE))
        m = min(len(s), n_samples - i)
        audio[i:i + m] += s[:m]
    return np.clip(audio, -1.0, 1.0)


def onset_range_sec(duration_sec: float, crop_len_sec: float = 5.0, max_off_sec: float = 2.0,
                    margin_sec: float = 0.3) -> Tuple[float, float]:
    """Where a clip's onset goes. Up to `crop_len_sec + max_off_sec + 0.4` s (7.4 s) there
    is a span inside the segments of *every* window (any offset class, any feasible video
    start; segments span 4.8 s centred in the 5-s crop): after the latest possible window
    start, before the earliest possible segment end, `margin_sec` in from both. Longer
    clips (stage I's 14 x 0.64 s needs 9 s) have no such span; there the onset goes to
    the middle second, which ~90 % of the random windows of a 10-s clip hold in both streams."""
    room = duration_sec - crop_len_sec  # latest video (or audio) crop start
    if room < max_off_sec - 1e-9:
        raise ValueError(f"a {duration_sec} s clip cannot hold +-{max_off_sec} s offsets of a {crop_len_sec} s crop")
    seg_lo, seg_hi = 0.08, crop_len_sec - 0.12  # the centred 14 x 0.64-s segments inside the crop
    lo, hi = room + seg_lo + margin_sec, seg_hi - margin_sec
    if lo < hi:
        return lo, hi
    return duration_sec / 2 - 0.5, duration_sec / 2 + 0.5


def _onset_event(frame: int) -> Dict[str, Any]:
    return {"time_sec": frame / FPS, "frame": int(frame), "kind": "onset", "sound": "hum"}


def _pulse_event(frame: int, pulse_frames: int) -> Dict[str, Any]:
    return {"time_sec": frame / FPS, "frame": int(frame), "kind": "pulse", "sound": "hum",
            "duration_sec": pulse_frames / FPS}


def _check_cue(cue: str) -> None:
    if cue not in CUES:
        raise ValueError(f"cue must be one of {CUES}, got {cue!r}")


def _check_pulse(frame: Optional[int], pulse_frames: int, n_frames: int, duration_sec: float) -> None:
    if int(pulse_frames) != pulse_frames or pulse_frames < 1:
        raise ValueError(f"pulse_frames must be a whole number of frames >= 1, got {pulse_frames!r}")
    if frame is not None and frame + pulse_frames > n_frames:
        raise ValueError(f"a {pulse_frames}-frame pulse at frame {frame} does not end inside the "
                         f"{duration_sec} s clip")


def _lamp_clip(rng: np.random.Generator, cue: str, frame: Optional[int], pulse_frames: int, n_frames: int,
               n_samples: int, height: int, width: int, duration_sec: float):
    """The onset or pulse clip switching on at `frame` (None: the cue-free distractor)."""
    pulse = None
    if cue == CUE_PULSE:
        _check_pulse(frame, pulse_frames, n_frames, duration_sec)
        pulse = int(pulse_frames)
    frames, audio = _render_onset(rng, n_frames, n_samples, height, width, frame, pulse)
    if frame is None:
        return frames, audio, []
    return frames, audio, [_onset_event(frame) if pulse is None else _pulse_event(frame, pulse)]


def _render_onset(rng: np.random.Generator, n_frames: int, n_samples: int, height: int, width: int,
                  onset_frame: Optional[int], pulse_frames: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A lamp that switches on (and stays on) at `onset_frame` while its hum starts in the
    same frame; `None`: the lamp stays off and silent (a cue-free distractor).
    `pulse_frames`: the lamp switches off again after that many frames and the hum stops
    with it (a `RAMP_SEC` release after the last lit frame keeps the end click-free).
    The random draws do not depend on either argument, so one seed gives the same room,
    lamp and hum pitch as onset, pulse or distractor."""
    t = np.arange(n_frames, dtype=np.float64) / FPS
    base, shift = _background(rng, t, height, width)
    dy, dx, d_half, d_col = _distractor(rng, t, height, width)
    cy, cx = height * rng.uniform(0.35, 0.65), width * rng.uniform(0.3, 0.7)
    radius = 0.22 * min(height, width)
    off_col = rng.uniform(40, 70, 3).astype(np.uint8)
    on_col = rng.uniform(170, 255, 3).astype(np.uint8)
    on = np.zeros(n_frames, bool) if onset_frame is None else np.arange(n_frames) >= onset_frame
    if onset_frame is not None and pulse_frames is not None:
        on &= np.arange(n_frames) < onset_frame + pulse_frames
    shift = np.round(shift + 30.0 * on[:, None]).astype(np.int16)  # the room lights up a little too
    video = np.empty((n_frames, height, width, 3), np.uint8)
    tmp = np.empty((height, width, 3), np.int16)
    for i in range(n_frames):
        np.add(base, shift[i], out=tmp)
        np.clip(tmp, 0, 255, out=tmp)
        img = video[i]
        img[...] = tmp
        _paint_disc(img, cy, cx, radius, on_col if on[i] else off_col)
        _paint_box(img, dy[i] - d_half, dy[i] + d_half, dx[i] - d_half, dx[i] + d_half, d_col)

    audio = rng.normal(0, rng.uniform(0.002, 0.02), n_samples).astype(np.float32)
    f0, level = rng.uniform(150, 700), rng.uniform(0.15, 0.4)
    if onset_frame is not None:
        i0 = onset_frame * (SAMPLE_RATE // FPS)
        ts = np.arange(n_samples - i0) / SAMPLE_RATE
        hum = sum(a * np.sin(2 * np.pi * k * f0 * ts) for k, a in ((1, 1.0), (2, 0.5), (3, 0.25)))
        envelope = np.minimum(1.0, ts / RAMP_SEC)
        if pulse_frames is not None:
            # Full level to the end of the last lit frame, then a linear release; in whole
            # samples so that the hum is exactly zero after it.
            end, ramp = pulse_frames * (SAMPLE_RATE // FPS), int(round(RAMP_SEC * SAMPLE_RATE))
            release = np.clip((end + ramp - np.arange(ts.size)) / ramp, 0.0, 1.0)
            envelope = np.minimum(envelope, release)
        audio[i0:] += (level / 1.75 * hum * envelope).astype(np.float32)
    return video, np.clip(audio, -1.0, 1.0)


def make_clip(seed: int, *, duration_sec: float = 10.0, height: int = 256, width: int = 256,
              min_events: int = 2, max_events: int = 5, min_gap_sec: float = 1.0,
              kinds: Sequence[str] = EVENT_KINDS, cue: str = CUE_EVENTS,
              onset_sec: Optional[Tuple[float, float]] = None, pulse_frames: int = 3
              ) -> Tuple[np.ndarray, np.ndarray, List[Dict[str, Any]]]:
    """One clip: `(frames uint8 [T, H, W, 3], audio float32 [N], events)`.

    `T = round(duration_sec * 25)`, `N = T * 640` (so the streams end together).
    `events` is a list of `{"time_sec", "frame", "kind", "sound"}` sorted by time.

    `cue="events"` (default): the sparse events of the module docstring.
    `cue="onset"`: one lamp switches on for good at a frame drawn from `onset_sec`
    (default `onset_range_sec(duration_sec)`) and its hum starts with it; one event of
    kind "onset", sound "hum".
    `cue="pulse"`: the same, but lamp and hum stop again after `pulse_frames` frames;
    one event of kind "pulse", sound "hum" with its `"duration_sec"`. Same seed, same
    switch-on frame, room and hum as `cue="onset"`.
    """
    _check_cue(cue)
    rng = np.random.default_rng([0x5F17C, int(seed)])
    n_frames = int(round(duration_sec * FPS))
    n_samples = n_frames * (SAMPLE_RATE // FPS)
    if cue in (CUE_ONSET, CUE_PULSE):
        lo, hi = onset_sec or onset_range_sec(duration_sec)
        f = int(rng.integers(int(math.ceil(lo * FPS)), int(math.floor(hi * FPS)) + 1))
        return _lamp_clip(rng, cue, f, pulse_frames, n_frames, n_samples, height, width, duration_sec)
    margin = int(0.3 * FPS)  # keep sounds from being cut at the clip ends
    frames_at = _event_frames(rng, n_frames, min_events, max_events, int(round(min_gap_sec * FPS)), margin)
    events = []
    for f in frames_at:
        kind = str(kinds[int(rng.integers(len(kinds)))])
        sound = str(SOUND_KINDS[int(rng.integers(len(SOUND_KINDS)))])
        events.append({"time_sec": float(f) / FPS, "frame": int(f), "kind": kind, "sound": sound})
    frames = _render_video(rng, n_frames, height, width, events)
    audio = _render_audio(rng, n_samples, events)
    return frames, audio, events


def make_clip_with_events(seed: int, event_times_sec: Sequence[float], *, duration_sec: float = 10.0,
                          height: int = 256, width: int = 256, kinds: Optional[Sequence[str]] = None,
                          sounds: Optional[Sequence[str]] = None, cue: str = CUE_EVENTS,
                          pulse_frames: int = 3) -> Tuple[np.ndarray, np.ndarray, List[Dict[str, Any]]]:
    """A clip with exactly the given events, rendered like `make_clip`.

    For controlled checks (one isolated event for evidence attribution) and for cue-free
    distractors (`event_times_sec=[]`: drifting background, static ball, open blocks,
    the silent square and background noise, but nothing that ties sound to picture).
    Times are snapped to the nearest video frame (events sit on the frame grid as in
    `make_clip`). `kinds` / `sounds` give one entry per event (default: drawn from the
    seed). Same return value as `make_clip`; its own seed space (never equal to a
    `make_clip` clip). `cue="onset"` / `cue="pulse"`: at most one time, the lamp's
    switch-on (none: the lamp stays off and silent; the same room, lamp and noise as the
    cued clips of this seed); a pulse lasts `pulse_frames` frames.
    """
    _check_cue(cue)
    rng = np.random.default_rng([0x5F17D, int(seed)])
    n_frames = int(round(duration_sec * FPS))
    n_samples = n_frames * (SAMPLE_RATE // FPS)
    order = np.argsort(np.asarray(event_times_sec, dtype=np.float64), kind="stable")
    frames_at = [int(round(float(event_times_sec[i]) * FPS)) for i in order]
    if cue in (CUE_ONSET, CUE_PULSE):
        if len(frames_at) > 1 or not all(0 <= f < n_frames for f in frames_at):
            raise ValueError(f"an {cue} clip takes at most one time inside the {duration_sec} s clip, "
                             f"got {list(event_times_sec)}")
        f = frames_at[0] if frames_at else None
        return _lamp_clip(rng, cue, f, pulse_frames, n_frames, n_samples, height, width, duration_sec)
    kinds = None if kinds is None else [kinds[i] for i in order] if len(kinds) == len(order) else kinds
    sounds = None if sounds is None else [sounds[i] for i in order] if len(sounds) == len(order) else sounds
    if any(not 0 <= f < n_frames for f in frames_at):
        raise ValueError(f"event times {list(event_times_sec)} must lie inside the {duration_sec} s clip")
    for name, given, allowed in (("kinds", kinds, EVENT_KINDS), ("sounds", sounds, SOUND_KINDS)):
        if given is not None:
            if len(given) != len(frames_at):
                raise ValueError(f"{name}: one entry per event ({len(frames_at)}), got {len(given)}")
            bad = [g for g in given if g not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose from {allowed}")
    events = []
    for i, f in enumerate(frames_at):
        kind = str(kinds[i]) if kinds is not None else str(EVENT_KINDS[int(rng.integers(len(EVENT_KINDS)))])
        sound = str(sounds[i]) if sounds is not None else str(SOUND_KINDS[int(rng.integers(len(SOUND_KINDS)))])
        events.append({"time_sec": float(f) / FPS, "frame": int(f), "kind": kind, "sound": sound})
    frames = _render_video(rng, n_frames, height, width, events)
    audio = _render_audio(rng, n_samples, events)
    return frames, audio, events


def encode_mp4(frames: np.ndarray, fps: int = FPS, crf: int = 20, preset: str = "veryfast") -> bytes:
    """`uint8 [T, H, W, 3]` -> H.264 (yuv420p) mp4 bytes, in memory.

    Every frame gets an explicit pts so that decoding returns exactly T frames at 25 fps.
    `preset="veryfast"` keeps the encode cheap; crf 20 keeps the events crisp.
    """
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sides, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # threads=1: several clips are encoded in parallel by the caller if at all, and
        # single-threaded x264 is bit-reproducible.
        stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
        stream.codec_context.thread_count = 1
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_record(seed: int, clip_id: Optional[str] = None, labels: Optional[Dict[str, Any]] = None,
                **clip_kwargs) -> records.ClipRecord:
    """`make_clip(seed)` encoded as a `ClipRecord` (events go to `labels["events"]`)."""
    frames, audio, events = make_clip(seed, **clip_kwargs)
    lab = {"events": events, "synthetic_seed": int(seed)}
    lab.update(labels or {})
    return records.ClipRecord(
        clip_id=clip_id or f"synthetic_{seed:08d}", video_mp4=encode_mp4(frames), audio=audio,
        fps=float(FPS), sample_rate=SAMPLE_RATE, duration_sec=frames.shape[0] / FPS,
        num_frames=int(frames.shape[0]), labels=lab, source=f"synthetic:{seed}",
        decoder={"av": av.__version__, "generator": "synchformer_jax.synthetic"})


def _fixed_offset(rng: np.random.Generator, duration_sec: float, crop_len_sec: float = 5.0,
                  max_off_sec: float = 2.0, grid_size: int = 21) -> Optional[Tuple[float, float]]:
    """A fixed evaluation offset like the official CSVs: a grid value and a video start
    on the 0.04 s frame grid such that both crops fit (grid values that cannot fit a
    short clip are left out; None when the clip is shorter than the crop)."""
    room = duration_sec - crop_len_sec
    grid = [round(float(g), 2) for g in np.linspace(-max_off_sec, max_off_sec, grid_size)]
    grid = [g for g in grid if abs(g) <= room + 1e-9]
    if not grid:
        return None
    off = grid[int(rng.integers(len(grid)))]
    lo, hi = max(0.0, -off), min(room, room - off)
    k_lo, k_hi = int(math.ceil(lo * FPS - 1e-6)), int(math.floor(hi * FPS + 1e-6))
    vstart = round(int(rng.integers(k_lo, k_hi + 1)) / FPS, 2)
    return off, vstart


def _write_shards(out_dir: pathlib.Path, split: str, payloads: List[bytes], num_shards: int,
                  fmt: str) -> List[str]:
    """Round-robin into `num_shards` shards through `input.shards`, the real-data writer."""
    paths = []
    for s in range(num_shards):
        path = out_dir / shards.shard_name("synthetic", split, fmt, s, num_shards)
        shards.write_shard(path, payloads[s::num_shards], fmt)
        paths.append(str(path))
    return paths


def _payload(args) -> bytes:
    clip_seed, clip_id, split, duration, clip_kwargs = args
    labels: Dict[str, Any] = {"split": split}
    if split == "eval":
        fixed = _fixed_offset(np.random.default_rng([0xE7A1, clip_seed]), duration)
        if fixed is not None:
            labels.update(offset_sec=fixed[0], vstart_sec=fixed[1])
    return records.encode(make_record(clip_seed, clip_id=clip_id, labels=labels, **clip_kwargs))


def make_dataset(out_dir, n_train: int, n_eval: int, seed: int = 0, format: str = "array_record",
                 num_shards: int = 2, workers: int = 1, **clip_kwargs) -> Dict[str, List[str]]:
    """Writes `train` and `eval` shards of synthetic clips; returns `{split: [paths]}`.

    Clip `i` of the train split uses seed `seed * 1_000_003 + i`, eval clips continue after
    the train ones, so the splits never share a clip. Eval records carry a fixed offset.
    `workers > 1` renders and encodes clips in that many processes (the output does not
    depend on it).
    """
    if format not in ("array_record", "tfrecord"):
        raise ValueError(f"format must be 'array_record' or 'tfrecord', got {format!r}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    duration = float(clip_kwargs.get("duration_sec", 10.0))
    result = {}
    base = int(seed) * 1_000_003
    for split, count, first in (("train", n_train, 0), ("eval", n_eval, n_train)):
        if count <= 0:
            continue
        jobs = [(base + first + i, f"{split}_{i:06d}", split, duration, clip_kwargs) for i in range(count)]
        if workers > 1:
            import concurrent.futures as cf  # noqa: PLC0415
            import multiprocessing as mp  # noqa: PLC0415

            # spawn, not fork: the caller may have started JAX / grain threads.
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                payloads = list(pool.map(_payload, jobs, chunksize=4))
        else:
            payloads = [_payload(j) for j in jobs]
        result[split] = _write_shards(out_dir, split, payloads, max(1, min(num_shards, count)), format)
    return result
