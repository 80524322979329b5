"""Decoding: bit-exact with the official decoder on the reference videos; clear errors."""
from __future__ import annotations

import av
import numpy as np
import pytest

from synchformer_jax.media import MediaError, decode_media
from tests import decoded_media as dm


# ------------------------------------------------------------------ reference parity


def test_decoded_frames_and_audio_equal_official(reference_path):
    files = dm.decoded_reference_files(reference_path)
    for path in files:
        video_id = path.stem
        with np.load(path) as ref:
            media = dm.decode_reference_video(reference_path, video_id)
            t, c, h, w = (int(v) for v in ref["decoded_rgb_shape_TCHW"])
            assert media.frames.shape == (t, h, w, c), video_id
            assert media.frames.dtype == np.uint8
            assert media.video_fps == float(ref["video_fps"]), video_id
            assert media.audio_rate == int(ref["audio_fps"]), video_id
            sha = dm.frame_sha256(media.frames)
            bad = [i for i, (a, b) in enumerate(zip(sha, ref["frame_sha256_full"])) if a != b]
            assert not bad, f"{video_id}: {len(bad)} frames differ, first {bad[:5]}"
            np.testing.assert_allclose(media.frames.mean(axis=(1, 2)), ref["frame_mean_rgb_full"],
                                       rtol=0, atol=1e-9, err_msg=video_id)
            audio = ref["audio_decoded"]
            assert media.audio.dtype == np.float32
            assert media.audio.shape == audio.shape, video_id
            # Exact: the waveform feeds the crop / log-mel parity further down.
            assert np.array_equal(media.audio, audio), (
                f"{video_id}: max |diff| {np.abs(media.audio - audio).max()}")


def test_end_sec_gives_a_prefix_of_the_whole_decode(reference_path):
    video_id = dm.decoded_reference_files(reference_path)[0].stem
    full = dm.decode_reference_video(reference_path, video_id)
    part = decode_media(dm.video_path(reference_path, video_id), end_sec=2.0)
    # pts <= ceil(2.0 s): frames 0..50 (inclusive end), whole audio frames up to 2 s.
    assert part.frames.shape[0] == 51
    assert np.array_equal(part.frames, full.frames[:51])
    assert 32000 <= part.audio.shape[0] < 32000 + 1024 + 1
    assert np.array_equal(part.audio, full.audio[:part.audio.shape[0]])


# ----------------------------------------------------------- synthetic (no reference)


def _write_media(path, video=True, audio=True, n_frames=30, channels=1):
    with av.open(str(path), "w") as c:
        if video:
            vs = c.add_stream("mpeg4", rate=25)
            vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        if audio:
            as_ = c.add_stream("aac", rate=16000)
            as_.layout = "mono" if channels == 1 else "stereo"
        if video:
            for i in range(n_frames):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")
                for p in vs.encode(frame):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)
        if audio:
            t = np.arange(16000 * n_frames // 25) / 16000
            wav = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            wav = np.stack([wav, -0.5 * wav][:channels])
            for s in range(0, wav.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, s:s + 1024]), format="fltp",
                                                   layout="mono" if channels == 1 else "stereo")
                frame.sample_rate = 16000
                for p in as_.encode(frame):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)
    return path


def test_decode_synthetic_file(tmp_path):
    path = _write_media(tmp_path / "clip.mp4", channels=2)
    media = decode_media(path)
    assert media.frames.shape == (30, 48, 64, 3) and media.frames.dtype == np.uint8
    assert media.video_fps == 25.0 and media.audio_rate == 16000
    assert media.audio.ndim == 1 and media.audio.dtype == np.float32
    assert media.audio.shape[0] >= 16000 * 30 // 25
    # Channel mean of (x, -x/2) is x/4: peak ~0.025 (AAC is lossy, so loosely).
    assert 0.015 < np.abs(media.audio).max() < 0.035
    # Frames come out in presentation order (grey levels increase).
    levels = media.frames[:, 24, 32, 0].astype(int)
    assert (np.diff(levels) > 0).all()


# ---------------------------------------------------------------------------- errors


def _assert_media_error(path, *words):
    with pytest.raises(MediaError) as info:
        decode_media(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert str(path) in msg
    for word in words:
        assert word in msg, msg


def test_missing_file(tmp_path):
    _assert_media_error(tmp_path / "nope.mp4", "no such file")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _assert_media_error(path, "empty file")


def test_text_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\nat all\n")
    _assert_media_error(path, "not a readable media file")


def test_directory(tmp_path):
    _assert_media_error(tmp_path, "directory")


def test_no_audio_stream(tmp_path):
    _assert_media_error(_write_media(tmp_path / "silent.mp4", audio=False), "no audio stream")


def test_no_video_stream(tmp_path):
    _assert_media_error(_write_media(tmp_path / "sound.m4a", video=False), "no video stream")
