"""Loading a parity set in the format of `shared/reference/tiny` (see its README).

A set folder holds `model.safetensors`, `config.json` and one `<case>.npz` per case; the
decoded frames live in the sibling folder `../decoded/`.
"""
from __future__ import annotations

import io
import json
import lzma
import pathlib
from typing import Any

import numpy as np
import pytest


def case_files(ref: pathlib.Path) -> list[pathlib.Path]:
    files = sorted(p for p in ref.glob("*__*.npz"))
    if not files:
        pytest.fail(f"reference set {ref} has no case files (*__*.npz)")
    return files


def require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.fail(f"reference set is incomplete: {path} is missing")
    return path


def head_overrides(ref: pathlib.Path) -> dict[str, Any]:
    """Attention-head counts (not stored in a state dict) from the set's config.json."""
    cfg_path = ref / "config.json"
    if not cfg_path.exists():
        return {}
    changed = json.loads(cfg_path.read_text()).get("changed_sizes", {})
    out: dict[str, Any] = {}
    for module, sizes in changed.items():
        if module.startswith("afeat_extractor (AST"):
            heads = sizes.get("num_attention_heads", {}).get("here")
            if heads:
                out["audio.num_heads"] = heads
        elif module.startswith("vfeat_extractor (MotionFormer"):
            heads = sizes.get("NUM_HEADS", {}).get("here")
            if heads:
                out["video.num_heads"] = heads
        elif module.startswith("transformer (") and "n_head" in sizes:
            out["sync.n_head"] = sizes["n_head"]["here"]
    return out


_FRAMES: dict[str, np.ndarray] = {}


def decoded_frames(ref: pathlib.Path, video_id: str) -> np.ndarray:
    """The stored centre-cropped uint8 frames `[N, 224, 224, 3]` of one video."""
    if video_id not in _FRAMES:
        path = require(ref.parent / "decoded" / f"{video_id}.frames_u8.npy.xz")
        _FRAMES[video_id] = np.load(io.BytesIO(lzma.decompress(path.read_bytes())))
    return _FRAMES[video_id]


def video_input(ref: pathlib.Path, case: Any, lut: np.ndarray) -> np.ndarray:
    """Rebuild the official float video input `[1, S, 16, 3, 224, 224]` of a case."""
    frames = decoded_frames(ref, str(case["video_id"]))
    seg = frames[case["segment_frame_indices"] - int(case["frames_store_first_index"])]
    return lut[seg].transpose(0, 1, 4, 2, 3)[None]


def constants(ref: pathlib.Path) -> Any:
    return np.load(require(ref.parent / "constants.npz"))
