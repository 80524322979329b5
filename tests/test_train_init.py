"""`train.init_from`: what a stage starts from.

* Stage II from a stage-I model of the same depths: every frozen extractor tensor comes
  from it, the new sync transformer keeps its init (trainable, the legitimate partial case).
* From a shallower stage-I model the extra frozen blocks would stay random and never
  train: refused with a message naming them, unless `init_from_partial` is set.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from synchformer_jax import experiment, pretrained, train
from synchformer_jax.models import synchformer as sf
from tests import train_helpers as th


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    """A stage-I model folder of the trainer tests' small model (video depth 2, audio 1)."""
    config = th.small_model(experiment.STAGE_AVCLIP)
    params = sf.init_params(config, jax.random.key(3))
    return pretrained.save_model(tmp_path_factory.mktemp("init") / "stage1", params, config), params


def _stage2(**model):
    config = th.small_config(experiment.STAGE_SYNC, {"train": "", "eval": ""},
                             **{f"model.{k}": v for k, v in model.items()})
    model_config = experiment.model_config(config)
    return config, model_config, sf.init_params(model_config, jax.random.key(0))


def _frozen(flat, config):
    rx = re.compile(config.optim.frozen)
    return {p for p in flat if rx.search("/".join(p))}


def test_stage2_from_stage1_of_the_same_depths(stage1_dir):
    folder, _ = stage1_dir
    config, model_config, params = _stage2()
    out, notes = train.init_from(params, str(folder), config, model_config)
    before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(out)
    loaded = traverse_util.flatten_dict(pretrained.load_model(folder).params)
    frozen = _frozen(after, config)
    assert frozen and all(p[0] in ("vfeat_extractor", "afeat_extractor") for p in frozen)
    # Every frozen tensor is the stage-I model's (stage I calls the extractors v_encoder /
    # a_encoder; the values are matched by the official key, so compare by value).
    stage1_values = {np.asarray(v).tobytes() for v in loaded.values()}
    assert all(np.asarray(after[p]).tobytes() in stage1_values for p in frozen)
    assert any(not np.array_equal(after[p], before[p]) for p in frozen)
    # The sync transformer is new: it keeps its init.
    new = [p for p in after if p[0] == "transformer"]
    assert new and all(np.array_equal(after[p], before[p]) for p in new)
    assert notes[0].startswith("initialised ")


def test_shallower_source_for_frozen_extractors_is_refused(stage1_dir):
    folder, _ = stage1_dir
    config, model_config, params = _stage2(**{"video.depth": 3, "audio.num_layers": 2})
    with pytest.raises(ValueError) as info:
        train.init_from(params, str(folder), config, model_config)
    msg = str(info.value)
    # Exactly the tensors of the extra blocks are missing: the deeper model's frozen
    # tensors that the same-depth model does not have.
    same_config, _, same = _stage2()
    extra = sorted("/".join(p) for p in _frozen(traverse_util.flatten_dict(params), config)
                   - _frozen(traverse_util.flatten_dict(same), same_config))
    assert any("/layer_1/" in p for p in extra) and any("/blocks_2/" in p for p in extra)
    counted = re.search(r"lacks (\d+) of the model's (\d+) frozen parameters", msg)
    assert counted and int(counted.group(1)) == len(extra)
    named = re.search(r"\): (.*?)(, \.\.\.)?\. They would", msg).group(1).split(", ")
    assert len(named) == 4 and set(named) <= set(extra)
    assert "init_from_partial" in msg and "\n" not in msg


def test_partial_init_of_frozen_parameters_when_asked(stage1_dir):
    folder, _ = stage1_dir
    config, model_config, params = _stage2(**{"video.depth": 3, "audio.num_layers": 2})
    config.init_from_partial = True
    out, notes = train.init_from(params, str(folder), config, model_config)
    assert any("left random (init_from_partial)" in n for n in notes)
    before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(out)
    frozen = _frozen(after, config)
    kept = [p for p in frozen if np.array_equal(after[p], before[p])]
    assert 0 < len(kept) < len(frozen)
