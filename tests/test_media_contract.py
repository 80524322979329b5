"""`conform`: any container / codec / rate -> the input contract, with A/V alignment kept.

Every source clip is generated here with PyAV and carries two events at the same
instant `EVENT_SEC`: a white flash (one input frame; all others dark) and a click
(a single-sample impulse, all other samples silent). After `conform` (and after
decoding the produced mp4 bytes again with `decode_media`) the click must be within
1 ms of `EVENT_SEC` and the flash must start on 25 fps frame `EVENT_SEC * 25`
(both relative to output frame 0).

Why 1 ms means something: the click is located as the first 16 kHz sample whose
magnitude reaches half the clip's peak. A single-sample impulse band-limited to 8 kHz
(resampling) is a sinc whose main lobe is under 2 samples (0.125 ms) wide; AAC / Opus
quantisation noise and pre-echo stay far below half the peak at the bit rates used, so
the edge is sharp. The errors this guards against are much larger: AAC priming is
1024 samples (64 ms at 16 kHz, 23 ms at 44.1 kHz), Opus pre-skip 312 samples at
48 kHz (6.5 ms), an ignored stream start time hundreds of ms, one video frame 40 ms
(upstream Synchformer issue #11: a decoder upgrade shifted audio against video).
No codec delay is calibrated away: the decoders must remove priming themselves.
"""
from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from synchformer_jax import records
from synchformer_jax.media import ConformedClip, MediaError, conform, decode_media, load_clip

EVENT_SEC = Fraction(1)  # flash and click
DARK, WHITE = 16, 235
CLICK_TOLERANCE_MS = 1.0


# ------------------------------------------------------------------ clip generator


def make_clip(path, *, vcodec="libx264", acodec="aac", fps=30, frame_times=None, duration=2.0,
              width=64, height=48, pix_fmt="yuv420p", rate=44100, channels=2,
              video_start=0.0, audio_start=0.0, flash_sec=EVENT_SEC, click_sec=EVENT_SEC,
              video=True, audio=True, audio_level=0.9, fmt=None, vtime_base=None, x264_opts=None,
              audio_duration=None):
    """Write a test clip; returns `path`.

    `frame_times` (seconds, sorted) gives irregular pts (variable frame rate); otherwise
    frames are at `video_start + i / fps`. The frame starting at `flash_sec` is white.
    The audio stream's first sample is at `audio_start`; the click is at `click_sec`; the
    audio ends at `audio_duration` (default: `duration`).
    """
    if frame_times is None:
        n = int(round(duration * fps))
        frame_times = [Fraction(video_start).limit_denominator(1000) + Fraction(i, fps) for i in range(n)]
    frame_times = [Fraction(t).limit_denominator(100000) for t in frame_times]
    name = os.fsdecode(path)
    options = {}
    if name.endswith((".mp4", ".mov")):
        # The mov muxer writes edit lists (stream start offsets) in the movie time scale,
        # 1/1000 s by default, which would move a 0.3 s audio start (minus AAC priming)
        # by a truncated fraction of a millisecond: the file itself would then say the
        # click is 0.8 ms early. A sample-exact time scale makes the file say what we mean.
        options["movie_timescale"] = str(rate if audio else 1000)
    with av.open(path if isinstance(path, bytes) else str(path), "w", format=fmt, options=options) as c:
        if video:
            vs = c.add_stream(vcodec, rate=fps, options=dict(x264_opts or {}))
            vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
            tb = vtime_base or Fraction(1, 1000 if frame_times != sorted(frame_times) or fps is None else fps * 1000)
            vs.codec_context.time_base = tb
            vs.time_base = tb
        if audio:
            as_ = c.add_stream(acodec, rate=rate, layout="mono" if channels == 1 else "stereo")
            if acodec in ("aac", "libopus", "opus"):
                as_.bit_rate = 128000 * channels
        packets = []
        if video:
            for t in frame_times:
                value = WHITE if t == flash_sec else DARK
                img = np.full((height, width, 3), value, np.uint8)
                if min(width, height) >= 8:
                    img[: height // 8, : width // 8] = (200, 40, 40)  # some colour
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                if pix_fmt != "rgb24":
                    frame = frame.reformat(format=pix_fmt)
                frame.pts = int(t / tb)
                frame.time_base = tb
                packets += vs.encode(frame)
            packets += vs.encode(None)
        if audio:
            n = int(round(((duration if audio_duration is None else audio_duration) - audio_start) * rate))
            wav = np.zeros((channels, n), np.float32)
            click = int(round((click_sec - Fraction(audio_start).limit_denominator(1000)) * rate))
            if 0 <= click < n:
                wav[:, click] = audio_level
            size = 960 if acodec in ("libopus", "opus") else 1024
            start_pts = int(round(audio_start * rate))
            for s in range(0, n, size):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, s:s + size]), format="fltp",
                                                   layout="mono" if channels == 1 else "stereo")
                frame.sample_rate = rate
                frame.pts = start_pts + s
                frame.time_base = Fraction(1, rate)
                packets += as_.encode(frame)
            packets += as_.encode(None)
        packets.sort(key=lambda p: (p.dts if p.dts is not None else 0) * p.time_base)
        c.mux(packets)
    return path


# ------------------------------------------------------------------------ detectors


def click_onset(audio: np.ndarray) -> int:
    """First sample whose magnitude reaches half the peak (the click's leading edge)."""
    mag = np.abs(audio)
    return int(np.argmax(mag >= 0.5 * mag.max()))


def flash_frames(frames: np.ndarray) -> np.ndarray:
    return np.flatnonzero(frames.reshape(frames.shape[0], -1).mean(axis=1) > (DARK + WHITE) / 2)


def event_errors(clip_frames, clip_audio, t0=Fraction(0)):
    """(click error in ms, flash onset error in frames, flash frames)."""
    expected_sample = (EVENT_SEC - t0) * 16000
    click_ms = (click_onset(clip_audio) - expected_sample) / 16
    flashes = flash_frames(clip_frames)
    assert flashes.size, "no flash frame in the output"
    flash_err = int(flashes[0]) - int((EVENT_SEC - t0) * 25)
    return float(click_ms), flash_err, flashes


MEASURED: dict[str, tuple[float, int]] = {}  # printed at the end with -s; see report


def held_frames(flash_end, t0=Fraction(0)):
    """How many 25 fps output frames show an input frame displayed [EVENT_SEC, flash_end)."""
    return sum(1 for k in range(200) if EVENT_SEC <= t0 + Fraction(k, 25) < flash_end)


def check_aligned(clip: ConformedClip, tmp_path, name, t0=Fraction(0), flash_end=EVENT_SEC + Fraction(1, 25)):
    assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 4
    t, h, w, _ = clip.frames.shape
    assert min(h, w) == 256 and h % 2 == 0 and w % 2 == 0
    assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1
    assert clip.fps == 25.0 and clip.sample_rate == 16000
    # The bytes decode to exactly the arrays (what a record consumer will see).
    out = tmp_path / f"{name}_conformed.mp4"
    out.write_bytes(clip.mp4_bytes)
    again = decode_media(out)
    assert again.video_fps == 25.0 and again.audio_rate == 16000
    assert np.array_equal(again.frames, clip.frames)
    assert np.array_equal(again.audio, clip.audio)
    with av.open(io.BytesIO(clip.mp4_bytes)) as c:
        assert c.streams.video[0].codec_context.name == "h264"  # never MPEG-4 Part 2
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.video[0].codec_context.format.name == "yuv420p"
    click_ms, flash_err, flashes = event_errors(again.frames, again.audio, t0)
    MEASURED[name] = (click_ms, flash_err)
    print(f"{name}: click {click_ms:+.4f} ms, flash {flash_err:+d} frames ({len(flashes)} flash frames)")
    assert abs(click_ms) <= CLICK_TOLERANCE_MS, f"{name}: click off by {click_ms:.3f} ms"
    assert flash_err == 0, f"{name}: flash on frame {flashes[0]}, want {int((EVENT_SEC - t0) * 25)}"
    assert len(flashes) == held_frames(flash_end, t0) and np.all(np.diff(flashes) == 1)


# --------------------------------------------------------------------------- formats

CASES = {
    # name: (file name, make_clip kwargs)
    "mp4_h264_aac_30fps_44k1_stereo": ("a.mp4", dict(fps=30, rate=44100)),
    "mkv_vp9_opus_30fps_48k_stereo": ("b.mkv", dict(vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000)),
    "webm_vp8_opus_24fps_48k": ("c.webm", dict(vcodec="libvpx", acodec="libopus", fps=24, rate=48000)),
    # Written with a 1/30000 time base, which the ogg muxer stores as a 30000 fps frame
    # rate; FFmpeg's ogg demuxer then dates the first frame one tick before the second
    # and gives every frame a one-tick duration (see `test_ogg_vp8_frame_rate`).
    "ogg_vp8_opus_30fps_48k": ("h.ogg", dict(vcodec="libvpx", acodec="libopus", fps=30, rate=48000)),
    "mov_h264_pcm_50fps_48k_stereo": ("d.mov", dict(fps=50, acodec="pcm_s16le", rate=48000)),
    "mp4_h264_aac_25fps_48k_stereo": ("e.mp4", dict(fps=25, rate=48000)),
    "mp4_audio_starts_0.3s_late": ("f.mp4", dict(fps=30, rate=44100, audio_start=0.3)),
    "mkv_audio_starts_0.3s_late": ("g.mkv", dict(vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000,
                                                 audio_start=0.3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_conform_keeps_flash_and_click_together(tmp_path, name):
    fname, kwargs = CASES[name]
    src = make_clip(tmp_path / fname, **kwargs)
    clip = conform(src)
    assert clip.reencoded
    assert not clip.silent
    # 64x48 -> 341x256 -> even crop 340x256
    assert clip.frames.shape[1:] == (256, 340, 3)
    assert clip.frames.shape[0] == 50  # 2 s at 25 fps
    check_aligned(clip, tmp_path, name, flash_end=EVENT_SEC + Fraction(1, kwargs["fps"]))


@pytest.mark.parametrize("vtime_base", [Fraction(1, 30000), Fraction(1, 30)])
def test_ogg_vp8_frame_rate(tmp_path, vtime_base):
    """VP8 in Ogg: the header's frame rate is 1/time base (30000 fps for a 1/30000 time
    base; none at all for 1/30), the frames are 1/30 s apart. `decode_media` reported
    30000 fps (the demuxer's average_rate; torchvision reports the same), which made
    `equalify_from_right` keep 1 audio sample per frame; with 1/30 it raised "no frame
    rate". `conform` dated the output from the misdated first frame and ended the clip at
    the last frame's one-tick duration: 49 frames, the flash missed."""
    src = make_clip(tmp_path / "vp8.ogg", vcodec="libvpx", acodec="libopus", fps=30, rate=48000,
                    vtime_base=vtime_base)
    with av.open(str(src)) as c:  # what the demuxer says (the premise of the test)
        v = c.streams.video[0]
        assert v.average_rate is None or float(v.average_rate) == 30000, v.average_rate
        assert v.guessed_rate == 30
    media = decode_media(src)
    assert media.video_fps == 30.0
    assert media.frames.shape[0] == 60
    clip = conform(src)
    assert clip.source["t0_sec"] == 0.0
    assert clip.frames.shape[0] == 50
    check_aligned(clip, tmp_path, f"ogg_vp8_tb_{vtime_base.denominator}")


def test_video_starting_after_audio(tmp_path):
    # Audio from 0, first video frame at 0.2 s: frame 0 of the output is the first
    # video frame, so both events land 0.2 s earlier in the output.
    src = make_clip(tmp_path / "late_video.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=25,
                    rate=48000, video_start=0.2, duration=2.2)
    clip = conform(src)
    assert clip.source["t0_sec"] == pytest.approx(0.2)
    check_aligned(clip, tmp_path, "mkv_video_starts_0.2s_late", t0=Fraction(1, 5),
                  flash_end=EVENT_SEC + Fraction(1, 25))


@pytest.mark.parametrize("fname", ["late_start.mkv", "late_start.webm"])
def test_matroska_streams_starting_late(tmp_path, fname):
    # Both streams from 0.6 s: FFmpeg's matroska muxer writes the end time (2.6 s) as the
    # Segment Duration, which must not be read as a 2.6-s length after a 0.6-s start
    # ("truncated or damaged: ... declares 3.20s" before).
    codecs = {"vcodec": "libx264", "acodec": "aac"} if fname.endswith(".mkv") else \
        {"vcodec": "libvpx-vp9", "acodec": "libopus", "rate": 48000}
    times = [Fraction(3, 5) + Fraction(i, 25) for i in range(50)]  # 0.6 .. 2.6 s
    src = make_clip(tmp_path / fname, fps=25, frame_times=times, audio_start=0.6, duration=2.6,
                    **{"rate": 44100, **codecs})
    with av.open(str(src)) as c:  # the end time, as described
        assert c.start_time == 600_000 and abs(c.duration - 2_600_000) < 30_000, (c.start_time, c.duration)
    clip = conform(src)
    assert clip.source["t0_sec"] == pytest.approx(0.6, abs=1e-3)
    assert clip.frames.shape[0] == 50
    check_aligned(clip, tmp_path, fname.replace(".", "_"), t0=Fraction(3, 5))


def _grey_index_clip(path, fmt, n=50, **x264):
    """25 fps H.264 whose frame i has grey level 16 + 4 i (its index, read back)."""
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream("libx264", rate=25, options={"crf": "1", **x264})
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        as_ = c.add_stream("mp2", rate=48000, layout="mono")
        packets = []
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 16 + 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            packets += vs.encode(frame.reformat(format="yuv420p"))
        packets += vs.encode(None)
        for start in range(0, n * 48000 // 25, 1152):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            packets += as_.encode(frame)
        packets += as_.encode(None)
        packets.sort(key=lambda p: (p.dts or 0) * p.time_base)
        c.mux(packets)
    return path


@pytest.mark.parametrize("fname, fmt", [("bframes.avi", "avi"), ("bframes.mkv", "matroska")])
def test_avi_decode_order_timestamps_keep_frame_order(tmp_path, fname, fmt):
    # AVI has no presentation timestamps: with B-frames FFmpeg hands the decoded frames
    # the times of the packets they came from (1, 4, 3, 5, 2, ...). Trusting them held
    # and dropped frames (0, 0, 0, 1, 3, 3, 3, 5, ...); the mkv is the control.
    src = _grey_index_clip(tmp_path / fname, fmt, bframes="3")
    if fmt == "avi":
        with av.open(str(src)) as c:
            times = [f.pts for f in c.decode(video=0)]
        assert times != sorted(times)  # the container really gives permuted times
    clip = conform(src)
    shown = np.round((clip.frames.reshape(len(clip.frames), -1).mean(axis=1) - 16) / 4).astype(int)
    assert shown.tolist() == list(range(50))


def _mpegts_tone(path, start, rate, seconds=2):
    """An MPEG-TS part from `start` s: 30 fps video, a 1 kHz tone at `rate` (mp2)."""
    with av.open(str(path), "w", format="mpegts") as c:
        vs = c.add_stream("libx264", rate=30, options={"bframes": "0"})
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.codec_context.time_base = vs.time_base = Fraction(1, 90000)
        as_ = c.add_stream("mp2", rate=rate, layout="mono")
        packets = []
        for i in range(30 * seconds):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), DARK, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int((start + Fraction(i, 30)) * 90000), Fraction(1, 90000)
            packets += vs.encode(frame.reformat(format="yuv420p"))
        packets += vs.encode(None)
        first = int(start * rate)
        tone = 0.5 * np.sin(2 * np.pi * 1000 * (first + np.arange(seconds * rate)) / rate)
        for s in range(0, seconds * rate, 1152):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[None, s:s + 1152], np.float32),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, first + s, Fraction(1, rate)
            packets += as_.encode(frame)
        packets += as_.encode(None)
        packets.sort(key=lambda p: (p.dts or 0) * p.time_base)
        c.mux(packets)
    return path.read_bytes()


def _dominant_hz(x):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / 16000)[np.argmax(spectrum)])


def test_sample_rate_change_mid_stream(tmp_path):
    # Two captures concatenated with continuous times: 48 kHz, then 44.1 kHz. Read at one
    # rate, the first part came out at 916 Hz with 0.16 s of silence inserted.
    src = tmp_path / "rates.ts"
    src.write_bytes(_mpegts_tone(tmp_path / "a.ts", Fraction(0), 48000)
                    + _mpegts_tone(tmp_path / "b.ts", Fraction(2), 44100))
    clip = conform(src)
    assert clip.source["audio_rates_decoded"] == [44100, 48000]
    assert clip.source["audio_gap_sec"] < 0.001
    for lo, hi in ((0.3, 1.7), (2.3, 3.7)):
        assert abs(_dominant_hz(clip.audio[int(lo * 16000):int(hi * 16000)]) - 1000) < 2, (lo, hi)


def test_timestamp_reset_is_an_error(tmp_path):
    # The second recording restarts at 0: before, its video was dropped as "out of order"
    # and its audio cut as "overlap", a silently halved example.
    src = tmp_path / "reset.ts"
    src.write_bytes(_mpegts_tone(tmp_path / "a.ts", Fraction(0), 48000)
                    + _mpegts_tone(tmp_path / "b.ts", Fraction(0), 48000))
    with pytest.raises(MediaError, match="jump back"):
        conform(src)


def test_mpegts_timestamp_wrap(tmp_path):
    # MPEG-TS times are 33 bits at 90 kHz: a capture that starts 1 s before 2^33 ticks
    # wraps. FFmpeg makes the part before the wrap negative; it is content, not a lead-in.
    base = Fraction(int((Fraction(2 ** 33, 90000) - 1) * 30), 30)
    times = [base + Fraction(i, 30) for i in range(60)]
    event = base + Fraction(3, 2)
    src = make_clip(tmp_path / "wrap.ts", fmt="mpegts", fps=30, frame_times=times, vtime_base=Fraction(1, 90000),
                    audio_start=base, duration=base + 2, acodec="mp2", rate=48000, channels=1,
                    flash_sec=event, click_sec=event, x264_opts={"bframes": "0"})
    clip = conform(src)
    assert clip.source["t0_sec"] < -0.9  # before the wrap
    assert clip.frames.shape[0] == 50
    assert flash_frames(clip.frames)[0] == 38  # 1.5 s in: the first output frame at or after it
    assert abs(click_onset(clip.audio) - 24000) <= 16


def test_variable_frame_rate(tmp_path):
    # Irregular pts (10..60 ms apart), one frame exactly at the event.
    rng = np.random.default_rng(0)
    times, t = [], Fraction(0)
    while t < 2:
        times.append(t)
        t += Fraction(int(rng.integers(10, 61)), 1000)
    times = sorted({x for x in times if abs(x - EVENT_SEC) > Fraction(5, 1000)} | {EVENT_SEC})
    after = times[times.index(EVENT_SEC) + 1]
    src = make_clip(tmp_path / "vfr.mkv", vcodec="libx264", acodec="aac", fps=None, frame_times=times,
                    rate=44100, vtime_base=Fraction(1, 1000))
    clip = conform(src)
    # The flash is held until the next input frame.
    check_aligned(clip, tmp_path, "mkv_h264_aac_vfr", flash_end=after)


def test_vfr_mp4_with_edit_list(tmp_path):
    # x264 with B-frames in mp4: composition offsets and an edit list shift the pts.
    times = [Fraction(i, 30) for i in range(60)]
    times = [t for t in times if not (Fraction(1, 2) < t < Fraction(7, 10))]  # a 0.2 s hole
    src = make_clip(tmp_path / "vfr.mp4", fps=None, frame_times=times, vtime_base=Fraction(1, 90000),
                    rate=44100, x264_opts={"bframes": "3"})
    check_aligned(conform(src), tmp_path, "mp4_h264_bframes_vfr_hole", flash_end=EVENT_SEC + Fraction(1, 30))


def test_re_encoding_is_repeatable_within_a_process():
    """The same frames give the same mp4 bytes every time (prepare's byte-identical reruns,
    and predictions that do not depend on a file's place in the input list). With
    libx264's AVX-512 paths these 340x256 fades gave 2 outputs in 10 runs on an AVX-512
    CPU (on other CPUs this passes either way)."""
    import hashlib

    from synchformer_jax.media import _encode_mp4

    rng = np.random.default_rng(0)
    frames = [np.clip(np.full((256, 340, 3), 5 * i, int) + rng.integers(0, 60, (256, 340, 3)), 0, 255)
              .astype(np.uint8) for i in range(50)]
    audio = (0.1 * rng.standard_normal(32000)).astype(np.float32)
    digests = {hashlib.sha256(_encode_mp4(frames, audio)).hexdigest() for _ in range(10)}
    assert len(digests) == 1


def test_conforming_file_is_kept_byte_for_byte(tmp_path):
    src = make_clip(tmp_path / "ok.mp4", fps=25, width=320, height=256, rate=16000, channels=1)
    with av.open(str(src)) as c:  # the generator really wrote a contract file
        assert c.streams.audio[0].rate == 16000 and float(c.streams.video[0].average_rate) == 25
    clip = conform(src)
    assert not clip.reencoded
    assert clip.mp4_bytes == src.read_bytes()
    media = decode_media(src)
    assert np.array_equal(clip.frames, media.frames) and np.array_equal(clip.audio, media.audio)
    check_aligned(clip, tmp_path, "mp4_conforming_copied")


def test_conforming_but_too_long_is_cut(tmp_path):
    src = make_clip(tmp_path / "ok.mp4", fps=25, width=256, height=256, rate=16000, channels=1, duration=3.0)
    clip = conform(src, max_duration_sec=2.0)
    assert clip.reencoded and clip.frames.shape[0] == 50
    assert clip.audio.shape[0] <= 2 * 16000 + 1024
    check_aligned(clip, tmp_path, "mp4_conforming_cut")


def test_max_duration(tmp_path):
    src = make_clip(tmp_path / "long.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000,
                    duration=3.0)
    clip = conform(src, max_duration_sec=1.5)
    assert clip.frames.shape[0] == 38  # frames at k/25 < 1.5 s: k = 0..37
    check_aligned(clip, tmp_path, "mkv_max_duration")


def test_misalignment_is_detected(tmp_path):
    """Negative control: the naive decode of a late-audio file fails the same check."""
    src = make_clip(tmp_path / "late.mp4", fps=25, rate=16000, channels=1, audio_start=0.3)
    media = decode_media(src)  # ignores the audio start time (sample 0 = first audio sample)
    click_ms, _, _ = event_errors(media.frames, media.audio)
    # Sample 0 is the first audio sample (0.3 s late, AAC priming not even removed):
    # the click comes out hundreds of ms early, far outside the 1 ms tolerance.
    assert click_ms < -200, click_ms
    clip = conform(src)
    check_aligned(clip, tmp_path, "mp4_25fps_16k_audio_late")


def test_load_clip_record(tmp_path):
    src = make_clip(tmp_path / "rec.webm", vcodec="libvpx", acodec="libopus", fps=30, rate=48000)
    rec = load_clip(src, labels={"split": "test"})
    assert rec.clip_id == "rec" and rec.labels == {"split": "test"}
    assert rec.fps == 25.0 and rec.sample_rate == 16000 and rec.num_frames == 50
    assert rec.decoder["av"] == av.__version__ and rec.decoder["conform"] == "re-encoded"
    assert "ffmpeg" in rec.decoder
    back = records.decode(records.encode(rec))
    assert back.video_mp4 == rec.video_mp4 and np.array_equal(back.audio, rec.audio)
    click_ms, flash_err, _ = event_errors(decode_media(_write(tmp_path / "r.mp4", back.video_mp4)).frames,
                                          back.audio)
    assert abs(click_ms) <= CLICK_TOLERANCE_MS and flash_err == 0


def _write(path, data):
    path.write_bytes(data)
    return path


def test_official_contract_files_are_kept_as_is(reference_path):
    """The reference set's videos (official data preparation) pass through untouched."""
    from tests import decoded_media as dm

    for npz in dm.decoded_reference_files(reference_path):
        path = dm.video_path(reference_path, npz.stem)
        clip = conform(path)
        assert not clip.reencoded and clip.mp4_bytes == path.read_bytes()
        official = dm.decode_reference_video(reference_path, npz.stem)
        # The strict decode used by conform gives the official arrays bit for bit.
        assert np.array_equal(clip.frames, official.frames)
        assert np.array_equal(clip.audio, official.audio)
