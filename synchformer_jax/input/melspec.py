"""Per-segment log-mel spectrogram exactly as the official audio transforms.

Official chain (applied to `[S, 10240]`, each segment independently):
`torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, win_length=400, hop_length=160,
n_mels=128)` -> `log(x + 1e-6)` -> right-pad time to 66 with **0.0 after the log**
-> `(x + 4.2677393) / (2 * 4.5689974)` (the AST normalisation divides by *twice* the
std) -> `[S, 1, 128, 66]`. So the 66th column is always `4.2677393 / 9.1379948 = 0.46703`.

MelSpectrogram defaults that matter: periodic Hann window of 400 samples zero-padded
centrally to 1024 (312 zeros each side), `center=True` with reflect padding of 512 at
*each segment's* borders, power 2, one-sided 513 bins, HTK mel scale between 0 and
8000 Hz, no filter normalisation. 1 + 10240 // 160 = 65 frames.

Precision: the official front end runs in float32; in quiet frames (power ~1e-8) the
`log(x + 1e-6)` turns float32 STFT rounding into differences of a few 1e-5 after
normalisation. The host version computes the STFT in float64 (closest to the stored
official inputs: max |diff| 2.3e-5 on the reference cases); the device version uses
float32 and is within 1e-4 of both.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SAMPLE_RATE", "N_FFT", "WIN_LENGTH", "HOP_LENGTH", "N_MELS", "N_FRAMES",
    "AST_NORM_MEAN", "AST_NORM_STD", "LOG_EPS", "num_stft_frames", "hann_window",
    "mel_filterbank", "log_mel_np", "log_mel_jax",
]

SAMPLE_RATE = 16000
N_FFT = 1024
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 128
N_FRAMES = 66  # PadOrTruncate(max_spec_t=66)
AST_NORM_MEAN = -4.2677393
AST_NORM_STD = 4.5689974
LOG_EPS = 1e-6

_F32 = np.float32
_WIN_OFFSET = (N_FFT - WIN_LENGTH) // 2  # 312: where the 400-tap window sits in the FFT frame


def num_stft_frames(num_samples: int) -> int:
    """Frames of a centred STFT: `1 + L // hop` (65 for a 10240-sample segment)."""
    return 1 + num_samples // HOP_LENGTH


@functools.lru_cache(maxsize=None)
def hann_window() -> np.ndarray:
    """Periodic Hann of 400 taps, `[400] float32`, as `torch.hann_window(400)`.

    Evaluated as PyTorch does in float32 (`0.5 - 0.5 * cos(n * float32(2 pi / 400))`);
    PyTorch's vectorised cosine is not correctly rounded, so 12 taps still differ by one
    float32 ulp (<= 6e-8), which is far below the front end's float32 noise.
    """
    n = np.arange(WIN_LENGTH, dtype=_F32)
    phase = (n * _F32(2.0 * math.pi / WIN_LENGTH)).astype(_F32)
    cos = np.cos(phase.astype(np.float64)).astype(_F32)
    w = (cos * _F32(-0.5) + _F32(0.5)).astype(_F32)
    w.setflags(write=False)
    return w


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    # PyTorch's float32 linspace: step rounded to float32, then `start + i * step` for the
    # first half and `stop - (num - 1 - i) * step` for the second half, each rounded once
    # (fused multiply-add). A float64 linspace cast to float32 differs in the last bit at
    # many points, and the HTK filters inherit it.
    step = _F32((_F32(stop) - _F32(start)) / _F32(num - 1))
    i = np.arange(num, dtype=np.float64)
    lo = np.float64(_F32(start)) + np.float64(step) * i
    hi = np.float64(_F32(stop)) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, lo, hi).astype(_F32)


@functools.lru_cache(maxsize=None)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float = None) -> np.ndarray:
    """HTK triangular filterbank `[n_fft // 2 + 1, n_mels] float32`, no normalisation.

    Same definition as `librosa.filters.mel(..., htk=True, norm=None)` (transposed), but
    evaluated in float32 the way torchaudio's `melscale_fbanks` does, which makes it
    bit-identical to the official table (librosa's float64 evaluation differs by up to
    1.3e-5 and moves the final inputs by ~1e-5).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    n_freqs = n_fft // 2 + 1
    all_freqs = _linspace_f32(0.0, sample_rate // 2, n_freqs)
    m_min = 2595.0 * math.log10(1.0 + f_min / 700.0)
    m_max = 2595.0 * math.log10(1.0 + f_max / 700.0)
    m_pts = _linspace_f32(m_min, m_max, n_mels + 2)
    # mel -> Hz in float32 steps; the power is rounded once from float64 (correctly rounded).
    q = (m_pts / _F32(2595.0)).astype(_F32)
    p = np.power(10.0, q.astype(np.float64)).astype(_F32)
    f_pts = (_F32(700.0) * (p - _F32(1.0))).astype(_F32)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = (_F32(-1.0) * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = np.maximum(_F32(0.0), np.minimum(down, up)).astype(_F32)
    fb.setflags(write=False)
    return fb


def _frame_index(num_samples: int) -> np.ndarray:
    """`[frames, 400]` indices into the reflect-padded signal of the window's support."""
    t = np.arange(num_stft_frames(num_samples))[:, None] * HOP_LENGTH
    return t + _WIN_OFFSET + np.arange(WIN_LENGTH)[None, :]


def _finish_np(mel: np.ndarray) -> np.ndarray:
    """`[..., frames, mels]` power -> normalised log-mel `[..., 1, mels, 66]` float32."""
    logmel = np.log(mel + LOG_EPS).astype(_F32)
    logmel = np.swapaxes(logmel, -1, -2)
    t = logmel.shape[-1]
    if t < N_FRAMES:
        pad = [(0, 0)] * (logmel.ndim - 1) + [(0, N_FRAMES - t)]
        logmel = np.pad(logmel, pad, constant_values=0.0)  # pad after the log: value 0
    else:
        logmel = logmel[..., :N_FRAMES]
    out = (logmel - _F32(AST_NORM_MEAN)) / _F32(2.0 * AST_NORM_STD)
    return out[..., None, :, :].astype(_F32)


def log_mel_np(segments: np.ndarray) -> np.ndarray:
    """`[..., S, L]` waveform segments -> `[..., S, 1, 128, 66]` float32 (host, float64 STFT)."""
    x = np.asarray(segments, dtype=np.float64)
    half = N_FFT // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    x = np.pad(x, pad, mode="reflect")
    frames = x[..., _frame_index(segments.shape[-1])] * hann_window().astype(np.float64)
    # The window occupies taps 312..711 of each 1024-sample frame; zero-padding it to
    # 1024 at the front instead only changes the phase, not the power.
    spec = np.fft.rfft(frames, n=N_FFT, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2
    mel = power @ mel_filterbank().astype(np.float64)
    return _finish_np(mel)


@functools.lru_cache(maxsize=None)
def _dft_matrix() -> np.ndarray:
    """`[400, 2 * 513]` windowed real DFT (cos | -sin), for the matmul STFT."""
    n = np.arange(WIN_LENGTH, dtype=np.float64)[:, None]
    k = np.arange(N_FFT // 2 + 1, dtype=np.float64)[None, :]
    ang = 2.0 * np.pi * ((n * k) % N_FFT) / N_FFT
    w = hann_window().astype(np.float64)[:, None]
    return np.concatenate([w * np.cos(ang), -w * np.sin(ang)], axis=1).astype(_F32)


def log_mel_jax(segments, method: str = "fft"):
    """`[..., S, L]` float32 segments -> `[..., S, 1, 128, 66]` float32, jit-able.

    `method="fft"` uses `jnp.fft.rfft`; `"matmul"` computes the 513 bins as one matmul
    with a windowed DFT matrix (faster on TPUs, which have slow FFTs). All matmuls run at
    HIGHEST precision: the default (TF32 / bf16 passes) would be far outside 1e-4 after
    the log.
    """
    x = jnp.asarray(segments, dtype=jnp.float32)
    num_samples = x.shape[-1]
    half = N_FFT // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    x = jnp.pad(x, pad, mode="reflect")
    frames = x[..., jnp.asarray(_frame_index(num_samples))]  # [..., T, 400]
    hi = jax.lax.Precision.HIGHEST
    if method == "fft":
        spec = jnp.fft.rfft(frames * jnp.asarray(hann_window()), n=N_FFT, axis=-1)
        power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    elif method == "matmul":
        ri = jnp.matmul(frames, jnp.asarray(_dft_matrix()), precision=hi)
        re, im = jnp.split(ri, 2, axis=-1)
        power = re ** 2 + im ** 2
    else:
        raise ValueError(f"method must be 'fft' or 'matmul', got {method!r}")
    mel = jnp.matmul(power, jnp.asarray(mel_filterbank()), precision=hi)
    logmel = jnp.swapaxes(jnp.log(mel + LOG_EPS), -1, -2)
    t = logmel.shape[-1]
    if t < N_FRAMES:
        logmel = jnp.pad(logmel, [(0, 0)] * (logmel.ndim - 1) + [(0, N_FRAMES - t)])
    else:
        logmel = logmel[..., :N_FRAMES]
    out = (logmel - AST_NORM_MEAN) / (2.0 * AST_NORM_STD)
    return out[..., None, :, :]
