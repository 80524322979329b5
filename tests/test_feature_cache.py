"""The stage-II feature cache (`synchformer_jax.feature_cache`).

* The grid comes from the transforms code (phase 2 for 14 segments) and the official
  int() truncations move the audio by 0 or -1 sample, never more.
* For several windows on the grid, the logits of `compare` on gathered cache entries
  equal the full model's logits on the raw window that the official-path code builds
  (`pipeline.process_record` with a fixed offset, then `assemble_on_device`), within
  1e-5 in float32; a window one entry off (video or audio) does not.
* Broken records are skipped and listed in the manifest.
* The training iterator restores exactly from `get_state()`, and splits across hosts.
* `train.train_and_evaluate` with `data.feature_cache` trains and evaluates (raw eval).
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from synchformer_jax import experiment, feature_cache as fc, pretrained, records, synthetic, train
from synchformer_jax.input import pipeline as pl
from synchformer_jax.input import shards as shard_lib
from synchformer_jax.input import transforms
from synchformer_jax.input.sources import Broken
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import tiny_config
from tests import train_helpers as th

SMALL = {"video.img_size": 32, "video.embed_dim": 32, "video.num_heads": 2, "video.depth": 1,
         "audio.hidden_size": 32, "audio.num_heads": 2, "audio.mlp_dim": 64, "audio.num_layers": 1,
         "sync.n_embd": 32, "sync.n_head": 2, "sync.n_layer": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcache")
    made = synthetic.make_dataset(root / "clips", 3, 2, seed=7, num_shards=1, **th.CLIP_KW)
    # The train shard plus one broken record: the build must skip and list it.
    payloads = list(shard_lib.iter_records(made["train"]))
    broken = root / shard_lib.shard_name("withbroken", "train", "array_record", 0, 1)
    shard_lib.write_shard(broken, payloads[:1] + [b"not a record"] + payloads[1:])
    return {"root": root, "train": [str(broken)], "eval": made["eval"], "payloads": payloads,
            "shards": {"train": made["train"][0], "eval": ",".join(made["eval"])}}


def _lively(params, seed: int = 1):
    """Every matrix redrawn as N(0, 1/fan_in): at the default init the tiny extractors
    give nearly the same features for every segment (the video ones to ~1e-9), which
    would let a wrong segment grid pass the comparison."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, path in zip(keys, sorted(flat)):
        x = flat[path]
        if x.ndim >= 2:
            flat[path] = jax.random.normal(key, x.shape, x.dtype) / np.sqrt(np.prod(x.shape[:-1]))
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def model14(data):
    """14 segments (the official grid phase), tiny widths, float32; cache in float32."""
    config = experiment.model_config_for_stage(experiment.STAGE_SYNC, tiny_config(n_segments=14, **SMALL))
    config = config.replace(dtype="float32")
    params = _lively(sf.init_params(config, jax.random.key(0)))
    model_dir = pretrained.save_model(data["root"] / "model14", params, config)
    out = data["root"] / "cache14"
    # From the model folder (as a user would); features in float32 for the 1e-5 check.
    manifest = fc.build_feature_cache(model_dir, data["train"], out, batch_size=16, dtype=np.float32)
    return config, params, out, manifest


def test_grid_is_derived_from_the_transforms():
    g = fc.grid_for(14)
    assert (g.v0, g.phase, g.step_frames, g.samples_per_frame) == (2, 2, 8, 640)
    assert g.offset_frames == tuple(range(-50, 51, 5))
    # 10-s clip: 30 video entries, 233 audio entries (phase 1280 samples).
    assert (g.num_video_entries(250), g.num_audio_entries(160000)) == (30, 233)
    g2 = fc.grid_for(2)  # other segment counts: other centred start, same phase
    assert (g2.v0, g2.phase) == (50, 2)
    dev = fc.official_deviation(g)
    assert (dev["audio_random_min"], dev["audio_random_max"]) == (-1, 0)
    assert (dev["video_fixed_min"], dev["video_fixed_max"]) == (-1, 0)


def _exact_windows(grid, v_len, a_len, count):
    """Valid windows where the official fixed-offset formula lands exactly on the grid."""
    values = transforms.class_grid().tolist()
    ok = grid.valid_pairs(v_len, a_len)
    out = []
    for g, j in np.argwhere(ok):
        vs = int(g) * grid.step_frames
        sec, off = vs / 25, round(values[j], 2)
        if transforms.sec2frames(sec, 25) != vs:
            continue
        if transforms.sec2frames(sec + off, 16000) != 640 * (vs + grid.offset_frames[j]):
            continue
        out.append((int(g), int(j)))
    # Spread over the clip: first, last and some in between, all classes' extremes.
    pick = np.linspace(0, len(out) - 1, count).round().astype(int)
    return [out[i] for i in pick]


def test_cached_logits_equal_raw_window_logits(data, model14):
    config, params, out, manifest = model14
    assert manifest["num_clips"] == 3 and len(manifest["skipped"]) == 1
    cache = fc.FeatureCache(out)
    model = sf.build_model(config)
    spec = pl.ExampleSpec(stage="sync", train=False, crop_size=32, n_segments=14)
    values = transforms.class_grid().tolist()
    compare = jax.jit(lambda v, a: model.apply({"params": params}, v, a, method="compare"))
    full = jax.jit(lambda v, a: model.apply({"params": params}, v, a))
    for clip in (0, 2):
        rec = records.decode(data["payloads"][clip])
        assert str(cache.index["clip_id"][clip]) == rec.clip_id
        wins = _exact_windows(cache.grid, int(cache.index["v_len"][clip]), int(cache.index["a_len"][clip]), 4)
        examples = []
        for g, j in wins:
            fixed = {rec.clip_id: (round(values[j], 2), g * 8 / 25)}
            ex = pl.process_record(data["payloads"][clip], None, spec, fixed=fixed)
            assert not isinstance(ex, Broken), ex
            assert int(ex["offset_target"]) == j
            examples.append(ex)
        batch = {k: v for k, v in pl.collate(examples).items() if k != "meta"}
        video, audio = pl.assemble_on_device(batch, spec.layout, half=True)
        raw = np.asarray(full(video, audio))
        v, a = zip(*(cache.window(clip, g, j) for g, j in wins))
        cached = np.asarray(compare(np.stack(v), np.stack(a)))
        assert np.abs(raw[1:] - raw[:1]).max() > 1e-2  # the windows' logits differ
        np.testing.assert_allclose(cached, raw, atol=1e-5, rtol=0)
        # One entry off (a phase error) must show: video by one step, audio by one frame.
        e = cache[clip]
        for dv, da in ((1, 0), (0, 1)):
            vs, as_ = [], []
            for g, j in wins:
                vi, ai = cache.grid.window_entries(g, j)
                vi = np.minimum(vi + dv, e["vfeat"].shape[0] - 1)
                ai = np.minimum(ai + da, e["afeat"].shape[0] - 1)
                vs.append(e["vfeat"][vi])
                as_.append(e["afeat"][ai])
            off = np.asarray(compare(np.stack(vs), np.stack(as_)))
            assert np.abs(off - raw).max() > 1e-4


def test_iterator_restores_and_splits(model14):
    _, _, out, _ = model14
    it = fc.CacheTrainIterator(out, batch_size=4, seed=3)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state == {"step": 3}
    after = [next(it) for _ in range(2)]
    again = fc.CacheTrainIterator(out, batch_size=4, seed=3)
    again.set_state(json.loads(json.dumps(state)))
    for x, y in zip(after, [next(again) for _ in range(2)]):
        assert set(x) == {"vfeat", "afeat", "offset_target"}
        assert x["vfeat"].shape == (4, 14, 8, 32) and x["afeat"].shape == (4, 14, 6, 32)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # Two hosts of 2 rows = one host of 4 rows.
    hosts = [fc.CacheTrainIterator(out, batch_size=2, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for h in hosts:
        h.set_state({"step": 3})
    parts = [next(h) for h in hosts]
    for k in after[0]:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), after[0][k])
    # Every drawn triple is a valid window; draws cover several clips and classes.
    tri = np.concatenate([it.draw(s) for s in range(50)])
    idx = it.cache.index
    for c, g, j in tri:
        assert it.cache.grid.valid_pairs(int(idx["v_len"][c]), int(idx["a_len"][c]))[g, j]
    assert len(set(tri[:, 0])) == 3 and len(set(tri[:, 2])) > 10


def test_train_and_evaluate_with_feature_cache(data, model14, tmp_path):
    """Stage II from the cache, its extractors initialised from the model the cache was
    built from (`init_from`), evaluated on the raw clips."""
    config14, params, cache_dir, manifest = model14
    config = th.small_config(experiment.STAGE_SYNC, data["shards"])
    config.model = config14.to_dict()
    config.init_from = str(data["root"] / "model14")
    config.train.num_steps = 3
    config.train.checkpoint_every = 1000
    config.data.feature_cache = str(cache_dir)
    assert manifest["extractor_params_sha256"] == fc.extractor_params_sha256(params)
    it = train.train_iterator(config, train.tasks.get_task(config.stage, experiment.model_config(config)), [])
    assert isinstance(it, fc.CacheTrainIterator) and next(it)["vfeat"].shape == (8, 14, 8, 32)
    # In a process of its own with one device (about 3x less CPU than the session's 8).
    workdir = tmp_path / "run"
    th.run_driver(th.write_config(config, tmp_path / "cached.json"), workdir, local_devices=1)
    final = json.loads((workdir / "eval_metrics.json").read_text())
    assert final["step"] == 3 and "accuracy_1" in final
    recs = th.read_metrics(workdir)
    assert sorted(recs) == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in recs.values())
