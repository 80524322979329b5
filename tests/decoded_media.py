"""The reference videos decoded once per test session with `synchformer_jax.media`.

A reference set folder (`<root>/tiny`) has the sibling folders `<root>/videos` (the mp4
files) and `<root>/decoded` (what the official decoder returned for each video).
"""
from __future__ import annotations

import functools
import hashlib
import pathlib

import numpy as np

from synchformer_jax.media import DecodedMedia, decode_media
from tests import reference_data as rd


def decoded_reference_files(ref: pathlib.Path) -> list[pathlib.Path]:
    files = sorted((ref.parent / "decoded").glob("*.npz"))
    if not files:
        import pytest
        pytest.fail(f"reference set is incomplete: no {ref.parent / 'decoded'}/*.npz")
    return files


def video_path(ref: pathlib.Path, video_id: str) -> pathlib.Path:
    """The mp4 of a video id (`lrs3_C8zY0oAdQrs_00018` is stored as `00018.mp4`)."""
    with np.load(rd.require(ref.parent / "decoded" / f"{video_id}.npz")) as d:
        name = str(d["video_file"])
    return rd.require(ref.parent / "videos" / name)


@functools.lru_cache(maxsize=None)
def _decode(path: str) -> DecodedMedia:
    return decode_media(path)


def decode_reference_video(ref: pathlib.Path, video_id: str) -> DecodedMedia:
    return _decode(str(video_path(ref, video_id)))


def frame_sha256(frames: np.ndarray) -> list[str]:
    """sha256 of every frame's HWC uint8 C-order bytes (the reference's checksum)."""
    return [hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest() for f in frames]
