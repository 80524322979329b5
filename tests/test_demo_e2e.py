"""The demo end to end on a tiny budget (8 fake CPU devices, see conftest.py).

Stage I for 2 steps -> checkpoint -> `run_demo` with 4 stage-I steps resumes it at step 2
-> feature cache of the stage-I extractors -> stage II from the stage-I run, trained on
the cache -> evaluation on held-out clips at fixed offsets -> `eval_metrics.json`,
`results.json` and a loadable model folder.
"""
import json
import logging
import pathlib

import numpy as np

from synchformer_jax import checkpoint, demo, feature_cache, pretrained, train

REPO = pathlib.Path(__file__).resolve().parents[1]

# Global batches are multiples of the 8 devices; one block per extractor and one sync
# layer keep the compiles short. Both stages get the same model overrides (stage II loads
# the stage-I extractors).
OVERRIDES = {
    "data.synthetic_train": 8, "data.synthetic_eval": 8, "data.synthetic_workers": 1,
    "data.eval_batch_size": 8, "data.read_threads": 1,
    "model.video.depth": 1, "model.audio.num_layers": 1, "model.sync.n_layer": 1,
    "train.log_every": 1,
    "segment_avclip.data.batch_size": 8, "segment_avclip.train.eval_max_batches": 1,
    "sync.data.batch_size": 8, "sync.train.num_steps": 3, "sync.train.checkpoint_every": 3,
    "sync.train.eval_every": 3,
}


def _train_steps(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["phase"] == "train"]


def test_demo_end_to_end_with_resume(tmp_path):
    stage1 = tmp_path / demo.STAGE1_DIR

    # Stage I alone for 2 steps: a checkpoint at step 2.
    ov = dict(OVERRIDES, **{"segment_avclip.train.num_steps": 2, "segment_avclip.train.checkpoint_every": 2,
                            "segment_avclip.train.eval_every": 2})
    c1, _ = demo.prepare_configs(tmp_path, fast=True, overrides=ov)
    assert c1.data.batch_size % 8 == 0
    train.train_and_evaluate(c1, stage1)
    ckpts = checkpoint.RunCheckpoints(stage1, keep=1)
    assert ckpts.latest_step() == 2
    ckpts.close()
    assert _train_steps(stage1) == [1, 2]

    # The whole demo with 4 stage-I steps: stage I resumes at step 3, then stage II.
    ov = dict(OVERRIDES, **{"segment_avclip.train.num_steps": 4, "segment_avclip.train.checkpoint_every": 4,
                            "segment_avclip.train.eval_every": 4})
    results = demo.run_demo(tmp_path, fast=True, overrides=ov, echo=lambda s: None)
    assert _train_steps(stage1) == [1, 2, 3, 4]  # continued, not restarted
    assert _train_steps(tmp_path / demo.STAGE2_DIR) == [1, 2, 3]

    metrics = json.loads((tmp_path / demo.STAGE2_DIR / "eval_metrics.json").read_text())
    assert metrics["step"] == 3
    assert metrics["count"] == 8  # every held-out clip once, padding masked out
    for key in ("accuracy_1", "accuracy_1_tol1", "accuracy_5", "accuracy_5_tol1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["accuracy_1"] <= metrics["accuracy_1_tol1"] and metrics["accuracy_1"] <= metrics["accuracy_5"]
    assert len(metrics["per_class_accuracy_1"]) == 21

    assert results["stage2"]["count"] == 8 and results["fast"] and not results["passed"]
    assert results["timings"]["cpu_sec"] > 0
    assert (tmp_path / "results.json").exists()

    # The model folder is the final stage-II model: config of the sync kind, params loadable.
    loaded = pretrained.load_model(tmp_path / demo.MODEL_DIR)
    assert loaded.config.kind == "sync" and loaded.config.sync.num_offset_classes == 21
    assert loaded.config.video.img_size == c1.model.video.img_size
    assert set(loaded.params) >= {"vfeat_extractor", "afeat_extractor", "transformer"}
    # Its provenance names the clips it learnt from (the attribution check reads the cue).
    assert pretrained.read_provenance(tmp_path / demo.MODEL_DIR)["synthetic_clip"]["cue"] == "onset"

    # Stage II trained on the cache of exactly the extractors it kept frozen.
    manifest = json.loads((tmp_path / "feature_cache" / "manifest.json").read_text())
    assert manifest["num_clips"] == 8 and not manifest["skipped"]
    assert manifest["extractor_params_sha256"] == feature_cache.extractor_params_sha256(loaded.params)


def test_demo_command_overrides(tmp_path, capsys):
    """`demo --set` reaches both stage configs (or one, by prefix); an unknown field is a
    usage error before any work starts."""
    from synchformer_jax import cli

    c1, c2 = demo.stage_configs(fast=True, overrides={"seed": 7, "sync.train.num_steps": 5})
    assert (c1.seed, c2.seed) == (7, 7) and c2.train.num_steps == 5 and c1.train.num_steps != 5
    rc = cli.main(["demo", "--fast", "--workdir", str(tmp_path / "w"), "--set", "train.no_such_field=1"])
    assert rc == 2 and "no_such_field" in capsys.readouterr().err
    assert not (tmp_path / "w" / demo.SYNTHETIC_DIR).exists()


def test_pulse_demo_trains_stage_two_through_the_window_curriculum(tmp_path, caplog):
    """`configs/demo_pulse.py`: pulse clips, and stage II draws its cached windows through
    the config's window curriculum (the trainer's path from `data.window_curriculum`)."""
    config_path = REPO / "configs" / "demo_pulse.py"
    ov = dict(OVERRIDES, **{"segment_avclip.train.num_steps": 1, "segment_avclip.train.checkpoint_every": 1,
                            "segment_avclip.train.eval_every": 1})
    c1, c2 = demo.stage_configs(config_path, fast=True, overrides=ov)
    assert c1.data.synthetic_clip.cue == c2.data.synthetic_clip.cue == "pulse"
    assert tuple(map(tuple, c2.data.window_curriculum.phases))[0] == (1000, 0.2)
    with caplog.at_level(logging.INFO, logger="synchformer_jax.feature_cache"):
        results = demo.run_demo(tmp_path, fast=True, config_path=config_path, overrides=ov, echo=lambda s: None)
    assert results["stage2"]["count"] == 8
    assert any("window curriculum [(1000, 0.2)" in r.getMessage() for r in caplog.records)
    # Every cached clip has its one event as the anchor the phases centre on.
    cache = feature_cache.FeatureCache(tmp_path / "feature_cache")
    assert len(cache) == 8 and np.all(np.isfinite(cache.index["anchor_sec"]))
    assert pretrained.read_provenance(tmp_path / demo.MODEL_DIR)["synthetic_clip"]["cue"] == "pulse"
