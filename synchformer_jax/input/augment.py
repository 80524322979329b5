"""Stage-I (Segment AVCLIP) training augmentations as host-side NumPy.

The official `configs/segment_avclip.yaml` train pipeline (see `docs/official_spec.md`
§4.2) augments each example with

* `RGBSpatialCropSometimesUpscale` (p=0.2: random 192 px crop resized to 224, else a
  random 224 crop; one crop for the whole clip),
* `RandomApplyColorDistortion` (torchvision `ColorJitter(0.8, 0.8, 0.8, 0.2)` with p=0.2,
  then `RandomGrayscale(p=0.2)`; drawn once per *segment*),
* `RandomHorizontalFlip(p=0.5)` per segment,
* five audio augmentations, each per segment with p=0.2: sox `reverb -w`, torchaudio
  `Vol(2.0)`, sox `pitch 1000` + `rate 16000`, torchaudio `lowpass_biquad(100 Hz,
  Q=0.707)` and `+0.01 * N(0, 1)` noise.

Everything here works on uint8 video `[S, T, H, W, 3]` (any leading axes for the spatial
crop) and float32 audio `[S, N]`, draws every random number from the
`numpy.random.Generator` it is given (same generator state -> same output) and never
modifies its inputs. The default probabilities are those of `segment_avclip.yaml`;
`Stage1AugmentConfig.disabled()` is the LRS3 recipe (all p=0).

The random *streams* are NumPy's, not torch's / Python's, so no official run is replayed
draw for draw; the distributions are the official ones.

Deviations from the originals (sox via `torchaudio.sox_effects`, torchaudio,
torchvision on uint8 tensors); notes below the table:

| op | original | here | difference |
|---|---|---|---|
| upscale | torchvision `Resize(224, antialias=None)` | `resize_bilinear` [1] | none intended |
| jitter / gray | uint8 tensor ops, each truncating | float32 [0, 1], one rounding [2] | <= ~1 level/op |
| luma | tensor path 0.2989 R + 0.587 G + 0.114 B | same (`LUMA_WEIGHTS`) [3] | none |
| reverb | sox `reverb -w`, channel mean | Freeverb network as an IR [4] | not bit-exact |
| volume | torchaudio `Vol(2.0)`: clamp(2 x, -1, 1) | same | none |
| pitch | sox `pitch 1000` + `rate 16000` | librosa `pitch_shift(n_steps=10)` [5] | other artefacts |
| lowpass | torchaudio `lowpass_biquad` (float32) | RBJ biquad, scipy `lfilter` [6] | float rounding |
| noise | `x + 0.01 * randn` | same | none |
| draws | torch / Python RNG | one NumPy generator [7] | other streams |

[1] Separable bilinear in float32, `align_corners=False` (half-pixel centres, negative
    source coordinates clamped to 0), round-half-even to uint8 like torchvision's cast
    back. `antialias=None` means False for tensors, and antialiasing only matters when
    shrinking; 192 -> 224 enlarges.
[2] torchvision on uint8 truncates after each of the four ops and in the grey images
    used by contrast / saturation / grayscale (a small downward bias); here everything
    stays float32 and is rounded once. Contrast blends with the mean luma of each
    *frame* (torchvision reduces over the last three axes of `[T, C, H, W]`).
[3] PIL (and the ITU-R 601-2 text) use 0.299; the tensor path, which the official code
    runs, uses 0.2989.
[4] The sox reverb structure and defaults, written from their published description
    (no sox code): per output channel 8 lowpass-feedback combs (Freeverb lengths 1116,
    1188, 1277, 1356, 1422, 1491, 1557, 1617 at 44.1 kHz, scaled to 16 kHz and by the
    room scale) summed, then 4 allpasses (225, 341, 441, 556; gain 0.5); input gain
    0.015 (x wet gain 0 dB); reverberance 50 % -> feedback 0.882, HF damping 50 % ->
    0.35, room scale 100 %, pre-delay 0; a mono input becomes 2 channels (stereo depth
    100 %: the second channel's delays are +-12 samples at 44.1 kHz, alternating), which
    the official code averages. Being linear, the whole chain is one impulse response
    (cached) applied with `scipy.signal.fftconvolve`. Not modelled: sox's internal
    sample-format conversions and any other input conditioning; the tail past the
    segment end is dropped (length kept, as the official in-place assignment needs).
    On white noise the wet output is about -13 dB below the input.
[5] `librosa.effects.pitch_shift(sr=16000, n_steps=10, res_type='soxr_hq')`: STFT
    phase-vocoder stretch (n_fft 2048, hop 512, zero-padded centred frames) + soxr
    resampling, then trimmed / padded to the input length. sox uses WSOLA time
    stretching + its own resampler: same 10-semitone shift and length, different
    artefacts (phase smearing vs splice artefacts; edge effects on 0.64 s segments).
[6] RBJ Audio-EQ-Cookbook coefficients (what torchaudio's `lowpass_biquad` computes),
    zero initial state, float64 filtering, output clamped to [-1, 1] as torchaudio's
    `lfilter(clamp=True)` default does, cast to float32.
[7] The official `RandomApply` applies when `U <= p`, the audio ops when `U < p`; here
    always `U < p` (p=0 never, p=1 always).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "LUMA_WEIGHTS", "AUDIO_RATE", "Stage1AugmentConfig", "stage1_augment",
    "resize_bilinear", "spatial_crop_sometimes_upscale",
    "rgb_to_grayscale", "adjust_brightness", "adjust_contrast", "adjust_saturation",
    "adjust_hue", "ColorJitterParams", "draw_color_jitter_params", "apply_color_jitter",
    "color_distortion", "horizontal_flip_per_segment",
    "reverb_impulse_response", "reverb", "volume", "pitch_shift",
    "lowpass_biquad_coefficients", "lowpass", "gauss_noise",
]

AUDIO_RATE = 16000

# torchvision's tensor `rgb_to_grayscale` weights (ITU-R 601-2 luma with R = 0.2989).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


def _check_p(p: float, what: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1], got {p}")
    return p


def _segment_mask(rng: np.random.Generator, n: int, p: float, what: str) -> np.ndarray:
    """One Bernoulli(p) per segment; drawn even for p in {0, 1} so the stream position
    does not depend on the probability (config changes do not shift later draws)."""
    p = _check_p(p, what)
    return rng.random(n) < p


def _audio_2d(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(f"audio segments must be [S, N], got shape {audio.shape}")
    return audio


def _video_5d(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"video segments must be [S, T, H, W, 3], got shape {video.shape}")
    return video


def _to_uint8(x: np.ndarray, scale: float = 255.0) -> np.ndarray:
    # Round-half-even (np.rint, like torch.round) and saturate, so float noise around
    # an integer never flips a level.
    return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ spatial crop / resize


def _linear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of PyTorch bilinear interpolation with
    `align_corners=False`: centre-aligned pixels, source = (dst + 0.5) * in/out - 0.5,
    negative sources clamped to 0 and the upper neighbour clamped to the last pixel."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `[..., H, W, 3]` -> uint8 `[..., height, width, 3]`, bilinear without
    antialiasing, computed in float32 and rounded (torchvision tensor `Resize` with
    `antialias=False`, which is what `antialias=None` means for tensors)."""
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3], got shape {frames.shape}")
    in_h, in_w = frames.shape[-3], frames.shape[-2]
    x = frames.astype(np.float32)
    r0, r1, wr = _linear_taps(in_h, height)
    wr = wr[:, None, None]
    x = x[..., r0, :, :] * (1.0 - wr) + x[..., r1, :, :] * wr
    c0, c1, wc = _linear_taps(in_w, width)
    wc = wc[:, None]
    x = x[..., c0, :] * (1.0 - wc) + x[..., c1, :] * wc
    return _to_uint8(x, 1.0)


def spatial_crop_sometimes_upscale(frames: np.ndarray, rng: np.random.Generator, p: float = 0.2,
                                   size: int = 224, smaller_size: int = 192) -> np.ndarray:
    """Official `RGBSpatialCropSometimesUpscale` (train, `is_random=True`).

    With probability `p` a random `smaller_size` square crop resized to `size`
    (bilinear, see `resize_bilinear`), otherwise a random `size` crop. One crop for every
    frame: pass the whole clip `[T, H, W, 3]` or all its segments `[S, T, H, W, 3]`
    (equivalent, since the crop is purely spatial). Crop origins are uniform over all
    valid positions (inclusive), as `random.randint(0, H - h)`.
    """
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3], got shape {frames.shape}")
    h, w = frames.shape[-3], frames.shape[-2]
    # The official code skips the draw when p == 0 (`do_sometimes_upscale`); so do we.
    upscale = _check_p(p, "upscale p") > 0 and rng.random() < p
    crop = smaller_size if upscale else size
    if h < crop or w < crop:
        raise ValueError(f"frames {h}x{w} are smaller than the crop {crop}")
    i = int(rng.integers(0, h - crop, endpoint=True))
    j = int(rng.integers(0, w - crop, endpoint=True))
    out = frames[..., i:i + crop, j:j + crop, :]
    if upscale:
        return resize_bilinear(out, size, size)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------- colour distortion
# All colour helpers take float32 RGB in [0, 1] with channels last, `[..., H, W, 3]`, and
# follow torchvision's tensor semantics (blend with a reference image, clamp to [0, 1]).


def rgb_to_grayscale(x: np.ndarray) -> np.ndarray:
    """`[..., 3]` -> `[..., 1]` luma with `LUMA_WEIGHTS`."""
    r, g, b = LUMA_WEIGHTS
    return (np.float32(r) * x[..., 0:1] + np.float32(g) * x[..., 1:2]
            + np.float32(b) * x[..., 2:3])


def _blend(x: np.ndarray, ref, factor: float) -> np.ndarray:
    return np.clip(np.float32(factor) * x + np.float32(1.0 - factor) * ref, 0.0, 1.0)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: `clamp(factor * x)`."""
    return _blend(x, np.float32(0.0), factor)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean luma of each image (each frame of a `[T, H, W, 3]` segment
    separately: torchvision reduces over the last three axes of `[T, C, H, W]`)."""
    mean = rgb_to_grayscale(x).mean(axis=(-3, -2, -1), keepdims=True, dtype=np.float32)
    return _blend(x, mean, factor)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the per-pixel grey image."""
    return _blend(x, rgb_to_grayscale(x), factor)


def _rgb_to_hsv(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    # Elementwise max/min of the three planes (much faster than reducing a size-3 axis).
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    delta = maxc - minc
    grey = delta == 0
    # Divisors of 1 where they would be 0 (grey pixels get h = s = 0, like torchvision).
    s = delta / np.where(grey, np.float32(1.0), maxc)
    d = np.where(grey, np.float32(1.0), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    # The first channel that attains the maximum decides the sextant (R, then G, then B).
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(grey, np.float32(0.0), h)
    h = np.mod(h / 6.0 + 1.0, 1.0).astype(np.float32)
    return h, s.astype(np.float32), maxc


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    h6 = h * np.float32(6.0)
    i = np.floor(h6)
    f = h6 - i
    i = i.astype(np.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    # Sextant k -> (R, G, B) picks from (v, t, p, q).
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def adjust_hue(x: np.ndarray, hue: float) -> np.ndarray:
    """Rotate the HSV hue by `hue` turns (in [-0.5, 0.5])."""
    if not -0.5 <= hue <= 0.5:
        raise ValueError(f"hue shift must be in [-0.5, 0.5], got {hue}")
    h, s, v = _rgb_to_hsv(x)
    h = np.mod(h + np.float32(hue), np.float32(1.0))
    return np.clip(_hsv_to_rgb(h, s, v), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ColorJitterParams:
    """One `ColorJitter` call: the op order (0 brightness, 1 contrast, 2 saturation,
    3 hue; a random permutation) and the four factors."""
    order: Tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float


def draw_color_jitter_params(rng: np.random.Generator, brightness: float = 0.8,
                             contrast: float = 0.8, saturation: float = 0.8,
                             hue: float = 0.2) -> ColorJitterParams:
    """torchvision `ColorJitter.get_params`: a random order of the four ops, factors
    uniform in `[max(0, 1 - x), 1 + x]`, hue uniform in `[-hue, hue]`."""
    order = tuple(int(k) for k in rng.permutation(4))

    def factor(x):
        return float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x))

    b, c, s = factor(brightness), factor(contrast), factor(saturation)
    return ColorJitterParams(order, b, c, s, float(rng.uniform(-hue, hue)))


def apply_color_jitter(x: np.ndarray, params: ColorJitterParams) -> np.ndarray:
    """Float32 `[..., H, W, 3]` in [0, 1] -> jittered, ops in `params.order`."""
    for k in params.order:
        if k == 0:
            x = adjust_brightness(x, params.brightness)
        elif k == 1:
            x = adjust_contrast(x, params.contrast)
        elif k == 2:
            x = adjust_saturation(x, params.saturation)
        else:
            x = adjust_hue(x, params.hue)
    return x


def color_distortion(video: np.ndarray, rng: np.random.Generator, p_color_jitter: float = 0.2,
                     p_gray_scale: float = 0.2, strength: float = 1.0,
                     return_params: bool = False):
    """Official `RandomApplyColorDistortion` on uint8 `[S, T, H, W, 3]`, per segment.

    For each segment independently: with `p_color_jitter` a `ColorJitter(0.8 s, 0.8 s,
    0.8 s, 0.2 s)` call (one set of parameters for all frames of the segment), then with
    `p_gray_scale` a 3-channel grayscale. With `return_params` also returns, per segment,
    `(ColorJitterParams or None, grayscale: bool)`.
    """
    video = _video_5d(video)
    p_color_jitter = _check_p(p_color_jitter, "p_color_jitter")
    p_gray_scale = _check_p(p_gray_scale, "p_gray_scale")
    out = video.copy()
    params = []
    for k in range(video.shape[0]):
        jitter = None
        if rng.random() < p_color_jitter:
            jitter = draw_color_jitter_params(rng, 0.8 * strength, 0.8 * strength,
                                              0.8 * strength, 0.2 * strength)
        gray = bool(rng.random() < p_gray_scale)
        params.append((jitter, gray))
        if jitter is None and not gray:
            continue  # untouched segments stay bit-identical (no float round trip)
        x = video[k].astype(np.float32) / np.float32(255.0)
        if jitter is not None:
            x = apply_color_jitter(x, jitter)
        if gray:
            x = np.broadcast_to(rgb_to_grayscale(x), x.shape)
        out[k] = _to_uint8(x)
    return (out, params) if return_params else out


def horizontal_flip_per_segment(video: np.ndarray, rng: np.random.Generator, p: float = 0.5,
                                return_flags: bool = False):
    """Official stage-I `RandomHorizontalFlip(p)`: each segment of `[S, T, H, W, 3]`
    flipped left-right independently (all frames of a segment together)."""
    video = _video_5d(video)
    flags = _segment_mask(rng, video.shape[0], p, "flip p")
    out = video.copy()
    out[flags] = video[flags][..., ::-1, :]
    return (out, flags) if return_flags else out


# ---------------------------------------------------------------------------------- audio

# Freeverb's tuning (delay lengths in samples at 44.1 kHz), which sox's reverb uses.
_COMB_LENGTHS_44K = (1116, 1188, 1277, 1356, 1422, 1491, 1557, 1617)
_ALLPASS_LENGTHS_44K = (225, 341, 441, 556)
_STEREO_SPREAD_44K = 12  # extra samples (alternating sign per filter) for the 2nd channel
_ALLPASS_GAIN = 0.5
_INPUT_GAIN = 0.015      # Freeverb's fixed input attenuation (before the combs)


def _comb(x: np.ndarray, delay: int, feedback: float, damping: float) -> np.ndarray:
    """Freeverb's comb with a one-pole lowpass in the loop: the delay line holds
    w[n] = x[n] + g * s[n], the output is y[n] = w[n - D], and the loop filter state is
    s[n] = (1 - d) y[n] + d s[n - 1]. Equivalently
    H(z) = z^-D (1 - d z^-1) / (1 - d z^-1 - g (1 - d) z^-D).

    Evaluated D samples at a time: inside one block the y[n - D] feedback term is
    already known, leaving a one-pole recursion (one short `lfilter` per block instead of
    a dense order-D filter, ~50x faster)."""
    from scipy.signal import lfilter

    n = x.shape[0]
    if n <= delay:  # nothing leaves the delay line within the segment
        return np.zeros(n)
    # Numerator z^-D (1 - d z^-1) applied to x.
    xin = np.zeros(n)
    xin[delay:] = x[:n - delay]
    xin[delay + 1:] -= damping * x[:n - delay - 1]
    y = np.zeros(n)
    g = feedback * (1.0 - damping)
    for start in range(0, n, delay):
        end = min(start + delay, n)
        u = xin[start:end].copy()
        if start >= delay:
            u += g * y[start - delay:end - delay]
        zi = [damping * y[start - 1]] if start > 0 else [0.0]
        y[start:end], _ = lfilter([1.0], [1.0, -damping], u, zi=zi)
    return y


def _allpass(x: np.ndarray, delay: int, gain: float = _ALLPASS_GAIN) -> np.ndarray:
    """Freeverb's (Schroeder-style) allpass: v[n] = x[n] + g v[n - D], y[n] = v[n - D] - x[n],
    i.e. H(z) = (-1 + (1 + g) z^-D) / (1 - g z^-D)."""
    n = x.shape[0]
    v = np.array(x, dtype=np.float64)
    for start in range(delay, n, delay):  # block-wise: v[n - D] is final before v[n]
        end = min(start + delay, n)
        v[start:end] += gain * v[start - delay:end - delay]
    y = -np.array(x, dtype=np.float64)
    if n > delay:
        y[delay:] += v[:n - delay]
    return y


@functools.lru_cache(maxsize=16)
def _reverb_ir_cached(n: int, sample_rate: int, reverberance: float, hf_damping: float,
                      room_scale: float, stereo_depth: float, wet_gain_db: float) -> np.ndarray:
    # Parameter mapping of sox's reverb (percent knobs -> filter constants): the feedback
    # grows from 0.3 (reverberance 0) to 0.98 (100) on an exponential curve, damping in
    # [0.2, 0.5], room scale stretches comb delays by [0.1, 1.0].
    a = -1.0 / math.log(1.0 - 0.3)
    b = 100.0 / (math.log(1.0 - 0.98) * a + 1.0)
    feedback = 1.0 - math.exp((reverberance - b) / (a * b))
    damping = hf_damping / 100.0 * 0.3 + 0.2
    scale = room_scale / 100.0 * 0.9 + 0.1
    depth = stereo_depth / 100.0
    gain = 10.0 ** (wet_gain_db / 20.0) * _INPUT_GAIN
    r = sample_rate / 44100.0
    impulse = np.zeros(n)
    impulse[0] = 1.0
    channels = [0.0] + ([depth] if depth > 0 else [])  # mono in -> 2 channels with depth
    irs = []
    for offset in channels:
        comb_sum = np.zeros(n)
        sign = 1.0
        for length in _COMB_LENGTHS_44K:
            d = int(scale * r * (length + _STEREO_SPREAD_44K * offset * sign) + 0.5)
            comb_sum += _comb(impulse, max(d, 2), feedback, damping)
            sign = -sign
        y = comb_sum
        for length in _ALLPASS_LENGTHS_44K:
            d = int(r * (length + _STEREO_SPREAD_44K * offset * sign) + 0.5)
            y = _allpass(y, max(d, 1))
            sign = -sign
        irs.append(gain * y)
    ir = np.mean(irs, axis=0)  # the official code averages the output channels
    ir.setflags(write=False)
    return ir


def reverb_impulse_response(n: int, sample_rate: int = AUDIO_RATE, reverberance: float = 50.0,
                            hf_damping: float = 50.0, room_scale: float = 100.0,
                            stereo_depth: float = 100.0, wet_gain_db: float = 0.0) -> np.ndarray:
    """First `n` samples of the (channel-averaged, wet-only) reverb impulse response.
    Knobs in sox's units (percent, dB); defaults are sox's."""
    return _reverb_ir_cached(int(n), int(sample_rate), float(reverberance), float(hf_damping),
                             float(room_scale), float(stereo_depth), float(wet_gain_db))


def reverb(audio: np.ndarray, rng: np.random.Generator, p: float = 0.2,
           sample_rate: int = AUDIO_RATE, reverberance: float = 50.0, hf_damping: float = 50.0,
           room_scale: float = 100.0, stereo_depth: float = 100.0,
           wet_gain_db: float = 0.0) -> np.ndarray:
    """Official `AudioRandomReverb` (sox `reverb -w`, channel mean) on `[S, N]`, each
    segment with probability `p`; wet signal only, length kept (the tail past the
    segment end is dropped). See the module table for the approximation."""
    from scipy.signal import fftconvolve

    audio = _audio_2d(audio)
    mask = _segment_mask(rng, audio.shape[0], p, "reverb p")
    out = audio.copy()
    if mask.any():
        n = audio.shape[1]
        ir = reverb_impulse_response(n, sample_rate, reverberance, hf_damping, room_scale,
                                     stereo_depth, wet_gain_db)
        wet = fftconvolve(audio[mask].astype(np.float64), ir[None, :], axes=-1)[:, :n]
        out[mask] = wet.astype(audio.dtype)
    return out


def volume(audio: np.ndarray, rng: np.random.Generator, p: float = 0.2,
           gain: float = 2.0) -> np.ndarray:
    """Official `AudioRandomVolume(gain=2.0, gain_type='amplitude')`: `clamp(g x, -1, 1)`
    per segment with probability `p` (torchaudio `Vol` always clamps)."""
    audio = _audio_2d(audio)
    mask = _segment_mask(rng, audio.shape[0], p, "volume p")
    out = audio.copy()
    out[mask] = np.clip(audio[mask] * np.asarray(gain, audio.dtype), -1.0, 1.0)
    return out


def pitch_shift(audio: np.ndarray, rng: np.random.Generator, p: float = 0.2, cents: float = 1000.0,
                sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """Official `AudioRandomPitchShift(shift=1000)` (sox `pitch 1000`, `rate 16000`) with
    `librosa.effects.pitch_shift` (phase vocoder + soxr), length kept, per segment with
    probability `p`."""
    audio = _audio_2d(audio)
    mask = _segment_mask(rng, audio.shape[0], p, "pitch p")
    out = audio.copy()
    if mask.any():
        import librosa  # heavy import (numba); only when a segment is actually shifted

        n = audio.shape[1]
        for k in np.flatnonzero(mask):
            y = librosa.effects.pitch_shift(audio[k].astype(np.float32), sr=sample_rate,
                                            n_steps=cents / 100.0, bins_per_octave=12)
            out[k] = librosa.util.fix_length(y, size=n).astype(audio.dtype)
    return out


def lowpass_biquad_coefficients(cutoff_hz: float = 100.0, sample_rate: int = AUDIO_RATE,
                                q: float = 0.707) -> Tuple[np.ndarray, np.ndarray]:
    """RBJ Audio-EQ-Cookbook lowpass `(b, a)`, normalised so that `a[0] == 1`."""
    w0 = 2.0 * math.pi * cutoff_hz / sample_rate
    alpha = math.sin(w0) / (2.0 * q)
    cos_w0 = math.cos(w0)
    b = np.array([(1.0 - cos_w0) / 2.0, 1.0 - cos_w0, (1.0 - cos_w0) / 2.0])
    a = np.array([1.0 + alpha, -2.0 * cos_w0, 1.0 - alpha])
    return b / a[0], a / a[0]


def lowpass(audio: np.ndarray, rng: np.random.Generator, p: float = 0.2, cutoff_hz: float = 100.0,
            q: float = 0.707, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """Official `AudioRandomLowpassFilter(cutoff_freq=100, Q=0.707)`: torchaudio
    `lowpass_biquad` (zero initial state, output clamped to [-1, 1] as torchaudio's
    `lfilter` does by default), per segment with probability `p`."""
    from scipy.signal import lfilter

    audio = _audio_2d(audio)
    mask = _segment_mask(rng, audio.shape[0], p, "lowpass p")
    out = audio.copy()
    if mask.any():
        b, a = lowpass_biquad_coefficients(cutoff_hz, sample_rate, q)
        y = lfilter(b, a, audio[mask].astype(np.float64), axis=-1)
        out[mask] = np.clip(y, -1.0, 1.0).astype(audio.dtype)
    return out


def gauss_noise(audio: np.ndarray, rng: np.random.Generator, p: float = 0.2,
                amplitude: float = 0.01) -> np.ndarray:
    """Official `AudioRandomGaussNoise(amplitude=0.01)`: `x + a * N(0, 1)` (no clamp),
    per segment with probability `p`."""
    audio = _audio_2d(audio)
    mask = _segment_mask(rng, audio.shape[0], p, "noise p")
    out = audio.copy()
    if mask.any():
        noise = rng.standard_normal((int(mask.sum()), audio.shape[1]), dtype=np.float32)
        out[mask] = audio[mask] + np.asarray(amplitude, audio.dtype) * noise.astype(audio.dtype)
    return out


# ------------------------------------------------------------------------------ composed


@dataclasses.dataclass(frozen=True)
class Stage1AugmentConfig:
    """Stage-I train augmentations; defaults = `configs/segment_avclip.yaml`.

    `spatial_crop`: run `spatial_crop_sometimes_upscale` inside `stage1_augment` (give it
    uncropped segments); set False when the caller already cropped to `crop_size` (then
    `sometimes_upscale_p` is not used there).
    """
    spatial_crop: bool = True
    crop_size: int = 224
    smaller_crop_size: int = 192
    sometimes_upscale_p: float = 0.2
    p_color_jitter: float = 0.2
    p_gray_scale: float = 0.2
    color_strength: float = 1.0
    hflip_p: float = 0.5
    sample_rate: int = AUDIO_RATE
    reverb_p: float = 0.2
    volume_p: float = 0.2
    volume_gain: float = 2.0
    pitch_p: float = 0.2
    pitch_cents: float = 1000.0
    lowpass_p: float = 0.2
    lowpass_cutoff_hz: float = 100.0
    lowpass_q: float = 0.707
    noise_p: float = 0.2
    noise_amplitude: float = 0.01

    def __post_init__(self):
        for name in ("sometimes_upscale_p", "p_color_jitter", "p_gray_scale", "hflip_p",
                     "reverb_p", "volume_p", "pitch_p", "lowpass_p", "noise_p"):
            _check_p(getattr(self, name), name)

    @classmethod
    def disabled(cls, **overrides) -> "Stage1AugmentConfig":
        """The LRS3 stage-I recipe: `sometimes_upscale_p=0, p_color_jitter=0,
        p_gray_scale=0, p_audio_aug=0` (the flip stays at 0.5)."""
        zeros = dict(sometimes_upscale_p=0.0, p_color_jitter=0.0, p_gray_scale=0.0,
                     reverb_p=0.0, volume_p=0.0, pitch_p=0.0, lowpass_p=0.0, noise_p=0.0)
        zeros.update(overrides)
        return cls(**zeros)

    @classmethod
    def with_audio_p(cls, p_audio_aug: float, **overrides) -> "Stage1AugmentConfig":
        """The official single `p_audio_aug` knob applied to all five audio ops."""
        ps = {k: p_audio_aug for k in ("reverb_p", "volume_p", "pitch_p", "lowpass_p", "noise_p")}
        ps.update(overrides)
        return cls(**ps)


def stage1_augment(video_segments: np.ndarray, audio_segments: np.ndarray,
                   rng: np.random.Generator,
                   config: Optional[Stage1AugmentConfig] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The stage-I train augmentations in the official order: (spatial crop) -> colour
    distortion -> flip -> [video normalisation happens elsewhere] -> reverb -> volume ->
    pitch -> lowpass -> noise. uint8 `[S, T, H, W, 3]` and float32 `[S, N]` in, uint8
    `[S, T, 224, 224, 3]` and float32 `[S, N]` out."""
    cfg = config if config is not None else Stage1AugmentConfig()
    video = _video_5d(video_segments)
    audio = _audio_2d(audio_segments)
    if video.shape[0] != audio.shape[0]:
        raise ValueError(f"{video.shape[0]} video but {audio.shape[0]} audio segments")
    if cfg.spatial_crop:
        video = spatial_crop_sometimes_upscale(video, rng, cfg.sometimes_upscale_p,
                                               cfg.crop_size, cfg.smaller_crop_size)
    video = color_distortion(video, rng, cfg.p_color_jitter, cfg.p_gray_scale, cfg.color_strength)
    video = horizontal_flip_per_segment(video, rng, cfg.hflip_p)
    audio = reverb(audio, rng, cfg.reverb_p, cfg.sample_rate)
    audio = volume(audio, rng, cfg.volume_p, cfg.volume_gain)
    audio = pitch_shift(audio, rng, cfg.pitch_p, cfg.pitch_cents, cfg.sample_rate)
    audio = lowpass(audio, rng, cfg.lowpass_p, cfg.lowpass_cutoff_hz, cfg.lowpass_q,
                    cfg.sample_rate)
    audio = gauss_noise(audio, rng, cfg.noise_p, cfg.noise_amplitude)
    return video, audio
