"""Band-limited resampling with a Hann-windowed sinc: torchaudio's default `Resample`.

av-benchmark brings generated audio to 16 kHz with `torchaudio.transforms.Resample(sr, 16000)`
at its defaults (`sinc_interp_hann`, `lowpass_filter_width=6`, `rolloff=0.99`). Any other
resampler (libswresample, soxr, scipy) gives a waveform ~35 dB away from it, enough to move
log-mel values by up to 0.2 (docs/predict.md), so the DeSync path uses this one. It is written
from the filter's math, in NumPy:

With the rates divided by their gcd (`orig`, `new`), the cutoff is
`base = min(orig, new) * rolloff` (in units where the input rate is `orig`), and output
sample n, at input position `p = n * orig / new`, is

    y[n] = sum_k x[k] * (base / orig) * sinc(t) * cos(pi * t / (2 * W))**2,
    t = clip((k - p) * base / orig, -W, W),   sinc(t) = sin(pi t) / (pi t),   W = 6,

over the input with zeros outside it. The filter of output n + new is that of output n moved
by `orig` input samples, so `new` kernels of `2 * width + orig` taps, `width =
ceil(W * orig / base)`, cover every output (a strided correlation). The output has
`ceil(len * new / orig)` samples; sample 0 is at input sample 0 (no delay).

Numerics as torchaudio's on float32 audio: positions in float64 except the phase `j / new`,
which torchaudio forms in float32; kernels rounded to float32; the sums here are float64
(torchaudio's conv1d sums in float32), so the two differ by float32 rounding only.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


def reduced_rates(orig_sr: int, new_sr: int) -> tuple[int, int]:
    """`(orig, new)` divided by their gcd (44100 -> 16000 is 441 -> 160)."""
    g = math.gcd(int(orig_sr), int(new_sr))
    return int(orig_sr) // g, int(new_sr) // g


@functools.lru_cache(maxsize=16)
def sinc_hann_kernel(orig_sr: int, new_sr: int, lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
                     rolloff: float = ROLLOFF) -> tuple[np.ndarray, int]:
    """`(kernels [new, 2 * width + orig] float32, width)` for the gcd-reduced rates.

    Tap m of kernel j weighs input sample `i * orig - width + m` for output `i * new + j`.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    orig, new = reduced_rates(orig_sr, new_sr)
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    taps = np.arange(-width, width + orig, dtype=np.float64) / orig  # input offset, in units of `orig` samples
    # torchaudio divides the integer phases by `new` in float32 (its default dtype) before
    # adding the float64 taps; doing the same keeps the kernels bit-equal after rounding.
    phase = (np.arange(0, -new, -1).astype(np.float32) / np.float32(new)).astype(np.float64)
    t = np.clip((phase[:, None] + taps[None, :]) * base, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernels = (sinc * window * (base / orig)).astype(np.float32)
    kernels.setflags(write=False)
    return kernels, width


def resampled_length(num_samples: int, orig_sr: int, new_sr: int) -> int:
    """Output length of `resample_sinc_hann` on `num_samples` inputs: `ceil(len * new / orig)`."""
    if orig_sr == new_sr:
        return int(num_samples)
    orig, new = reduced_rates(orig_sr, new_sr)
    return -(-int(num_samples) * new // orig)


def resample_sinc_hann(x, orig_sr: int, new_sr: int, *, num_output: Optional[int] = None) -> np.ndarray:
    """Resample float `[..., N]` from `orig_sr` to `new_sr` (torchaudio's default `Resample`).

    Returns float32 `[..., resampled_length(N)]`, or only its first `num_output` samples
    (which equal those of the full output: only the input they need is read, so a long
    file costs no more than its start). Equal rates return the input as float32.
    """
    x = np.asarray(x, dtype=np.float32)
    total = resampled_length(x.shape[-1], orig_sr, new_sr)
    n_out = total if num_output is None else int(num_output)
    if n_out > total:
        raise ValueError(f"{n_out} output samples asked of an input that gives {total}")
    if orig_sr == new_sr:
        return x[..., :n_out].copy()
    orig, new = reduced_rates(orig_sr, new_sr)
    kernels, width = sinc_hann_kernel(orig_sr, new_sr)
    taps = kernels.shape[-1]
    blocks = -(-n_out // new)  # each block of `orig` inputs gives `new` outputs
    # Zeros `width` before the signal and after it as far as the last block reads.
    padded_len = (blocks - 1) * orig + taps
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    used = min(flat.shape[-1], padded_len - width)
    padded = np.zeros((flat.shape[0], padded_len), np.float64)
    padded[:, width:width + used] = flat[:, :used]
    frames = np.lib.stride_tricks.sliding_window_view(padded, taps, axis=-1)[:, ::orig][:, :blocks]
    y = frames @ kernels.astype(np.float64).T  # [rows, blocks, new]
    return y.reshape(*lead, blocks * new)[..., :n_out].astype(np.float32)
