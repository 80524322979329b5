"""Training and evaluation from TFRecord shards (`data.format = "tfrecord"`).

* `tfrecord_eval_dataset` over TFRecord shards yields exactly the batches `eval_dataset`
  yields over ArrayRecord shards of the same synthetic clips (same frames, audio,
  targets, ids, padding and order), on 1, 2 and 3 hosts; every (round, clip) exactly
  once across hosts, the same batch count on every host.
* Damaged TFRecord shards (a bad data CRC, a truncated tail) cost their records, are
  reported in `meta["skipped"]` once across hosts, and keep the batch counts equal.
* `tfrecord_indexed_train_dataset` (the default TFRecord training path) yields exactly
  the batches `train_dataset` yields over ArrayRecord shards of the same clips, across
  epochs, on a host of two and with worker processes; its state resumes exactly (also
  from an ArrayRecord iterator's state); a bad data CRC costs one record, reported.
* `train.train_iterator` picks it by default, the stream with
  `data.tfrecord_access = "stream"`, and refuses other values.
* `train.train_and_evaluate` with `data.format = "tfrecord"` (either access) trains,
  evaluates, checkpoints, and a second call resumes with the data iterator where it
  stopped.
"""
from __future__ import annotations

import dataclasses
import json
import struct

import jax
import pytest

from synchformer_jax import checkpoint, experiment, records, synthetic, tasks, train
from synchformer_jax.input import pipeline as pl
from synchformer_jax.input import shards as shard_lib
from tests import train_helpers as th
from tests.test_pipeline import _assert_batches_equal

N_TRAIN, N_EVAL = 8, 7  # 7 eval clips: uneven host splits and a padded last batch
DEVICES = 1  # the training run's fake devices: about 3x less CPU than 8 for compiles and saves
SPEC = pl.ExampleSpec(stage="sync", train=False, crop_size=32, n_segments=2)
TRAIN_SPEC = dataclasses.replace(SPEC, train=True)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same synthetic records as ArrayRecord shards and as TFRecord shards.

    The TFRecord set is a copy of the ArrayRecord one's payloads (same shard layout)
    rather than a second `make_dataset(format="tfrecord")`: the synthetic H.264 encode
    is not bit-reproducible for every clip (some clips encode to different bytes from
    call to call), which would make a cross-format comparison flaky.
    """
    root = tmp_path_factory.mktemp("formats")
    made = {"array_record": synthetic.make_dataset(root / "array_record", N_TRAIN, N_EVAL, seed=5, **th.CLIP_KW)}
    (root / "tfrecord").mkdir()
    made["tfrecord"] = {}
    for split, paths in made["array_record"].items():
        made["tfrecord"][split] = []
        for path in paths:
            info = shard_lib.parse_shard_name(path)
            out = root / "tfrecord" / shard_lib.shard_name(info["name"], split, "tfrecord", info["index"],
                                                          info["num_shards"])
            shard_lib.write_shard(out, shard_lib.iter_records([path]), "tfrecord")
            made["tfrecord"][split].append(str(out))
    return made


@pytest.mark.parametrize("hosts,batch_size,rounds,fixed", [(1, 3, 2, None), (2, 2, 2, None), (3, 2, 1, "labels")])
def test_tfrecord_eval_equals_array_record_eval(sets, hosts, batch_size, rounds, fixed):
    kw = dict(batch_size=batch_size, seed=7, rounds=rounds, fixed_offsets=fixed, process_count=hosts,
              read_threads=2)
    seen = []
    for p in range(hosts):
        ar = list(pl.eval_dataset(sets["array_record"]["eval"], SPEC, process_index=p, **kw))
        tf = list(pl.tfrecord_eval_dataset(sets["tfrecord"]["eval"], SPEC, process_index=p, **kw))
        _assert_batches_equal(tf, ar)
        assert len(tf) == -(-(-(-rounds * N_EVAL // hosts)) // batch_size)  # same count on every host
        for b in tf:
            seen.extend(b["index"][b["mask"]].tolist())
    assert sorted(seen) == list(range(rounds * N_EVAL))  # every (round, clip) exactly once


def _frame(data: bytes) -> bytes:
    head = struct.pack("<Q", len(data))
    return (head + struct.pack("<I", shard_lib.masked_crc32c(head)) + data
            + struct.pack("<I", shard_lib.masked_crc32c(data)))


def test_damaged_tfrecord_eval_skips_reports_and_keeps_counts(sets, tmp_path):
    recs = list(shard_lib.iter_records(sets["tfrecord"]["eval"]))
    bad_crc = bytearray(_frame(recs[1]))
    bad_crc[-20] ^= 0xFF  # a flipped bit in the data: the data CRC fails
    a = tmp_path / "d-eval.tfrecord-00000-of-00002"
    a.write_bytes(_frame(recs[0]) + bytes(bad_crc) + _frame(recs[2]) + _frame(recs[5])[:100])  # truncated tail
    b = tmp_path / "d-eval.tfrecord-00001-of-00002"
    b.write_bytes(_frame(recs[3]) + _frame(recs[4]))
    # Slots: shard a 0..2 and 3 (the tail damage), shard b 4, 5: skips ride on the host's
    # next example (a broken slot last: test_evaluate_reports_skipped_records).
    hosts, batch_size = 2, 2
    report, seen, counts = pl.SkipReport(), [], []
    for p in range(hosts):
        batches = list(pl.tfrecord_eval_dataset([str(a), str(b)], SPEC, batch_size=batch_size, seed=1,
                                                process_index=p, process_count=hosts, read_threads=1))
        counts.append(len(batches))
        for x in batches:
            report.update(x)
            seen.extend(zip(x["index"][x["mask"]].tolist(), x["meta"]["clip_id"][x["mask"]].tolist()))
    assert counts == [2, 2]  # ceil(ceil(6 / 2) / 2) on both hosts
    ids = [records.decode(r).clip_id for r in recs]
    assert sorted(seen) == [(0, ids[0]), (2, ids[2]), (4, ids[3]), (5, ids[4])]
    assert report.count == 2
    assert any(f"{a}#1" in s and "data CRC mismatch" in s for s in report.items), report.items
    assert any(f"{a}#3" in s and "truncated record" in s for s in report.items), report.items


def test_evaluate_reports_skipped_records(sets, tmp_path):
    """`train.evaluate` counts the broken records of the evaluation, also the one slot a
    truncated tail leaves at the end of the last shard (nothing follows it), and the
    padding row that reports it counts in no metric."""
    from synchformer_jax.models import synchformer as sf

    recs = list(shard_lib.iter_records(sets["tfrecord"]["eval"]))[:3]
    clean = tmp_path / shard_lib.shard_name("clean", "eval", "tfrecord", 0, 1)
    clean.write_bytes(b"".join(_frame(r) for r in recs))
    damaged = tmp_path / shard_lib.shard_name("damaged", "eval", "tfrecord", 0, 1)
    damaged.write_bytes(clean.read_bytes() + _frame(recs[0])[:100])
    shards = {split: ",".join(paths) for split, paths in sets["tfrecord"].items()}
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"data.format": "tfrecord", "data.eval_rounds": 1})
    trainer = train.build_trainer(config, th.single_mesh())
    init = jax.jit(lambda r: sf.init_params(trainer.task.model_config, r),
                   out_shardings=trainer.state_shardings.params)
    params = init(jax.random.key(0))
    got = {path.name: train.evaluate(trainer, params, train.eval_batches(config, trainer.task, [str(path)]))
           for path in (clean, damaged)}
    want = dict(got[clean.name], skipped_records=1)
    assert got[clean.name]["skipped_records"] == 0 and got[clean.name]["count"] == 3
    assert got[damaged.name] == want


def test_tfrecord_reader_refuses_array_record_shards(sets):
    with pytest.raises(ValueError, match="data.format"):
        pl.tfrecord_eval_dataset(sets["array_record"]["eval"], SPEC, batch_size=2)


def _take(it, n):
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ indexed training


@pytest.mark.parametrize("hosts,host,batch_size,n", [(1, 0, 3, 6), (2, 1, 2, 5)])
def test_tfrecord_indexed_train_equals_array_record_train(sets, hosts, host, batch_size, n):
    """Same records, same seed: the same batches (frames, audio, targets, global index),
    past the epoch boundary (8 clips: 18 and 20 examples drawn), where both reshuffle."""
    kw = dict(batch_size=batch_size, seed=11, process_index=host, process_count=hosts, read_threads=2)
    ar = _take(iter(pl.train_dataset(sets["array_record"]["train"], TRAIN_SPEC, **kw)), n)
    tf = _take(iter(pl.tfrecord_indexed_train_dataset(sets["tfrecord"]["train"], TRAIN_SPEC, **kw)), n)
    _assert_batches_equal(tf, ar)
    epoch = [str(c) for b in tf for c in b["meta"]["clip_id"]][:N_TRAIN // hosts]
    assert len(set(epoch)) == len(epoch)  # the first epoch: each clip at most once


def test_tfrecord_indexed_train_resumes_exactly(sets):
    kw = dict(batch_size=3, seed=4, read_threads=2)
    it = iter(pl.tfrecord_indexed_train_dataset(sets["tfrecord"]["train"], TRAIN_SPEC, **kw))
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 3)  # crosses the epoch boundary (8 clips, 6 taken before)
    fresh = iter(pl.tfrecord_indexed_train_dataset(sets["tfrecord"]["train"], TRAIN_SPEC, **kw))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)
    # The state is the ArrayRecord pipeline's: a run can move between the formats.
    ar = iter(pl.train_dataset(sets["array_record"]["train"], TRAIN_SPEC, **kw))
    ar.set_state(state)
    _assert_batches_equal(_take(ar, 3), expected)


def test_tfrecord_indexed_train_with_worker_processes(sets):
    """Worker processes get a pickled copy of the source (index included, no open file)."""
    kw = dict(batch_size=2, seed=5, num_workers=2, read_threads=1, per_worker_buffer=1)
    got = []
    for paths, make in ((sets["tfrecord"]["train"], pl.tfrecord_indexed_train_dataset),
                        (sets["array_record"]["train"], pl.train_dataset)):
        it = iter(make(paths, TRAIN_SPEC, **kw))
        try:
            got.append(_take(it, 3))
        finally:
            it.close()  # stop its workers before the next iterator starts (2 cores)
    _assert_batches_equal(*got)


def test_damaged_tfrecord_train_skips_reports_and_goes_on(sets, tmp_path):
    recs = list(shard_lib.iter_records(sets["tfrecord"]["train"]))[:3]
    bad_crc = bytearray(_frame(recs[1]))
    bad_crc[-20] ^= 0xFF  # a flipped bit in the data: the data CRC fails
    path = tmp_path / shard_lib.shard_name("damaged", "train", "tfrecord", 0, 1)
    path.write_bytes(_frame(recs[0]) + bytes(bad_crc) + _frame(recs[2]))
    ids = [records.decode(r).clip_id for r in recs]

    report = pl.SkipReport()
    one_epoch = list(pl.tfrecord_indexed_train_dataset([str(path)], TRAIN_SPEC, batch_size=1, seed=0,
                                                       num_epochs=1, read_threads=1))
    for b in one_epoch:
        report.update(b)
    assert sorted(str(b["meta"]["clip_id"][0]) for b in one_epoch) == [ids[0], ids[2]]
    assert report.count == 1 and f"{path}#1" in report.items[0] and "data CRC mismatch" in report.items[0]
    # Repeating, the damaged record costs its example in every epoch and nothing more:
    # the batches and the skips per batch are those of an ArrayRecord shard with an
    # unreadable record in the same slot.
    ar_path = tmp_path / shard_lib.shard_name("damaged", "train", "array_record", 0, 1)
    shard_lib.write_shard(ar_path, [recs[0], b"not a record", recs[2]])
    kw = dict(batch_size=2, seed=0, read_threads=1)
    tf = _take(iter(pl.tfrecord_indexed_train_dataset([str(path)], TRAIN_SPEC, **kw)), 4)  # 4 epochs' worth
    ar = _take(iter(pl.train_dataset([str(ar_path)], TRAIN_SPEC, **kw)), 4)
    skips = [len(b["meta"]["skipped"]) for b in tf]
    assert skips == [len(b["meta"]["skipped"]) for b in ar] and sum(skips) >= 3
    assert all("data CRC mismatch" in x for b in tf for x in b["meta"]["skipped"])
    strip = [[dict(b, meta=dict(b["meta"], skipped=[])) for b in bs] for bs in (tf, ar)]
    _assert_batches_equal(*strip)
    # Nothing usable: a clear error, not an endless skip.
    junk = tmp_path / shard_lib.shard_name("junk", "train", "tfrecord", 0, 1)
    junk.write_bytes(bytes(bad_crc) * 2)
    with pytest.raises(pl.NoUsableRecordsError, match="4 records in a row"):
        next(iter(pl.tfrecord_indexed_train_dataset([str(junk)], TRAIN_SPEC, batch_size=1, seed=0, read_threads=1)))


def test_train_iterator_picks_the_tfrecord_access(sets):
    shards = {split: ",".join(paths) for split, paths in sets["tfrecord"].items()}
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"data.format": "tfrecord"})
    task = tasks.get_task(config.stage, experiment.model_config(config))
    paths = sets["tfrecord"]["train"]
    kw = dict(batch_size=config.data.batch_size, seed=config.seed)
    indexed = next(iter(pl.tfrecord_indexed_train_dataset(paths, task.example_spec, read_threads=1, **kw)))
    stream = next(iter(pl.tfrecord_train_dataset(paths, task.example_spec, **kw)))
    assert list(indexed["meta"]["clip_id"]) != list(stream["meta"]["clip_id"])  # the test can tell them apart

    assert config.data.tfrecord_access == "indexed"  # the default
    _assert_batches_equal([next(train.train_iterator(config, task, paths))], [indexed])
    config.data.tfrecord_access = "stream"
    _assert_batches_equal([next(train.train_iterator(config, task, paths))], [stream])
    config.data.tfrecord_access = "seek"
    with pytest.raises(ValueError, match="data.tfrecord_access must be one of"):
        train.train_iterator(config, task, paths)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Shared by the training runs: the second access compiles nothing."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.parametrize("access", ["indexed", "stream"])
def test_train_from_tfrecord_evaluates_checkpoints_and_resumes(sets, tmp_path, compile_cache, access):
    """Two driver processes (one fake device each, a shared compilation cache so that the
    second does not compile again): steps 1-2, then a restart that resumes at step 3."""
    shards = {split: ",".join(paths) for split, paths in sets["tfrecord"].items()}
    overrides = {"data.format": "tfrecord", "train.num_steps": 2, "train.checkpoint_every": 2}
    if access != "indexed":  # the default: left as the config has it
        overrides["data.tfrecord_access"] = access
    config = th.small_config(experiment.STAGE_SYNC, shards, **overrides)
    workdir, batch_log = tmp_path / "run", tmp_path / "batches.jsonl"
    driver = dict(local_devices=DEVICES, cache_dir=compile_cache, extra=["--batch-log", str(batch_log)])
    th.run_driver(th.write_config(config, tmp_path / "two.json"), workdir, **driver)
    first = json.loads((workdir / "eval_metrics.json").read_text())
    assert first["step"] == 2 and first["count"] == N_EVAL  # evaluated every eval clip once
    config.train.num_steps = 4
    th.run_driver(th.write_config(config, tmp_path / "four.json"), workdir, **driver)

    step, _, data_state, _ = checkpoint.restore_on_host(workdir)
    assert step == 4
    # The restarted run went on from the restored iterator: its batches 3 and 4 are a
    # fresh iterator's batches 3 and 4 (a restart from scratch would repeat 1 and 2),
    # and the saved iterator state is the fresh one's after 4 batches. The fresh
    # iterator is the pipeline `access` names, built here, not through train.py.
    task = tasks.get_task(config.stage, experiment.model_config(config))
    kw = dict(batch_size=config.data.batch_size, seed=config.seed)
    if access == "indexed":
        # ...which gives the batches the ArrayRecord shards of the same clips give.
        fresh = iter(pl.train_dataset(sets["array_record"]["train"], task.example_spec, **kw))
    else:
        fresh = iter(pl.tfrecord_train_dataset(sets["tfrecord"]["train"], task.example_spec, **kw))
    want = [next(fresh) for _ in range(4)]
    log = th.read_batch_log(batch_log)
    assert sorted(log) == [1, 2, 3, 4] and all(len(v) == 1 for v in log.values())
    for s, batch in enumerate(want, 1):
        assert log[s][0]["clip_id"] == [str(c) for c in batch["meta"]["clip_id"]], s
        assert log[s][0]["index"] == batch["index"].tolist(), s
    assert log[1][0]["clip_id"] != log[3][0]["clip_id"]
    assert json.loads(json.dumps(fresh.get_state())) == data_state["iterator"]
    assert (data_state["examples"], data_state["processes"], data_state["devices"]) == (4 * config.data.batch_size, 1,
                                                                                        DEVICES)
    records_ = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records_ if r["phase"] == "eval") == [2, 4]
    assert sorted(r["step"] for r in records_ if r["phase"] == "train") == [1, 2, 3, 4]
    if access == "indexed":
        # Resumed with the other access, the run stops with a clear error, not a KeyError
        # (the other way round: a stream-era run under the new default).
        config.data.tfrecord_access = "stream"
        config.train.num_steps = 5
        with pytest.raises(AssertionError, match=r"written by another data pipeline \(data.tfrecord_access: "
                                                 r"\"indexed\" -> \"stream\"\); resume with "
                                                 r"--config.data.tfrecord_access=indexed"):
            th.run_driver(th.write_config(config, tmp_path / "other.json"), workdir, **driver)
