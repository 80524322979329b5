"""uint8 RGB -> model input values, bit-exact with the official transforms.

Stages II/III (and inference) use `RGBToHalfToZeroOne` + `RGBNormalize(0.5, 0.5)`:
`uint8 -> float16`, `/ 255` in float16, `(x - 0.5) / 0.5` in float16, then the model
casts to float32. Doing the same in float32 changes 254 of the 256 values by up to
4.9e-4, so the float16 rounding is reproduced. Each float16 step is "compute in float32,
round to float16" (what PyTorch's CPU half kernels do, and what NumPy's float16 does).
Stage I validation (`segment_avclip.yaml`) uses `RGBToFloatToZeroOne`, i.e. float32.

Only 256 inputs exist, so the mapping is a 256-entry table built once on the host with
NumPy and gathered on the device. A gather is exact on every backend, whereas float16
arithmetic under XLA is not the PyTorch arithmetic: the same three float16 steps in
`jax.numpy` on CPU give 6 of the 256 values one float16 ulp off (up to 9.8e-4), and XLA
may also keep excess precision inside fusions on accelerators.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["model_input_lut", "video_uint8_to_model_input", "video_uint8_to_model_input_np"]


@functools.lru_cache(maxsize=None)
def model_input_lut(half: bool = True) -> np.ndarray:
    """`[256] float32`: the official value of every uint8 level.

    `half=True`: `RGBToHalfToZeroOne` + `RGBNormalize` in float16 (stages II/III).
    `half=False`: `RGBToFloatToZeroOne` + `RGBNormalize` in float32 (stage I eval).
    """
    levels = np.arange(256, dtype=np.uint8)
    dtype = np.float16 if half else np.float32
    x = levels.astype(dtype) / dtype(255.0)
    x = (x - dtype(0.5)) / dtype(0.5)
    lut = x.astype(np.float32)
    lut.setflags(write=False)
    return lut


def video_uint8_to_model_input_np(video: np.ndarray, half: bool = True) -> np.ndarray:
    """NumPy twin of `video_uint8_to_model_input`: any-shape uint8 -> float32."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise TypeError(f"expected uint8 frames, got {video.dtype}")
    return model_input_lut(half)[video]


def video_uint8_to_model_input(video, half: bool = True, dtype=jnp.float32):
    """uint8 frames (any shape, e.g. `[B, S, T, H, W, 3]`) -> official model input values.

    jit-able (`half` and `dtype` static). Values are in [-1, 1]; `dtype` other than
    float32 (e.g. bfloat16 compute) rounds the exact float32 values once. The layout is
    left alone: the official model wants `[B, S, T, 3, H, W]`, channel-last models take
    the frames as they are.
    """
    video = jnp.asarray(video)
    if video.dtype != jnp.uint8:
        raise TypeError(f"expected uint8 frames, got {video.dtype}")
    lut = jnp.asarray(model_input_lut(half))
    out = jnp.take(lut, video.astype(jnp.int32), axis=0, mode="clip")
    return out.astype(dtype)
