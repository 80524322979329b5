"""Building the stage-II feature cache (`synchformer_jax.feature_cache_build`, `synchformer-jax cache`).

* Parts (`part=(i, n)`) share one build in one folder: every part but the last returns
  None and leaves no manifest (a training run refuses the folder in one line); the
  last writes the manifest, and the cache equals a single-process build record for
  record, the decode-ahead threads included.
* A rerun builds only what is missing or stale: nothing after a complete build, one
  shard whose sidecar was lost (an interrupted build), one whose source changed, one
  whose output was cut short (which training refuses in one line until then).
* A folder holding shards of other extractors is refused unless `overwrite`, which
  rebuilds them; a rebuild removes the old manifest first.
* The CLI builds the cache of a stage-II config (its init_from extractors, its compute
  dtype) that `train` then accepts, and refuses other stages and bad `--part` in one line.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

from synchformer_jax import cli, experiment, feature_cache as fc, feature_cache_build as fcb, records, synthetic
from synchformer_jax.input import shards as shard_lib
from synchformer_jax.input.sources import ArrayRecordSource
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import tiny_config

SMALL = {"video.img_size": 32, "video.embed_dim": 32, "video.num_heads": 2, "video.depth": 1,
         "audio.hidden_size": 32, "audio.num_heads": 2, "audio.mlp_dim": 64, "audio.num_layers": 1,
         "sync.n_embd": 32, "sync.n_head": 2, "sync.n_layer": 1}


@pytest.fixture(scope="module")
def model():
    config = experiment.model_config_for_stage(experiment.STAGE_SYNC, tiny_config(n_segments=14, **SMALL))
    config = config.replace(dtype="float32")
    return sf.init_params(config, jax.random.key(0)), config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three source shards of 6-s clips (1, 2 and 1 clips); the second also holds a broken record."""
    root = tmp_path_factory.mktemp("fcb")
    recs = [records.encode(synthetic.make_record(40 + i, f"clip{i}", height=32, width=32, duration_sec=6.0))
            for i in range(4)]
    groups = [recs[:1], [recs[1], b"not a record", recs[2]], recs[3:]]
    paths = []
    for si, payloads in enumerate(groups):
        path = root / shard_lib.shard_name("src", "train", "array_record", si, len(groups))
        shard_lib.write_shard(path, payloads)
        paths.append(str(path))
    return root, paths


def _entries(out) -> list:
    cache = fc.FeatureCache(out, memory_clips=0)
    return [bytes(cache._src[i]) for i in range(len(cache._src))]


def _same_manifest(a: dict, b: dict) -> None:
    drop = ("build_seconds",)
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.fixture(scope="module")
def single(model, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "cache"
    manifest = fcb.build_feature_cache(model, sources[1], out, batch_size=16, dtype=np.float32, decode_threads=0)
    return out, manifest


def test_parts_make_the_single_build(model, sources, single, tmp_path, caplog):
    out1, whole = single
    assert whole["num_clips"] == 4 and len(whole["skipped"]) == 1 and "#1 clip '?'" in whole["skipped"][0]
    out = tmp_path / "parts"
    with caplog.at_level(logging.INFO, logger=fcb.__name__):
        first = fcb.build_feature_cache(model, sources[1], out, batch_size=16, dtype=np.float32, part=(1, 2))
    assert first is None and not (out / fc.MANIFEST).exists()
    assert "2 of 3 shards still to build" in caplog.text
    # A training run refuses the half-built folder in one line that says what to do.
    with pytest.raises(fc.CacheMismatchError, match=r"1 shards built, no manifest.json: .*synchformer-jax cache"):
        fc.FeatureCache(out)
    last = fcb.build_feature_cache(model, sources[1], out, batch_size=16, dtype=np.float32, part=(0, 2))
    assert last is not None and json.loads((out / fc.MANIFEST).read_text()) == last
    _same_manifest(last, whole)
    assert _entries(out) == _entries(out1)
    a, b = fc.FeatureCache(out), fc.FeatureCache(out1)
    for k in a.index:
        np.testing.assert_array_equal(a.index[k], b.index[k])


def test_a_rerun_builds_only_what_is_missing_or_stale(model, sources, tmp_path, caplog):
    root, paths = sources
    src = [str(tmp_path / os.path.basename(p)) for p in paths]  # copies this test may rewrite
    for p, q in zip(paths, src):
        with open(p, "rb") as f, open(q, "wb") as g:
            g.write(f.read())
    out = tmp_path / "cache"
    kw = dict(batch_size=16, dtype=np.float32)
    fcb.build_feature_cache(model, src, out, **kw)
    names = sorted(p.name for p in out.glob("features-*") if not p.name.endswith(".json"))
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}

    def rebuilt(caplog_text: str) -> list:
        return [n for n in names if f"{n} done" in caplog_text]

    with caplog.at_level(logging.INFO, logger=fcb.__name__):
        caplog.clear()
        again = fcb.build_feature_cache(model, src, out, **kw)
        assert rebuilt(caplog.text) == [] and "0 of its 3 shards to build" in caplog.text
        assert {n: os.stat(out / n).st_mtime_ns for n in names} == stamps and again["num_clips"] == 4
        # An interrupted build: the second shard was written but its sidecar was not.
        (out / (names[1] + fcb.SIDECAR_SUFFIX)).unlink()
        caplog.clear()
        fcb.build_feature_cache(model, src, out, **kw)
        assert rebuilt(caplog.text) == [names[1]]
        # A source rewritten with other clips: only its shard is built again.
        shard_lib.write_shard(src[2], [records.encode(synthetic.make_record(77, "new", height=32, width=32,
                                                                             duration_sec=6.0))])
        caplog.clear()
        manifest = fcb.build_feature_cache(model, src, out, **kw)
        assert rebuilt(caplog.text) == [names[2]]
    assert list(fc.FeatureCache(out).index["clip_id"]) == ["clip0", "clip1", "clip2", "new"]
    assert manifest["source_shard_files"][2]["sha256"] == shard_lib.sha256_file(src[2])
    # An output shard cut short (a full disk, a bad copy) is built again; until then
    # training refuses the cache in one line naming the shard and what to do.
    data = (out / names[0]).read_bytes()
    (out / names[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(fc.CacheMismatchError, match=rf"shard {names[0]} cannot be opened, its build wrote 9 "
                                                    r"\(damaged or replaced\): run synchformer-jax cache again"):
        fc.FeatureCache(out)
    with caplog.at_level(logging.INFO, logger=fcb.__name__):
        caplog.clear()
        fcb.build_feature_cache(model, src, out, **kw)
        assert rebuilt(caplog.text) == [names[0]]
    assert len(fc.FeatureCache(out).entries([0, 1, 2, 3])) == 4
    # A shard replaced by one of other records (here: the next shard's).
    (out / names[0]).write_bytes((out / names[1]).read_bytes())
    with pytest.raises(fc.CacheMismatchError, match=rf"shard {names[0]} holds 18 records, its build wrote 9"):
        fc.FeatureCache(out)


def test_other_extractors_are_refused_unless_overwrite(model, sources, single, tmp_path):
    params, config = model
    out = tmp_path / "cache"
    fcb.build_feature_cache(model, sources[1][:1], out, batch_size=16, dtype=np.float32)
    other = jax.tree.map(lambda x: x + 0.01, params)
    with pytest.raises(fc.CacheMismatchError, match=r"features-train.array_record-00000-of-00001 was built with "
                                                    r"other settings \(extractor_params_sha256: .*overwrite"):
        fcb.build_feature_cache((other, config), sources[1][:1], out, batch_size=16, dtype=np.float32)
    assert (out / fc.MANIFEST).exists()  # refused before touching anything
    with pytest.raises(fc.CacheMismatchError, match=r"dtype: 'float32' \(building 'float16'\)"):
        fcb.build_feature_cache(model, sources[1][:1], out, batch_size=16)
    made = fcb.build_feature_cache((other, config), sources[1][:1], out, batch_size=16, dtype=np.float32,
                                   overwrite=True)
    assert made["extractor_params_sha256"] == fc.extractor_params_sha256(other)
    assert made["extractor_params_sha256"] != fc.extractor_params_sha256(params)


def test_bfloat16_storage_is_refused(model, sources, tmp_path):
    """An entry names its dtype by `dtype.str`, which is '<V2' for bfloat16: unreadable."""
    import ml_dtypes

    with pytest.raises(ValueError, match="storage dtype must be float16 or float32, got bfloat16"):
        fcb.build_feature_cache(model, sources[1][:1], tmp_path / "c", dtype=ml_dtypes.bfloat16)
    assert not (tmp_path / "c").exists()


def test_parse_part():
    assert fcb.parse_part("0/1") == (0, 1) and fcb.parse_part("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="expected i/n"):
            fcb.parse_part(bad)


def test_cli_builds_a_cache_that_train_accepts(tmp_path, capsys):
    """The tiny stage-II config on its synthetic set: `cache`, then `train` from the cache."""
    run, out = tmp_path / "run", tmp_path / "cache"
    common = ["--config", "configs/tiny.py:sync", f"--config.data.synthetic_dir={tmp_path / 'synthetic'}"]
    assert cli.main(["cache", *common, "--out", str(out), "--part", "0/1", "--batch-size", "32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["num_clips"] == 16 and summary["skipped"] == 0
    manifest = json.loads((out / fc.MANIFEST).read_text())
    assert manifest["dtype"] == "float16" and fc.built_compute_dtype(manifest) == "float32"
    source = ArrayRecordSource(manifest["source_shards"])
    assert len(source) == 16
    rc = cli.main(["train", *common, "--workdir", str(run), f"--config.data.feature_cache={out}",
                   "--config.train.num_steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--config", "configs/tiny.py:segment_avclip", "--out", "x"], "is a 'segment_avclip' config; the feature cache"),
    (["--config", "configs/tiny.py:sync", "--out", "x", "--part", "2/2"], "--part: part '2/2': expected i/n"),
    (["--config", "configs/tiny.py:sync"], "pass --out DIR or set --config.data.feature_cache=DIR"),
])
def test_cli_refuses_in_one_line(args, says, capsys):
    assert cli.main(["cache", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
