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
* The manifest records its source shards (size, mtime, sha256); a cache built by other
  extractors or from other clips than the run's is refused at training start, a moved
  copy of the sources is not, and `accept_other_shards` accepts only the shard difference.
* A cache of another segment layout, class grid, feature width or compute dtype than the
  model's is refused in one line (`CacheMismatchError`) naming both and the fix; a
  manifest without the compute dtype is read with a warning.
* The index stores each clip's anchor (its only event's time); the window curriculum
  draws only windows centred near it, keeps a centred share of later batches, resumes
  and splits exactly, and leaves the plain draw unchanged.
* The plain draw is the official sampling on the cache grid: clips equally whatever their
  length, then classes equally among those that fit, then fitting starts equally; clips
  without a window are not drawn and are reported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from synchformer_jax import experiment, feature_cache as fc, feature_cache_build as fcb, pretrained, records, synthetic, train
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
    manifest = fcb.build_feature_cache(model_dir, data["train"], out, batch_size=16, dtype=np.float32)
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


ARRAYS = ("vfeat", "afeat", "offset_target")


def _assert_same_batch(x: dict, y: dict) -> None:
    assert set(x) == set(y) and x["meta"] == y["meta"]
    for k in ARRAYS:
        np.testing.assert_array_equal(x[k], y[k])


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
        assert set(x) == {"vfeat", "afeat", "offset_target", "meta"} and x["meta"] == {"skipped": []}
        assert x["vfeat"].shape == (4, 14, 8, 32) and x["afeat"].shape == (4, 14, 6, 32)
        _assert_same_batch(x, y)
    # Two hosts of 2 rows = one host of 4 rows.
    hosts = [fc.CacheTrainIterator(out, batch_size=2, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for h in hosts:
        h.set_state({"step": 3})
    parts = [next(h) for h in hosts]
    for k in ARRAYS:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), after[0][k])
    # Batches made ahead on threads are the plain iterator's, in order, across a restore.
    threaded = fc.CacheTrainIterator(out, batch_size=4, seed=3, workers=2, memory_clips=1)
    first = [next(threaded) for _ in range(3)]
    assert threaded.get_state() == state and len(threaded._ahead) == 1  # step 3 is being made
    threaded.set_state({"step": 1})
    rest = [next(threaded) for _ in range(4)]
    threaded.close()
    plain = fc.CacheTrainIterator(out, batch_size=4, seed=3)
    want = [next(plain) for _ in range(3)]
    for x, y in zip(first + rest, want + want[1:] + after):
        _assert_same_batch(x, y)
    # Every drawn triple is a valid window; draws cover several clips and classes.
    tri = np.concatenate([it.draw(s) for s in range(50)])
    idx = it.cache.index
    for c, g, j in tri:
        assert it.cache.grid.valid_pairs(int(idx["v_len"][c]), int(idx["a_len"][c]))[g, j]
    assert len(set(tri[:, 0])) == 3 and len(set(tri[:, 2])) > 10


def test_rows_read_only_their_records_and_equal_the_whole_entries(model14):
    _, _, out, _ = model14
    cache = fc.FeatureCache(out, memory_clips=0)
    assert cache.records_per_clip == 9 and len(cache._src) == 9 * len(cache)
    requested = []
    read = cache._read
    cache._read = lambda n: requested.append(n) or read(n)
    triples = fc.CacheTrainIterator(cache, batch_size=24, seed=4).draw(0)
    vfeat, afeat = cache.windows(triples)
    # Each row reads its clip's video record and the one audio-phase record of its window.
    phase = [(int(c) * 9, int(c) * 9 + 1 + int(cache.grid.window_entries(int(g), int(j))[1][0]) % 8)
             for c, g, j in triples]
    assert requested == [n for row in phase for n in row]
    assert len({a % 9 for _, a in phase}) > 2
    whole = cache.entries(triples[:, 0])
    for r, (c, g, j) in enumerate(triples):
        vi, ai = cache.grid.window_entries(int(g), int(j))
        e = whole[int(c)]
        assert e["afeat"].shape[0] == cache.index["na"][c] and e["vfeat"].shape[0] == cache.index["nv"][c]
        np.testing.assert_array_equal(vfeat[r], e["vfeat"][vi])
        np.testing.assert_array_equal(afeat[r], e["afeat"][ai])
    # The audio phases interleave back into consecutive entries: neighbours differ.
    assert np.abs(np.diff(whole[int(triples[0, 0])]["afeat"].astype(np.float64), axis=0)).min(axis=(1, 2)).min() > 0


def test_damaged_or_mismatched_caches_are_refused_in_one_line(model14, tmp_path):
    _, _, out, manifest = model14
    # A record damaged inside a shard that still opens: its clip's first read says which and what to do.
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3:len(data) // 3 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    cache = fc.FeatureCache(bad, memory_clips=0)
    read = [c for c in range(len(cache)) if not _raises(cache.entries, [c])]
    assert len(read) < len(cache)
    with pytest.raises(fc.CacheMismatchError, match=r"clip \d \(.*features-train.*\) cannot be read: .*Rebuild its"):
        cache.entries(range(len(cache)))
    # In training a row whose record cannot be read is skipped, reported and stood in for:
    # the same batches with records found broken early or late, on threads or not.
    plain = fc.CacheTrainIterator(bad, batch_size=16, seed=0, memory_clips=0)
    batches = [next(plain) for _ in range(20)]
    skipped = [m for b in batches for m in b["meta"]["skipped"]]
    assert skipped and all(re.search(r"clip \d \(.*features-train.*\) cannot be read: .*stand-in", m) for m in skipped)
    assert len(plain.cache.broken) >= 1
    threaded = fc.CacheTrainIterator(bad, batch_size=16, seed=0, workers=2, memory_clips=0)
    threaded.set_state({"step": 7})
    for x, y in zip([next(threaded) for _ in range(13)], batches[7:]):
        _assert_same_batch(x, y)
    threaded.close()
    # Stood-in rows are the only ones that differ from the draw.
    intact = fc.CacheTrainIterator(out, batch_size=16, seed=0, memory_clips=0)
    changed = sum(int((intact.draw(i)[:, 2] != b["offset_target"]).sum()) for i, b in enumerate(batches))
    assert 0 < changed <= len(skipped)
    # Shards and an index of different builds.
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    with np.load(mixed / fc.INDEX) as z:
        index = {k: z[k] for k in z.files}
    index["clip_id"] = index["clip_id"][::-1]
    np.savez(mixed / fc.INDEX, **index)
    with pytest.raises(fc.CacheMismatchError, match=r"record 0 holds part 0 of clip .*the index expects part 0 of"):
        fc.FeatureCache(mixed).entries([0])
    # A cache of the earlier one-record-per-clip format.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    m = json.loads((old / fc.MANIFEST).read_text())
    m["format_version"] = 1
    (old / fc.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(fc.CacheMismatchError, match=r"record format 1, this synchformer-jax reads format 2 .*--overwrite"):
        fc.FeatureCache(old)


def _raises(fn, *args) -> bool:
    try:
        fn(*args)
    except fc.CacheMismatchError:
        return True
    return False


def test_train_and_evaluate_with_feature_cache(data, model14, tmp_path):
    """Stage II from the cache, its extractors initialised from the model the cache was
    built from (`init_from`), evaluated on the raw clips."""
    config14, params, cache_dir, manifest = model14
    # The training shards are the cache's sources (checked at start: verify_for_training).
    config = th.small_config(experiment.STAGE_SYNC, dict(data["shards"], train=data["train"][0]))
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


def test_manifest_records_the_source_shards(data, model14):
    manifest = model14[3]
    (rec,) = manifest["source_shard_files"]
    path = data["train"][0]
    assert rec["path"] == os.path.abspath(path) and rec["size"] == os.path.getsize(path)
    assert rec["sha256"] == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_verify_for_training(data, model14, tmp_path, caplog):
    _, params, cache_dir, _ = model14
    source = data["train"][0]
    fc.verify_for_training(cache_dir, params, [source])  # the run that built it: silent
    # A copy elsewhere (another path and mtime) holds the same clips: hashed and accepted.
    copy = tmp_path / "copy" / pathlib.Path(source).name
    copy.parent.mkdir()
    shutil.copyfile(source, copy)
    fc.verify_for_training(cache_dir, params, [str(copy)])
    # Other extractors (here: random, as with no init_from) are refused, whatever the shards.
    other = _lively(params, seed=2)
    with pytest.raises(fc.CacheMismatchError, match=r"cache14 does not fit.*sha256 [0-9a-f]{12}\.\.\., this run's "
                                                    r"extractors \(from init_from stage1\) have [0-9a-f]{12}"):
        fc.verify_for_training(cache_dir, other, [source], extractors_from="stage1", accept_other_shards=True)
    # Other clips: the clean shard (the cache's source also holds a broken record) ...
    clean = data["shards"]["train"]
    with pytest.raises(fc.CacheMismatchError, match=r"configured shards not among its sources: .*"
                                                    r"sources not configured: .*withbroken.*data.train_shards"):
        fc.verify_for_training(cache_dir, params, [clean])
    # ... or the source itself, rewritten since the build (same size, so it is hashed).
    blob = bytearray(copy.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shutil.copytree(cache_dir, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / fc.MANIFEST).read_text())
    manifest["source_shard_files"][0]["path"] = str(copy)  # as if built from the copy
    (tmp_path / "cache" / fc.MANIFEST).write_text(json.dumps(manifest))
    fc.verify_for_training(tmp_path / "cache", params, [str(copy)])
    copy.write_bytes(bytes(blob))
    with pytest.raises(fc.CacheMismatchError, match=r"changed since the cache was built: .*copy"):
        fc.verify_for_training(tmp_path / "cache", params, [str(copy)])
    # The switch accepts other shards (with a warning), never other extractors.
    with caplog.at_level(logging.WARNING, logger="synchformer_jax.feature_cache"):
        fc.verify_for_training(cache_dir, params, [clean], accept_other_shards=True)
    assert "accepted (data.feature_cache_accept_other_shards)" in caplog.text


def test_trainer_refuses_a_cache_of_other_extractors(data, model14, tmp_path):
    """The audit's case: stage II from a cache while the run's own frozen extractors are
    others (no init_from: random) stops before the first step, naming the cause."""
    config14, _, cache_dir, _ = model14
    config = th.small_config(experiment.STAGE_SYNC, dict(data["shards"], train=data["train"][0]))
    config.model = config14.to_dict()
    config.data.feature_cache = str(cache_dir)
    with pytest.raises(fc.CacheMismatchError, match=r"randomly initialised: no init_from"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "eval_metrics.json").exists()


@pytest.mark.parametrize("change, built, run", [
    ({"n_segments": 12}, "model.n_segments=14", "model.n_segments=12"),
    ({"sync.num_offset_classes": 11}, "model.sync.num_offset_classes=21", "model.sync.num_offset_classes=11"),
    ({"sync.max_offset_sec": 1.0}, "model.sync.max_offset_sec=2.0", "model.sync.max_offset_sec=1.0"),
    ({"video.embed_dim": 64}, "model.video.embed_dim=32", "model.video.embed_dim=64"),
])
def test_a_cache_for_another_layout_is_refused_in_one_line(model14, change, built, run):
    """The audit's case (C4): another segment layout or class count is a `CacheMismatchError`
    (one line, exit 2 from the CLI) naming the cache, both settings and the fix, not a
    ValueError with the grids' reprs."""
    config14, _, cache_dir, _ = model14
    fc.train_iterator(cache_dir, config14, batch_size=4, seed=0)  # the model it was built for
    with pytest.raises(fc.CacheMismatchError) as e:
        fc.train_iterator(cache_dir, config14.replace(**change), batch_size=4, seed=0)
    message = str(e.value)
    assert message.startswith(f"feature cache {cache_dir} does not fit this run: it was built for {built}, "
                              f"this run has {run}. Rebuild the cache"), message
    assert f"set --config.{built}" in message and "\n" not in message and "CacheGrid" not in message


def test_a_cache_computed_in_another_dtype_is_refused(data, model14, tmp_path, caplog):
    """The cache records the extractors' compute dtype (its `model_config.dtype`); a run
    computing in another (`train.compute_dtype`) would train the head on features that
    evaluation and the saved model never compute. A manifest without it: a warning."""
    config14, _, cache_dir, manifest = model14
    assert fc.built_compute_dtype(manifest) == "float32" == config14.dtype
    with pytest.raises(fc.CacheMismatchError, match=r"cache14 does not fit this run: its features were computed in "
                                                    r"float32, this run computes in bfloat16 \(train.compute_dtype\)"
                                                    r".*Rebuild the cache .*--config\.train\.compute_dtype=float32"):
        fc.train_iterator(cache_dir, config14.replace(dtype="bfloat16"), batch_size=4, seed=0)
    # Through the trainer's iterator, with the run's train.compute_dtype.
    config = th.small_config(experiment.STAGE_SYNC, dict(data["shards"], train=data["train"][0]))
    config.model = config14.to_dict()
    config.data.feature_cache = str(cache_dir)
    config.train.compute_dtype = "bfloat16"
    with pytest.raises(fc.CacheMismatchError, match="computed in float32, this run computes in bfloat16"):
        train.train_iterator(config, train.tasks.get_task(config.stage, experiment.model_config(config)), [])
    # A manifest that does not say: read as before, with a warning.
    legacy = tmp_path / "nodtype"
    shutil.copytree(cache_dir, legacy)
    old = {k: v for k, v in manifest.items() if k != "model_config"}
    (legacy / fc.MANIFEST).write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="synchformer_jax.feature_cache"):
        it = fc.train_iterator(legacy, config14.replace(dtype="bfloat16"), batch_size=4, seed=0)
    assert next(it)["vfeat"].shape == (4, 14, 8, 32)
    assert "predates recording its compute dtype" in caplog.text


def test_cli_refuses_another_layout_with_one_line(data, model14, tmp_path, capsys):
    """`synchformer-jax train` on a cache of another layout: `error: ...` and exit 2."""
    config14, _, cache_dir, _ = model14
    config = th.small_config(experiment.STAGE_SYNC, dict(data["shards"], train=data["train"][0]))
    config.model = config14.to_dict()
    config.init_from = str(data["root"] / "model14")
    config.data.feature_cache = str(cache_dir)
    as_json = th.write_config(config, tmp_path / "config.json")
    spec = tmp_path / "config.py"
    spec.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict(json.loads(open({str(as_json)!r}).read()))\n")
    from synchformer_jax import cli

    rc = cli.main(["train", "--config", str(spec), "--workdir", str(tmp_path / "run"),
                   "--config.model.n_segments=12"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: feature cache {cache_dir} does not fit this run: it was built for "
                          "model.n_segments=14, this run has model.n_segments=12"), err


@pytest.mark.parametrize("stage", [experiment.STAGE_AVCLIP, experiment.STAGE_SYNCHRONIZABILITY])
def test_a_cache_outside_stage_two_is_refused(data, model14, stage):
    """Stage I trains the extractors a cache freezes; stage III's examples are not in it.
    The setting was silently ignored there (the run trained on raw clips)."""
    from synchformer_jax import cli, tasks

    _, _, cache_dir, _ = model14
    config = th.small_config(stage, dict(data["shards"], train=data["train"][0]))
    config.data.feature_cache = str(cache_dir)
    task = tasks.get_task(stage, experiment.model_config(config))
    with pytest.raises(cli.ConfigError, match=f"serves stage-II .* training only; this run is stage '{stage}'"):
        train.train_iterator(config, task, data["train"])


PULSE_ANCHORS = (3.48, 3.60)  # 0.04 s and 0.16 s from the nearest window centre (see _centre)


@pytest.fixture(scope="module")
def pulse_cache(data, model14):
    """A cache of three 8-s clips: 'a' and 'b' with one pulse each (anchored), 'c' with
    sparse events (no anchor), built by the module's builder with model14's extractors."""
    config, params, _, _ = model14
    kw = dict(height=32, width=32, duration_sec=8.0)
    recs = [synthetic.make_record(11 + i, clip, cue="pulse", onset_sec=(t, t), **kw)
            for i, (clip, t) in enumerate(zip("ab", PULSE_ANCHORS))]
    recs.append(synthetic.make_record(13, "c", **kw))
    shard = data["root"] / shard_lib.shard_name("pulse", "train", "array_record", 0, 1)
    shard_lib.write_shard(shard, [records.encode(r) for r in recs])
    out = data["root"] / "cache_pulse"
    fcb.build_feature_cache((params, config), [str(shard)], out, batch_size=64)
    return out


def _centre(g):
    """Video window centre in s, from the official layout itself: the crop starts at frame
    8 g and its 14 segments of 16 frames every 8 frames sit centred in the 125 frames,
    covering frames [2, 122) of it."""
    return (8 * np.asarray(g) + (2 + 122) / 2) / 25


def _distance(it, triples):
    anchor = it.cache.index["anchor_sec"][triples[:, 0]]
    return np.abs(_centre(triples[:, 1]) - anchor)


def test_cache_stores_anchors_and_old_caches_load(pulse_cache, tmp_path):
    cache = fc.FeatureCache(pulse_cache)
    anchors = cache.index["anchor_sec"]
    assert anchors.dtype == np.float64 and list(cache.index["clip_id"]) == ["a", "b", "c"]
    np.testing.assert_allclose(anchors[:2], PULSE_ANCHORS, atol=1e-9)
    assert np.isnan(anchors[2])  # several events: no anchor
    with np.load(pulse_cache / fc.INDEX) as z:
        assert "anchor_sec" in z.files
        old = {k: z[k] for k in z.files if k != "anchor_sec"}
    # A cache written before the anchors: loads, draws as before, has no anchor to centre on.
    legacy = tmp_path / "legacy"
    shutil.copytree(pulse_cache, legacy)
    np.savez(legacy / fc.INDEX, **old)
    loaded = fc.FeatureCache(legacy)
    assert np.isnan(loaded.index["anchor_sec"]).all() and len(loaded.index["anchor_sec"]) == 3
    np.testing.assert_array_equal(fc.CacheTrainIterator(legacy, batch_size=4, seed=2).draw(0),
                                  fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=2).draw(0))
    with pytest.raises(ValueError, match=r"legacy.*0\.5 s.*0 of 3 clips have one"):
        fc.CacheTrainIterator(legacy, batch_size=4, seed=2, window_curriculum=[(5, 0.5)])


def test_plain_draw_is_the_curriculum_free_draw(pulse_cache):
    plain = fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=5)
    empty = fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=5, window_curriculum=(), keep_centred=0.0)
    assert [plain.draw(s).tolist() for s in range(3)] == [empty.draw(s).tolist() for s in range(3)]
    assert plain.phase_at(0) is None and empty.phase_at(0) is None


# No window; only classes -0.2 .. +0.4 s fit on the 8-frame start grid; all 21 fit (twice).
MIXED_SEC = (4.9, 5.4, 8.0, 10.0)


@pytest.fixture(scope="module")
def mixed_cache(data, model14):
    """Clips of four lengths (MIXED_SEC), built with model14's extractors."""
    config, params, _, _ = model14
    recs = [synthetic.make_record(20 + i, f"len{i}", height=32, width=32, duration_sec=sec)
            for i, sec in enumerate(MIXED_SEC)]
    shard = data["root"] / shard_lib.shard_name("mixed", "train", "array_record", 0, 1)
    shard_lib.write_shard(shard, [records.encode(r) for r in recs])
    out = data["root"] / "cache_mixed"
    fcb.build_feature_cache((params, config), [str(shard)], out, batch_size=64)
    return out


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_plain_draw_follows_the_official_sampling(mixed_cache, model14, caplog):
    """Official stage II: every clip once per epoch, then `random.choice` over the classes,
    then a uniform start in the range that fits the class. So clips are drawn equally
    whatever their length, classes equally although fewer starts fit +-2 s than 0 s, and
    given its class every fitting start equally. A draw uniform over all valid (clip,
    start, class) triples, as this iterator made before, fails each of the three."""
    with caplog.at_level(logging.WARNING, logger=fc.__name__):
        it = fc.train_iterator(mixed_cache, model14[0], batch_size=16, seed=9)
    assert "1 of 4 clips have no stage-II window" in caplog.text
    idx, grid = it.cache.index, it.cache.grid
    valid = [grid.valid_pairs(int(idx["v_len"][c]), int(idx["a_len"][c]), int(idx["nv"][c]), int(idx["na"][c]))
             for c in range(4)]
    assert [v.any(axis=0).sum() for v in valid] == [0, 4, 21, 21]
    # The triple-uniform draw would take the clips in proportion 0 : 5 : 136 : 265 ...
    assert [int(v.sum()) for v in valid] == [0, 5, 136, 265]
    assert it.cache.pair_counts().tolist() == [0, 5, 136, 265]  # per distinct length, spread back
    tri = np.concatenate([it.draw(s) for s in range(1000)])  # 16,000 rows
    n = len(tri)
    for c in range(4):  # ... here every clip with a window a third
        assert _within(np.sum(tri[:, 0] == c), n, 0 if c == 0 else 1 / 3), c
    for c in (1, 2, 3):
        rows = tri[tri[:, 0] == c]
        assert all(valid[c][g, j] for _, g, j in rows)
        classes = np.flatnonzero(valid[c].any(axis=0))
        for j in classes:  # classes equally (the triple draw: class 10 of clip 3 at 16/265 = 6.0 %)
            assert _within(np.sum(rows[:, 2] == j), len(rows), 1 / len(classes)), (c, j)
    rows = tri[(tri[:, 0] == 3) & (tri[:, 2] == 10)]  # offset 0 in the 10-s clip: 16 starts fit
    starts = np.flatnonzero(valid[3][:, 10])
    assert len(starts) == 16 and set(rows[:, 1]) == set(starts)
    for g in starts:
        assert _within(np.sum(rows[:, 1] == g), len(rows), 1 / 16, sigmas=4.5), g


def test_curriculum_rows_lie_near_the_anchor(pulse_cache):
    phases = [(3, 0.1), (3, 0.2), (3, 0.5)]
    it = fc.CacheTrainIterator(pulse_cache, batch_size=8, seed=1, window_curriculum=phases)
    assert [it.phase_at(s) for s in (0, 2, 3, 5, 6, 8, 9, 100)] == [0, 0, 1, 1, 2, 2, None, None]
    idx = it.cache.index
    clips = {}
    for step in range(9):
        tri = it.draw(step)
        jitter = phases[step // 3][1]
        assert np.all(_distance(it, tri) <= jitter + 1e-9), (step, tri)
        clips.setdefault(jitter, set()).update(tri[:, 0].tolist())
        for c, g, j in tri:
            assert it.cache.grid.valid_pairs(int(idx["v_len"][c]), int(idx["a_len"][c]))[g, j]
    # 0.1 s: only clip 'a' has a window centre that near; 0.2 s adds 'b'; never 'c'.
    assert clips[0.1] == {0} and clips[0.2] == {0, 1} and clips[0.5] == {0, 1}
    # Then every window of every clip.
    tail = np.concatenate([it.draw(s) for s in range(9, 29)])
    assert 2 in tail[:, 0] and np.mean(_distance(it, tail) <= 0.5) < 0.6  # (NaN for 'c': never near)
    assert len(set(tail[:, 2])) > 10


def test_keep_centred_share_and_host_split(pulse_cache):
    phases = [(2, 0.1), (2, 0.5)]
    it = fc.CacheTrainIterator(pulse_cache, batch_size=8, seed=4, window_curriculum=phases, keep_centred=0.5)
    for step in range(2, 12):  # the wider phase and the unrestricted tail keep half centred
        tri = it.draw(step)
        assert np.sum(_distance(it, tri) <= 0.1 + 1e-9) >= 4, (step, tri)
    plain = fc.CacheTrainIterator(pulse_cache, batch_size=8, seed=4)
    bare = fc.CacheTrainIterator(pulse_cache, batch_size=8, seed=4, window_curriculum=phases)
    tails = np.concatenate([bare.draw(s) for s in range(4, 24)])
    assert np.mean(_distance(bare, tails) <= 0.1 + 1e-9) < 0.3
    # Without keep_centred the tail is the plain draw, step for step.
    np.testing.assert_array_equal(tails, np.concatenate([plain.draw(s) for s in range(4, 24)]))
    # Two hosts of 4 rows = one host of 8, in every phase; each host keeps its share.
    hosts = [fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=4, process_index=p, process_count=2,
                                   window_curriculum=phases, keep_centred=0.5) for p in (0, 1)]
    for step in range(8):
        parts = [h.draw(step) for h in hosts]
        np.testing.assert_array_equal(np.concatenate(parts), it.draw(step))
        if step >= 2:
            assert all(np.sum(_distance(it, p) <= 0.1 + 1e-9) >= 2 for p in parts)


def test_curriculum_resumes_across_phase_boundaries(pulse_cache):
    kw = dict(batch_size=4, seed=3, window_curriculum=[(2, 0.1), (2, 0.2)], keep_centred=0.5)
    it = fc.CacheTrainIterator(pulse_cache, **kw)
    next(it)
    state = it.get_state()
    assert state == {"step": 1}
    after = [next(it) for _ in range(5)]  # steps 1..5: phase 0, phase 1, the tail
    again = fc.CacheTrainIterator(pulse_cache, **kw)
    again.set_state(json.loads(json.dumps(state)))
    for x, y in zip(after, [next(again) for _ in range(5)]):
        _assert_same_batch(x, y)
    assert again.get_state() == {"step": 6}
    first = after[0]["vfeat"]
    v, _ = it.cache.window(*it.draw(1)[0])
    np.testing.assert_array_equal(first[0], v)


def test_curriculum_errors(data, model14, pulse_cache):
    with pytest.raises(ValueError, match=r"cache_pulse.*jitter 0\.02 s.*2 of 3 clips have one"):
        fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=0, window_curriculum=[(5, 0.2), (5, 0.02)])
    with pytest.raises(ValueError, match="keep_centred needs a window_curriculum"):
        fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=0, keep_centred=0.5)
    with pytest.raises(ValueError, match="share in"):
        fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=0, window_curriculum=[(5, 0.2)], keep_centred=1.5)
    for bad in ([(0, 0.2)], [(2.5, 0.2)], [(5, -0.1)], [(5,)], [(5, float("nan"))]):
        with pytest.raises(ValueError, match="each phase is"):
            fc.CacheTrainIterator(pulse_cache, batch_size=4, seed=0, window_curriculum=bad)
    # The trainer: the config passes through with a cache and is refused without one.
    config14 = model14[0]
    config = th.small_config(experiment.STAGE_SYNC, data["shards"])
    config.model = config14.to_dict()
    config.data.window_curriculum.phases = ((2, 0.1), (3, 0.2))
    config.data.window_curriculum.keep_centred = 0.5
    task = train.tasks.get_task(config.stage, experiment.model_config(config))
    with pytest.raises(ValueError, match="data.window_curriculum needs .*data.feature_cache"):
        train.train_iterator(config, task, [])
    config.data.feature_cache = str(pulse_cache)
    it = train.train_iterator(config, task, [])
    assert it.phases == ((2, 0.1), (3, 0.2)) and it.keep_centred == 0.5
    assert np.all(_distance(it, it.draw(0)) <= 0.1 + 1e-9)


def test_a_clip_too_short_because_of_its_audio_says_so(data):
    """Both streams are cut to the shorter one; an 8-s video with 2 s of audio is too short
    for 14 segments because of its audio, which the reason must say."""
    rec = records.decode(data["payloads"][0])
    grid = fc.grid_for(14)
    fcb._clip_inputs(rec, grid, 32)  # the whole clip fits
    short = dataclasses.replace(rec, audio=rec.audio[:2 * 16000])
    with pytest.raises(ValueError, match=r"too short for 14 segments \(its 2.00 s of audio cut the 8.00-s video\)"):
        fcb._clip_inputs(short, grid, 32)
