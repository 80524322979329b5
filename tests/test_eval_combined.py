"""`synchformer-jax eval --offset-checkpoint`: offsets among the clips a synchronizability
model accepts (paper Fig. 4 right; official `scripts/test_syncability.py` with `config_off`).

Small random models on synthetic 10-s clips (the +-4.8 s unsynchronizable offset of a
14-segment crop needs 9.6 s): a 13-segment synchronizability model whose head is
rescaled so that p(synchronizable) spreads over (0, 1) on these clips and the thresholds
keep different ones (`_spread_head`), and a 14-segment offset model.

* The command writes `metrics.offset_at_sync_threshold`, equal to
  `offset_accuracy_at_sync_thresholds` of logits computed here without the combined task:
  the examples of a 14-segment synchronizability spec, the synchronizability model on a
  13-segment assembly of the same span, the offset model on the 14-segment one. The usual
  synchronizability metrics in the same JSON are those of the 13-segment logits.
* The synchronizability model sees the first 13 of the 14 segments (not the last 13).
* Usage errors: a non-synchronizability config; offset models that do not fit (a
  synchronizability model, too few segments, another class grid, a file that does not
  say its offset range) are one line naming the file.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from synchformer_jax import cli, experiment, pretrained, sharding, synthetic, train
from synchformer_jax.evaluators.synchronizability import (SYNC_THRESHOLDS, SynchronizabilityMetrics,
                                                         offset_accuracy_at_sync_thresholds, softmax_p1)
from synchformer_jax.input import device as device_lib
from synchformer_jax.input import pipeline as pl
from synchformer_jax.models import convert_torch
from synchformer_jax.models import synchformer as sf
from tests import train_helpers as th

N_CLIPS, ROUNDS = 6, 2  # 12 examples: a full batch of 8 and a padded one
SEED = experiment.default_config(experiment.STAGE_SYNCHRONIZABILITY).seed  # the eval draws' seed
SPEC14 = pl.ExampleSpec(stage="synchronizability", train=False, crop_size=32, n_segments=14)
SPEC13 = pl.ExampleSpec(stage="synchronizability", train=False, crop_size=32, n_segments=13)


def _init(model_config, seed: int):
    return jax.device_get(jax.jit(lambda r: sf.init_params(model_config, r))(jax.random.key(seed)))


def _apply(model_config):
    model = sf.build_model(model_config)
    return jax.jit(lambda params, video, audio: model.apply({"params": params}, video, audio))


def _direct_logits(setup, batches):
    """Both models' logits on the command's examples, without `CombinedSyncOffsetTask`:
    the synchronizability model on a 13-segment assembly of the 14-segment span (its
    first 112 frames / 71 680 samples), the offset model on the 14-segment one."""
    sync, offset = setup["apply_sync"], setup["apply_offset"]
    rows = {k: [] for k in ("sync", "offset", "offset_target", "sync_target", "offset_sec")}
    for batch in batches:
        keep = np.asarray(batch["mask"], bool)
        dev = {k: batch[k] for k in ("video", "audio")}
        rows["sync"].append(np.asarray(sync(setup["sync_params"], *pl.assemble_on_device(dev, SPEC13.layout)))[keep])
        rows["offset"].append(np.asarray(offset(setup["offset_params"],
                                                *pl.assemble_on_device(dev, SPEC14.layout)))[keep])
        for k in ("offset_target", "sync_target", "offset_sec"):
            rows[k].append(np.asarray(batch[k])[keep])
    return {k: np.concatenate(v) for k, v in rows.items()}


def _spread_head(params, logits):
    """A random head gives nearly the same p(sync) to every clip. The head is linear, so
    rescaling its weight and moving its bias maps the logit difference `u` (bias removed)
    of these clips to `scale * u + shift`: standard deviation 2.5 with the 20th percentile
    at 0, so p(sync) spreads over (0, 1) and the thresholds keep different clips."""
    head = params["transformer"]["sync_head"]
    u = (logits[:, 1] - logits[:, 0]) - (head["bias"][1] - head["bias"][0])
    scale = 2.5 / np.std(u)
    head["kernel"] = head["kernel"] * scale
    head["bias"] = np.asarray([0.0, -scale * np.quantile(u, 0.2)], head["bias"].dtype)
    return params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("combined")
    shards = synthetic.make_dataset(root / "data", 0, N_CLIPS, seed=3, height=64, width=64, duration_sec=10.0)
    sync_config = th.small_model(experiment.STAGE_SYNCHRONIZABILITY)
    offset_config = th.small_model(experiment.STAGE_SYNC).replace(n_segments=14)
    out = {"root": root, "eval": ",".join(shards["eval"]), "sync_config": sync_config, "offset_config": offset_config,
           "sync_params": _init(sync_config, 0), "offset_params": _init(offset_config, 1),
           "apply_sync": _apply(sync_config), "apply_offset": _apply(offset_config)}
    # The examples of the command: `--split test` of the config below (seed, rounds, batch 8).
    out["batches"] = list(pl.eval_dataset(out["eval"].split(","), SPEC14, batch_size=8, seed=SEED, rounds=ROUNDS,
                                          read_threads=1))
    out["sync_params"] = _spread_head(out["sync_params"], _direct_logits(out, out["batches"])["sync"])
    out["sync_model"] = str(pretrained.save_model(root / "sync_model", out["sync_params"], sync_config))
    out["offset_model"] = str(pretrained.save_model(root / "offset_model", out["offset_params"], offset_config))
    out["config"] = _config_file(root / "synchronizability_config.py", out["eval"])
    return out


def _config_file(path: pathlib.Path, shards: str, stage: str = "synchronizability") -> pathlib.Path:
    """The small model's stage-III (or another stage's) config; `--split test` reads
    `shards`, ROUNDS random rounds, as `configs/synchronizability.py`'s test group."""
    path.write_text(f'''
import ml_collections
from tests import train_helpers as th


def get_config():
    c = th.small_config({stage!r}, {{"train": "", "eval": ""}}, **{{"data.fixed_offsets": False}})
    c.test = ml_collections.ConfigDict(dict(shards={shards!r}, rounds={ROUNDS}, fixed_offsets=False))
    return c
''')
    return path


def _eval(setup, tmp_path, capsys, offset_checkpoint, config=None):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--config", str(config or setup["config"]), "--workdir", str(tmp_path / "wd"),
                   "--checkpoint", setup["sync_model"], "--split", "test", "--out", str(out),
                   "--offset-checkpoint", str(offset_checkpoint)])
    captured = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.exists() else None), captured


def test_eval_reports_offsets_at_sync_thresholds(setup, tmp_path, capsys):
    rc, record, captured = _eval(setup, tmp_path, capsys, setup["offset_model"])
    assert rc == 0, captured.err
    assert record["offset_checkpoint"] == setup["offset_model"] and record["example_segments"] == 14
    m = record["metrics"]
    assert m["count"] == N_CLIPS * ROUNDS and m["clips_evaluated"] == N_CLIPS

    d = _direct_logits(setup, setup["batches"])
    # The examples are 14-segment ones: the unsynchronizable offset is +-4.8 s, not +-4.48 s.
    assert set(np.round(np.abs(d["offset_sec"][d["sync_target"] == 0]).astype(np.float64), 2).tolist()) == {4.8}
    p = softmax_p1(d["sync"])
    want = offset_accuracy_at_sync_thresholds(d["offset"], d["offset_target"], p, d["sync_target"])
    got = m["offset_at_sync_threshold"]
    assert sorted(got, key=float) == [str(t) for t in SYNC_THRESHOLDS]
    for thr, w in want.items():
        g = got[str(thr)]
        assert (g["count"], g["fraction_kept"]) == (w["count"], w["fraction_kept"]), thr
        for key in ("accuracy_1", "accuracy_5", "accuracy_1_tol1", "accuracy_5_tol1"):
            assert g[key] == w[key], (thr, key)
        for key in ("mAP", "mROCAUC"):
            assert g[key] == (None if np.isnan(w[key]) else pytest.approx(w[key], abs=1e-5)), (thr, key)
    # Not vacuous: the thresholds keep different numbers of items, and some kept item is
    # not synchronizable (its target becomes the wrong class (pred + 5) mod 21).
    assert len({got[str(t)]["count"] for t in SYNC_THRESHOLDS}) > 2
    assert np.any((p > 0.5) & (d["sync_target"] == 0))
    # The usual synchronizability metrics, from the same (13-segment) logits.
    sync = SynchronizabilityMetrics()
    sync.update(d["sync"], d["sync_target"])
    r = sync.result()
    assert m["accuracy_1"] == r["accuracy_1"] and m["roc_auc"] == pytest.approx(r["roc_auc"], abs=1e-9)


def test_the_synchronizability_model_sees_the_first_13_of_14_segments(setup):
    config = th.small_config("synchronizability", {"train": "", "eval": setup["eval"]})
    trainer = train.build_trainer(config)
    params = jax.device_put(setup["sync_params"], trainer.state_shardings.params)
    combined = train.build_offset_model(trainer, setup["offset_params"], setup["offset_config"])
    spec = combined.task.example_spec
    assert spec.segments == 14 and spec.stage == "synchronizability"
    batch = next(iter(train.eval_batches(config, trainer.task, setup["eval"].split(","), spec=spec)))
    host = {k: batch[k] for k in ("video", "audio")}
    out = combined.predict_step(params, combined.params,
                                device_lib.host_to_global(batch, trainer.mesh, sharding.BATCH_AXES))
    video, audio = pl.assemble_on_device(host, spec.layout)
    first = np.asarray(setup["apply_sync"](setup["sync_params"], video[:, :13], audio[:, :13]))
    last = np.asarray(setup["apply_sync"](setup["sync_params"], video[:, 1:], audio[:, 1:]))
    np.testing.assert_allclose(np.asarray(out["logits"]), first, rtol=1e-5, atol=1e-4)

    def margin(logits):  # what p(sync) depends on
        return logits[:, 1] - logits[:, 0]

    np.testing.assert_allclose(margin(np.asarray(out["logits"])), margin(first), atol=2e-3)
    # The check can tell them apart: the last 13 segments move the margin far more.
    assert np.max(np.abs(margin(first) - margin(last))) > 0.05
    offset = setup["apply_offset"](setup["offset_params"], video, audio)
    np.testing.assert_allclose(np.asarray(out["offset_logits"]), np.asarray(offset), rtol=1e-5, atol=1e-4)


def test_offset_checkpoint_needs_a_synchronizability_config(setup, tmp_path, capsys):
    config = _config_file(tmp_path / "sync_config.py", setup["eval"], stage="sync")
    rc, record, captured = _eval(setup, tmp_path, capsys, setup["offset_model"], config=config)
    assert rc == 2 and record is None
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: --offset-checkpoint") and "a sync config" in line


def _misfits(setup, root: pathlib.Path):
    """Offset models that cannot join the evaluation, with what the error must say."""
    from safetensors.numpy import save_file

    def zeros(config):  # the values do not matter: the fit is refused before any is used
        shapes = jax.eval_shape(lambda r: sf.init_params(config, r), jax.random.key(0))
        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)

    base = setup["offset_config"]
    three = base.replace(**{"sync.num_offset_classes": 3, "sync.max_offset_sec": 1.0})
    out = [(setup["sync_model"], "it is a synchronizability model, not an offset (stage II) model")]
    for name, config, message in (
            ("12_segments", base.replace(n_segments=12), "its 12 segments are fewer than the 13"),
            ("3_classes", three, "3 offset classes over +-1 s are not the examples' grid (21 classes over +-2 s)")):
        out.append((str(pretrained.save_model(root / name, zeros(config), config)), message))
    # An official-layout file (no config metadata) of 3 classes does not say their range.
    path = root / "three_classes.safetensors"
    save_file({k: np.asarray(v, order="C") for k, v in convert_torch.flax_to_torch(zeros(three)).items()}, str(path))
    out.append((str(path), "sync.max_offset_sec=S (3 offset classes"))
    return out


def test_offset_models_that_do_not_fit_are_one_line_errors(setup, tmp_path, capsys):
    for path, message in _misfits(setup, tmp_path):
        rc, record, captured = _eval(setup, tmp_path, capsys, path)
        assert rc == 2 and record is None, captured.err
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"error: --offset-checkpoint {path}: ") and message in line, line
