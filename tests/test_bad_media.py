"""`conform` / `load_clip` on bad or unusual input: clear one-line `MediaError`s, or a
correct result where the input is merely unusual.

Policy on damage (see `synchformer_jax.media`): `conform` raises when the decoder
reports an error or flags a frame corrupt (H.264 / AAC bitstream damage) and when a
stream decodes to clearly less than the file declares (truncation; the matroska
demuxer stops at garbage it cannot resync past). Silent audio is not an error: it is
reported in `ConformedClip.silent`.
"""
from __future__ import annotations

import io
import os
from fractions import Fraction
import struct
import tracemalloc

import av
import numpy as np
import pytest

from synchformer_jax import records
from synchformer_jax.media import MediaError, conform, decode_media, is_silent, load_clip
from tests.test_media_contract import event_errors, make_clip


def _assert_error(path, *words, **kwargs):
    with pytest.raises(MediaError) as info:
        conform(path, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    name = os.fsdecode(path)
    assert name in msg or repr(name) in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


def _aligned(clip, flash_frames=1):
    click_ms, flash_err, flashes = event_errors(clip.frames, clip.audio)
    assert abs(click_ms) <= 1.0 and flash_err == 0, (click_ms, flash_err)
    assert len(flashes) == flash_frames


# ------------------------------------------------------------------- not media at all


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _assert_error(path, "empty file")
    with pytest.raises(MediaError, match="empty file"):
        load_clip(path)


def test_text_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\nat all\n")
    _assert_error(path, "not a readable media file")


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "gone.mkv", "no such file")


# ------------------------------------------------------------------------- damage


def _mdat(data: bytes) -> tuple[int, int]:
    """Payload range of the mp4 'mdat' box (the coded audio and video)."""
    i = data.index(b"mdat")
    size = struct.unpack(">I", data[i - 4:i])[0]
    return i + 4, i - 4 + size


@pytest.mark.parametrize("conforming", [False, True])
def test_corrupt_packets_mid_stream_mp4(tmp_path, conforming):
    kw = dict(fps=25, width=320, height=256, rate=16000, channels=1) if conforming else dict(fps=30)
    src = make_clip(tmp_path / "good.mp4", duration=3.0, **kw)
    data = bytearray(src.read_bytes())
    start, end = _mdat(bytes(data))
    mid, n = (start + end) // 2, min(512, (end - start) // 10)
    data[mid:mid + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    # H.264 / AAC detect the damage: the file is rejected, not silently concealed.
    _assert_error(bad, "stream")
    # The undamaged original is fine (and kept as is when it conforms).
    assert conform(src).reencoded is not conforming


def test_damaged_mkv_is_not_silently_shortened(tmp_path):
    src = make_clip(tmp_path / "good.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000,
                    duration=3.0)
    data = bytearray(src.read_bytes())
    mid, n = len(data) // 2, len(data) // 10
    data[mid:mid + n] = bytes(n)  # a zeroed region: the demuxer stops there
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    assert decode_media(bad).frames.shape[0] < 90  # the official decoder would silently cut
    _assert_error(bad, "truncated or damaged")


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_truncated_file(tmp_path, ext):
    kw = dict(vcodec="libvpx-vp9", acodec="libopus", rate=48000) if ext == "mkv" else {}
    src = make_clip(tmp_path / f"good.{ext}", fps=30, duration=3.0, **kw)
    data = src.read_bytes()
    bad = tmp_path / f"cut.{ext}"
    bad.write_bytes(data[:len(data) * 2 // 3])
    # mp4: the index ('moov') is at the end; a cut one may still open with streams
    # missing, so the box sizes are checked. mkv: it opens and decodes the first
    # part, which must not pass as the whole clip.
    _assert_error(bad, "truncated")


# ------------------------------------------------------------------ missing content


def test_no_audio_stream(tmp_path):
    _assert_error(make_clip(tmp_path / "mute.mp4", audio=False), "no audio stream")


def test_no_video_stream(tmp_path):
    _assert_error(make_clip(tmp_path / "sound.m4a", video=False, fmt="mp4"), "no video stream")


def test_audio_with_cover_art_only(tmp_path):
    # An m4a with album art: one still image in a video stream flagged "attached picture".
    path = tmp_path / "cover.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        audio = out.add_stream("aac", rate=44100, layout="mono")
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        packets = []
        for start in range(0, 3 * 44100, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, start
            packets += audio.encode(frame)
        packets += audio.encode(None)
        image = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
        image = image.reformat(format="yuvj420p")
        image.pts = 0
        packets += list(cover.encode(image)) + list(cover.encode(None))
        out.mux(packets)
    with av.open(str(path)) as c:
        assert [s.type for s in c.streams] == ["audio", "video"]
    _assert_error(path, "has no video stream (only a cover image)")


def test_shorter_than_minimum(tmp_path):
    src = make_clip(tmp_path / "short.mp4", fps=30, duration=2.0)
    _assert_error(src, "too short", min_duration_sec=3.0)
    with pytest.raises(MediaError, match="too short"):
        load_clip(src, min_duration_sec=3.0)
    assert conform(src, min_duration_sec=1.9).num_frames == 50


def test_silent_audio_is_flagged_not_an_error(tmp_path):
    src = make_clip(tmp_path / "quiet.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000,
                    audio_level=0.0)
    clip = conform(src)
    assert clip.silent and is_silent(clip.audio)
    assert clip.frames.shape[0] == 50 and clip.audio.shape[0] >= 32000
    rec = load_clip(src)  # the record has no silence field: callers use is_silent
    assert is_silent(rec.audio)
    loud = conform(make_clip(tmp_path / "loud.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000))
    assert not loud.silent


# ------------------------------------------------------------------ unusual but valid


def test_one_by_one_video(tmp_path):
    src = make_clip(tmp_path / "dot.mkv", vcodec="ffv1", pix_fmt="yuv444p", width=1, height=1, fps=25)
    clip = conform(src)
    assert clip.frames.shape == (50, 256, 256, 3)
    _aligned(clip)


@pytest.mark.parametrize("fname,vcodec,pix_fmt", [
    ("y444.mp4", "libx264", "yuv444p"),
    ("gray.mkv", "ffv1", "gray"),
    ("rgb.mov", "png", "rgb24"),
    ("rgb.mkv", "libx264rgb", "rgb24"),
])
def test_odd_pixel_formats(tmp_path, fname, vcodec, pix_fmt):
    src = make_clip(tmp_path / fname, vcodec=vcodec, pix_fmt=pix_fmt, fps=30)
    clip = conform(src)
    assert clip.reencoded and clip.frames.shape == (50, 256, 340, 3)
    _aligned(clip)


def test_odd_source_size_gives_even_output(tmp_path):
    src = make_clip(tmp_path / "odd.mkv", vcodec="ffv1", pix_fmt="yuv444p", width=63, height=47, fps=30)
    clip = conform(src)
    # 63 * 256 / 47 = 343.1 -> 343 -> cropped to 342
    assert clip.frames.shape == (50, 256, 342, 3)
    _aligned(clip)


def test_portrait_video(tmp_path):
    src = make_clip(tmp_path / "tall.mp4", width=48, height=64, fps=30)
    assert conform(src).frames.shape == (50, 340, 256, 3)


def test_rotation_and_aspect_ratio_are_recorded_not_applied(tmp_path):
    # A phone video's display matrix and a non-square pixel shape: ignored like the official
    # filter does, but written down in `source` instead of vanishing.
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.codec_context.sample_aspect_ratio = Fraction(2, 1)
        if not hasattr(vs, "set_display_rotation"):
            pytest.skip(f"PyAV {av.__version__} cannot write a display matrix")
        vs.set_display_rotation(90)
        aus = out.add_stream("aac", rate=16000, layout="mono")
        packets = []
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 100, np.uint8), format="rgb24")
            frame.pts = i
            packets += vs.encode(frame.reformat(format="yuv420p"))
        packets += vs.encode(None)
        for start in range(0, 32000, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            packets += aus.encode(frame)
        packets += aus.encode(None)
        out.mux(packets)
    clip = conform(path)
    assert clip.frames.shape == (50, 256, 340, 3)  # unrotated, stored size
    assert clip.source["sample_aspect_ratio"] == "2"
    assert abs(clip.source["rotation_deg_ignored"]) == 90


def test_flv_whose_audio_cannot_be_sought(tmp_path):
    # decode_media reads the streams one after the other (as torchvision does); FLV cannot
    # seek back to its audio, which used to read as "no decodable samples".
    src = make_clip(tmp_path / "clip.flv", fmt="flv", fps=25, acodec="libmp3lame", rate=44100)
    with pytest.raises(MediaError, match="audio stream cannot be read: the container cannot seek back"):
        decode_media(src)
    _aligned(conform(src))


def test_huge_resolution_is_resized_frame_by_frame(tmp_path):
    src = make_clip(tmp_path / "huge.mp4", width=4000, height=3000, fps=5, duration=2.0,
                    x264_opts={"preset": "ultrafast"})
    tracemalloc.start()
    try:
        clip = conform(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert clip.frames.shape == (50, 256, 340, 3)
    # One 4000x3000 RGB frame is 36 MB and the 10 decoded frames 360 MB; the output
    # (two copies of 50 x 256 x 340 x 3) is 26 MB. Full-size arrays never exist.
    assert peak < 36e6, f"peak traced memory {peak / 1e6:.0f} MB"
    # 5 fps: the flash frame at 1.0 s is held for 0.2 s = 5 output frames.
    _aligned(clip, flash_frames=5)


# --------------------------------------------------------------------- file names


def test_non_utf8_file_name(tmp_path):
    src = make_clip(tmp_path / "tmp.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000)
    raw = os.fsencode(tmp_path) + b"/caf\xe9_\xff.mkv"  # Latin-1 bytes: not UTF-8
    os.rename(src, raw)
    clip = conform(raw)
    _aligned(clip)
    rec = load_clip(raw)
    assert rec.clip_id == "caf\\xe9_\\xff"
    assert records.decode(records.encode(rec)).source == rec.source
    # Errors name the file readably on one line.
    bad = os.fsencode(tmp_path) + b"/t\xe9xt.mp4"
    with open(bad, "wb") as f:
        f.write(b"plain text, not a video\n")
    msg = _assert_error(bad, "not a readable media file")
    assert "\\udce9" in msg  # repr of the surrogate-escaped name


@pytest.mark.parametrize("name", ["12:30 clip.mkv", "data:clip.mp4"])
def test_colon_in_a_relative_file_name(tmp_path, monkeypatch, name):
    # FFmpeg would read "12:30 clip.mkv" / "data:clip.mp4" as URLs ("Protocol not found").
    make_clip(tmp_path / name, fps=25, rate=44100)
    monkeypatch.chdir(tmp_path)
    _aligned(conform(name))
    assert decode_media(name).frames.shape[0] == 50
    with open("12:31 text.mp4", "w") as f:
        f.write("plain text, not a video\n")
    _assert_error("12:31 text.mp4", "not a readable media file")


def test_broken_symbolic_link(tmp_path):
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    _assert_error(tmp_path / "gone.mp4", "broken symbolic link", "deleted.mp4")


def test_non_utf8_metadata(tmp_path):
    # The muxer's "Lavf..." tags (matroska MuxingApp / ENCODER) overwritten in place with
    # Latin-1 bytes: a strict UTF-8 reading of the metadata fails on opening (PyAV < 19
    # without metadata_errors="ignore"). The clip itself is intact.
    src = make_clip(tmp_path / "tagged.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000)
    data = src.read_bytes()
    assert data.count(b"Lavf") >= 2
    path = tmp_path / "latin1_tags.mkv"
    path.write_bytes(data.replace(b"Lavf", b"\xff\xfe\xe9f"))
    _aligned(conform(path))
    assert decode_media(path).frames.shape[0] == 60
    assert load_clip(path).clip_id == "latin1_tags"


# ------------------------------------------------------------ audit: odd audio streams


def _float_pcm_clip(path, rate, bad_value, bad_at_sec=0.5, n_bad=3, seconds=2):
    """25 fps video with float PCM audio (mkv) holding `n_bad` samples of `bad_value`."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = out.add_stream("pcm_f32le", rate=rate, layout="stereo")
        packets = []
        for k in range(25 * seconds):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 80, np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 25)
            packets += vs.encode(frame)
        packets += vs.encode(None)
        wav = np.zeros((2, seconds * rate), np.float32)
        first = int(bad_at_sec * rate)
        wav[1, first:first + n_bad] = bad_value  # one channel is enough to spoil the mean
        for start in range(0, wav.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            packets += aus.encode(frame)
        packets += aus.encode(None)
        packets.sort(key=lambda p: (p.dts or 0) * p.time_base)
        out.mux(packets)
    return path


@pytest.mark.parametrize("bad_value, rate", [(np.nan, 16000), (np.inf, 44100), (-np.inf, 48000)])
def test_non_finite_audio_is_a_clear_error(tmp_path, bad_value, rate):
    # Before: the AAC encoder refused the frame ("Invalid argument: 'avcodec_send_frame()'
    # returned 22", not even a MediaError, no file name).
    src = _float_pcm_clip(tmp_path / "nan audio.mkv", rate, bad_value)
    msg = _assert_error(src, "audio has 3 non-finite sample(s) (NaN or inf)", f"at {rate} Hz",
                        "the first at 0.50 s")
    with pytest.raises(MediaError, match="non-finite"):
        load_clip(src)
    assert "avcodec" not in msg
    # The official-style decode returns the samples as they are (prepare refuses them).
    assert np.count_nonzero(~np.isfinite(decode_media(src).audio)) == 3


def _two_audio_tracks(path, default_first: bool):
    """25 fps video, then a 440 Hz "commentary" track, then a 1 kHz "main" track flagged default."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        tracks = []
        for hz, title in ((440, "commentary"), (1000, "main")):
            aus = out.add_stream("aac", rate=16000, layout="mono")
            aus.metadata["title"] = title
            aus.metadata["language"] = "eng"
            tracks.append((aus, hz))
        default = av.stream.Disposition.default
        tracks[0][0].disposition = default if default_first else av.stream.Disposition.comment
        tracks[1][0].disposition = 0 if default_first else default
        packets = []
        for k in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 80, np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 25)
            packets += vs.encode(frame)
        packets += vs.encode(None)
        for aus, hz in tracks:
            tone = (0.5 * np.sin(2 * np.pi * hz * np.arange(32000) / 16000)).astype(np.float32)
            for start in range(0, 32000, 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[None, start:start + 1024]),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 16000, start, Fraction(1, 16000)
                packets += aus.encode(frame)
            packets += aus.encode(None)
        packets.sort(key=lambda p: (p.dts or 0) * p.time_base)
        out.mux(packets)
    return path


def _dominant_hz(x):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / 16000)[np.argmax(spectrum)])


@pytest.mark.parametrize("default_first", [False, True])
def test_first_audio_track_is_used_and_recorded(tmp_path, default_first):
    # The official decode (torchvision's read_video) takes the first audio stream whatever
    # the default flags say; so does media, and `source` now says which one it was.
    src = _two_audio_tracks(tmp_path / "tracks.mkv", default_first)
    with av.open(str(src)) as c:  # the premise: the default flag is where the test put it
        flags = [bool(s.disposition & av.stream.Disposition.default) for s in c.streams.audio]
        assert flags == [default_first, not default_first]
    clip = conform(src)
    assert abs(_dominant_hz(clip.audio[4000:28000]) - 440) < 5
    assert abs(_dominant_hz(decode_media(src).audio[4000:28000]) - 440) < 5
    assert clip.source["audio_stream_index"] == 1  # container index (the video is 0)
    assert clip.source["audio_streams"] == 2
    assert clip.source["audio_stream_default"] is default_first
    assert clip.source["audio_stream_title"] == "commentary"
    assert clip.source["audio_stream_language"] == "eng"
    assert clip.source["default_audio_stream_index"] == (1 if default_first else 2)


def test_one_audio_track_is_recorded_too(tmp_path):
    clip = conform(make_clip(tmp_path / "one.mkv", vcodec="libvpx-vp9", acodec="libopus", fps=30, rate=48000))
    assert clip.source["audio_stream_index"] == 1 and clip.source["audio_streams"] == 1


@pytest.mark.parametrize("conforming", [False, True])
def test_record_drops_audio_that_runs_long_past_the_video(tmp_path, conforming):
    # 2 s of video beside 120 s of audio: the official pipeline trims the audio to the
    # video (EqualifyFromRight) before anything else, so 118 s of it can never be used;
    # the record kept all of it (7.7 MB of PCM for 2 s of clip).
    kw = dict(fps=25, width=320, height=256, rate=16000, channels=1) if conforming else dict(fps=30)
    src = make_clip(tmp_path / "long_audio.mp4", duration=2.0, audio_duration=120.0, **kw)
    clip = conform(src)  # the API keeps everything
    assert clip.audio.shape[0] >= 119 * 16000
    assert clip.reencoded is not conforming
    rec = load_clip(src)
    keep = int((2.0 + 1.0) * 16000)  # the video's end plus a 1 s margin
    assert rec.audio.shape[0] == keep
    assert np.array_equal(rec.audio, clip.audio[:keep])
    assert rec.num_frames == 50 and rec.duration_sec == pytest.approx(2.0)
    if conforming:
        assert rec.video_mp4 == src.read_bytes()  # kept byte for byte; only the PCM is cut
    else:
        with av.open(io.BytesIO(rec.video_mp4)) as c:  # the re-encoded mp4 is cut as well
            assert float(c.duration / 1e6) < 3.2
    # Audio no longer than the video (plus the margin) is kept whole.
    short = load_clip(make_clip(tmp_path / "normal.mp4", duration=2.0, audio_duration=2.5, **kw))
    assert short.audio.shape[0] == conform(tmp_path / "normal.mp4").audio.shape[0]
