"""Shard specs -> files (`input.shard_sets`): a glob or a directory names whole shard sets,
checked against their numbering and prepare's manifest.json, and an ArrayRecord shard
that cannot be opened is skipped and reported instead of stopping the run."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from synchformer_jax import prepare as prep, records
from synchformer_jax.input import shard_sets, shards, sources
from tests.test_prepare import make_video


def _record(i: int) -> bytes:
    # Random (incompressible) bytes: zstd stores them as they are, so a test can find
    # and damage one record inside a shard.
    video = np.random.default_rng(i).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return records.encode(records.ClipRecord(clip_id=f"clip{i}", video_mp4=video, audio=np.zeros(8, np.float32)))


def _write_set(directory, name, split, num, fmt="array_record", per_shard=2, only=None):
    paths = []
    for i in range(num):
        path = directory / shards.shard_name(name, split, fmt, i, num)
        if only is None or i in only:
            shards.write_shard(path, [_record(per_shard * i + k) for k in range(per_shard)], fmt)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real `prepare` output: 3 clips, one per shard, with its manifest.json."""
    videos = tmp_path_factory.mktemp("videos")
    for i in range(3):
        make_video(videos / f"clip{i}.mp4", seconds=1.0, seed=i)
    out = tmp_path_factory.mktemp("records")
    prep.prepare([videos], out, split="train", shard_size=1, num_workers=0, progress=False)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_glob_over_a_set_with_a_missing_shard_is_refused(tmp_path):
    _write_set(tmp_path, "d", "train", 4, only={0, 2, 3})
    with pytest.raises(shards.ShardError, match=r"d-train\.array_record .* lacks 1 of its 4 shards \(00001 of 00004\)"):
        sources.expand_paths(str(tmp_path / "d-train*"))
    with pytest.raises(shards.ShardError, match="lacks"):
        sources.ArrayRecordSource(str(tmp_path / "d-train.array_record-*"))
    # Files named one by one are a choice, not a set: taken as given.
    one = str(tmp_path / shards.shard_name("d", "train", "array_record", 2, 4))
    assert sources.expand_paths([one]) == [one]
    assert len(sources.ArrayRecordSource([one])) == 2


def test_a_shard_still_being_written_is_neither_read_nor_complete(tmp_path):
    """prepare publishes shards one by one; its temporary files are not shards."""
    _write_set(tmp_path, "d", "train", 2, only={0})
    (tmp_path / (shards.shard_name("d", "train", "array_record", 1, 2) + shards.TMP_MARK + "abc")).write_bytes(b"x")
    with pytest.raises(shards.ShardError, match=r"lacks 1 of its 2 shards \(00001 of 00002\)"):
        sources.expand_paths(str(tmp_path / "d-train*"))


def test_a_missing_shard_of_a_prepared_set_names_the_shard(prepared, tmp_path):
    out = _copy(prepared, tmp_path / "records")
    files = sorted(f for f in os.listdir(out) if shards.parse_shard_name(f))
    assert len(files) == 3
    assert len(sources.expand_paths(str(out / "clips-train*"))) == 3
    os.remove(out / files[1])
    with pytest.raises(shards.ShardError, match=r"clips-train\.array_record .* \(00001 of 00003\)"):
        sources.expand_paths(str(out))


def test_the_manifest_lists_shards_the_numbering_cannot_know_of(prepared, tmp_path):
    """A complete-looking 2-shard set where the manifest lists 3 (a set half replaced by
    a run with another shard size): the manifest wins, naming what is missing."""
    out = _copy(prepared, tmp_path / "records")
    for f in os.listdir(out):
        if shards.parse_shard_name(f):
            os.remove(out / f)
    _write_set(out, "clips", "train", 2)
    with pytest.raises(shards.ShardError, match=r"manifest\.json lists 3 shard\(s\) of split 'train', but 3 are "
                                                r"missing: clips-train\.array_record-00000-of-00003"):
        sources.expand_paths(str(out / "clips-train*"))


def test_a_shard_of_another_size_than_listed_is_warned_about(prepared, tmp_path, caplog):
    out = _copy(prepared, tmp_path / "records")
    first = out / shards.shard_name("clips", "train", "array_record", 0, 3)
    with open(first, "ab") as f:
        f.write(b"\0" * 16)
    with caplog.at_level(logging.WARNING):
        assert len(sources.expand_paths(str(out / "clips-train*"))) == 3
    assert first.name in caplog.text and "differs in size" in caplog.text


def test_a_directory_means_one_shard_set(tmp_path):
    train = _write_set(tmp_path, "d", "train", 2)
    _write_set(tmp_path, "d", "eval", 1)
    (tmp_path / "done.json").write_text("{}")
    with pytest.raises(shards.ShardError, match=r"several shard sets \(d-eval\.array_record \(1 shards\), "
                                                r"d-train\.array_record \(2 shards\)\).*glob"):
        sources.expand_paths(str(tmp_path))
    with pytest.raises(shards.ShardError, match="several shard sets"):
        sources.ArrayRecordSource(str(tmp_path))
    os.remove(tmp_path / shards.shard_name("d", "eval", "array_record", 0, 1))
    # The manifest and other non-shard files in it are not read as shards.
    (tmp_path / shard_sets.MANIFEST).write_text("{}")
    assert sources.expand_paths(str(tmp_path)) == train
    assert len(sources.ArrayRecordSource(str(tmp_path))) == 4


def test_a_glob_over_two_formats_is_refused(tmp_path):
    _write_set(tmp_path, "d", "train", 2)
    _write_set(tmp_path, "d", "train", 1, fmt="tfrecord")
    with pytest.raises(shards.ShardError, match=r"2 formats \(array_record, tfrecord\)"):
        sources.expand_paths(str(tmp_path / "d-train*"))
    with pytest.raises(ValueError, match=r"d-train\.tfrecord-00000-of-00001 is a tfrecord shard, not ArrayRecord"):
        sources.ArrayRecordSource([str(tmp_path / "d-train.tfrecord-00000-of-00001")])


def test_two_shard_counts_of_one_set_are_refused(tmp_path):
    _write_set(tmp_path, "d", "train", 2)
    _write_set(tmp_path, "d", "train", 3)
    with pytest.raises(shards.ShardError, match="two shard counts"):
        sources.expand_paths(str(tmp_path / "d-train*"))


def test_a_truncated_shard_is_skipped_and_reported_with_its_clip_count(prepared, tmp_path, caplog):
    out = _copy(prepared, tmp_path / "records")
    bad = out / shards.shard_name("clips", "train", "array_record", 1, 3)
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.6)])
    with caplog.at_level(logging.WARNING):
        src = sources.ArrayRecordSource(str(out / "clips-train*"))
    assert len(src) == 3  # two good records and one slot for the damaged shard
    assert isinstance(src[0], bytes) and isinstance(src[2], bytes)
    broken = src[1]
    assert isinstance(broken, sources.Broken) and broken.where == str(bad)
    assert "truncated or damaged" in broken.error and "its 1 clip(s) (per manifest.json)" in broken.error
    assert bad.name in caplog.text and "skipped" in caplog.text
    # The parallel read gives the same records and slots, in the order asked, repeats included.
    order = [2, 0, 1, 2, 0]
    many = src.get_many(order)
    assert many[0] == src[2] and many[1] == src[0] and many[3] == src[2] and many[4] == src[0]
    assert isinstance(many[2], sources.Broken) and many[2].where == str(bad)
    with pytest.raises(IndexError):
        src.get_many([0, 3])


def test_tfrecord_bytes_under_an_array_record_name_are_named_as_such(tmp_path):
    good, = _write_set(tmp_path, "d", "train", 1)
    wrong = tmp_path / "other.array_record"
    shards.write_shard(wrong, [_record(7)], "tfrecord")
    src = sources.ArrayRecordSource([good, str(wrong)])
    assert len(src) == 3
    assert isinstance(src[2], sources.Broken) and "holds TFRecord records, not ArrayRecord" in src[2].error
    assert "count unknown" in src[2].error
    with pytest.raises(shards.ShardError, match=r"none of the 1 ArrayRecord shard\(s\) can be read"):
        sources.ArrayRecordSource([str(wrong)])


def test_a_broken_record_is_named_by_its_shard_and_position(tmp_path):
    """Index -> shard by cumulative counts: the name of a failing record in the last of
    several shards (it used to open every shard to find it)."""
    paths = _write_set(tmp_path, "d", "train", 3, per_shard=3)
    raw = bytearray(open(paths[2], "rb").read())
    pos = raw.find(records.decode(_record(7)).video_mp4)  # record 1 of shard 2 (group_size 1: its own chunk)
    assert pos > 0
    raw[pos + 100] ^= 0xFF
    open(paths[2], "wb").write(bytes(raw))
    src = sources.ArrayRecordSource(str(tmp_path / "d-train*"))
    got = src[7]
    assert isinstance(got, sources.Broken) and got.where == f"{paths[2]}#1", got
    assert src[6] == _record(6) and src[8] == _record(8)


def test_train_refuses_a_partial_set_at_start_up_in_one_line(tmp_path, capsys):
    """`synchformer-jax train` over a glob whose set lacks a shard: exit status 2 and one
    line naming the set and the missing shard, before any step runs."""
    from synchformer_jax import cli

    _write_set(tmp_path, "d", "train", 3, only={0, 1})
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    rc = cli.main(["train", "--config", f"{config}:sync", "--workdir", str(tmp_path / "run"),
                   f"--config.data.train_shards={tmp_path}/d-train.array_record-*", "--config.train.num_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and "d-train.array_record" in err[-1] and "(00002 of 00003)" in err[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()
