"""The TFDS builder for your own clips (`tfds_clips`) and reading TFDS-wrapped records.

* A folder with broken files -> a TFDS ArrayRecord dataset: one example per usable clip,
  each the record `prepare` makes of that clip; the broken files skipped and listed in the
  dataset's `metadata.json` (read back through `tfds.builder_from_directory`).
* Records wrapped in `tf.Example`s (how TFDS stores them) give exactly the training and
  evaluation batches of the bare records, through the real grain pipelines.
* A TFDS dataset of other features is a per-record error that says so; the builder
  refuses to run without a `ClipsConfig`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from synchformer_jax import prepare as prep, records, synthetic, tfds_clips
from synchformer_jax.input import pipeline as pl
from synchformer_jax.input import shards
from tests import train_helpers as th
from tests.test_pipeline import _assert_batches_equal, _write_array_record
from tests.test_prepare import make_folder, read_split

SPEC = pl.ExampleSpec(stage="sync", train=False, crop_size=32, n_segments=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    videos = make_folder(root / "videos", n=3, seconds=1.0)  # + an empty and a text file
    builder = tfds_clips.SynchformerClips(data_dir=str(root / "tfds"), config=tfds_clips.ClipsConfig(
        name="mine", splits={"train": [str(videos)], "test": [str(videos / "sub")]}, num_workers=0))
    builder.download_and_prepare()
    return root, videos, builder


def test_builder_writes_the_records_prepare_writes(built, tmp_path):
    root, videos, builder = built
    assert builder.data_dir.endswith("synchformer_clips/mine/1.0.0")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "test": 1}
    train_paths = shards.list_shards(builder.data_dir, "train")  # TFDS names its shards as we do
    assert [p.name for p in train_paths] == ["synchformer_clips-train.array_record-00000-of-00001"]
    got = {r.clip_id: r for r in (records.decode(b) for b in shards.iter_records(train_paths))}

    prep.prepare([videos], tmp_path / "prepared", split="train", num_workers=0, progress=False)
    want = {r.clip_id: r for r in read_split(tmp_path / "prepared", "train")}
    assert sorted(got) == sorted(want) == ["clip00", "clip02", "sub/clip01"]
    for clip_id, rec in want.items():
        np.testing.assert_array_equal(got[clip_id].audio, rec.audio)
        assert dataclasses.replace(got[clip_id], audio=None) == dataclasses.replace(rec, audio=None), clip_id

    test_ids = [records.decode(b).clip_id for b in shards.iter_records(shards.list_shards(builder.data_dir, "test"))]
    assert test_ids == ["clip01"]  # ids are relative to the split's own input folder


def test_broken_files_are_skipped_and_listed_in_the_metadata(built):
    _, _, builder = built
    for info in (builder.info, tfds.builder_from_directory(builder.data_dir).info):
        skipped = info.metadata["skipped"]
        assert [(s["split"], s["source"]) for s in skipped] == [("train", "text.mp4"), ("train", "zero.mp4")]
        assert "empty file" in skipped[1]["reason"] and skipped[0]["reason"]


def test_builder_output_goes_through_the_eval_pipeline(built):
    _, _, builder = built
    paths = [str(p) for p in shards.list_shards(builder.data_dir, "train")]
    # 1-s clips: one 0.64-s segment and room for offsets up to 0.1 s.
    spec = dataclasses.replace(SPEC, n_segments=1, crop_len_sec=0.64, max_off_sec=0.1)
    batches = list(pl.eval_dataset(paths, spec, batch_size=2, read_threads=1))
    ids = [i for b in batches for i in b["meta"]["clip_id"][b["mask"]].tolist()]
    assert sorted(ids) == ["clip00", "clip02", "sub/clip01"]
    assert not any(b["meta"].get("skipped") for b in batches)


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    """Synthetic shards, and the same records in the same order wrapped as TFDS writes them."""
    root = tmp_path_factory.mktemp("wrapped")
    made = synthetic.make_dataset(root / "bare", 6, 5, seed=3, **th.CLIP_KW)
    features = tfds_clips.features()
    out = {"bare": made}
    out["tfds"] = {}
    for split, paths in made.items():
        bare = list(shards.iter_records(paths))
        as_tfds = [features.serialize_example({"clip_id": records.decode(b).clip_id, "record": b}) for b in bare]
        assert all(w != b for w, b in zip(as_tfds, bare))
        out["tfds"][split] = [_write_array_record(root / f"synchformer_clips-{split}.array_record-00000-of-00001",
                                                  as_tfds)]
    return out


def test_wrapped_records_give_the_same_train_batches(wrapped):
    kw = dict(batch_size=2, seed=11, read_threads=1)
    train_spec = dataclasses.replace(SPEC, train=True)
    bare = iter(pl.train_dataset(wrapped["bare"]["train"], train_spec, **kw))
    as_tfds = iter(pl.train_dataset(wrapped["tfds"]["train"], train_spec, **kw))
    _assert_batches_equal([next(as_tfds) for _ in range(4)], [next(bare) for _ in range(4)])  # over an epoch


def test_wrapped_records_give_the_same_eval_batches(wrapped):
    kw = dict(batch_size=2, seed=5, rounds=2, read_threads=1)
    _assert_batches_equal(list(pl.eval_dataset(wrapped["tfds"]["eval"], SPEC, **kw)),
                          list(pl.eval_dataset(wrapped["bare"]["eval"], SPEC, **kw)))


def test_a_tf_example_of_other_features_is_a_clear_error():
    other = tfds.features.FeaturesDict({"video": tfds.features.Text(), "label": tfds.features.Text()})
    with pytest.raises(records.RecordError, match=r"without a 'record' feature \(it has: label, video\)"):
        records.decode(other.serialize_example({"video": "v", "label": "x"}))
    with pytest.raises(records.RecordError, match="not a synchformer-jax record"):
        records.decode(b"\x0a\xff\xff\xff")  # looks like a tf.Example, is not one


def test_the_builder_needs_a_clips_config(tmp_path):
    with pytest.raises(ValueError, match="needs config=ClipsConfig"):
        tfds_clips.SynchformerClips(data_dir=str(tmp_path))
    empty = tfds_clips.SynchformerClips(data_dir=str(tmp_path), config=tfds_clips.ClipsConfig(name="empty"))
    with pytest.raises(ValueError, match="no splits"):
        empty.download_and_prepare()
