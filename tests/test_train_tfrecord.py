"""Training and evaluation from TFRecord shards (`data.format = "tfrecord"`).

* `tfrecord_eval_dataset` over TFRecord shards yields exactly the batches `eval_dataset`
  yields over ArrayRecord shards of the same synthetic clips (same frames, audio,
  targets, ids, padding and order), on 1, 2 and 3 hosts; every (round, clip) exactly
  once across hosts, the same batch count on every host.
* Damaged TFRecord shards (a bad data CRC, a truncated tail) cost their records, are
  reported in `meta["skipped"]` once across hosts, and keep the batch counts equal.
* `train.train_and_evaluate` with `data.format = "tfrecord"` trains, evaluates,
  checkpoints, and a second call resumes with the data iterator where it stopped.
"""
from __future__ import annotations

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


def test_train_from_tfrecord_evaluates_checkpoints_and_resumes(sets, tmp_path):
    """Two driver processes (one fake device each, a shared compilation cache so that the
    second does not compile again): steps 1-2, then a restart that resumes at step 3."""
    shards = {split: ",".join(paths) for split, paths in sets["tfrecord"].items()}
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"data.format": "tfrecord", "train.num_steps": 2,
                                                               "train.checkpoint_every": 2})
    workdir, batch_log, cache = tmp_path / "run", tmp_path / "batches.jsonl", tmp_path / "jax_cache"
    kw = dict(local_devices=DEVICES, cache_dir=cache, extra=["--batch-log", str(batch_log)])
    th.run_driver(th.write_config(config, tmp_path / "two.json"), workdir, **kw)
    first = json.loads((workdir / "eval_metrics.json").read_text())
    assert first["step"] == 2 and first["count"] == N_EVAL  # evaluated every eval clip once
    config.train.num_steps = 4
    th.run_driver(th.write_config(config, tmp_path / "four.json"), workdir, **kw)

    step, _, data_state, _ = checkpoint.restore_on_host(workdir)
    assert step == 4
    # The restarted run went on from the restored iterator: its batches 3 and 4 are a
    # fresh iterator's batches 3 and 4 (a restart from scratch would repeat 1 and 2),
    # and the saved iterator state is the fresh one's after 4 batches.
    task = tasks.get_task(config.stage, experiment.model_config(config))
    fresh = train.train_iterator(config, task, shards["train"].split(","))
    want = [next(fresh) for _ in range(4)]
    log = th.read_batch_log(batch_log)
    assert sorted(log) == [1, 2, 3, 4] and all(len(v) == 1 for v in log.values())
    for s, batch in enumerate(want, 1):
        assert log[s][0]["clip_id"] == [str(c) for c in batch["meta"]["clip_id"]], s
    assert log[1][0]["clip_id"] != log[3][0]["clip_id"]
    assert json.loads(json.dumps(fresh.get_state())) == data_state
    records_ = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records_ if r["phase"] == "eval") == [2, 4]
    assert sorted(r["step"] for r in records_ if r["phase"] == "train") == [1, 2, 3, 4]
