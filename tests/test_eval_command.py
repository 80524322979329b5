"""What an evaluation reads and reports (`synchformer-jax eval`, `train.evaluate`).

Records come from `synchformer-jax prepare` over real mp4 files and lists, the model is a
saved model folder of the small test model; the command runs in this process.

* The eval command reads exactly the shards it is given: `data.eval_shards` alone (no
  train shards, no synthetic clips), `--split test` with train shards that do not exist;
  the JSON names the files it read. Training with eval shards but no train shards is an
  error, not a synthetic run.
* Under `data.fixed_offsets`, a record with offset labels is scored at them, one without
  at the seeded draw of the random protocol (the same batch as `fixed_offsets=None`);
  the results count both.
* Clips of a list that prepare could not write are reported (`coverage`: listed,
  evaluated, missing with ids) with a warning line.
* Skipped records go to `skipped.jsonl` (eval command, training), and a training resume
  forgets only the lines after its checkpoint.
* An evaluation that scored nothing exits 1 with one `error:` line; the metrics JSON is
  strict JSON.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from synchformer_jax import cli, experiment, metric_writers, pretrained, train
from synchformer_jax import prepare as prep
from synchformer_jax.input import pipeline as pl
from synchformer_jax.input import shards as shard_lib
from synchformer_jax.models import synchformer as sf
from synchformer_jax.skip_log import SkipLog
from tests import train_helpers as th
from tests.test_prepare import make_video

PRESENT = ["aaaaaaaaaaa_0_10000", "bbbbbbbbbbb_0_10000", "ccccccccccc_0_10000"]
ABSENT = "mmmmmmmmmmm_0_10000"  # listed, no media
SHORT = "sssssssssss_0_10000"  # 2 s: too short for a stage-II crop
FIXED = {PRESENT[0]: (0.4, 1.0)}  # the fixed-offset CSV's one row
SPEC = pl.ExampleSpec(stage="sync", train=False, crop_size=32, n_segments=2)


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    media = root / "media"
    for i, clip in enumerate(PRESENT):
        make_video(media / f"{clip}.mp4", seconds=8.0, seed=i)
    make_video(media / f"{SHORT}.mp4", seconds=2.0, seed=9)
    ids = root / "lists" / "vggsound_test.txt"
    ids.parent.mkdir()
    ids.write_text("\n".join(PRESENT + [ABSENT]) + "\n")
    csv = root / "lists" / "test_size21_crop5_min-2.00_max2.00.csv"
    csv.write_text("path,offset_sec,vstart_sec\n" + "".join(f"{c},{o},{v}\n" for c, (o, v) in FIXED.items()))
    with_short = root / "lists" / "short_test.txt"
    with_short.write_text(f"{PRESENT[1]}\n{SHORT}\n")
    only_short = root / "lists" / "shortonly_test.txt"
    only_short.write_text(f"{SHORT}\n")
    out = {}
    for name, lst in (("ids", ids), ("fixed", csv), ("with_short", with_short), ("only_short", only_short)):
        prep.prepare([lst], root / name, media_root=media, name=name.replace("_", ""), split="test",
                     list_format="vggsound" if lst.suffix == ".txt" else "auto", num_workers=0, progress=False)
        out[name] = ",".join(str(p) for p in shard_lib.list_shards(root / name, "test"))

    model_config = th.small_model(experiment.STAGE_SYNC)
    params = jax.jit(lambda r: sf.init_params(model_config, r))(jax.random.key(0))
    out["model"] = str(pretrained.save_model(root / "model", jax.device_get(params), model_config))
    out["root"] = root
    return out


def _config_file(path: pathlib.Path, test_shards: str = "") -> pathlib.Path:
    """The small test model's stage-II config; no shards (the command line sets them); a
    synthetic set of 1 + 2 tiny clips, so that evaluating it by mistake is quick and shows."""
    path.write_text(f'''
import ml_collections
from tests import train_helpers as th


def get_config():
    c = th.small_config("sync", {{"train": "", "eval": ""}}, **{{
        "data.synthetic_train": 1, "data.synthetic_eval": 2, "data.eval_rounds": 1}})
    c.data.synthetic_clip = ml_collections.ConfigDict(dict(height=64, width=64, duration_sec=8.0))
    c.test = ml_collections.ConfigDict(dict(shards={test_shards!r}, rounds=2, fixed_offsets=False))
    return c
''')
    return path


def _eval(data, tmp_path, capsys, *overrides, split="valid", test_shards=""):
    config = _config_file(tmp_path / "eval_config.py", test_shards)
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--config", str(config), "--workdir", str(tmp_path / "wd"), "--checkpoint", data["model"],
                   "--split", split, "--out", str(out), *overrides])
    captured = capsys.readouterr()
    record = _strict_json(out.read_text()) if out.exists() else None
    return rc, record, captured


def test_eval_reads_only_the_given_shards(data, tmp_path, capsys):
    rc, record, _ = _eval(data, tmp_path, capsys, f"--config.data.eval_shards={data['ids']}")
    assert rc == 0
    assert not (tmp_path / "wd" / "synthetic").exists()  # no generated clips stood in for them
    assert record["eval_shards"] == data["ids"] and record["eval_files"] == data["ids"].split(",")
    assert record["metrics"]["count"] == record["metrics"]["clips_evaluated"] == len(PRESENT)


def test_eval_split_test_needs_no_train_shards(data, tmp_path, capsys):
    rc, record, _ = _eval(data, tmp_path, capsys, f"--config.data.train_shards={tmp_path}/absent-train.array_record-*",
                          split="test", test_shards=data["fixed"])
    assert rc == 0
    assert record["eval_files"] == data["fixed"].split(",") and record["eval_rounds"] == 2
    assert record["metrics"]["count"] == 2 and record["metrics"]["clips_evaluated"] == 1
    assert record["metrics"]["offsets_drawn"] == 2  # the test protocol draws (fixed_offsets False)


def test_training_refuses_eval_shards_without_train_shards(data, tmp_path):
    config = experiment.default_config(experiment.STAGE_SYNC)
    config.data.eval_shards = data["ids"]
    with pytest.raises(ValueError, match="data.train_shards is empty"):
        train.data_paths(config, tmp_path)
    assert not (tmp_path / "synthetic").exists()


def test_unlabelled_records_get_the_seeded_draw(data):
    """`fixed_offsets="labels"` on records without offset labels: exactly the batches of
    the random protocol (`None`), marked "drawn"; a labelled record: its labels."""
    kw = dict(batch_size=2, seed=3, rounds=2, read_threads=1)
    got = list(pl.eval_dataset(data["ids"].split(","), SPEC, fixed_offsets="labels", **kw))
    want = list(pl.eval_dataset(data["ids"].split(","), SPEC, fixed_offsets=None, **kw))
    assert sum(int(b["mask"].sum()) for b in got) == 2 * len(PRESENT)
    for g, w in zip(got, want, strict=True):
        for key in ("video", "audio", "offset_target", "offset_sec", "v_start_i_sec", "index", "mask"):
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
        assert list(g["meta"]["offset"][g["mask"]]) == ["drawn"] * int(g["mask"].sum())
    (fixed,) = list(pl.eval_dataset(data["fixed"].split(","), SPEC, fixed_offsets="labels", **dict(kw, rounds=1)))
    assert fixed["offset_sec"][0] == np.float32(FIXED[PRESENT[0]][0]) and fixed["meta"]["offset"][0] == "fixed"
    assert fixed["v_start_i_sec"][0] == np.float32(FIXED[PRESENT[0]][1])


def test_mixed_offsets_are_counted_and_missing_list_clips_reported(data, tmp_path, capsys):
    shards = f"{data['ids']},{data['fixed']}"
    rc, record, captured = _eval(data, tmp_path, capsys, f"--config.data.eval_shards={shards}")
    assert rc == 0
    m = record["metrics"]
    assert (m["count"], m["offsets_fixed"], m["offsets_drawn"]) == (len(PRESENT) + 1, 1, len(PRESENT))
    cov = record["coverage"]
    # Listed: the id list's 4 rows and the CSV's 1; evaluated: all 4 records that exist.
    assert (cov["listed"], cov["evaluated"], cov["missing"]) == (len(PRESENT) + 2, len(PRESENT) + 1, 1)
    assert cov["missing_ids"] == [ABSENT] and cov["missing_reasons"] == {"no such file": 1}
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and ABSENT in warning[0]
    assert warning[0].startswith("warning: 4 of 5 listed clips evaluated")


def test_skipped_records_are_listed_and_persisted(data, tmp_path, capsys):
    rc, record, captured = _eval(data, tmp_path, capsys, f"--config.data.eval_shards={data['with_short']}")
    assert rc == 0
    assert record["metrics"]["skipped_records"] == 1 and record["metrics"]["count"] == 1
    assert len(record["skipped"]) == 1 and SHORT in record["skipped"][0]
    assert record["coverage"]["evaluated"] == 1 and record["coverage"]["prepared"] == 2
    (entry,) = SkipLog(tmp_path / "wd").read()
    assert entry["phase"] == "eval_valid" and SHORT in entry["skipped"] and entry["checkpoint"] == data["model"]
    assert "1 prepared clips skipped at evaluation" in captured.err


def test_evaluation_of_nothing_is_an_error(data, tmp_path, capsys):
    rc, record, captured = _eval(data, tmp_path, capsys, f"--config.data.eval_shards={data['only_short']}")
    assert rc == 1 and record is None
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scored no clips" in errors[0] and SHORT in errors[0], captured.err
    assert captured.out == ""
    assert SHORT in SkipLog(tmp_path / "wd").read()[0]["skipped"]  # the reason stays on disk


def test_json_safe_writes_no_nan():
    got = metric_writers.json_values({"a": np.float32("nan"), "b": [1.0, float("inf")], "c": {"d": np.int64(3)}})
    assert got == {"a": None, "b": [1.0, None], "c": {"d": 3}}
    assert _strict_json(json.dumps(got, allow_nan=False)) == got


def test_skip_log_resume_keeps_only_what_the_checkpoint_covers(tmp_path):
    log = SkipLog(tmp_path)
    log.append("train", 1, ["clip 'a': x"])
    log.append("eval", 2, ["clip 'b': y"])
    log.append("eval_valid", 7, ["clip 'c': z"], checkpoint="best")
    log.append("train", 3, ["clip 'a': x", "clip 'd': w"])
    with open(log.path, "a") as f:
        f.write('{"phase": "train", "st')  # torn by a kill
    assert log.resume(2) == 1
    assert [(e["phase"], e["step"]) for e in log.read()] == [("train", 1), ("eval", 2), ("eval_valid", 7)]
    assert log.resume(0) == 0 and [e["phase"] for e in log.read()] == ["eval_valid"]


def test_training_persists_skips_across_a_resume(data, tmp_path):
    """Train shards with one too-short clip among 6, batches of 8: every step skips it.
    A run stopped at step 2 whose log went on past its checkpoint (a kill: a step-3 line),
    resumed to step 4: the step-3 line is gone, the lines up to the checkpoint stay, each
    skip is logged once and the skip count runs on from before the resume."""
    shards = {"train": f"{data['ids']},{data['with_short']},{data['fixed']}", "eval": data["fixed"]}
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"train.num_steps": 2, "train.checkpoint_every": 2})
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    before = [e for e in SkipLog(workdir).read() if e["phase"] == "train"]
    assert before and all(SHORT in e["skipped"] for e in before)
    SkipLog(workdir).append("train", 3, ["clip 'x' at index 0: logged by the killed run"])
    config.train.num_steps = 4
    train.train_and_evaluate(config, workdir)

    entries = [e for e in SkipLog(workdir).read() if e["phase"] == "train"]
    assert entries[:len(before)] == before and all(SHORT in e["skipped"] for e in entries)
    assert len(entries) > len(before) and {e["step"] for e in entries[len(before):]} <= {3, 4}
    assert th.read_metrics(workdir)[4]["skipped_records"] == len(entries)
    eval_metrics = _strict_json((workdir / "eval_metrics.json").read_text())
    assert eval_metrics["clips_listed"] == 1 and eval_metrics["clips_missing"] == 0
    assert eval_metrics["clips_evaluated"] == 1 and eval_metrics["offsets_fixed"] == 1


def test_misspelt_best_metric_is_an_error_at_the_first_evaluation(data, tmp_path):
    """`train.best_metric` names a key of the stage's evaluation; a misspelt one used to
    mean no best checkpoint, ever, without a word."""
    shards = {"train": f"{data['ids']},{data['fixed']}", "eval": data["fixed"]}
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"train.num_steps": 1, "train.checkpoint_every": 1,
                                                                 "train.best_metric": "acc1"})
    with pytest.raises(ValueError, match=r"train.best_metric='acc1' is not reported .*accuracy_1"):
        train.train_and_evaluate(config, tmp_path / "run")


def test_a_training_workdir_is_a_model_for_convert_and_predict(data, tmp_path, capsys):
    """`predict` / `export` / `convert` take a run's workdir as it is (its best checkpoint,
    else its latest): no Python needed between training and using the model."""
    from synchformer_jax import checkpoint

    shards = {"train": f"{data['ids']},{data['fixed']}", "eval": data["fixed"]}
    config = th.small_config(experiment.STAGE_SYNC, shards, **{"train.num_steps": 1, "train.checkpoint_every": 1})
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    loaded = pretrained.load_model(workdir)
    params, model_config = checkpoint.restore_params(workdir, checkpoint.BEST)
    assert loaded.config == model_config
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    assert cli.main(["convert", str(workdir), "--out", str(tmp_path / "model")]) == 0, capsys.readouterr().err
    assert pretrained.load_model(tmp_path / "model").config == model_config
    with pytest.raises(pretrained.CheckpointError, match="no usable checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        pretrained.load_model(tmp_path / "empty")
