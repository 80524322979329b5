"""Stage-I augmentations (`synchformer_jax.input.augment`): each op's defining property,
the per-segment randomness, the probabilities and determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest

from synchformer_jax.input import augment as A

SR = 16000
N = 10240  # one 0.64 s audio segment


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tone(freq, n=N, amp=0.5, sr=SR):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def _video(s=3, t=4, h=20, w=24, seed=0):
    return _rng(seed).integers(0, 256, (s, t, h, w, 3), dtype=np.uint8)


def _rate(count, total, p, sigmas=5.0):
    """|count / total - p| within `sigmas` binomial standard deviations."""
    sd = math.sqrt(p * (1 - p) / total)
    return abs(count / total - p) <= sigmas * sd + 1e-12


# ------------------------------------------------------------------------------ spatial


def test_resize_bilinear_matches_half_pixel_formula():
    # 4 -> 8 with align_corners=False: sources clamp(0.25 * (2 i + 1) - 0.5 ... ), values
    # chosen so that every output is an integer (no rounding ambiguity).
    row = np.array([0, 40, 80, 120], np.uint8)
    frame = np.broadcast_to(row[None, :, None], (4, 4, 3))
    out = A.resize_bilinear(frame, 4, 8)
    np.testing.assert_array_equal(out[0, :, 0], [0, 10, 30, 50, 70, 90, 110, 120])
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(out[0:1, :, 0], (4, 8)))
    # Round-half-even on exact halves, like torch.round: [0, 10, 20, 30] -> 2.5 -> 2, 7.5 -> 8.
    row = np.array([0, 10, 20, 30], np.uint8)
    out = A.resize_bilinear(np.broadcast_to(row[None, :, None], (1, 4, 3)), 1, 8)
    np.testing.assert_array_equal(out[0, :, 0], [0, 2, 8, 12, 18, 22, 28, 30])


def test_upscale_path_keeps_224_uint8_and_interpolates():
    frames = _rng(1).integers(0, 256, (2, 256, 300, 3), dtype=np.uint8)
    out = A.spatial_crop_sometimes_upscale(frames, _rng(2), p=1.0)
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.uint8
    # A 192 crop enlarged: no 224 window of the input equals it (noise would have to
    # match), and a constant frame stays constant.
    const = np.full((1, 256, 256, 3), 77, np.uint8)
    np.testing.assert_array_equal(A.spatial_crop_sometimes_upscale(const, _rng(0), p=1.0), 77)


def test_plain_crop_is_one_window_for_all_frames():
    frames = _rng(3).integers(0, 256, (3, 2, 30, 40, 3), dtype=np.uint8)
    out = A.spatial_crop_sometimes_upscale(frames, _rng(4), p=0.0, size=16, smaller_size=12)
    assert out.shape == (3, 2, 16, 16, 3)
    hits = [(i, j) for i in range(15) for j in range(25)
            if np.array_equal(frames[..., i:i + 16, j:j + 16, :], out)]
    assert len(hits) == 1  # the same (i, j) for every frame of every segment


def test_upscale_probability():
    frames = _rng(5).integers(0, 256, (1, 10, 10, 3), dtype=np.uint8)
    rng = _rng(6)
    upscaled = 0
    n = 3000
    for _ in range(n):
        out = A.spatial_crop_sometimes_upscale(frames, rng, p=0.2, size=8, smaller_size=6)
        assert out.shape == (1, 8, 8, 3)
        windows = (np.array_equal(frames[:, i:i + 8, j:j + 8], out)
                   for i in range(3) for j in range(3))
        upscaled += not any(windows)
    assert _rate(upscaled, n, 0.2)


# ------------------------------------------------------------------------------- colour


def test_grayscale_equal_channels_with_torchvision_luma():
    video = _video(s=2)
    out, params = A.color_distortion(video, _rng(), p_color_jitter=0.0, p_gray_scale=1.0,
                                     return_params=True)
    assert all(j is None and g for j, g in params)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    v = video.astype(np.float64)
    luma = 0.2989 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]
    assert np.abs(out[..., 0] - luma).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(A.rgb_to_grayscale(np.eye(3, dtype=np.float32))[:, 0],
                                  np.float32([0.2989, 0.587, 0.114]))
    # A pure-channel check: R=255 alone -> round(0.2989 * 255) = 76.
    red = np.zeros((1, 1, 2, 2, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_array_equal(A.color_distortion(red, _rng(), 0.0, 1.0), 76)


def test_identity_factors_are_identities():
    video = _video(s=1)[0]
    x = video.astype(np.float32) / 255
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1)]:
        p = A.ColorJitterParams(order, 1.0, 1.0, 1.0, 0.0)
        np.testing.assert_array_equal(A._to_uint8(A.apply_color_jitter(x, p)), video)
    np.testing.assert_allclose(A.adjust_hue(x, 0.0), x, atol=2e-6)
    np.testing.assert_array_equal(A.adjust_brightness(x, 1.0), x)
    # Full hue turn halves are symmetric: +0.5 then -0.5 returns the input.
    np.testing.assert_allclose(A.adjust_hue(A.adjust_hue(x, 0.5), -0.5), x, atol=1e-5)


def test_color_ops_semantics():
    red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(A.adjust_hue(red, 1 / 3), [[[0, 1, 0]]], atol=1e-6)  # -> green
    np.testing.assert_allclose(A.adjust_hue(red, 0.5), [[[0, 1, 1]]], atol=1e-6)    # -> cyan
    np.testing.assert_allclose(A.adjust_hue(red, -1 / 3), [[[0, 0, 1]]], atol=1e-6)  # -> blue
    x = _rng(1).random((2, 5, 6, 3), dtype=np.float32)
    np.testing.assert_allclose(A.adjust_brightness(x, 0.5), x * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(A.adjust_brightness(x, 100.0).max(), 1.0)  # clamped
    sat0 = A.adjust_saturation(x, 0.0)
    np.testing.assert_allclose(sat0, np.broadcast_to(A.rgb_to_grayscale(x), x.shape), atol=1e-6)
    # Contrast 0 -> each frame becomes its own mean luma (torchvision reduces per image).
    x[1] *= 0.25
    c0 = A.adjust_contrast(x, 0.0)
    for t in range(2):
        np.testing.assert_allclose(c0[t], A.rgb_to_grayscale(x[t]).mean(), atol=1e-6)
    assert abs(c0[0].mean() - c0[1].mean()) > 0.1


def test_jitter_param_ranges():
    rng = _rng(2)
    ps = [A.draw_color_jitter_params(rng) for _ in range(2000)]
    for name, lo, hi in [("brightness", 0.2, 1.8), ("contrast", 0.2, 1.8),
                         ("saturation", 0.2, 1.8), ("hue", -0.2, 0.2)]:
        vals = np.array([getattr(p, name) for p in ps])
        assert vals.min() >= lo and vals.max() <= hi
        assert vals.min() < lo + 0.05 and vals.max() > hi - 0.05  # spans the range
    orders = {p.order for p in ps}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) == 24


def test_color_params_constant_within_segment_independent_across():
    base = _rng(3).integers(0, 256, (1, 1, 12, 14, 3), dtype=np.uint8)
    video = np.broadcast_to(base, (6, 4, 12, 14, 3)).copy()  # identical frames and segments
    out, params = A.color_distortion(video, _rng(4), p_color_jitter=1.0, p_gray_scale=0.0,
                                     return_params=True)
    for k in range(6):
        for t in range(4):  # every frame of a segment got the same jitter
            np.testing.assert_array_equal(out[k, t], out[k, 0])
        x = video[k].astype(np.float32) / 255
        np.testing.assert_array_equal(out[k], A._to_uint8(A.apply_color_jitter(x, params[k][0])))
    assert len({p[0] for p in params}) == 6
    assert len({out[k].tobytes() for k in range(6)}) == 6


def test_color_probabilities_and_untouched_segments():
    video = _video(s=4000, t=1, h=2, w=2, seed=5)
    out, params = A.color_distortion(video, _rng(6), return_params=True)
    jit = np.array([p[0] is not None for p in params])
    gray = np.array([p[1] for p in params])
    assert _rate(jit.sum(), 4000, 0.2) and _rate(gray.sum(), 4000, 0.2)
    assert _rate((jit & gray).sum(), 4000, 0.04)  # independent draws
    np.testing.assert_array_equal(out[~jit & ~gray], video[~jit & ~gray])


# --------------------------------------------------------------------------------- flip


def test_flip_per_segment_independent():
    video = _video(s=2000, t=2, h=2, w=3, seed=7)
    out, flags = A.horizontal_flip_per_segment(video, _rng(8), return_flags=True)
    np.testing.assert_array_equal(out[flags], video[flags][:, :, :, ::-1])
    np.testing.assert_array_equal(out[~flags], video[~flags])
    assert _rate(flags.sum(), 2000, 0.5)
    # Independent: consecutive flags agree about half the time.
    assert _rate((flags[1:] == flags[:-1]).sum(), 1999, 0.5)


# -------------------------------------------------------------------------------- audio


def test_lowpass_coefficients_are_rbj():
    b, a = A.lowpass_biquad_coefficients(100.0, SR, 0.707)
    w0 = 2 * math.pi * 100 / SR
    alpha = math.sin(w0) / (2 * 0.707)
    a0 = 1 + alpha
    np.testing.assert_allclose(b, np.array([1 - math.cos(w0), 2 * (1 - math.cos(w0)),
                                            1 - math.cos(w0)]) / 2 / a0, rtol=1e-12)
    np.testing.assert_allclose(a, [1.0, -2 * math.cos(w0) / a0, (1 - alpha) / a0], rtol=1e-12)
    # Unity gain at DC, -3 dB at the cut-off (Q = 1/sqrt 2).
    assert abs(b.sum() / a.sum() - 1) < 1e-12
    z = np.exp(-1j * w0 * np.arange(3))
    assert abs(20 * np.log10(abs(b @ z / (a @ z))) + 3.01) < 0.05


def _gain_db(x, y, skip=4000):
    return 20 * np.log10(np.sqrt(np.mean(y[skip:] ** 2)) / np.sqrt(np.mean(x[skip:] ** 2)))


def test_lowpass_attenuates_2k_and_passes_20hz():
    x = np.stack([_tone(2000), _tone(20, n=4 * SR)[:N]])
    y = A.lowpass(x, _rng(), p=1.0)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert _gain_db(x[0], y[0]) < -30
    # 20 Hz: one full period is 800 samples; measure over whole periods after settling.
    assert abs(_gain_db(x[1][2000:10000], y[1][2000:10000], skip=0)) < 1.0
    # torchaudio's lfilter clamps its output to [-1, 1].
    loud = np.full((1, 4000), 3.0, np.float32)
    assert A.lowpass(loud, _rng(), p=1.0).max() <= 1.0


def test_volume_doubles_and_clamps():
    x = np.array([[0.1, -0.2, 0.6, -0.7, 0.0]], np.float32)
    np.testing.assert_allclose(A.volume(x, _rng(), p=1.0), [[0.2, -0.4, 1.0, -1.0, 0.0]])
    np.testing.assert_array_equal(A.volume(x, _rng(), p=0.0), x)


def test_gauss_noise_std():
    x = np.zeros((4, 50000), np.float32)
    y = A.gauss_noise(x, _rng(), p=1.0)
    assert y.dtype == np.float32
    assert abs(y.std() - 0.01) < 0.0002 and abs(y.mean()) < 0.0002
    assert not np.array_equal(y[0], y[1])  # fresh noise per segment


def test_pitch_shift_moves_440_by_10_semitones():
    x = _tone(440)[None]
    y = A.pitch_shift(x, _rng(), p=1.0)
    assert y.shape == x.shape and y.dtype == np.float32
    spec = np.abs(np.fft.rfft(y[0][2000:-2000] * np.hanning(N - 4000)))
    freqs = np.fft.rfftfreq(N - 4000, 1 / SR)
    peak = freqs[np.argmax(spec)]
    expected = 440 * 2 ** (10 / 12)  # 783.99 Hz
    assert abs(peak - expected) < 10, peak
    # 1200 cents = one octave.
    y = A.pitch_shift(x, _rng(), p=1.0, cents=1200)
    spec = np.abs(np.fft.rfft(y[0][2000:-2000] * np.hanning(N - 4000)))
    assert abs(freqs[np.argmax(spec)] - 880) < 10


def test_reverb_is_wet_only_with_decaying_tail():
    x = np.zeros((1, N), np.float32)
    x[0, 100] = 1.0
    y = A.reverb(x, _rng(), p=1.0)[0]
    assert y.shape == (N,) and y.dtype == np.float32
    # Causal and no dry path (`-w`); FFT convolution leaves ~1e-19 round-off.
    assert np.abs(y[:101]).max() < 1e-9
    first = np.flatnonzero(np.abs(y) > 1e-9)[0] - 100
    assert 300 < first < 500  # first comb echo ~ 25 ms at 16 kHz
    win = 1600  # 0.1 s windows from 0.1 s after the impulse
    rms = [np.sqrt(np.mean(y[s:s + win] ** 2)) for s in range(1700, N - win + 1, win)]
    assert rms[-1] > 0  # still ringing 0.5 s later
    assert all(b < a for a, b in zip(rms, rms[1:]))  # decaying
    assert rms[-1] < 0.4 * rms[0]
    # Linear and time invariant: shifting the impulse shifts the output.
    x2 = np.roll(x, 500, axis=1)
    np.testing.assert_allclose(A.reverb(x2, _rng(), p=1.0)[0][600:], y[100:-500], atol=1e-7)


def test_audio_probabilities():
    x = np.random.default_rng(9).uniform(-0.4, 0.4, (3000, 64)).astype(np.float32)
    for op in (A.reverb, A.volume, A.lowpass, A.gauss_noise):
        y = op(x, _rng(10), p=0.2)
        changed = np.any(y != x, axis=1)
        assert _rate(changed.sum(), 3000, 0.2), (op.__name__, changed.mean())
        assert not np.any(op(x, _rng(10), p=0.0) != x)
    xs = np.random.default_rng(11).uniform(-0.4, 0.4, (300, 4096)).astype(np.float32)
    changed = np.any(A.pitch_shift(xs, _rng(12), p=0.2) != xs, axis=1)
    assert _rate(changed.sum(), 300, 0.2)


# ----------------------------------------------------------------------------- composed


def _example(seed=0, s=4):
    rng = _rng(seed)
    video = rng.integers(0, 256, (s, 3, 240, 250, 3), dtype=np.uint8)
    audio = rng.uniform(-0.5, 0.5, (s, N)).astype(np.float32)
    return video, audio


def test_stage1_deterministic_and_inputs_untouched():
    video, audio = _example()
    v0, a0 = video.copy(), audio.copy()
    cfg = A.Stage1AugmentConfig(p_color_jitter=0.5, p_gray_scale=0.5, reverb_p=0.5, volume_p=0.5,
                                pitch_p=0.5, lowpass_p=0.5, noise_p=0.5)
    v1, a1 = A.stage1_augment(video, audio, _rng(42), cfg)
    v2, a2 = A.stage1_augment(video, audio, _rng(42), cfg)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(a1, a2)
    assert v1.shape == (4, 3, 224, 224, 3) and v1.dtype == np.uint8 and a1.dtype == np.float32
    v3, a3 = A.stage1_augment(video, audio, _rng(43), cfg)
    assert not (np.array_equal(v1, v3) and np.array_equal(a1, a3))
    np.testing.assert_array_equal(video, v0)
    np.testing.assert_array_equal(audio, a0)


def test_stage1_is_the_ops_in_official_order():
    video, audio = _example(1)
    cfg = A.Stage1AugmentConfig(sometimes_upscale_p=1.0, p_color_jitter=1.0, reverb_p=1.0,
                                volume_p=1.0, pitch_p=1.0, lowpass_p=1.0, noise_p=1.0)
    v, a = A.stage1_augment(video, audio, _rng(7), cfg)
    rng = _rng(7)
    ev = A.spatial_crop_sometimes_upscale(video, rng, 1.0)
    ev = A.color_distortion(ev, rng, 1.0, 0.2)
    ev = A.horizontal_flip_per_segment(ev, rng, 0.5)
    ea = A.reverb(audio, rng, 1.0)
    ea = A.volume(ea, rng, 1.0)
    ea = A.pitch_shift(ea, rng, 1.0)
    ea = A.lowpass(ea, rng, 1.0)
    ea = A.gauss_noise(ea, rng, 1.0)
    np.testing.assert_array_equal(v, ev)
    np.testing.assert_array_equal(a, ea)
    # Order matters once the volume clamp bites: lowpass-then-volume differs.
    loud = audio * 1.8
    other = A.volume(A.lowpass(loud, _rng(0), 1.0), _rng(0), 1.0)
    assert not np.allclose(other, A.lowpass(A.volume(loud, _rng(0), 1.0), _rng(0), 1.0))


def test_disabled_config_only_crops_and_flips():
    video, audio = _example(2)
    cfg = A.Stage1AugmentConfig.disabled(spatial_crop=False)
    v, a = A.stage1_augment(video[:, :, :224, :224], audio, _rng(3), cfg)
    np.testing.assert_array_equal(a, audio)
    crop = video[:, :, :224, :224]
    for k in range(v.shape[0]):
        assert np.array_equal(v[k], crop[k]) or np.array_equal(v[k], crop[k][:, :, ::-1])
    assert A.Stage1AugmentConfig.with_audio_p(0.0).pitch_p == 0.0
    with pytest.raises(ValueError):
        A.Stage1AugmentConfig(noise_p=1.5)
