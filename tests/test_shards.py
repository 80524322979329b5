"""Shard writers/readers (ArrayRecord, TFRecord without TensorFlow) and the list parsers."""
from __future__ import annotations

import os
import pathlib
import struct

import numpy as np
import pytest

from synchformer_jax import datasets, records
from synchformer_jax.input import shards

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _record(i: int) -> bytes:
    return records.encode(records.ClipRecord(
        clip_id=f"clip{i}", video_mp4=bytes([i % 256]) * (100 + 37 * i),
        audio=np.linspace(-1, 1, 50 + i, dtype=np.float32), duration_sec=i / 10, labels={"k": i}))


# --------------------------------------------------------------------------- CRC32C

def _crc32c_bitwise(data: bytes) -> int:
    reg = 0xFFFFFFFF
    for b in data:
        reg ^= b
        for _ in range(8):
            reg = (reg >> 1) ^ 0x82F63B78 if reg & 1 else reg >> 1
    return reg ^ 0xFFFFFFFF


def test_crc32c_known_values_and_lengths():
    # RFC 3720 (iSCSI) test vectors and the usual check value.
    assert shards.crc32c(b"123456789") == 0xE3069283
    assert shards.crc32c(bytes(32)) == 0x8A9136AA
    assert shards.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert shards.crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(0)
    # Around the 1 KiB lane size of the vectorised path.
    for n in (0, 1, 7, 1023, 1024, 1025, 2048, 3000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert shards.crc32c(data) == _crc32c_bitwise(data), n


def test_masked_crc_matches_tfrecord_definition():
    crc = shards.crc32c(b"abc")
    assert shards.masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------- names

def test_shard_names_round_trip():
    name = shards.shard_name("vggsound", "test", "array_record", 3, 15)
    assert name == "vggsound-test.array_record-00003-of-00015"
    assert shards.parse_shard_name(name) == {"name": "vggsound", "split": "test", "format": "array_record",
                                             "index": 3, "num_shards": 15}
    assert shards.parse_shard_name("manifest.json") is None
    with pytest.raises(ValueError):
        shards.shard_name("x", "te-st", "tfrecord", 0, 1)
    with pytest.raises(ValueError):
        shards.shard_name("x", "test", "parquet", 0, 1)


def test_list_shards_finds_complete_sets_only(tmp_path):
    for i in range(3):
        shards.write_shard(tmp_path / shards.shard_name("d", "train", "tfrecord", i, 3), [_record(i)], "tfrecord")
    shards.write_shard(tmp_path / shards.shard_name("d", "test", "tfrecord", 0, 2), [_record(0)], "tfrecord")
    assert [p.name for p in shards.list_shards(tmp_path, "train")] == \
        [f"d-train.tfrecord-{i:05d}-of-00003" for i in range(3)]
    with pytest.raises(shards.ShardError, match="lacks shard"):
        shards.list_shards(tmp_path, "test")
    with pytest.raises(shards.ShardError, match="several"):
        shards.list_shards(tmp_path)
    with pytest.raises(shards.ShardError, match="no shards"):
        shards.list_shards(tmp_path, "valid")


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", shards.FORMATS)
def test_write_read_round_trip(tmp_path, fmt):
    data = [_record(i) for i in range(7)]
    paths = []
    for s in range(2):
        path = tmp_path / shards.shard_name("t", "train", fmt, s, 2)
        info = shards.write_shard(path, data[s * 4:(s + 1) * 4], fmt)
        assert info["num_records"] == len(data[s * 4:(s + 1) * 4]) and info["sha256"] == shards.sha256_file(path)
        assert not list(tmp_path.glob("*.tmp-*"))
        paths.append(path)
    assert list(shards.iter_records(paths)) == data
    assert [records.decode(b).clip_id for b in shards.iter_records(paths)] == [f"clip{i}" for i in range(7)]
    # The same records give the same bytes (reruns reproduce the manifest's checksums).
    again = shards.write_shard(tmp_path / "again", data[:4], fmt)
    assert again["sha256"] == shards.sha256_file(paths[0])


def test_array_record_random_access(tmp_path):
    data = [_record(i) for i in range(9)]
    paths = [tmp_path / shards.shard_name("t", "train", "array_record", s, 3) for s in range(3)]
    for s, p in enumerate(paths):
        shards.write_shard(p, data[3 * s:3 * s + 3])
    reader = shards.ArrayRecordShards(paths)
    assert len(reader) == 9 and reader[4] == data[4] and reader[-1] == data[8]
    with pytest.raises(IndexError):
        reader[9]
    src = shards.data_source(paths)
    assert len(src) == 9 and src[7] == data[7]
    with pytest.raises(shards.ShardError, match="random access"):
        shards.data_source([tmp_path / "x-train.tfrecord-00000-of-00001"])


def test_tfrecord_framing_is_standard(tmp_path):
    path = tmp_path / "one.tfrecord"
    shards.write_shard(path, [b"hello"], "tfrecord")
    raw = path.read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] == 5 and raw[12:17] == b"hello" and len(raw) == 8 + 4 + 5 + 4
    assert struct.unpack("<I", raw[8:12])[0] == shards.masked_crc32c(raw[:8])
    assert struct.unpack("<I", raw[17:])[0] == shards.masked_crc32c(b"hello")


def test_tfrecord_readable_by_grain(tmp_path):
    grain = pytest.importorskip("grain")
    data = [_record(i) for i in range(3)]
    path = tmp_path / "g-train.tfrecord-00000-of-00001"
    shards.write_shard(path, data, "tfrecord")
    assert list(grain.experimental.TFRecordIterDataset(str(path))) == data


def test_tfrecord_corruption_names_shard_and_offset(tmp_path):
    data = [_record(i) for i in range(3)]
    path = tmp_path / "c-train.tfrecord-00000-of-00001"
    shards.write_shard(path, data, "tfrecord")
    raw = bytearray(path.read_bytes())
    second = 16 + len(data[0])  # byte offset of record 1
    raw[second + 12 + 40] ^= 0x01  # flip one bit inside record 1's payload
    path.write_bytes(bytes(raw))
    it = shards.iter_tfrecord(path)
    assert next(it) == data[0]
    with pytest.raises(shards.ShardError) as e:
        next(it)
    assert str(path) in str(e.value) and f"offset {second}" in str(e.value) and "CRC" in str(e.value)
    assert len(list(shards.iter_tfrecord(path, verify=False))) == 3
    path.write_bytes(bytes(raw[:-10]))
    with pytest.raises(shards.ShardError, match="truncated"):
        list(shards.iter_tfrecord(path, verify=False))


def test_aborted_writer_leaves_nothing(tmp_path):
    path = tmp_path / "a-train.array_record-00000-of-00001"
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(path, "array_record") as w:
            w.write(_record(0))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- official lists

def official_data_dir() -> pathlib.Path:
    named = os.environ.get("SYNCHFORMER_OFFICIAL_DATA")
    if named:
        if not pathlib.Path(named).is_dir():
            pytest.fail(f"SYNCHFORMER_OFFICIAL_DATA={named} does not exist")
        return pathlib.Path(named)
    default = REPO_ROOT.parent / "shared" / "official_data"
    if not default.is_dir():
        pytest.skip(f"no official lists: {default} is absent and SYNCHFORMER_OFFICIAL_DATA is unset")
    return default


def test_official_lists_parse():
    d = official_data_dir()
    test = datasets.parse_vggsound_list(d / "vggsound_test.txt")
    valid = datasets.parse_vggsound_list(d / "vggsound_valid.txt")
    assert len(test) == 14511 and len(valid) == 18845 and not set(test) & set(valid)
    assert datasets.detect_list_format(d / "vggsound_test.txt") == "vggsound"
    assert datasets.split_from_name(d / "vggsound_valid.txt") == "valid"
    lrs3 = datasets.parse_lrs3_list(d / "lrs3_test.txt")
    assert len(lrs3) == 5966 and lrs3[0] == "pretrain/-MTRxRO5SRA/00002"
    fixed = {k: datasets.parse_fixed_offsets_csv(d / f"fixed_offsets_{k}" / "test_size21_crop5_min-2.00_max2.00.csv")
             for k in ("vggsound", "lrs3", "audioset")}
    assert set(fixed["lrs3"]) == set(lrs3)
    assert set(fixed["vggsound"]) <= set(test) and len(fixed["vggsound"]) == 14022
    assert all(datasets.id_format(k) == "audioset" for k in fixed["audioset"])
    assert fixed["vggsound"]["---g-f_I2yQ_1000_11000"] == datasets.FixedOffset(0.4, 3.44)
    for table in fixed.values():
        assert all(-2.0 <= v.offset_sec <= 2.0 for v in table.values())
    merged = datasets.merge_fixed_offsets(*fixed.values())
    assert len(merged) == sum(map(len, fixed.values()))
    sparse = datasets.parse_sparse_fixed_offsets_csv(d / "vggsound_sparse_clean_fixed_offsets.csv")
    assert len(sparse) == 444  # the is_sync == 1 rows (official_spec §4.7)
    rows = datasets.sparse_fixed_offsets_rows(d / "vggsound_sparse_clean_fixed_offsets.csv")
    assert len(rows) == 646 and sum(r[2] for r in rows) == 444
    dropped = datasets.parse_filter_lists([d / "filtered_examples_vggsound", d / "filtered_examples_vggsound_extra"])
    assert "G1x66WZKZKQ_215000_225000" in dropped  # listed with ".mp4" in filtered_broken.txt
    assert dropped["G1x66WZKZKQ_215000_225000"] == "filtered_broken.txt"
    assert all(datasets.id_format(k) == "vggsound" for k in dropped)


def test_list_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "vggsound_test.txt"
    bad.write_text("abcdefghijk_0_10000\nnot an id\n")
    with pytest.raises(datasets.ListError, match=r"vggsound_test.txt:2"):
        datasets.parse_vggsound_list(bad)
    csv = tmp_path / "off.csv"
    csv.write_text("path,offset_sec,vstart_sec\na,0.2,1.0\na,0.4,1.0\n")
    with pytest.raises(datasets.ListError, match="twice"):
        datasets.parse_fixed_offsets_csv(csv)


def test_media_paths():
    root = pathlib.Path("media")
    assert datasets.media_path(root, "abcdefghijk_0_10000") == root / "abcdefghijk_0_10000.mp4"
    assert datasets.media_path(root, "pretrain/-MTRxRO5SRA/00002") == root / "pretrain" / "-MTRxRO5SRA" / "00002.mp4"
    with pytest.raises(datasets.ListError):
        datasets.media_path(root, "../etc/passwd")


def test_audioset_folders(tmp_path):
    # Ids and fixed-offset keys use eval/balanced/unbalanced; files and filter lists the long names.
    assert datasets.media_path(tmp_path, "eval/abcdefghijk_0_10000") == \
        tmp_path / "eval_segments" / "abcdefghijk_0_10000.mp4"
    assert datasets.canonical_id("unbalanced_train_segments/abcdefghijk_0_7000") == "unbalanced/abcdefghijk_0_7000"
    flt = tmp_path / "less_than_9s_in_frames.txt"
    flt.write_text("unbalanced_train_segments/abcdefghijk_0_7000\n")
    assert datasets.parse_filter_lists([flt]) == {"unbalanced/abcdefghijk_0_7000": flt.name}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "abcdefghijk_0_10000.mp4").write_bytes(b"x")  # kept under the short name
    assert datasets.find_media(tmp_path, "eval/abcdefghijk_0_10000") == tmp_path / "eval" / "abcdefghijk_0_10000.mp4"


def test_vggsound_meta_labels(tmp_path):
    meta = tmp_path / "vggsound.csv"
    meta.write_text('abcdefghijk,0,"dog barking",test\nzzzzzzzzzzz,12,cat purring,train\n')
    assert datasets.parse_vggsound_meta(meta) == {
        "abcdefghijk_0_10000": {"label": "dog barking", "target": 1},
        "zzzzzzzzzzz_12000_22000": {"label": "cat purring", "target": 0}}


def test_fetch_checks_sha256(tmp_path):
    src = tmp_path / "remote.txt"
    src.write_bytes(b"abcdefghijk_0_10000\n")
    import hashlib

    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "lists" / "vggsound_test.txt"
    assert datasets.fetch(src.as_uri(), dest, good) == dest and dest.read_bytes() == src.read_bytes()
    assert datasets.fetch("file:///nonexistent-but-cached", dest, good) == dest  # already verified: no download
    other = tmp_path / "other.txt"
    with pytest.raises(datasets.ChecksumError, match="does not match"):
        datasets.fetch(src.as_uri(), other, "0" * 64)
    assert not other.exists() and not list(tmp_path.glob("other.txt*"))
    with pytest.raises(ValueError):
        datasets.fetch(src.as_uri(), other, "abc")


def test_official_checksums_match_the_copies():
    d = official_data_dir()
    # The shared copies are the official files unchanged: fetch_official must accept them.
    for name in ("vggsound_test.txt", "lrs3_test.txt", "vggsound_sparse_clean_fixed_offsets.csv",
                 "fixed_offsets_vggsound/test_size21_crop5_min-2.00_max2.00.csv"):
        assert shards.sha256_file(d / name) == datasets.OFFICIAL_FILES[name], name


def test_fetch_official_from_a_mirror(tmp_path):
    d = official_data_dir()
    out = datasets.fetch_official("vggsound_valid.txt", tmp_path, base_url=d.as_uri() + "/")
    assert out == tmp_path / "vggsound_valid.txt" and len(datasets.parse_vggsound_list(out)) == 18845
