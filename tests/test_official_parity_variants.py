"""bench/official_parity.py's variant table, checked without torch: the sizes it builds
officially are ones this package can convert with the head counts it will give."""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from synchformer_jax.models import convert_torch as ct
from synchformer_jax.models.config import ModelConfig
from synchformer_jax.models.synchformer import abstract_params

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


pv = _bench_module("parity_variants")
TINY = [v for v in pv.VARIANTS.values() if not v.full]


@pytest.mark.parametrize("variant", list(pv.VARIANTS.values()), ids=lambda v: v.name)
def test_head_counts_divide_widths_and_match_the_config(variant):
    config = variant.expected_config()
    for width, heads in ((config.audio.hidden_size, config.audio.num_heads),
                         (config.video.embed_dim, config.video.num_heads),
                         (config.sync.n_embd, config.sync.n_head)):
        assert heads >= 1 and width % heads == 0, (width, heads)
    expected = variant.expected_heads()
    assert expected["ast"] == config.audio.num_heads and expected["mf"] == config.video.num_heads
    if variant.is_stage_one:
        assert "sync" not in expected and config.audio.hidden_size == config.video.embed_dim  # one n_embd
    else:
        assert expected["sync"] == config.sync.n_head
    if variant.full:  # the official yaml as it is: nothing to give
        assert variant.overrides() == {}
        assert config == (ModelConfig.avclip() if variant.is_stage_one else ModelConfig())


def test_tiny_variants_cover_the_configs_and_class_counts():
    assert {v.official_config for v in TINY} == {pv.SYNC, pv.SYNCHRONIZABILITY, pv.SEGMENT_AVCLIP}
    assert {v.num_off_cls or 21 for v in TINY if v.official_config == pv.SYNC} >= {3, 21, 41}
    # Every tiny width is unofficial, so each needs (and tests) a given head count.
    for v in TINY:
        assert all(w != pv.OFFICIAL_WIDTH for w in (v.audio_size().hidden, v.video_size().dim)), v.name


def _trainer_args(variant) -> dict:
    """What the converter reads of the `args` the worker's checkpoint carries."""
    if variant.is_stage_one:
        return {}
    data = {"max_off_sec": variant.max_off_sec if variant.max_off_sec is not None else 2.0}
    return {"data": data, "model": {"params": {"transformer": {"params": {"n_head": variant.sync_size().n_head}}}}}


@pytest.mark.parametrize("variant", TINY, ids=lambda v: v.name)
def test_overrides_convert_a_state_dict_of_that_size(variant):
    expected = variant.expected_config()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_params(expected))
    state_dict = ct.flax_to_torch(params)
    if variant.is_stage_one:
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}  # as epoch_best.pt stores it

    config = ct.infer_config(state_dict, embedded=_trainer_args(variant), overrides=variant.overrides())
    assert config == expected, [f.name for f in dataclasses.fields(config)
                                if getattr(config, f.name) != getattr(expected, f.name)]
    back = ct.torch_to_flax(state_dict, config).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), back, params)

    # The overrides are needed: without them the file does not say the head counts.
    with pytest.raises(ct.ConversionError) as info:
        ct.infer_config(state_dict, embedded=_trainer_args(variant))
    for key in variant.overrides():
        if key != "sync.n_head":  # the trainer's args carry that one
            assert key in str(info.value)


def test_all_runs_only_the_tiny_variants_unless_full():
    parity = _bench_module("official_parity")
    assert [v.name for v in parity.select_variants("all", full=False)] == [v.name for v in TINY]
    assert len(parity.select_variants("all", full=True)) == len(pv.VARIANTS)
    with pytest.raises(SystemExit, match="--full"):
        parity.select_variants("v1,v6", full=False)
