"""grain pipelines: contents, exact resume, host sharding, broken records, evaluation,
TFRecord streaming, and the device-side assembly."""
import dataclasses
import json
import logging
import os
import shutil
import struct

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from synchformer_jax import records, synthetic
from synchformer_jax.input import melspec, normalize, pipeline as pl, shards, sources, transforms

N_TRAIN, N_EVAL, DURATION = 6, 3, 9.0  # 9 s: stage I needs 8.96 s of segments


def _write_array_record(path, payloads):
    w = ArrayRecordWriter(str(path), "group_size:1")
    for p in payloads:
        w.write(p)
    w.close()
    return str(path)


def _read_all(paths):
    out = []
    for p in paths:
        r = ArrayRecordReader(p)
        out.extend(r.read_all())
        r.close()
    return out


def _tfrecord_bytes(payloads):
    """Independent TFRecord framing for the tests (the CRC comes from a tiny table loop)."""
    def crc(data):
        reg = 0xFFFFFFFF
        for b in data:
            reg ^= b
            for _ in range(8):
                reg = (reg >> 1) ^ (0x82F63B78 if reg & 1 else 0)
        reg ^= 0xFFFFFFFF
        return (((reg >> 15) | (reg << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out = b""
    for d in payloads:
        head = struct.pack("<Q", len(d))
        # The data CRC of big records uses the module's fast CRC (checked against this
        # loop on a small record in test_crc32c).
        out += head + struct.pack("<I", crc(head)) + d + struct.pack("<I", shards.masked_crc32c(d))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = synthetic.make_dataset(root / "ds", N_TRAIN, N_EVAL, seed=11, num_shards=2, duration_sec=DURATION)
    good = _read_all(paths["train"])
    rec = records.decode(good[1])
    truncated = records.encode(dataclasses.replace(rec, clip_id="bad_mp4", source="test:truncated",
                                                   video_mp4=rec.video_mp4[: len(rec.video_mp4) // 3]))
    broken = _write_array_record(root / "broken.array_record", [good[0], b"not a record", truncated, good[2]])
    tf_dir = root / "tf"
    tf_dir.mkdir()
    tf_paths = []
    for s in range(2):
        p = tf_dir / f"train.tfrecord-{s:05d}"
        p.write_bytes(_tfrecord_bytes(good[s::2]))
        tf_paths.append(str(p))
    return {"train": paths["train"], "eval": paths["eval"], "broken": [broken], "tfrecord": tf_paths,
            "records": good, "truncated": truncated}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if k == "meta":
                np.testing.assert_array_equal(x[k]["clip_id"], y[k]["clip_id"])
                assert x[k]["skipped"] == y[k]["skipped"]
            else:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------ contents


def test_train_batch_shapes_and_labels(data):
    spec = pl.ExampleSpec(stage="sync", train=True)
    b = next(iter(pl.train_dataset(data["train"], spec, batch_size=2, seed=0)))
    assert b["video"].shape == (2, 120, 224, 224, 3) and b["video"].dtype == np.uint8
    assert b["audio"].shape == (2, 76800) and b["audio"].dtype == np.float32
    assert b["mask"].all() and b["offset_target"].dtype == np.int32
    grid = transforms.class_grid()
    for off, cls in zip(b["offset_sec"], b["offset_target"]):
        assert transforms.quantize_offset(grid, off)[1] == cls
    assert b["meta"]["clip_id"].shape == (2,) and b["meta"]["skipped"] == []


@pytest.mark.parametrize("stage,train", [("sync", True), ("sync", False), ("synchronizability", True),
                                         ("segment_avclip", True)])
def test_example_matches_official_transforms(data, stage, train):
    """The shipped span, segmented with the static layout, is exactly `apply_plan`."""
    spec = pl.ExampleSpec(stage=stage, train=train)
    rec_bytes = data["records"][3]
    rec = records.decode(rec_bytes)
    ex = pl.process_record(rec_bytes, np.random.default_rng(5), spec)
    assert not isinstance(ex, sources.Broken), ex
    frames = pl.decode_video_bytes(rec.video_mp4)
    plan = spec.plan(rec.num_frames, rec.audio.shape[0], 256, 256, np.random.default_rng(5))
    ref_v, ref_a = transforms.apply_plan(frames, rec.audio, plan)
    lay = spec.layout
    np.testing.assert_array_equal(ex["video"][lay.frame_index()], ref_v)
    np.testing.assert_array_equal(ex["audio"][lay.sample_index()], ref_a)
    assert ref_v.shape[0] == {"sync": 14, "synchronizability": 13, "segment_avclip": 14}[stage]
    if stage == "synchronizability":
        assert ex["sync_target"] == int(plan.temporal.is_synchronizable)


def test_assemble_on_device_matches_host_reference(data):
    spec = pl.ExampleSpec(stage="sync", train=True)
    b = next(iter(pl.train_dataset(data["train"], spec, batch_size=2, seed=3)))
    lay = spec.layout
    video, audio = pl.assemble_on_device({k: b[k] for k in ("video", "audio")}, lay)
    assert video.shape == (2, 14, 16, 3, 224, 224) and audio.shape == (2, 14, 1, 128, 66)
    ref_v = normalize.video_uint8_to_model_input_np(np.moveaxis(b["video"][:, lay.frame_index()], -1, -3))
    np.testing.assert_array_equal(np.asarray(video), ref_v)
    ref_a = melspec.log_mel_np(b["audio"][:, lay.sample_index()])
    np.testing.assert_allclose(np.asarray(audio), ref_a, atol=1e-4)
    # Host log-mel gives the same model input through the same function.
    spec_m = dataclasses.replace(spec, host_audio="logmel")
    ex = pl.process_record(data["records"][0], np.random.default_rng(1), spec_m)
    assert ex["audio"].shape == (14, 1, 128, 66)
    _, a2 = pl.assemble_on_device({"video": ex["video"][None], "audio": ex["audio"][None]}, lay)
    np.testing.assert_array_equal(np.asarray(a2)[0], ex["audio"])


def test_stage_one_augmentation_hook(data):
    from synchformer_jax.input.augment import Stage1AugmentConfig

    spec = pl.ExampleSpec(stage="segment_avclip", train=True)
    plain = pl.process_record(data["records"][0], np.random.default_rng(2), spec)
    assert plain["video"].shape == (224, 224, 224, 3) and plain["audio"].shape == (143360,)
    flip_all = pl.Stage1Augment(Stage1AugmentConfig.disabled(spatial_crop=False, hflip_p=1.0))
    flipped = pl.process_record(data["records"][0], np.random.default_rng(2), spec, augment=flip_all)
    np.testing.assert_array_equal(flipped["video"], plain["video"][:, :, ::-1])
    np.testing.assert_array_equal(flipped["audio"], plain["audio"])
    # The official recipe, including the crop from whole frames.
    ex = pl.process_record(data["records"][0], np.random.default_rng(3), spec, augment=pl.Stage1Augment())
    assert not isinstance(ex, sources.Broken), ex
    assert ex["video"].shape == (224, 224, 224, 3) and ex["video"].dtype == np.uint8
    assert ex["audio"].shape == (143360,) and ex["audio"].dtype == np.float32


# --------------------------------------------------------------------- resume, hosts


def test_resume_is_exact_without_workers(data):
    spec = pl.ExampleSpec(stage="sync", train=True)
    ds = pl.train_dataset(data["train"], spec, batch_size=2, seed=4)
    it = iter(ds)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 3)  # crosses the epoch boundary (6 clips / 2 per batch)
    fresh = iter(pl.train_dataset(data["train"], spec, batch_size=2, seed=4))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


def test_resume_is_exact_with_two_workers(data):
    spec = pl.ExampleSpec(stage="sync", train=True)
    kw = dict(batch_size=2, seed=5, num_workers=2, read_threads=1, per_worker_buffer=1)
    it = iter(pl.train_dataset(data["train"], spec, **kw))
    try:
        first = _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 2)
    finally:
        it.close()  # stop its workers before the next iterator starts (2 cores)
    fresh = iter(pl.train_dataset(data["train"], spec, **kw))
    try:
        fresh.set_state(state)
        _assert_batches_equal(_take(fresh, 2), expected)
    finally:
        fresh.close()
    # Workers do not change the batches either.
    single = iter(pl.train_dataset(data["train"], spec, batch_size=2, seed=5))
    _assert_batches_equal(first + expected, _take(single, 4))


# Cheap examples (24 frames of 32x32, 2 segments) for the tests that start worker processes.
SMALL = pl.ExampleSpec(stage="sync", train=True, n_segments=2, crop_size=32)


def _train_batches(paths, n=None, **kw):
    """`n` batches (all if None) of `train_dataset` over `SMALL`; worker processes stopped after."""
    it = iter(pl.train_dataset(paths, SMALL, read_threads=1, per_worker_buffer=1, **kw))
    try:
        return list(it) if n is None else _take(it, n)
    finally:
        it.close()  # before the next pipeline starts its workers (2 cores)


def test_batches_do_not_depend_on_the_worker_count(data):
    """grain hands worker `w` of `W` every `W`-th example and each worker batches its own;
    the pipeline orders the examples so that the batches come out as in one process."""
    ref = _train_batches(data["train"], 5, batch_size=2, seed=6)  # 10 examples: into the second epoch
    assert [int(i) for b in ref for i in b["index"]] == list(range(10))
    for workers in (1, 2, 3):
        _assert_batches_equal(_train_batches(data["train"], 5, batch_size=2, seed=6, num_workers=workers), ref)


def test_a_finite_run_reads_the_same_examples_with_workers(data):
    """2 epochs of 6 clips in batches of 5: 2 batches, 2 examples dropped. 3 workers hold
    rounds of 15: workers 0 and 1 get a batch each, worker 2 the dropped 2."""
    ref = _train_batches(data["train"], batch_size=5, seed=7, num_epochs=2)
    assert sorted(int(i) for b in ref for i in b["index"]) == list(range(10))
    for workers in (2, 3):
        _assert_batches_equal(_train_batches(data["train"], batch_size=5, seed=7, num_epochs=2,
                                             num_workers=workers), ref)


def test_worker_order_is_a_lazy_bijection():
    """Every example once, in batch order, for dataset sizes around whole rounds."""
    for n in range(0, 14):
        for workers, batch in ((2, 1), (2, 3), (3, 2)):
            order = pl._WorkerBatchOrder(grain.MapDataset.range(n), workers, batch)
            # What worker w reads (grain's slice `w::W`), without the holes grain skips.
            shares = [[x for x in order[w::workers] if x is not None] for w in range(workers)]
            assert sorted(x for sh in shares for x in sh) == list(range(n))
            batches = [sh[k:k + batch] for sh in shares for k in range(0, len(sh), batch)]
            assert sorted(batches) == [list(range(k, min(k + batch, n))) for k in range(0, n, batch)]
            # Worker w's k-th batch is batch k * W + w.
            for w, sh in enumerate(shares):
                for k in range(0, len(sh), batch):
                    first = (k // batch * workers + w) * batch
                    assert sh[k:k + batch] == list(range(first, min(first + batch, n)))
    endless = grain.MapDataset.range(3).repeat()
    assert len(pl._WorkerBatchOrder(endless, 3, 4)) % 12 == 0


def test_a_start_example_continues_the_global_stream_on_any_host_count(data):
    """A restart on another number of hosts begins at the global example the run reached:
    its global batches hold the same examples, with the same draws, as the uninterrupted
    run's (one host here, 4 steps of 4 over an epoch boundary; the restart after 2 steps)."""
    ref = _train_batches(data["train"], 4, batch_size=4, seed=5)

    def rows(batches):
        return {int(i): {k: b[k][r] for k in ("video", "audio", "offset_target")}
                for b in batches for r, i in enumerate(b["index"])}

    for hosts, workers in ((1, 0), (2, 0), (2, 2), (4, 0)):
        per_host = [_train_batches(data["train"], 2, batch_size=4 // hosts, seed=5, start_example=8,
                                   process_index=p, process_count=hosts, num_workers=workers)
                    for p in range(hosts)]
        for step in range(2):
            got = rows([h[step] for h in per_host])
            want = rows([ref[2 + step]])
            assert sorted(got) == sorted(want) == list(range(8 + 4 * step, 12 + 4 * step)), (hosts, step)
            for i in want:
                for k in want[i]:
                    np.testing.assert_array_equal(got[i][k], want[i][k], err_msg=f"{hosts} hosts, example {i}, {k}")


def test_hosts_read_disjoint_slices_of_one_global_shuffle(data):
    spec = pl.ExampleSpec(stage="sync", train=True)

    def indices(pi, pc):
        ds = pl.train_dataset(data["train"], spec, batch_size=1, seed=9, num_epochs=1,
                              process_index=pi, process_count=pc)
        return [(int(b["index"][0]), str(b["meta"]["clip_id"][0])) for b in ds]

    one = indices(0, 1)
    h0, h1 = indices(0, 2), indices(1, 2)
    assert len(one) == N_TRAIN and sorted({c for _, c in one}) == [f"train_{i:06d}" for i in range(N_TRAIN)]
    assert h0 == one[0::2] and h1 == one[1::2]


def test_epochs_are_reshuffled(data):
    spec = pl.ExampleSpec(stage="sync", train=True)
    ds = pl.train_dataset(data["train"], spec, batch_size=N_TRAIN, seed=1, num_epochs=2)
    e0, e1 = [list(b["meta"]["clip_id"]) for b in ds]
    assert sorted(e0) == sorted(e1) and e0 != e1


# ------------------------------------------------------------------- broken records


def test_broken_records_are_skipped_and_reported(data, caplog):
    spec = pl.ExampleSpec(stage="sync", train=True)
    ds = pl.train_dataset(data["broken"], spec, batch_size=1, seed=0, num_epochs=1)
    report = pl.SkipReport()
    with caplog.at_level(logging.WARNING):
        batches = list(ds)
        for b in batches:
            report.update(b)
    assert len(batches) == 2  # 4 records, 2 broken
    assert report.count == 2
    text = " ".join(report.items)
    assert "bad_mp4" in text and "test:truncated" in text and "RecordError" in text
    assert "bad_mp4" in caplog.text


def test_a_stream_of_only_unusable_records_stops_with_a_clear_error(data, tmp_path):
    """Repeating forever over records that all fail (clips too short for the stage, say)
    must not skip forever: twice the data set's size of failures in a row is an error."""
    path = _write_array_record(tmp_path / "junk.array_record", [b"not a record", b"nor this"])
    ds = pl.train_dataset([path], pl.ExampleSpec(stage="sync", train=True), batch_size=1, seed=0)
    with pytest.raises(pl.NoUsableRecordsError, match=r"junk\.array_record: 4 records in a row"):
        next(iter(ds))
    # One good record among the broken ones keeps the stream going.
    path = _write_array_record(tmp_path / "mixed.array_record", [b"not a record", data["records"][0]])
    it = iter(pl.train_dataset([path], pl.ExampleSpec(stage="sync", train=True), batch_size=1, seed=0))
    assert [len(next(it)["meta"]["clip_id"]) for _ in range(20)] == [1] * 20


def test_damaged_array_record_bytes_do_not_stop_the_pipeline(data, tmp_path):
    """A flipped byte inside the second record's chunk of an ArrayRecord file."""
    good = data["records"][:3]
    path = _write_array_record(tmp_path / "flip.array_record", good)
    raw = bytearray(open(path, "rb").read())
    pos = raw.find(good[1][200:264])  # inside the mp4 of record 1 (group_size 1, uncompressed)
    assert pos > 0
    raw[pos + 10] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    ds = pl.train_dataset([path], pl.ExampleSpec(stage="sync", train=False, hflip_p=0.0), batch_size=1,
                          seed=0, num_epochs=1)
    report = pl.SkipReport()
    n = 0
    for b in ds:
        report.update(b)
        n += 1
    # Riegeli's chunk hash catches it; the reader error costs only that record.
    assert n == 2 and report.count == 1
    assert "hash mismatch" in report.items[0] and f"{path}#1" in report.items[0]


def _with_nan_audio(data: bytes) -> bytes:
    rec = records.decode(data)
    audio = np.array(rec.audio)
    audio[1000:1003] = np.nan
    audio[5000] = np.inf
    return records.encode(dataclasses.replace(rec, clip_id="nan_clip", source="test:nan", audio=audio))


@pytest.mark.parametrize("train", [True, False])
def test_a_clip_with_non_finite_audio_is_skipped_and_named(data, tmp_path, train):
    """One NaN in a clip's PCM would turn a training step's loss NaN (and be scored in an
    evaluation): it is a broken record, skipped and reported by clip id."""
    path = tmp_path / shards.shard_name("nan", "train", "array_record", 0, 1)
    shards.write_shard(path, [data["records"][0], _with_nan_audio(data["records"][1]), data["records"][2]])
    spec = pl.ExampleSpec(stage="sync", train=train)
    if train:
        batches = list(pl.train_dataset([str(path)], spec, batch_size=1, seed=0, num_epochs=1))
    else:
        batches = list(pl.eval_dataset([str(path)], spec, batch_size=1, seed=0))
    report = pl.SkipReport()
    for b in batches:
        report.update(b)
    used = [str(c) for b in batches for c, m in zip(b["meta"]["clip_id"], b["mask"]) if m]
    assert len(used) == 2 and "nan_clip" not in used
    assert all(np.isfinite(b["audio"]).all() for b in batches)
    assert report.count == 1
    assert "'nan_clip' (test:nan)" in report.items[0] and "4 non-finite sample(s)" in report.items[0]


def _seed_placing(n, slot, position):
    """A shuffle seed that puts record `slot` of `n` at `position` of the first epoch."""
    return next(s for s in range(1000) if list(grain.MapDataset.range(n).seed(s).shuffle())[position] == slot)


# (batch size, workers, where the shuffle puts the broken record among 3 good ones)
@pytest.mark.parametrize("batch_size,workers,position", [(1, 0, 3), (2, 0, 3), (2, 0, 2), (1, 2, 3), (2, 2, 3)])
def test_a_finite_training_stream_reports_a_broken_record_at_its_end(data, tmp_path, batch_size, workers, position):
    """No example follows the broken record (or only ones in the dropped remainder): its
    report rides on the last batch, once, also across a restore from any state; with
    workers it can come from a worker that makes no batch of its own ((2, 2, 3): worker 1
    reads a good record and the broken one)."""
    path = tmp_path / shards.shard_name("tail", "train", "array_record", 0, 1)
    shards.write_shard(path, data["records"][:3] + [data["truncated"]])
    seed = _seed_placing(4, 3, position)
    ds = pl.train_dataset([str(path)], SMALL, batch_size=batch_size, seed=seed, num_epochs=1, num_workers=workers,
                          read_threads=1, per_worker_buffer=1)
    it = iter(ds)
    states, batches = [json.loads(json.dumps(it.get_state()))], []
    try:
        for b in it:
            batches.append(b)
            states.append(json.loads(json.dumps(it.get_state())))
    finally:
        it.close()
    order = [records.decode(data["records"][i]).clip_id for i in grain.MapDataset.range(4).seed(seed).shuffle()
             if i < 3]
    assert [c for b in batches for c in b["meta"]["clip_id"]] == order[:3 // batch_size * batch_size]
    assert [len(b["meta"]["skipped"]) for b in batches] == [0] * (len(batches) - 1) + [1]
    assert "bad_mp4" in batches[-1]["meta"]["skipped"][0]
    for k, state in enumerate(states):
        fresh = iter(ds)
        try:
            fresh.set_state(state)
            _assert_batches_equal(list(fresh), batches[k:])
        finally:
            fresh.close()


def test_a_finite_stream_too_short_for_a_batch_still_names_its_broken_records(data, tmp_path, caplog):
    path = tmp_path / shards.shard_name("short", "train", "array_record", 0, 1)
    shards.write_shard(path, [data["records"][0], data["truncated"]])
    with caplog.at_level(logging.WARNING, logger=pl.__name__):
        assert list(pl.train_dataset([str(path)], SMALL, batch_size=2, seed=0, num_epochs=1, read_threads=1)) == []
    assert "1 broken record(s) skipped in a stream that yielded no batch" in caplog.text


def test_a_streaming_tfrecord_run_reports_a_bad_last_record(data, tmp_path):
    recs = data["records"][:3]
    raw = bytearray(_tfrecord_bytes(recs))
    raw[-100] ^= 0x01  # inside the last record's data: a data CRC mismatch
    bad = tmp_path / "bad_last.tfrecord"
    bad.write_bytes(bytes(raw))
    batches = list(pl.tfrecord_train_dataset([str(bad)], SMALL, batch_size=1, seed=0, num_epochs=1, window_size=1))
    assert len(batches) == 2
    assert [len(b["meta"]["skipped"]) for b in batches] == [0, 1]
    assert "data CRC mismatch" in batches[-1]["meta"]["skipped"][0]


def test_a_truncated_array_record_shard_costs_its_clips_not_the_run(data, tmp_path):
    """The whole first shard is unreadable: training goes on with the other one and the
    damage is reported (by shard) like a damaged record."""
    copies = []
    for p in data["train"]:
        copies.append(str(tmp_path / os.path.basename(p)))
        shutil.copy(p, copies[-1])
    raw = open(copies[0], "rb").read()
    open(copies[0], "wb").write(raw[: int(len(raw) * 0.6)])
    spec = pl.ExampleSpec(stage="sync", train=False, hflip_p=0.0)
    it = iter(pl.train_dataset(str(tmp_path / "*-train.array_record-*"), spec, batch_size=1, seed=0))
    second = [records.decode(r).clip_id for r in _read_all([data["train"][1]])]
    report = pl.SkipReport()
    clips = []
    for b in _take(it, 2 * len(second)):  # two epochs: the report of epoch 1 rides on a later example
        report.update(b)
        clips.extend(b["meta"]["clip_id"].tolist())
    assert sorted(set(clips)) == sorted(second)
    assert report.count >= 1
    assert report.items[0].startswith(copies[0]) and "truncated or damaged" in report.items[0]


# ------------------------------------------------------------------------ evaluation


def test_eval_random_rounds_are_deterministic_and_padded(data):
    spec = pl.ExampleSpec(stage="sync", train=False)
    run = lambda: list(pl.eval_dataset(data["eval"], spec, batch_size=4, seed=2, rounds=2))  # noqa: E731
    a, b = run(), run()
    _assert_batches_equal(a, b)
    assert len(a) == 2  # 6 examples -> 4 + 2 real rows
    mask = np.concatenate([x["mask"] for x in a])
    idx = np.concatenate([x["index"] for x in a])
    assert mask.tolist() == [True] * 6 + [False] * 2
    assert sorted(idx[mask].tolist()) == list(range(6))
    assert (a[1]["video"][2:] == 0).all() and (idx[~mask] == -1).all()
    # Each round draws new offsets; each (round, clip) is seeded on its own.
    offs = np.concatenate([x["offset_sec"] for x in a])[mask]
    by_index = dict(zip(idx[mask].tolist(), offs.tolist()))
    assert [by_index[i] for i in range(3)] != [by_index[i] for i in range(3, 6)]
    other = list(pl.eval_dataset(data["eval"], spec, batch_size=1, seed=2, rounds=2))
    assert {int(x["index"][0]): float(x["offset_sec"][0]) for x in other} == by_index


def test_eval_hosts_get_equal_batch_counts(data):
    spec = pl.ExampleSpec(stage="sync", train=False)
    per_host = [list(pl.eval_dataset(data["eval"], spec, batch_size=1, rounds=1, process_index=i,
                                     process_count=2)) for i in range(2)]
    assert [len(h) for h in per_host] == [2, 2]  # 3 clips: host 1 gets one padding batch
    real = sorted(int(b["index"][0]) for h in per_host for b in h if b["mask"][0])
    assert real == [0, 1, 2]


def test_eval_fixed_offsets_from_labels_and_csv(data, tmp_path):
    spec = pl.ExampleSpec(stage="sync", train=False)
    got = {}
    for b in pl.eval_dataset(data["eval"], spec, batch_size=2, fixed_offsets="labels"):
        for m, cid, off, vs in zip(b["mask"], b["meta"]["clip_id"], b["offset_sec"], b["v_start_i_sec"]):
            if m:
                got[str(cid)] = (round(float(off), 2), round(float(vs), 2))
    labels = {}
    for raw in _read_all(data["eval"]):
        r = records.decode(raw)
        labels[r.clip_id] = (r.labels["offset_sec"], r.labels["vstart_sec"])
    assert got == labels
    csv = tmp_path / "fixed.csv"
    csv.write_text("path,offset_sec,vstart_sec\n" + "".join(f"{k},{-o},{v}\n" for k, (o, v) in labels.items()))
    mapping = pl.read_fixed_offsets_csv(csv)
    got_csv = {}
    for b in pl.eval_dataset(data["eval"], spec, batch_size=3, fixed_offsets=mapping):
        for cid, off in zip(b["meta"]["clip_id"], b["offset_sec"]):
            got_csv[str(cid)] = round(float(off), 2)
    assert got_csv == {k: -o + 0.0 for k, (o, _) in labels.items()}


# Slots of an eval shard (G good, T truncated mp4, J not a record) and the hosts: every
# layout puts the broken record(s) last in some host's slice, where no example follows.
@pytest.mark.parametrize("layout,hosts,batch_size", [("GGGT", 1, 2), ("GGGT", 1, 4), ("GGTJ", 1, 3),
                                                     ("GGGT", 2, 1), ("GGTG", 2, 1)])
def test_eval_broken_records_at_the_end_of_a_host_are_reported(data, tmp_path, layout, hosts, batch_size):
    from synchformer_jax.evaluators.offset import OffsetMetrics

    payloads = [{"G": data["records"][i], "T": data["truncated"], "J": b"not a record"}[c]
                for i, c in enumerate(layout)]
    path = tmp_path / shards.shard_name("broken", "eval", "array_record", 0, 1)
    shards.write_shard(path, payloads)
    good = [i for i, c in enumerate(layout) if c == "G"]
    spec = pl.ExampleSpec(stage="sync", train=False)
    report, counts, seen = pl.SkipReport(), [], []
    metrics = OffsetMetrics(transforms.class_grid().shape[0])
    for p in range(hosts):
        batches = list(pl.eval_dataset([str(path)], spec, batch_size=batch_size, seed=3, process_index=p,
                                       process_count=hosts, read_threads=1))
        counts.append(len(batches))
        for b in batches:
            report.update(b)
            seen.extend(b["index"][b["mask"]].tolist())
            assert (b["index"][~b["mask"]] == -1).all() and (b["video"][~b["mask"]] == 0).all()
            # Logits right on the real rows, wrong on the padding ones: only masking gives 1.0.
            wrong = (b["offset_target"] + 1) % metrics.num_classes
            logits = np.eye(metrics.num_classes)[np.where(b["mask"], b["offset_target"], wrong)]
            metrics.update(logits, b["offset_target"], b["mask"])
    assert counts == [-(-(-(-len(layout) // hosts)) // batch_size)] * hosts  # the broken-free count
    assert sorted(seen) == good
    assert report.count == layout.count("T") + layout.count("J")  # each once, on its host
    assert ("T" in layout) == any("bad_mp4" in s and "test:truncated" in s for s in report.items)
    assert ("J" in layout) == any("RecordError" in s for s in report.items)
    result = metrics.result()
    assert result["count"] == len(good) and result["accuracy_1"] == 1.0


def test_eval_broken_last_record_through_worker_processes(data, tmp_path):
    """Each worker process drops and batches its own share, so each one's stream can end
    on a broken record; its report must still come back as data."""
    path = tmp_path / shards.shard_name("broken", "eval", "array_record", 0, 1)
    shards.write_shard(path, data["records"][:5] + [data["truncated"]])
    spec = pl.ExampleSpec(stage="sync", train=False)
    it = iter(pl.eval_dataset([str(path)], spec, batch_size=2, seed=3, num_workers=2, read_threads=1,
                              per_worker_buffer=1))
    try:
        batches = list(it)
    finally:
        it.close()
    report = pl.SkipReport()
    for b in batches:
        report.update(b)
    # The workers read batch-sized runs (worker 0: slots 0, 1 and 4, 5; worker 1: 2, 3), so
    # the 6 slots fill the 3 batches they would without workers; worker 0's stream ends on
    # the broken slot 5, whose report rides on a padding row of its last batch.
    assert len(batches) == 3
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
    assert sorted(i for b in batches for i in b["index"][b["mask"]].tolist()) == [0, 1, 2, 3, 4]
    assert report.count == 1 and "bad_mp4" in report.items[0]


def test_eval_end_of_stream_report_resumes_exactly_once(data, tmp_path):
    path = tmp_path / shards.shard_name("broken", "eval", "array_record", 0, 1)
    shards.write_shard(path, data["records"][:1] + [data["truncated"], b"not a record"])
    spec = pl.ExampleSpec(stage="sync", train=False)
    ds = pl.eval_dataset([str(path)], spec, batch_size=1, seed=3, read_threads=1)
    it = iter(ds)
    states = [json.loads(json.dumps(it.get_state()))]
    batches = []
    for b in it:
        batches.append(b)
        states.append(json.loads(json.dumps(it.get_state())))
    # One clip, then both skips on a padding row, then the padding batch every host runs.
    assert [b["mask"].tolist() for b in batches] == [[True], [False], [False]]
    assert [len(b["meta"]["skipped"]) for b in batches] == [0, 2, 0]
    for k, state in enumerate(states):
        fresh = iter(ds)
        fresh.set_state(state)
        _assert_batches_equal(list(fresh), batches[k:])


def test_synchronizability_eval_draws_both_classes(data):
    spec = pl.ExampleSpec(stage="synchronizability", train=False)
    batches = list(pl.eval_dataset(data["eval"], spec, batch_size=3, seed=0, rounds=4))
    assert batches[0]["video"].shape == (3, 112, 224, 224, 3) and batches[0]["audio"].shape == (3, 71680)
    sync = np.concatenate([b["sync_target"] for b in batches])
    assert set(sync.tolist()) == {0, 1}


# -------------------------------------------------------------------------- TFRecord


def test_tfrecord_writer_matches_independent_framing(tmp_path):
    payloads = [b"x" * 10, b"hello", bytes(range(256)) * 20]
    p = tmp_path / "a.tfrecord"
    shards.write_shard(p, payloads, "tfrecord")
    assert p.read_bytes() == _tfrecord_bytes(payloads)
    got = list(iter(sources.TFRecordShardDataset(p)))
    assert got == payloads


def test_tfrecord_stream_resumes_exactly_and_skips_bad_crc(data, tmp_path):
    spec = pl.ExampleSpec(stage="sync", train=True)
    kw = dict(batch_size=2, seed=3, window_size=4, cycle_length=2)
    it = iter(pl.tfrecord_train_dataset(data["tfrecord"], spec, **kw))
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)  # into the second epoch
    fresh = iter(pl.tfrecord_train_dataset(data["tfrecord"], spec, **kw))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)
    one_epoch = list(pl.tfrecord_train_dataset(data["tfrecord"], spec, num_epochs=1, **dict(kw, batch_size=1)))
    assert sorted(str(b["meta"]["clip_id"][0]) for b in one_epoch) == [f"train_{i:06d}" for i in range(N_TRAIN)]

    # A flipped byte in the middle record's data: CRC mismatch -> skipped and reported.
    recs = data["records"][:3]
    raw = bytearray(_tfrecord_bytes(recs))
    raw[12 + len(recs[0]) + 4 + 12 + 500] ^= 0x01
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(bytes(raw))
    report = pl.SkipReport()
    got = []
    for b in pl.tfrecord_train_dataset([str(bad)], spec, batch_size=1, seed=0, num_epochs=1, window_size=1):
        report.update(b)
        got.append(str(b["meta"]["clip_id"][0]))
    assert len(got) == 2 and report.count == 1 and "data CRC mismatch" in report.items[0]
