"""A feature cache of full-size 10-s entries for the cache benchmarks (bench/feature_cache.py,
bench/cached_loop.py). No side effects on import: the benchmarks choose the jax platform."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from synchformer_jax import feature_cache
from synchformer_jax.input import shards as shard_lib


def write(root: pathlib.Path, n_clips: int, options: str) -> pathlib.Path:
    """A cache of `n_clips` full-size 10-s entries (D = 768, float16) in the current record
    format, its shard written with ArrayRecord `options`."""
    grid = feature_cache.grid_for(14)
    nv, na = grid.num_video_entries(250), grid.num_audio_entries(160000)
    rng = np.random.default_rng(0)
    v = rng.standard_normal((nv, 8, 768)).astype(np.float16)
    a = rng.standard_normal((na, 6, 768)).astype(np.float16)
    root.mkdir(parents=True)
    name = shard_lib.shard_name("features", "train", "array_record", 0, 1)
    with shard_lib.ShardWriter(root / name, "array_record", options) as w:
        for i in range(n_clips):
            for part in feature_cache.encode_clip(f"c{i}", v, a, 250, 160000, feature_cache.audio_phases(grid)):
                w.write(part)
        shard = w.close()
    np.savez(root / feature_cache.INDEX, clip_id=np.array([f"c{i}" for i in range(n_clips)]),
             anchor_sec=np.full(n_clips, np.nan), v_len=np.full(n_clips, 250), a_len=np.full(n_clips, 160000),
             nv=np.full(n_clips, nv), na=np.full(n_clips, na))
    (root / feature_cache.MANIFEST).write_text(json.dumps({"format_version": feature_cache.FORMAT_VERSION,
                                                           "grid": grid.to_dict(), "shards": [shard]}))
    return root
