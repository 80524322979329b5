"""Official state dicts <-> Flax params: key coverage at full size, exact round trips."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util

from synchformer_jax.models import convert_torch as ct
from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY, KIND_AVCLIP, KIND_SYNC, ModelConfig, tiny_config
from synchformer_jax.models.synchformer import abstract_params, init_params

MANIFEST_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "manifests"
MANIFESTS = {
    "sync": "sync_full_state_dict.json",
    "segment_avclip": "segment_avclip_full_state_dict.json",
    "ft_synchability": "ft_synchability_full_state_dict.json",
}
UNUSED = {"vfeat_extractor.patch_embed.proj.weight", "vfeat_extractor.patch_embed.proj.bias",
          "v_encoder.patch_embed.proj.weight", "v_encoder.patch_embed.proj.bias"}


def _manifest(name: str) -> dict:
    path = MANIFEST_DIR / MANIFESTS[name]
    if not path.exists():
        pytest.skip(f"full-size manifests not available at {MANIFEST_DIR}")
    return json.loads(path.read_text())


def _entries(manifest: dict) -> list[dict]:
    for key in ("state_dict", "entries", "tensors"):
        if key in manifest:
            return manifest[key]
    raise AssertionError(f"unrecognised manifest layout: {list(manifest)}")


@pytest.mark.parametrize("name, kind, head, n_segments", [
    ("sync", KIND_SYNC, "offset", 14),
    ("segment_avclip", KIND_AVCLIP, "offset", 14),
    ("ft_synchability", KIND_SYNC, HEAD_SYNCHRONIZABILITY, 13),
])
def test_full_size_manifest_maps_one_to_one(name, kind, head, n_segments):
    manifest = _manifest(name)
    shapes = {e["key"]: tuple(e["shape"]) for e in _entries(manifest)}
    config = ct.infer_config(shapes)
    assert config.kind == kind and config.sync.head == head
    assert config.n_segments == n_segments
    assert config.video.embed_dim == config.audio.hidden_size == 768
    plan = ct.plan_conversion(shapes, config)

    # Every key maps to exactly one Flax parameter of the right shape, and back.
    flat = traverse_util.flatten_dict(abstract_params(config))
    assert len(set(plan.paths.values())) == len(plan.paths) == len(flat)
    for key, path in plan.paths.items():
        original = plan.renamed[key]
        assert ct.flax_shape(key, shapes[original]) == tuple(flat[path].shape), key
        assert ct.flax_path_to_torch_key(path) == key
    # Nothing left over but the documented unused 2-D patch embedding.
    leftovers = set(shapes) - {plan.renamed[k] for k in plan.paths}
    assert leftovers == {plan.renamed[k] for k in plan.passthrough}
    assert {k.removeprefix("module.") for k in leftovers} <= UNUSED and len(leftovers) == 2

    # The model built by eval_shape has the manifest's parameter count.
    n_flax = sum(int(np.prod(s.shape)) for s in flat.values())
    n_unused = sum(int(np.prod(shapes[k])) for k in leftovers)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert n_flax + n_unused == total
    summary = json.loads((MANIFEST_DIR / "param_counts_summary.json").read_text())
    assert total == summary[name]["total_params"]


def test_synchronizability_initialised_from_stage_two_truncates_table():
    config = tiny_config()
    params = init_params(config, jax.random.key(0))
    sd = ct.flax_to_torch(params)
    target = config.replace(**{"sync.head": HEAD_SYNCHRONIZABILITY}, n_segments=13)
    # Stage III starts from stage II: off_head is dropped, sync_head is new.
    sd = {k: v for k, v in sd.items() if not k.startswith("transformer.off_head")}
    sd_with_head = dict(sd)
    sd_with_head["transformer.sync_head.weight"] = np.zeros((2, 64), np.float32)
    sd_with_head["transformer.sync_head.bias"] = np.zeros((2,), np.float32)
    converted = ct.torch_to_flax(sd_with_head, target)
    table = converted.params["transformer"]["pos_emb_cfg"]["pos_emb"]
    assert table.shape == (1, 184, 64)
    np.testing.assert_array_equal(table, sd["transformer.pos_emb_cfg.pos_emb"][:, :184])
    assert any("truncated" in n for n in converted.notes)
    with pytest.raises(ct.ConversionError, match="missing 2: transformer.sync_head.bias"):
        ct.torch_to_flax(sd, target)


@pytest.mark.parametrize("kind", [KIND_SYNC, KIND_AVCLIP])
def test_round_trip_is_exact(kind):
    config = tiny_config(kind=kind)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(1)))
    rng = np.random.default_rng(0)
    # Random values everywhere so that a swapped or transposed tensor cannot hide.
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    sd = ct.flax_to_torch(params)
    unused = {k for k in sd if k.endswith(ct.UNUSED_SUFFIXES)}
    assert len(unused) == 2
    sd = {k: (rng.standard_normal(v.shape).astype(np.float32) if k in unused else v) for k, v in sd.items()}
    back = ct.torch_to_flax(sd, ct.infer_config(sd, overrides={"video.num_heads": 4, "audio.num_heads": 4,
                                                               "sync.n_head": 4}))
    # Shapes compared as well as values: assert_array_equal broadcasts, so the 0-d
    # `logit_scale` read back as (1,) (which the model then refused) would pass it.
    jax.tree.map(lambda x, y: (np.testing.assert_array_equal(x, y), _same_shape(x, y)), back.params, params)
    again = ct.flax_to_torch(back.params, back.passthrough)
    assert list(again) and set(again) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)
        assert again[k].shape == sd[k].shape and again[k].dtype == np.float32, k
    if kind == KIND_AVCLIP:
        assert sd["logit_scale"].shape == back.params["logit_scale"].shape == ()


def _same_shape(x, y):
    assert np.shape(x) == np.shape(y), (np.shape(x), np.shape(y))


def test_stage_one_keys_feed_the_sync_model():
    """An AVCLIP file (DDP `module.` prefix) initialises the sync model's extractors."""
    avclip = tiny_config(kind=KIND_AVCLIP)
    params = init_params(avclip, jax.random.key(2))
    sd = {"module." + k: v for k, v in ct.flax_to_torch(params).items()}
    converted = ct.torch_to_flax(sd, tiny_config(), modules=["vfeat_extractor", "afeat_extractor"])
    assert set(converted.params) == {"vfeat_extractor", "afeat_extractor"}
    np.testing.assert_array_equal(converted.params["afeat_extractor"]["ast"]["embeddings"]["cls_token"],
                                  params["a_encoder"]["ast"]["embeddings"]["cls_token"])
    assert "stripped the DDP prefix `module.`" in converted.notes
    assert any("logit_scale" in n for n in converted.notes)


def test_visual_only_state_dict_like_mmaudio():
    config = tiny_config()
    sd = ct.flax_to_torch(init_params(config, jax.random.key(3)))
    visual = {k: v for k, v in sd.items() if k.startswith("vfeat_extractor.")}
    converted = ct.torch_to_flax(visual, config, modules=["vfeat_extractor"])
    assert set(converted.params) == {"vfeat_extractor"}
    with pytest.raises(ct.ConversionError, match="missing"):
        ct.torch_to_flax(visual, config)


def test_mismatches_are_reported_by_name():
    config = tiny_config()
    sd = ct.flax_to_torch(init_params(config, jax.random.key(4)))
    bad = dict(sd)
    bad["transformer.blocks.0.attn.key.weight"] = np.zeros((64, 63), np.float32)
    bad["transformer.extra.weight"] = np.zeros((3, 3), np.float32)
    del bad["aproj.bias"]
    with pytest.raises(ct.ConversionError) as err:
        ct.torch_to_flax(bad, config)
    msg = str(err.value)
    assert "aproj.bias" in msg and "transformer.extra.weight" in msg and "attn.key.weight" in msg


def test_head_count_must_be_given_for_unofficial_widths():
    sd = ct.flax_to_torch(init_params(tiny_config(), jax.random.key(5)))
    with pytest.raises(ct.ConversionError, match="video.num_heads"):
        ct.infer_config(sd)
    config = ct.infer_config(sd, overrides={"video.num_heads": 4, "audio.num_heads": 4, "sync.n_head": 4})
    assert config == tiny_config()


def test_unofficial_widths_are_not_guessed_and_all_missing_sizes_are_asked_at_once():
    # 128-wide extractors of 8 heads and a 96-wide transformer of 6: widths that 64 and 96
    # divide, which used to give 2, 2 and 1 heads without a word (and wrong logits).
    config = tiny_config().replace(**{"video.embed_dim": 128, "video.num_heads": 8, "audio.hidden_size": 128,
                                      "audio.num_heads": 8, "sync.n_embd": 96, "sync.n_head": 6,
                                      "sync.num_offset_classes": 3, "sync.max_offset_sec": 1.0})
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract_params(config))
    shapes = {k: np.shape(v) for k, v in ct.flax_to_torch(zeros).items()}
    with pytest.raises(ct.ConversionError) as err:
        ct.infer_config(shapes)
    msg = str(err.value)
    for wanted in ("video.num_heads=N (width 128)", "audio.num_heads=N (width 128)", "sync.n_head=N (width 96)",
                   "sync.max_offset_sec=S (3 offset classes"):
        assert wanted in msg, msg
    given = {"video.num_heads": 8, "audio.num_heads": 8, "sync.n_head": 6, "sync.max_offset_sec": 1.0}
    assert ct.infer_config(shapes, overrides=given) == config
    # The offset range may come from the checkpoint's training config instead.
    args = {"data": {"max_off_sec": 1.0}}
    assert ct.infer_config(shapes, embedded=args, overrides={k: v for k, v in given.items()
                                                             if k != "sync.max_offset_sec"}) == config
    # Only what the converted modules need is asked for (MMAudio's visual-only use).
    visual = ct.infer_config(shapes, overrides={"video.num_heads": 8}, modules=["vfeat_extractor"])
    assert visual.video.num_heads == 8


def test_bad_head_counts_and_misspelt_overrides_are_one_line_errors():
    sd = ct.flax_to_torch(init_params(tiny_config(), jax.random.key(7)))
    heads = {"video.num_heads": 4, "audio.num_heads": 4, "sync.n_head": 4}
    with pytest.raises(ct.ConversionError, match="audio.num_heads=5 does not divide the width 96"):
        ct.torch_to_flax(sd, ct.infer_config(sd, overrides={**heads, "audio.num_heads": 5}))
    with pytest.raises(ct.ConversionError, match=r"unknown model config field sync\.'n_heads'; sync has: .*n_head"):
        ct.infer_config(sd, overrides={**heads, "sync.n_heads": 4})
    with pytest.raises(ct.ConversionError, match="unknown model config group 'vision'"):
        ct.infer_config(sd, overrides={**heads, "vision.depth": 4})


def test_embedded_official_config_gives_sync_heads():
    sd = ct.flax_to_torch(init_params(tiny_config(), jax.random.key(6)))
    args = {"model": {"params": {"transformer": {"params": {"n_head": 4, "n_embd": 64}}}},
            "data": {"max_off_sec": 2.0}}
    config = ct.infer_config(sd, embedded=args, overrides={"video.num_heads": 4, "audio.num_heads": 4})
    assert config.sync.n_head == 4


def test_key_mapping_rule():
    assert ct.torch_key_to_flax_path("transformer.blocks.2.mlp.0.weight", 2) == \
        ("transformer", "blocks_2", "mlp_0", "kernel")
    assert ct.torch_key_to_flax_path("vfeat_extractor.spatial_attn_agg.self_attn.in_proj_weight", 2) == \
        ("vfeat_extractor", "spatial_attn_agg", "self_attn", "in_proj", "kernel")
    assert ct.torch_key_to_flax_path("afeat_extractor.ast.layernorm.weight", 1) == \
        ("afeat_extractor", "ast", "layernorm", "scale")
    for key, ndim in [("transformer.blocks.2.mlp.0.weight", 2), ("vfeat_extractor.blocks.11.norm3.bias", 1),
                      ("afeat_extractor.freq_attn_agg.self_attn.in_proj_bias", 1),
                      ("transformer.pos_emb_cfg.pos_emb", 3), ("logit_scale", 0)]:
        assert ct.flax_path_to_torch_key(ct.torch_key_to_flax_path(key, ndim)) == key
    w = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.float32).reshape(2, 3, 4, 5, 6)  # Conv3d [O, I, kt, kh, kw]
    k = ct.torch_to_flax_array("x.proj.weight", w)
    assert k.shape == (4, 5, 6, 3, 2) and k[1, 2, 3, 0, 1] == w[1, 0, 1, 2, 3]
    np.testing.assert_array_equal(ct.flax_to_torch_array(("x", "proj", "kernel"), k), w)


def test_full_size_config_defaults_match_official():
    c = ModelConfig()
    assert c.pos_emb_len == 198 and ModelConfig.synchronizability().pos_emb_len == 184
    assert c.audio.freq_patches == 12 and c.audio.time_patches == 6
    assert c.video.temporal_patches == 8 and c.video.spatial_patches == 196
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({"nonsense": 1})
