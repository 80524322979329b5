"""Run an exported Synchformer (`synchformer-jax export`) with jax, numpy and safetensors only.

No Flax and no model code are imported: the folder's `inference.jax_exported` holds the
whole computation (StableHLO), `params.safetensors` the weights, `contract.json` the
shapes. This file can be copied next to a deployment on its own.

    from synchformer_jax.serving_loader import load
    served = load("exported/")
    logits = served(video, audio)          # numpy [n, C]; any number n of clips
    served.contract["classes"]["offset_sec"][logits.argmax(-1)[0]]

Inputs are checked against the contract (shapes except the batch, dtypes) with an
error naming the input, the expected and the given shape. A call with `n` clips runs the
fixed-batch function ceil(n / B) times, padding the last call.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np

__all__ = ["ServedModel", "load"]

_FORMAT = "synchformer-jax/serving/1"
# jax device platform -> the names `jax.export` lowers for.
_PLATFORM_ALIASES = {"gpu": ("cuda", "rocm"), "cuda": ("cuda",), "rocm": ("rocm",), "cpu": ("cpu",), "tpu": ("tpu",)}


class ServedModel:
    """A loaded export: `__call__(video, audio) -> logits` (numpy float32 `[n, C]`)."""

    def __init__(self, folder: str | os.PathLike, device: Optional[Any] = None):
        from jax import export as jax_export
        from safetensors.numpy import load_file

        self.folder = pathlib.Path(folder)
        contract_path = self.folder / "contract.json"
        if not contract_path.is_file():
            raise FileNotFoundError(f"{self.folder}: not an exported model (no contract.json)")
        self.contract = json.loads(contract_path.read_text())
        if self.contract.get("format") != _FORMAT:
            raise ValueError(f"{contract_path}: format {self.contract.get('format')!r}, this loader reads {_FORMAT!r}")
        self.exported = jax_export.deserialize(bytearray((self.folder / self.contract["function"]).read_bytes()))
        self.device = device if device is not None else jax.devices()[0]
        names = _PLATFORM_ALIASES.get(self.device.platform, (self.device.platform,))
        if not any(n in self.exported.platforms for n in names):
            raise ValueError(f"{self.folder}: exported for {list(self.exported.platforms)}, not for this "
                             f"{self.device.platform} device (re-export with --platforms)")
        params = load_file(str(self.folder / self.contract["params"]))
        self.params = jax.device_put(params, self.device)
        self.batch = int(self.contract["batch"])
        self.specs = self.contract["inputs"]
        self._call = jax.jit(self.exported.call)

    @property
    def classes(self) -> dict[str, Any]:
        return self.contract["classes"]

    def _check(self, name: str, x: Any) -> np.ndarray:
        spec = self.specs[name]
        want_shape, want_dtype = tuple(spec["shape"][1:]), np.dtype(spec["dtype"])
        x = np.asarray(x)
        if x.ndim != len(want_shape) + 1 or tuple(x.shape[1:]) != want_shape:
            raise ValueError(f"{name}: expected shape [n, {', '.join(map(str, want_shape))}] ({spec['layout']}, "
                             f"{spec['dtype']}), got {list(x.shape)}")
        if want_dtype == np.uint8:
            if x.dtype != np.uint8:
                raise ValueError(f"{name}: expected uint8 ({spec['values']}), got {x.dtype}")
        elif not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name}: expected floating point {spec['dtype']} ({spec['values']}), got {x.dtype}")
        return x.astype(want_dtype, copy=False)

    def __call__(self, video: Any, audio: Any) -> np.ndarray:
        video, audio = self._check("video", video), self._check("audio", audio)
        n = video.shape[0]
        if audio.shape[0] != n:
            raise ValueError(f"video has {n} clips, audio {audio.shape[0]}")
        if n == 0:
            return np.zeros((0, self.contract["outputs"]["logits"]["shape"][-1]), np.float32)
        out = []
        for start in range(0, n, self.batch):
            v, a = video[start:start + self.batch], audio[start:start + self.batch]
            k = v.shape[0]
            if k < self.batch:  # pad the last call with copies of its first clip
                v = np.concatenate([v, np.repeat(v[:1], self.batch - k, axis=0)])
                a = np.concatenate([a, np.repeat(a[:1], self.batch - k, axis=0)])
            logits = self._call(self.params, jax.device_put(v, self.device), jax.device_put(a, self.device))
            out.append(np.asarray(logits)[:k])
        return np.concatenate(out)


def load(folder: str | os.PathLike, device: Optional[Any] = None) -> ServedModel:
    """Load an export folder (see module doc); `device` defaults to the first jax device."""
    return ServedModel(folder, device)
