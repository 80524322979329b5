"""`conform` / `load_clip` on bad or unusual input: clear one-line `MediaError`s, or a
correct result where the input is merely unusual.

Policy on damage (see `synchformer_jax.media`): `conform` raises when the decoder
reports an error or flags a frame corrupt (H.264 / AAC bitstream damage) and when a
stream decodes to clearly less than the file declares (truncation; the matroska
demuxer stops at garbage it cannot resync past). Silent audio is not an error: it is
reported in `ConformedClip.silent`.
"""
from __future__ import annotations

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
