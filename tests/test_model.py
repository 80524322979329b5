"""Model behaviour beyond parity: precision, training mode, gradients, entry points."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from synchformer_jax.models import convert_torch as ct
from synchformer_jax.models import layers
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY, KIND_AVCLIP, tiny_config
from tests import reference_data as rd


def _small(**kw):
    """The tiny structure at 2 segments of 32x32 video: fast enough for many variants."""
    base = tiny_config(n_segments=2, **{"video.img_size": 32})
    return base.replace(**kw) if kw else base


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    video, audio = sf.dummy_inputs(config, batch)
    return (jnp.asarray(rng.uniform(-1, 1, video.shape).astype(np.float32)),
            jnp.asarray(rng.normal(0, 0.5, audio.shape).astype(np.float32)))


def _rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(x)


def test_bfloat16_forward_within_bfloat16_tolerance_of_float32(reference_path):
    sd = load_file(rd.require(reference_path / "model.safetensors"))
    config = ct.infer_config(sd, overrides=rd.head_overrides(reference_path))
    params = ct.torch_to_flax(sd, config).params
    case = np.load(rd.case_files(reference_path)[0])
    video = jnp.asarray(rd.video_input(reference_path, case, rd.constants(reference_path)["rgb_u8_to_model_input_lut"]))
    audio = jnp.asarray(case["audio_input"])
    outs = {}
    for dtype in ("float32", "bfloat16"):
        model = sf.Synchformer(config.replace(dtype=dtype))
        fwd = jax.jit(lambda v, a, m=model: m.apply({"params": params}, v, a, mutable=["intermediates"]))
        logits, state = fwd(video, audio)
        assert logits.dtype == jnp.float32  # logits stay float32 whatever the compute dtype
        outs[dtype] = (logits, state["intermediates"]["vfeat"][0], state["intermediates"]["afeat"][0])
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %); a few steps of
    # accumulated rounding through the layers is expected, a wrong op is not.
    for name, x, y in zip(("logits", "vfeat", "afeat"), outs["float32"], outs["bfloat16"]):
        assert _rel(x, y) < 2e-2, name
    assert float(jnp.max(jnp.abs(outs["float32"][0] - outs["bfloat16"][0]))) < 0.1
    # The bfloat16 run really computed in bfloat16 (it is not the float32 run again).
    assert float(jnp.max(jnp.abs(outs["float32"][0] - outs["bfloat16"][0]))) > 1e-5


def test_train_mode_dropout_and_drop_path():
    config = _small()
    model = sf.Synchformer(config)
    params = sf.init_params(config, jax.random.key(0))
    video, audio = _inputs(config)
    run = jax.jit(lambda rng, train_ext: model.apply({"params": params}, video, audio, train=True,
                                                      train_extractors=train_ext, rngs={"dropout": rng}),
                  static_argnums=1)
    eval_logits = model.apply({"params": params}, video, audio)
    a, b = run(jax.random.key(1), False), run(jax.random.key(2), False)
    assert not np.allclose(a, b) and not np.allclose(a, eval_logits)
    np.testing.assert_array_equal(a, run(jax.random.key(1), False))
    # Frozen extractors stay in eval mode: their features do not depend on the rng.
    feats = jax.jit(lambda rng, train: model.apply({"params": params}, video, train=train, rngs={"dropout": rng},
                                                   method="extract_video_features"), static_argnums=1)
    np.testing.assert_array_equal(feats(jax.random.key(1), False), feats(jax.random.key(2), False))
    # Drop path (0.2, stage I) makes the training-mode video features stochastic.
    assert not np.allclose(feats(jax.random.key(1), True), feats(jax.random.key(2), True))


def test_gradients_flow_and_remat_changes_nothing():
    config = _small(**{"sync.embd_pdrop": 0.0, "sync.attn_pdrop": 0.0, "sync.resid_pdrop": 0.0})
    params = sf.init_params(config, jax.random.key(0))
    video, audio = _inputs(config)
    target = jnp.array([3, 7])

    def loss(p, model):
        logits = model.apply({"params": p}, video, audio)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=1))

    grads = {}
    for remat in (False, True):
        model = sf.Synchformer(config.replace(remat=remat))
        grads[remat] = jax.jit(jax.grad(functools.partial(loss, model=model)))(params)
    flat = jax.tree_util.tree_leaves_with_path(grads[False])
    assert all(np.all(np.isfinite(g)) for _, g in flat)
    nonzero = [jax.tree_util.keystr(p) for p, g in flat if np.any(g != 0)]
    for module in ("vfeat_extractor", "afeat_extractor", "vproj", "aproj", "transformer"):
        assert any(module in p for p in nonzero), module
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), grads[False], grads[True])


@pytest.mark.parametrize("kind,remat", [("sync", False), (KIND_AVCLIP, True)])
def test_scanned_blocks_equal_the_unrolled_blocks(kind, remat):
    """`scan_blocks` runs the extractors' blocks as one lax.scan over the same per-block
    parameters: same tree, same outputs and gradients (stage II model without remat,
    stage I model with remat, against the unrolled blocks without it)."""
    config = _small(kind=kind, **{"sync.embd_pdrop": 0.0, "sync.attn_pdrop": 0.0, "sync.resid_pdrop": 0.0})
    params = sf.init_params(config, jax.random.key(0))
    assert (jax.tree.structure(sf.init_params(config.replace(scan_blocks=True), jax.random.key(0)))
            == jax.tree.structure(params))
    video, audio = _inputs(config)
    build = sf.SegmentAVCLIP if kind == KIND_AVCLIP else sf.Synchformer

    def loss(p, model):
        out = model.apply({"params": p}, video, audio)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    results = {}
    for scan in (False, True):
        model = build(config.replace(scan_blocks=scan, remat=remat and scan))
        out = jax.jit(lambda p, model=model: model.apply({"params": p}, video, audio))(params)
        grads = jax.jit(jax.grad(functools.partial(loss, model=model)))(params)
        results[scan] = (out, grads)
    (ref_out, ref_grads), (out, grads) = results[False], results[True]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), out, ref_out)
    # float32 sums in another order: gradients of O(1) agree to ~1e-6 absolute.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), grads, ref_grads)
    # The extractors' blocks are really trained through the scan.
    for extractor, block in (("v", "blocks_1"), ("a", "ast")):
        name = {"v": "vfeat_extractor", "a": "afeat_extractor"}[extractor] if kind != KIND_AVCLIP else f"{extractor}_encoder"
        sub = grads[name][block]
        sub = sub["mlp"]["fc1"]["kernel"] if block == "blocks_1" else sub["encoder"]["layer_1"]["output"]["dense"]["kernel"]
        assert np.any(np.asarray(sub) != 0), name


def test_remat_policy_dots_keeps_the_matmuls_and_changes_no_gradient():
    """`remat_policy="dots"` keeps the weight matmuls' outputs of each rematerialised block
    (XLA's plan of the scanned step grows by them) and computes the same gradients as a
    full recompute; an unknown policy is refused by name."""
    config = _small(kind=KIND_AVCLIP, scan_blocks=True, remat=True)
    params = sf.init_params(config, jax.random.key(0))
    video, audio = _inputs(config)

    def loss(p, model):
        v, a, _ = model.apply({"params": p}, video, audio)
        return jnp.sum(jnp.sin(v)) + jnp.sum(jnp.cos(a))

    grads, temp = {}, {}
    for policy in ("nothing", "dots"):
        model = sf.SegmentAVCLIP(config.replace(remat_policy=policy))
        compiled = jax.jit(jax.grad(functools.partial(loss, model=model))).lower(params).compile()
        grads[policy] = compiled(params)
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), grads["dots"], grads["nothing"])
    assert temp["dots"] > 1.2 * temp["nothing"], temp
    with pytest.raises(ValueError, match="unknown remat_policy 'some'.*dots"):
        sf.SegmentAVCLIP(config.replace(remat_policy="some")).apply({"params": params}, video, audio)


def _cudnn_stand_in(monkeypatch) -> list:
    """cuDNN's fused attention as jax 0.11.2 / cuDNN 9.19 behaved on an H100: any length
    in a forward pass, but its training rule raises for odd sequence lengths (what broke
    the stage-I step under remat; docs/benchmarks.md, second GPU call). Computes with
    XLA attention; returns the list of lengths it was called with (and whether a padding
    mask came with them)."""
    real = jax.nn.dot_product_attention
    calls = []

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def fused(q, k, v, scale):
        return real(q, k, v, scale=scale, implementation="xla")

    def fused_fwd(q, k, v, scale):
        if q.shape[1] % 2 or k.shape[1] % 2:
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
        return jax.vjp(lambda q, k, v: real(q, k, v, scale=scale, implementation="xla"), q, k, v)

    fused.defvjp(fused_fwd, lambda scale, vjp, g: vjp(g))

    def dot_product_attention(q, k, v, *args, scale=None, implementation=None, **kwargs):
        if implementation == "cudnn":
            padded = kwargs.get("key_value_seq_lengths") is not None
            calls.append((q.shape[1], k.shape[1], padded))
            # The even-padded path and masked attention (a bias to cuDNN): even lengths only.
            if padded or kwargs.get("mask") is not None:
                assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0, (q.shape, k.shape)
                return real(q, k, v, *args, scale=scale, implementation="xla", **kwargs)
            return fused(q, k, v, scale)
        return real(q, k, v, *args, scale=scale, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", dot_product_attention)
    monkeypatch.setattr(layers, "_use_cudnn", lambda q: True)
    return calls


def _stage1_grads_xla_and_stand_in(monkeypatch, config):
    """A stage-I model's gradients with XLA attention, then through the cuDNN stand-in:
    (the gradient function, XLA's gradients, the stand-in's, the stand-in's calls)."""
    params = sf.init_params(config, jax.random.key(0))
    video, audio = _inputs(config)

    def grads():
        model = sf.SegmentAVCLIP(config)
        loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in model.apply({"params": p}, video, audio))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    expected = grads()
    calls = _cudnn_stand_in(monkeypatch)
    return grads, expected, grads(), calls


@pytest.mark.parametrize("scan,grad_kernel", [(False, "xla"), (True, "xla"), (True, "cudnn")])
def test_stage1_remat_step_trains_through_cudnn_attention(monkeypatch, scan, grad_kernel):
    """With cuDNN attention (a stand-in here) the stage-I gradients under remat, unrolled or
    scanned, equal XLA attention's: odd lengths (the time attention's 9 keys, the space
    attention's and the spatial aggregator's 197, the frequency aggregator's 13) take the
    kernel forward and, for the gradient, XLA's attention or cuDNN on lengths padded to
    even (`SYNCHFORMER_JAX_ODD_ATTENTION_GRAD`); without that wrapper the same step raises."""
    monkeypatch.setenv(layers.ODD_LENGTH_GRAD_ENV, grad_kernel)
    grads, expected, got, calls = _stage1_grads_xla_and_stand_in(
        monkeypatch, _small(kind=KIND_AVCLIP, remat=True, scan_blocks=scan))
    assert any(q % 2 or k % 2 for q, k, _ in calls), calls  # odd lengths went to the kernel
    assert any(padded for _, _, padded in calls) == (grad_kernel == "cudnn"), calls
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), got, expected)
    monkeypatch.setattr(layers, "_fused_forward", lambda q, k, v, scale, forward, grad: jax.nn.dot_product_attention(
        q, k, v, scale=scale, implementation=forward))
    with pytest.raises(NotImplementedError, match="Unsupported sequence length"):
        grads()


@pytest.mark.parametrize("kind,scan,pack", [("sync", False, 3), (KIND_AVCLIP, True, 9)])
def test_packed_time_attention_equals_the_per_location_attention(kind, scan, pack):
    """`time_attention_pack` (several spatial locations per time-attention sequence under
    a block-diagonal mask) computes the official per-location time attention: the same
    features, outputs and gradients with 3 or all 9 patches of a 48-px frame packed,
    unrolled, and scanned with remat (stage I)."""
    config = _small(kind=kind, **{"video.img_size": 48})
    params = sf.init_params(config, jax.random.key(1))
    video, audio = _inputs(config, seed=3)
    build = sf.SegmentAVCLIP if kind == KIND_AVCLIP else sf.Synchformer

    def run(c):
        model = build(c)
        def features(p):
            out, state = model.apply({"params": p}, video, audio, mutable=["intermediates"])
            return out, state["intermediates"]
        loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(features(p)[0]))  # noqa: E731
        return jax.jit(features)(params), jax.jit(jax.grad(loss))(params)

    (ref_out, ref_inter), ref_grads = run(config)
    (out, inter), grads = run(config.replace(time_attention_pack=pack, scan_blocks=scan, remat=scan))
    # float32 sums in another order: values of O(1) agree to a few 1e-6.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-6), out, ref_out)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-6), inter, ref_inter)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), grads, ref_grads)


def test_packed_time_attention_mask_keeps_locations_apart():
    """The mask is what keeps a packed sequence's locations apart: the packed attention
    equals each location's own attention computed directly, and moving one location's
    keys changes only that location's outputs. The mask's pad column is never attended."""
    from synchformer_jax.models import motionformer as mf
    frames, patches, pack, heads, dim = 4, 6, 3, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(0, 1, (2, 1 + frames * patches, heads, dim)), jnp.float32)
               for _ in range(3))
    got = mf.packed_time_attention(q, k, v, frames, patches, pack)
    # Reference: each location's own sequence [CLS, its F keys], computed directly.
    t = lambda x: x[:, 1:].reshape(2, frames, patches, heads, dim)  # noqa: E731
    keys = jnp.concatenate([jnp.broadcast_to(k[:, :1, None], (2, 1, patches, heads, dim)), t(k)], axis=1)
    vals = jnp.concatenate([jnp.broadcast_to(v[:, :1, None], (2, 1, patches, heads, dim)), t(v)], axis=1)
    logits = jnp.einsum("nfphd,ngphd->nphfg", t(q), keys)
    ref = jnp.einsum("nphfg,ngphd->nfphd", jax.nn.softmax(logits, axis=-1), vals).reshape(got.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    mask = mf.time_pack_mask(frames, pack)
    assert mask.shape == (frames * pack, frames * pack + 2) and mask[:, 0].all() and not mask[:, -1].any()
    assert mask.sum(axis=1).tolist() == [1 + frames] * (frames * pack)
    moved = mf.packed_time_attention(q, k.at[:, 1::patches].multiply(-2.0), v, frames, patches, pack)
    changed = np.abs(np.asarray(moved - got)).reshape(2, frames, patches, -1).max(axis=(0, 1, 3))
    assert changed[0] > 1e-3 and np.all(changed[1:] == 0), changed
    with pytest.raises(ValueError, match="must divide the 6 patches"):
        mf.packed_time_attention(q, k, v, frames, patches, 4)


def test_time_attention_pack_is_checked_against_the_frame():
    with pytest.raises(ValueError, match="time_attention_pack=5 must be a whole number >= 1 that divides the 196"):
        tiny_config(time_attention_pack=5)
    assert tiny_config(time_attention_pack=14).time_attention_pack == 14


def test_packed_time_attention_trains_through_cudnn(monkeypatch):
    """With cuDNN attention (the stand-in: odd lengths raise in training) the packed time
    attention reaches the kernel in training at even lengths with its mask, and the
    stage-I gradients under remat equal XLA attention's."""
    config = _small(kind=KIND_AVCLIP, remat=True, scan_blocks=True, time_attention_pack=2)
    _, expected, got, calls = _stage1_grads_xla_and_stand_in(monkeypatch, config)
    frames = config.video.temporal_patches
    assert (frames * 2, frames * 2 + 2, False) in calls, calls  # the packed time attention
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), got, expected)


def test_scanned_blocks_take_each_blocks_drop_path_rate():
    """Drop path inside the scan uses the per-block rate (0 for the first block, the
    configured rate for the last): at a rate of ~1 the last block's space-attention and
    MLP branches are dropped, which equals zeroing their output projections."""
    config = _small(**{"video.drop_path_rate": 1.0 - 1e-7})
    params = sf.init_params(config, jax.random.key(0))
    video, _ = _inputs(config)
    scanned = sf.Synchformer(config.replace(scan_blocks=True))
    feats = jax.jit(lambda p, rng, train: scanned.apply({"params": p}, video, train=train, rngs={"dropout": rng},
                                                        method="extract_video_features"), static_argnums=2)
    dropped = feats(params, jax.random.key(3), True)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if ("blocks_1" in jax.tree_util.keystr(path) and any(
            part in jax.tree_util.keystr(path) for part in ("'attn']['proj'", "'mlp']['fc2'"))) else x, params)
    np.testing.assert_allclose(dropped, feats(zeroed, jax.random.key(3), False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(dropped, feats(params, jax.random.key(3), False), atol=1e-3)


def test_compare_is_differentiable_wrt_features():
    """Downstream users put the sync score in a loss: gradients w.r.t. audio features."""
    config = _small()
    model = sf.Synchformer(config)
    params = sf.init_params(config, jax.random.key(0))
    video, audio = _inputs(config)
    vfeat = sf.extract_video_features(model, params, video)
    afeat = sf.extract_audio_features(model, params, audio)
    assert vfeat.shape == (2, 2, 8, 96) and afeat.shape == (2, 2, 6, 96)
    g = jax.grad(lambda a: jnp.sum(jax.nn.softmax(sf.compare(model, params, vfeat, a))[:, 10]))(afeat)
    assert g.shape == afeat.shape and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("num_classes", [3, 21, 41])
def test_offset_class_grid_is_configurable(num_classes):
    config = _small(**{"sync.num_offset_classes": num_classes})
    params = sf.init_params(config, jax.random.key(0))
    assert params["transformer"]["off_head"]["kernel"].shape == (64, num_classes)
    logits = sf.Synchformer(config).apply({"params": params}, *_inputs(config, batch=1))
    assert logits.shape == (1, num_classes)


def test_synchronizability_head_and_sequence_length_check():
    config = _small(**{"sync.head": HEAD_SYNCHRONIZABILITY})
    params = sf.init_params(config, jax.random.key(0))
    assert "sync_head" in params["transformer"] and "off_head" not in params["transformer"]
    model = sf.Synchformer(config)
    video, audio = _inputs(config, batch=1)
    assert model.apply({"params": params}, video, audio).shape == (1, 2)
    vfeat = sf.extract_video_features(model, params, video)
    afeat = sf.extract_audio_features(model, params, audio)
    with pytest.raises(ValueError, match="position table has 30 rows"):
        sf.compare(model, params, vfeat[:, :1], afeat)


def test_segment_avclip_embeddings_and_temperature():
    config = _small(kind=KIND_AVCLIP)
    model = sf.SegmentAVCLIP(config)
    params = sf.init_params(config, jax.random.key(0))
    assert set(params) == {"v_encoder", "a_encoder", "logit_scale"}
    video, audio = _inputs(config)
    v, a, tau = model.apply({"params": params}, video, audio)
    assert v.shape == a.shape == (2, 2, 96)
    np.testing.assert_allclose(jnp.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)
    assert float(tau) == pytest.approx(0.07)
    # The temperature is clamped to [0.001, 0.5] but still receives a gradient there.
    for raw, clamped in ((2.0, 0.5), (-1.0, 0.001)):
        p = dict(params, logit_scale=jnp.asarray(raw))
        tau_fn = lambda q: model.apply({"params": q}, method="temperature")  # noqa: E731
        assert float(tau_fn(p)) == pytest.approx(clamped)
        assert float(jax.grad(tau_fn)(p)["logit_scale"]) == 1.0


def test_bad_input_shapes_are_named():
    config = _small()
    model = sf.Synchformer(config)
    params = sf.init_params(config, jax.random.key(0))
    video, audio = _inputs(config, batch=1)
    with pytest.raises(ValueError, match=r"video must be \[B, S, T, C, H, W\]"):
        model.apply({"params": params}, video[0], audio)
    with pytest.raises(ValueError, match=r"audio must be"):
        model.apply({"params": params}, video, audio[:, :, :, :, :, None])


@pytest.mark.parametrize("lq, lk", [(8, 9), (196, 197), (13, 13), (1, 9), (6, 6)])
def test_even_padded_attention_equals_unpadded(lq, lk):
    """cuDNN's training recipe for odd lengths (one zero token of padding, the pad key
    masked by sequence lengths, the pad query dropped), run on XLA: values and gradients
    equal the unpadded attention's, and the mask is real (an unmasked pad key would get
    weight exp(0) and change the result)."""
    rng = np.random.default_rng(lq + lk)
    q = jnp.asarray(rng.normal(0, 1, (3, lq, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(0, 1, (3, lk, 2, 8)), jnp.float32) for _ in range(2))
    plain = functools.partial(jax.nn.dot_product_attention, scale=0.3, implementation="xla")
    padded = functools.partial(layers.even_padded_attention, scale=0.3, implementation="xla")
    through_wrapper = lambda q, k, v: layers._fused_forward(q, k, v, 0.3, "xla", "xla-padded")  # noqa: E731
    want = jax.jit(plain)(q, k, v)
    for fn in (padded, through_wrapper):
        np.testing.assert_allclose(jax.jit(fn)(q, k, v), want, rtol=1e-6, atol=1e-6)
        w = jnp.asarray(rng.normal(0, 1, want.shape), jnp.float32)
        grads = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
        wants = jax.jit(jax.grad(lambda q, k, v: jnp.sum(plain(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
        for g, h in zip(grads, wants):
            assert g.shape == h.shape
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
    if lk % 2:
        unmasked = jax.nn.dot_product_attention(layers._pad_to_even(q), layers._pad_to_even(k),
                                                layers._pad_to_even(v), scale=0.3)[:, :lq]
        assert not np.allclose(unmasked, want, atol=1e-3)


def test_odd_length_grad_kernel_setting(monkeypatch):
    monkeypatch.delenv(layers.ODD_LENGTH_GRAD_ENV, raising=False)
    assert layers.odd_length_grad_kernel() == "xla"
    monkeypatch.setenv(layers.ODD_LENGTH_GRAD_ENV, "cudnn")
    assert layers.odd_length_grad_kernel() == "cudnn"
    monkeypatch.setenv(layers.ODD_LENGTH_GRAD_ENV, "flash")
    with pytest.raises(ValueError, match="SYNCHFORMER_JAX_ODD_ATTENTION_GRAD='flash'"):
        layers.odd_length_grad_kernel()


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_single_query_attention_equals_generic_attention(dtype, tol):
    """The CLS query's packed-head attention against the generic path, jitted (XLA-CPU
    fusions are where such rewrites go wrong), values and gradients, an odd key count."""
    from synchformer_jax.models import layers
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(0, 1, shape), dtype) for shape in
               ((3, 4, 8), (3, 37, 4, 8), (3, 37, 4, 8)))

    def packed(q, k, v):
        return layers.single_query_attention(q, k, v)

    def generic(q, k, v):
        return layers.attention(q[:, None], k, v, scale=1.0)[:, 0]

    got, want = jax.jit(packed)(q, k, v), jax.jit(generic)(q, k, v)
    assert got.shape == (3, 4, 8) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
    # The heads must not mix: changing head 0's keys leaves the other heads' outputs alone.
    moved = jax.jit(packed)(q, k.at[:, :, 0].multiply(-3.0), v)
    np.testing.assert_array_equal(np.asarray(moved[:, 1:], np.float32), np.asarray(got[:, 1:], np.float32))
    assert not np.allclose(np.asarray(moved[:, 0], np.float32), np.asarray(got[:, 0], np.float32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

    grads = jax.jit(jax.grad(loss(packed), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(loss(generic), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, ref):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=5 * tol)
