"""Log-mel front end: official filterbank, stored audio inputs, host/device agreement."""
from __future__ import annotations

import jax
import librosa
import numpy as np
import pytest

from synchformer_jax.input import melspec as M
from tests import reference_data as rd

TOL = 1e-4  # official float32 STFT vs ours, amplified by log(x + 1e-6) in quiet frames
PAD_VALUE = np.float32((np.float32(0.0) - np.float32(M.AST_NORM_MEAN)) / np.float32(2 * M.AST_NORM_STD))


def _noise(shape, seed=0):
    rng = np.random.default_rng(seed)
    # Mixed loud and near-silent segments: the quiet ones exercise the log floor.
    x = rng.standard_normal(shape).astype(np.float32) * 0.1
    x[..., ::2, :] *= 1e-3
    return x


def _reference_segments(case):
    audio = case["audio_crop"]
    return np.stack([audio[s:e] for s, e in case["segment_a_ranges_in_crop"]])


def test_filterbank_bit_exact_with_official(reference_path):
    const = rd.constants(reference_path)
    fb = M.mel_filterbank()
    assert fb.shape == (513, 128) and fb.dtype == np.float32
    assert np.array_equal(fb, const["mel_filterbank"])
    assert np.abs(M.hann_window() - const["stft_window"]).max() <= 6e-8
    assert float(const["ast_norm_mean"]) == pytest.approx(M.AST_NORM_MEAN)
    assert float(const["ast_norm_std"]) == pytest.approx(M.AST_NORM_STD)
    assert float(const["log_eps"]) == M.LOG_EPS


def test_filterbank_is_librosa_htk():
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=0.0, fmax=8000.0, htk=True,
                              norm=None, dtype=np.float64).T
    fb = M.mel_filterbank()
    # Same triangles; only float32 evaluation differs.
    assert np.abs(fb - ref).max() < 2e-5
    assert fb.sum(axis=0).min() > 0  # every filter is non-empty
    n = np.arange(400)
    assert np.abs(M.hann_window() - (0.5 - 0.5 * np.cos(2 * np.pi * n / 400))).max() < 3e-7
    assert M.hann_window()[0] == 0.0 and M.hann_window()[200] == 1.0  # periodic, not symmetric


def test_reference_audio_inputs(reference_path):
    fft = jax.jit(M.log_mel_jax)
    mm = jax.jit(lambda x: M.log_mel_jax(x, method="matmul"))
    for path in rd.case_files(reference_path):
        with np.load(path) as case:
            segments = _reference_segments(case)
            expected = case["audio_input"][0]
            host = M.log_mel_np(segments)
            assert host.shape == expected.shape == (14, 1, 128, 66) and host.dtype == np.float32
            for name, got in (("numpy", host), ("jax fft", np.asarray(fft(segments))),
                              ("jax matmul", np.asarray(mm(segments)))):
                diff = np.abs(got - expected).max()
                assert diff < TOL, f"{path.stem} {name}: max |diff| {diff}"
            assert (expected[..., -1] == PAD_VALUE).all()


def test_pad_column_and_layout():
    x = _noise((3, 10240))
    out = M.log_mel_np(x)
    assert out.shape == (3, 1, 128, 66)
    assert M.num_stft_frames(10240) == 65
    # Padding happens after the log: log-domain 0, i.e. 4.2677393 / 9.1379948 = 0.46703.
    assert (out[..., 65] == PAD_VALUE).all() and abs(float(PAD_VALUE) - 0.46703) < 1e-5
    assert not (out[..., :65] == PAD_VALUE).all(axis=-1).any()


def test_matches_librosa_melspectrogram():
    """Independent check of framing, padding, window placement, power and scale."""
    x = _noise((4, 10240), seed=1)
    power = librosa.feature.melspectrogram(
        y=x.astype(np.float64), sr=16000, n_fft=1024, hop_length=160, win_length=400, window="hann",
        center=True, pad_mode="reflect", power=2.0, n_mels=128, fmin=0.0, fmax=8000.0, htk=True,
        norm=None)
    assert power.shape == (4, 128, 65)
    expected = (np.log(power + 1e-6) - M.AST_NORM_MEAN) / (2 * M.AST_NORM_STD)
    got = M.log_mel_np(x)[:, 0, :, :65]
    assert np.abs(got - expected).max() < 2e-5


def test_jax_matches_numpy_with_batch_dims():
    x = _noise((2, 3, 10240), seed=2)
    host = M.log_mel_np(x)
    assert host.shape == (2, 3, 1, 128, 66)
    for method in ("fft", "matmul"):
        dev = np.asarray(jax.jit(lambda s, m=method: M.log_mel_jax(s, method=m))(x))
        assert dev.shape == host.shape
        assert np.abs(dev - host).max() < TOL, method
    with pytest.raises(ValueError):
        M.log_mel_jax(x, method="dct")


def test_other_lengths_pad_or_truncate():
    short = M.log_mel_np(_noise((1, 8000)))  # 51 frames -> 15 padded columns
    assert short.shape == (1, 1, 128, 66) and (short[..., 51:] == PAD_VALUE).all()
    long = M.log_mel_np(_noise((1, 12000)))  # 76 frames -> truncated to 66
    assert long.shape == (1, 1, 128, 66) and not (long[..., 65] == PAD_VALUE).all()
    dev = np.asarray(M.log_mel_jax(_noise((1, 8000))))
    assert np.abs(dev - short).max() < TOL


def test_sine_lands_in_its_mel_band():
    t = np.arange(10240) / 16000
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)[None]
    out = M.log_mel_np(x)[0, 0, :, 10:55]
    peak = int(np.bincount(out.argmax(axis=0)).argmax())
    centres = librosa.mel_frequencies(130, fmin=0.0, fmax=8000.0, htk=True)[1:-1]
    assert abs(centres[peak] - 1000.0) < 0.5 * (centres[peak + 1] - centres[peak - 1])
