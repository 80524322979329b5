"""Parity of the Flax model with the official PyTorch outputs stored in a reference set.

The set comes from SYNCHFORMER_REFERENCE_DIR (default: the shared tiny set). Every case
must match the official features, intermediate activations and logits within 1e-4.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from synchformer_jax.models import convert_torch
from synchformer_jax.models.synchformer import Synchformer
from tests import reference_data as rd

TOL = 1e-4


@pytest.fixture(scope="module")
def converted(reference_path):
    sd = load_file(rd.require(reference_path / "model.safetensors"))
    config = convert_torch.infer_config(sd, overrides=rd.head_overrides(reference_path))
    return convert_torch.torch_to_flax(sd, config)


@pytest.fixture(scope="module")
def forward(converted):
    model = Synchformer(converted.config)

    @jax.jit
    def run(video, audio):
        return model.apply({"params": converted.params}, video, audio, mutable=["intermediates"])

    return run


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def test_every_case_matches_official_outputs(reference_path, forward):
    lut = rd.constants(reference_path)["rgb_u8_to_model_input_lut"]
    for case_file in rd.case_files(reference_path):
        case = np.load(case_file)
        video = rd.video_input(reference_path, case, lut)
        # The rebuilt input is the official one (sum check from the reference README).
        assert abs(video.astype(np.float64).sum() - float(case["video_input_sum_f64"])) < 1e-6
        logits, state = forward(jnp.asarray(video), jnp.asarray(case["audio_input"]))
        im = state["intermediates"]
        checks = {
            "afeat": (im["afeat"][0], case["afeat"]),
            "vfeat": (im["vfeat"][0], case["vfeat"]),
            "aproj_out": (im["aproj_out"][0], case["aproj_out"]),
            "vproj_out": (im["vproj_out"][0], case["vproj_out"]),
            "ast_last_hidden_state": (im["afeat_extractor"]["last_hidden_state"][0], case["ast_last_hidden_state"]),
            "mf_tokens_last_block_seg0": (im["vfeat_extractor"]["tokens_last_block"][0][0],
                                          case["mf_tokens_last_block_seg0"]),
            "transformer_tokens_after_pos_emb": (im["transformer"]["tokens_after_pos_emb"][0],
                                                 case["transformer_tokens_after_pos_emb"]),
            "transformer_block_outs": (jnp.stack(im["transformer"]["block_outs"]), case["transformer_block_outs"]),
            "transformer_ln_f_out": (im["transformer"]["ln_f_out"][0], case["transformer_ln_f_out"]),
            "logits": (logits, case["logits"]),
        }
        errors = {name: _max_abs(ours, theirs) for name, (ours, theirs) in checks.items()}
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"{case_file.name}: max abs error above {TOL}: {bad}"
        assert int(np.argmax(logits)) == int(np.argmax(case["logits"]))
        loss = -jax.nn.log_softmax(logits)[0, int(case["offset_class"])]
        assert abs(float(loss) - float(case["loss_cross_entropy"])) <= TOL


def test_split_entry_points_and_chunking_match_full_forward(reference_path, converted):
    """extract_video_features / extract_audio_features / compare, chunked, give the same logits."""
    from synchformer_jax.models import synchformer as sf

    model = Synchformer(converted.config)
    case = np.load(rd.case_files(reference_path)[0])
    lut = rd.constants(reference_path)["rgb_u8_to_model_input_lut"]
    video = jnp.asarray(rd.video_input(reference_path, case, lut))
    audio = jnp.asarray(case["audio_input"])
    vfeat = jax.jit(functools.partial(sf.extract_video_features, model, chunk_size=5))(converted.params, video)
    afeat = jax.jit(functools.partial(sf.extract_audio_features, model, chunk_size=3))(converted.params, audio)
    assert _max_abs(vfeat, case["vfeat"]) <= TOL
    assert _max_abs(afeat, case["afeat"]) <= TOL
    logits = jax.jit(functools.partial(sf.compare, model))(converted.params, vfeat, afeat)
    assert _max_abs(logits, case["logits"]) <= TOL
