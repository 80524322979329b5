"""`synchformer_jax.desync_eval` and `synchformer-jax desync`: av-benchmark's DeSync from files.

Frame selection is checked against libavfilter's `fps` rule written out by hand (round
to the nearest 1/25 s, latest frame wins), the resampler against a direct float64
evaluation of the windowed-sinc sum and the properties that pin it down, the clip-length
generalisation against the 8-s results, and the command end to end on a micro model.
"""
from __future__ import annotations

import json
import math
import pathlib
import wave
from fractions import Fraction

import av
import jax
import numpy as np
import pytest

from synchformer_jax import cli, desync_eval, inference, pretrained
from synchformer_jax.input import resample
from synchformer_jax.models import convert_torch
from synchformer_jax.models import synchformer as sf
from tests.data.write_torch_file import write_torch_zip
from tests.test_inference import MICRO, micro_config, random_params

GREY_STEP = 4  # grey level of frame i is 4 * i: 64 frames fit in 0..255 with room for codec error


def write_indexed_video(path, fps, n_frames: int, *, size=(48, 64), audio: bool = False) -> pathlib.Path:
    """H.264 (lossless, qp 0) where frame i is uniform grey 4 * i (i < 64) or, past 63,
    moving stripes; `audio=False`: a video-only file."""
    h, w = size
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"qp": "0", "preset": "ultrafast"}
        if audio:
            a_s = c.add_stream("aac", rate=16000, layout="mono")
        xx = np.arange(w)[None, :, None]
        for i in range(n_frames):
            if i < 64:
                img = np.full((h, w, 3), GREY_STEP * i, np.uint8)
            else:
                img = np.broadcast_to(((xx + 5 * i) % 32) * 8, (h, w, 3)).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        if audio:
            wav = (0.1 * np.sin(np.arange(int(n_frames / float(fps) * 16000)) / 7.0)).astype(np.float32)
            for s in range(0, len(wav), 1024):
                frame = av.AudioFrame.from_ndarray(wav[None, s:s + 1024].copy(), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, s
                c.mux(a_s.encode(frame))
            c.mux(a_s.encode(None))
    return pathlib.Path(path)


def write_wav(path, samples_int16: np.ndarray, rate: int) -> pathlib.Path:
    """16-bit PCM wav of `[channels, N]` integers (stdlib writer, independent of PyAV)."""
    x = np.asarray(samples_int16, np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(x.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.ascontiguousarray(x.T).tobytes())
    return pathlib.Path(path)


def noise_wav(path, seconds: float, rate: int = 44100, channels: int = 2, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    return write_wav(path, rng.integers(-8000, 8000, (channels, int(seconds * rate))), rate)


def fps_filter_indices(fps: Fraction, n_out: int) -> list[int]:
    """libavfilter `fps=25` (round=near) on a constant-rate source with frame i at i / fps:
    output j is the latest source frame whose time, rounded half up to 1/25 s, is <= j."""
    slot = lambda i: math.floor(Fraction(i) * 25 / fps + Fraction(1, 2))  # noqa: E731
    return [max(i for i in range(4 * n_out) if slot(i) <= j) for j in range(n_out)]


# ----------------------------------------------------------------- video frames


@pytest.mark.parametrize("fps", [Fraction(30), Fraction(24), Fraction(30000, 1001)], ids=["30", "24", "29.97"])
def test_frames_follow_the_fps_filter_rule_at_source_resolution(tmp_path, fps):
    path = write_indexed_video(tmp_path / "v.mp4", fps, 64)  # video only: no audio stream at all
    frames = desync_eval.decode_sync_frames(path, 50)
    assert frames.shape == (50, 48, 64, 3) and frames.dtype == np.uint8  # source size, no 256-px detour
    got = np.round(frames.astype(float).mean(axis=(1, 2, 3)) / GREY_STEP).astype(int).tolist()
    expected = fps_filter_indices(fps, 50)
    assert got == expected
    # The rule differs from sample-and-hold (latest frame with i / fps <= j / 25), so this
    # would catch a decoder that picks frames the other way.
    hold = [max(i for i in range(200) if Fraction(i) / fps <= Fraction(j, 25)) for j in range(50)]
    assert hold != expected


def test_too_short_or_unreadable_videos_raise_one_line_naming_the_file(tmp_path):
    path = write_indexed_video(tmp_path / "short.mp4", 25, 40, audio=True)
    assert desync_eval.decode_sync_frames(path, 40).shape[0] == 40
    with pytest.raises(desync_eval.DesyncFileError) as e:
        desync_eval.decode_sync_frames(path, 41)
    assert str(e.value).startswith(f"{path}: video too short: 40 frames") and "41 needed" in str(e.value)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n")
    with pytest.raises(desync_eval.DesyncFileError, match=f"^{bad}: cannot decode"):
        desync_eval.decode_sync_frames(bad, 10)
    wav = noise_wav(tmp_path / "sound.wav", 0.5)
    with pytest.raises(desync_eval.DesyncFileError, match="no video stream"):
        desync_eval.decode_sync_frames(wav, 10)


# ----------------------------------------------------------------- audio


def direct_sinc_hann(x: np.ndarray, orig_sr: int, new_sr: int, n: int) -> float:
    """Output n of the windowed-sinc resampler evaluated straight from its formula in
    float64: sum_k x[k] (base / orig) sinc(t) cos^2(pi t / 12), t = clip((k - n orig / new)
    base / orig, -6, 6), base = 0.99 min(orig, new), rates divided by their gcd."""
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    base = 0.99 * min(orig, new)
    t = np.clip((np.arange(x.shape[0]) - n * orig / new) * base / orig, -6, 6)
    h = base / orig * np.sinc(t) * np.cos(np.pi * t / 12) ** 2
    return float(np.dot(x.astype(np.float64), h))


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000])
def test_resampler_equals_the_windowed_sinc_formula(rate):
    x = (0.3 * np.random.default_rng(rate).standard_normal(3000)).astype(np.float32)
    y = resample.resample_sinc_hann(x, rate, 16000)
    assert y.dtype == np.float32 and y.shape == (math.ceil(3000 * 16000 / rate),)
    for n in (0, 1, 7, 100, 159, 160, 333, y.shape[0] - 1):
        # 1e-5: float32 kernels; rolloff 0.98 or a 5-zero-crossing window are off by >3e-3.
        assert abs(y[n] - direct_sinc_hann(x, rate, 16000, n)) < 1e-5, n


def test_resampler_gain_tone_lag_and_prefix():
    for rate in (44100, 48000, 22050):
        kernels, _ = resample.sinc_hann_kernel(rate, 16000)
        np.testing.assert_allclose(kernels.astype(np.float64).sum(axis=1), 1.0, atol=1e-3)  # DC gain 1, each phase
        t = np.arange(2 * rate) / rate
        y = resample.resample_sinc_hann(np.sin(2 * np.pi * 1000 * t), rate, 16000)
        ref = np.sin(2 * np.pi * 1000 * np.arange(y.shape[0]) / 16000)
        assert np.abs(y - ref)[200:-200].max() < 1e-3  # a tone below the cutoff passes, in phase
    # An impulse at input 441 * 10 (output 1600 at 44.1 -> 16 kHz) peaks there, symmetrically.
    x = np.zeros(44100, np.float32)
    x[4410] = 1.0
    y = resample.resample_sinc_hann(x, 44100, 16000)
    assert int(np.argmax(y)) == 1600
    # (to 1e-5: torchaudio rounds each phase's position to float32, which tilts it by ~1e-6)
    np.testing.assert_allclose(y[1600 - 8:1600], y[1601:1609][::-1], atol=1e-5)
    assert np.all(y[:1600 - 7] == 0) and np.all(y[1600 + 8:] == 0)  # 6 zero crossings of a 7.92-kHz sinc
    # The first N outputs alone equal those of the whole signal (only their input is read).
    x = np.random.default_rng(0).standard_normal(48000 * 3).astype(np.float32)
    full = resample.resample_sinc_hann(x, 48000, 16000)
    np.testing.assert_array_equal(resample.resample_sinc_hann(x, 48000, 16000, num_output=32000), full[:32000])
    np.testing.assert_array_equal(resample.resample_sinc_hann(x, 16000, 16000), x)
    with pytest.raises(ValueError):
        resample.resample_sinc_hann(x, 48000, 16000, num_output=full.shape[0] + 1)


def test_audio_files_load_like_torchaudio_and_reach_16k_mono(tmp_path):
    ints = np.random.default_rng(1).integers(-32768, 32767, (2, 44100 * 2))
    wav = write_wav(tmp_path / "a.wav", ints, 44100)
    audio, rate = desync_eval.load_audio(wav)
    assert rate == 44100 and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, (ints / 32768.0).astype(np.float32))  # int16 / 2**15
    flac = tmp_path / "a.flac"
    with av.open(str(flac), "w") as c:  # lossless: the same samples back
        s = c.add_stream("flac", rate=44100, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(ints.T.reshape(1, -1)).astype(np.int16),
                                           format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 44100, 0
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    np.testing.assert_array_equal(desync_eval.load_audio(flac)[0], audio)

    wave16k = desync_eval.sync_waveform(wav, 16000)  # L = 1 s: int(16000 * 1)
    mono = audio.mean(axis=0, dtype=np.float32)
    np.testing.assert_array_equal(wave16k, resample.resample_sinc_hann(mono, 44100, 16000)[:16000])
    with pytest.raises(desync_eval.DesyncFileError, match=f"^{wav}: audio too short: 32000 samples"):
        desync_eval.sync_waveform(wav, 32001)


# ----------------------------------------------------------------- lengths and windows


def test_eight_second_default_is_the_existing_protocol():
    assert inference.desync_lengths() == (8.0, inference.DESYNC_FRAMES, inference.DESYNC_SAMPLES,
                                          inference.DESYNC_SEGMENTS)
    assert desync_eval.window_segments(8.0) == [[0, 13], [10, 23]]
    config = micro_config()
    model, params = sf.Synchformer(config), random_params(config, 1)
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (1, 205, 32, 32, 3), np.uint8)
    tracks = (0.3 * rng.standard_normal((1, 2, 130000))).astype(np.float32)
    default, explicit = inference.DesyncScorer(model, params), inference.DesyncScorer(model, params, clip_sec=8.0)
    v0, v1 = default.video_features(frames), explicit.video_features(frames)
    np.testing.assert_array_equal(v0, v1)
    r0, r1 = default.score(v0, tracks), explicit.score(v1, tracks)
    np.testing.assert_array_equal(r0.logits, r1.logits)
    np.testing.assert_array_equal(r0.desync_sec, r1.desync_sec)


def test_ten_seconds_use_windows_0_to_13_and_16_to_29():
    lengths = inference.desync_lengths(10.0)
    assert lengths == (10.0, 250, 160000, 30)
    assert desync_eval.window_segments(10.0) == [[0, 13], [16, 29]]
    with pytest.raises(ValueError, match="at least 4.8 s"):
        inference.desync_lengths(4.7)
    # Features that carry their segment number: the compare answers the class of the
    # window's first segment, so the offsets name the windows that were scored.
    config = micro_config()
    model = sf.Synchformer(config)
    grid = inference.offset_grid(config)
    vfeat = np.zeros((1, 30, 8, 4), np.float32)
    vfeat[..., 0] = np.arange(30)[None, :, None]
    afeat = np.zeros((1, 1, 30, 6, 4), np.float32)

    def compare_fn(v, a):
        first = v[:, 0, 0, 0].astype(int)
        return jax.nn.one_hot(first, grid.shape[0]) * 10.0

    result = inference.desync_from_features(model, None, vfeat, afeat, compare_fn=compare_fn)
    np.testing.assert_allclose(result.offsets_sec[0, 0], [grid[0], grid[16]])
    # The model-side inputs of 10 s: 30 segments from frame / sample 0, the first 24 of
    # which are those of 8 s.
    rng = np.random.default_rng(0)
    wav = (0.3 * rng.standard_normal((1, 160000))).astype(np.float32)
    spec10, spec8 = inference.desync_audio_input(wav, 10.0), inference.desync_audio_input(wav)
    assert spec10.shape == (1, 30, 1, 128, 66)
    np.testing.assert_array_equal(spec10[:, :24], spec8)
    with pytest.raises(ValueError, match="160000 samples"):
        inference.desync_audio_input(wav[:, :159999], 10.0)
    params = random_params(config, 1)
    frames = rng.integers(0, 256, (1, 250, 32, 32, 3), np.uint8)
    v10 = inference.desync_video_features(model, params, frames, clip_sec=10.0)
    assert v10.shape == (1, 30, 8, 32)
    np.testing.assert_allclose(v10[:, :24], inference.desync_video_features(model, params, frames), atol=1e-6)
    mm = inference.mmaudio_sync_features(model, params, frames[:, :200])  # MMAudio's [B, S * 8, D]
    assert mm.shape == (1, 192, 32)
    np.testing.assert_allclose(mm, np.asarray(v10[:, :24]).reshape(1, 192, 32), atol=1e-6)


# ----------------------------------------------------------------- pairing and the whole run


def test_pairing_by_stem_and_av_benchmark_names(tmp_path):
    v, a = tmp_path / "v", tmp_path / "a"
    v.mkdir()
    a.mkdir()
    for name in ("clip1.mp4", "clip2.mp4", "zxpo56cpUBU_000007.mp4", "notes.txt", "upper.MP4"):
        (v / name).write_bytes(b"")
    for name in ("clip1.wav", "clip2.flac", "clip2.wav", "zxpo56cpUBU_000007-0.flac", "stray.wav", "x.mp3"):
        (a / name).write_bytes(b"")
    p = desync_eval.pair_files(v, a)
    assert [(x.name, pathlib.Path(x.audio).name) for x in p.pairs] == [("clip1", "clip1.wav")]
    reasons = {pathlib.Path(e.path).name: (e.kind, e.reason) for e in p.excluded}
    assert reasons["clip2.flac"][0] == reasons["clip2.wav"][0] == "error" and "ambiguous" in reasons["clip2.wav"][1]
    assert reasons["stray.wav"][0] == "unpaired" and reasons["zxpo56cpUBU_000007-0.flac"][0] == "unpaired"
    assert reasons["clip2.mp4"][0] == reasons["zxpo56cpUBU_000007.mp4"][0] == "unpaired"
    assert "upper.MP4" not in reasons and "x.mp3" not in reasons  # av-benchmark lists *.mp4, *.wav, *.flac

    p = desync_eval.pair_files(v, a, names="av-benchmark")
    assert ("zxpo56cpUBU_000007", "zxpo56cpUBU_000007-0.flac") in [(x.name, pathlib.Path(x.audio).name)
                                                                   for x in p.pairs]
    assert desync_eval.avbench_clip_name("000000014_zxpo56cpUBU_000007-0") == "zxpo56cpUBU_000007"
    assert desync_eval.avbench_clip_name("Y---g-f_I2yQ_000001_0") == "---g-f_I2yQ_000001"
    assert desync_eval.avbench_clip_name("clip1") == "clip1"
    with pytest.raises(desync_eval.DesyncFileError, match="no such audio folder"):
        desync_eval.pair_files(v, tmp_path / "missing")


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Videos: a (30 fps, silent), b (too short), c (not a video), d (no audio file), f (24 fps);
    audio (44.1 kHz stereo): a, b, c, e (no video), f (too short)."""
    root = tmp_path_factory.mktemp("desync")
    v, a = root / "videos", root / "audio"
    v.mkdir()
    a.mkdir()
    write_indexed_video(v / "a.mp4", 30, 250)
    write_indexed_video(v / "b.mp4", 25, 150)
    (v / "c.mp4").write_text("not a video\n")
    write_indexed_video(v / "d.mp4", 25, 205, audio=True)
    write_indexed_video(v / "f.mp4", 24, 200)
    for name, seconds, seed in (("a.wav", 8.1, 0), ("b.wav", 8.5, 1), ("c.wav", 8.5, 2), ("e.wav", 8.5, 3),
                                ("f.wav", 7.9, 4)):
        noise_wav(a / name, seconds, seed=seed)
    config = micro_config()
    model_dir = pretrained.save_model(root / "model", random_params(config, 1), config)
    return {"root": root, "videos": v, "audio": a, "model": model_dir, "config": config}


def test_evaluate_scores_pairs_and_reports_every_left_out_file(clip_folders):
    f = clip_folders
    config = f["config"]
    params = random_params(config, 1)
    report = desync_eval.evaluate_desync(config, params, f["videos"], f["audio"])
    assert [c.name for c in report.clips] == ["a"]
    kinds = {pathlib.Path(e.path).name: e.kind for e in report.excluded}
    assert kinds == {"b.mp4": "error", "b.wav": "unpaired", "c.mp4": "error", "c.wav": "unpaired",
                     "d.mp4": "unpaired", "e.wav": "unpaired", "f.wav": "error"}
    reasons = {pathlib.Path(e.path).name: e.reason for e in report.excluded}
    assert reasons["b.mp4"].startswith("video too short") and reasons["f.wav"].startswith("audio too short")
    assert report.desync_sec == report.clips[0].desync_sec

    # The same clip through the library pieces by hand, outside the file loop.
    model = sf.Synchformer(config)
    frames = inference.desync_resize_crop(desync_eval.decode_sync_frames(f["videos"] / "a.mp4", 200)[None], 32)
    wav = desync_eval.sync_waveform(f["audio"] / "a.wav", 128000)
    vfeat = inference.desync_video_features(model, params, frames)
    res = inference.desync(model, params, vfeat, wav[None, None])
    assert report.clips[0].offsets_sec == tuple(float(o) for o in np.asarray(res.offsets_sec)[0, 0])
    assert report.clips[0].desync_sec == pytest.approx(float(res.desync_sec[0, 0]))


def test_cli_desync_end_to_end(clip_folders, capsys, tmp_path):
    f = clip_folders
    out = tmp_path / "desync.json"
    rc = cli.main(["desync", "--video-dir", str(f["videos"]), "--audio-dir", str(f["audio"]), "--checkpoint",
                   str(f["model"]), "--json-out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1  # files that cannot be used are errors of the command, as in predict
    err_lines = [ln for ln in cap.err.splitlines() if ln.startswith("error: ")]
    assert sorted(ln.split(": ")[1] for ln in err_lines) == sorted(
        str(f[k] / n) for k, n in (("videos", "b.mp4"), ("videos", "c.mp4"), ("audio", "f.wav")))
    assert any(ln.startswith(f"note: {f['audio'] / 'e.wav'}: no video named e") for ln in cap.err.splitlines())
    doc = json.loads(out.read_text())
    assert doc["schema"] == desync_eval.SCHEMA and doc["num_clips"] == 1 and doc["num_errors"] == 3
    assert doc["settings"]["windows"] == [[0, 13], [10, 23]] and doc["settings"]["frames"] == 200
    assert doc["model"]["matmul_precision"] == "highest" and doc["model"]["dtype"] == "float32"
    assert doc["desync_sec"] == pytest.approx(np.mean([c["desync_sec"] for c in doc["clips"]]))
    assert f"DeSync {doc['desync_sec']:.4f} s: mean over 1 clip(s)" in cap.out

    # Only good files: exit 0; a clip length that holds no window and a missing
    # checkpoint are usage / checkpoint errors (2), before any file is read.
    # The checkpoint as a bare official state dict, the form of synchformer_state_dict.pth
    # (head counts of the micro widths given with --set, as for any unofficial width).
    good_v, good_a = tmp_path / "v", tmp_path / "a"
    good_v.mkdir()
    good_a.mkdir()
    (good_v / "a.mp4").symlink_to(f["videos"] / "a.mp4")
    (good_a / "a.wav").symlink_to(f["audio"] / "a.wav")
    pth = tmp_path / "synchformer_state_dict.pth"
    write_torch_zip(pth, dict(convert_torch.flax_to_torch(random_params(f["config"], 1))))
    heads = [a for k, v in MICRO.items() if k.endswith(("num_heads", "n_head")) for a in ("--set", f"{k}={v}")]
    base = ["desync", "--video-dir", str(good_v), "--audio-dir", str(good_a), "--no-progress"]
    assert cli.main([*base, "--checkpoint", str(pth), *heads]) == 0
    assert f"DeSync {doc['desync_sec']:.4f} s: mean over 1 clip(s)" in capsys.readouterr().out  # same model
    assert cli.main([*base, "--checkpoint", str(f["model"]), "--audio-length", "4"]) == 2
    assert "--audio-length 4.0" in capsys.readouterr().err
    assert cli.main([*base, "--checkpoint", str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt" in capsys.readouterr().err
