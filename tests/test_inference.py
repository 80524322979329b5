"""`synchformer_jax.inference`: official window inputs, offset prediction, the DeSync
protocol from cached features, and placement search in long videos.

Models here are "micro" Synchformers (32 px frames, one layer per stack) with random
weights drawn in NumPy (no jitted init), so that every test runs the real model in a
few seconds; where the protocol needs an answer we control, a compare function of known
behaviour replaces the sync transformer (the functions take it as an argument).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from synchformer_jax import inference, media
from synchformer_jax.input import melspec, normalize
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import HEAD_SYNCHRONIZABILITY, tiny_config
from tests import reference_data as rd

MICRO = {"video.img_size": 32, "video.embed_dim": 32, "video.depth": 1, "video.num_heads": 2,
         "audio.hidden_size": 32, "audio.num_layers": 1, "audio.num_heads": 2, "audio.mlp_dim": 64,
         "sync.n_embd": 32, "sync.n_layer": 1, "sync.n_head": 2}
TOL = 1e-4


def micro_config(**kw):
    return tiny_config(**{**MICRO, **kw})


def micro_sync_config(**kw):
    return micro_config(**{"sync.head": HEAD_SYNCHRONIZABILITY, "n_segments": 13, **kw})


def random_params(config, seed: int = 0):
    """Random float32 params of `config`'s shapes without compiling an init: LayerNorm
    scales 1 + 0.1 N, biases 0.05 N, matrices N / sqrt(fan_in), embeddings 0.5 N (the
    recipe of the reference set: every tensor matters, nothing is left at 0 or 1)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(sf.abstract_params(config))
    out = {}
    for path, leaf in sorted(flat.items()):
        shape, name = leaf.shape, path[-1]
        if name == "scale":
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            x = 0.05 * rng.standard_normal(shape)
        elif name == "kernel":
            x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            x = 0.5 * rng.standard_normal(shape)
        out[path] = x.astype(np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def micro():
    config = micro_config()
    return sf.Synchformer(config), random_params(config, 1)


REF_BATCH = 12


@pytest.fixture(scope="module")
def full_forward(micro):
    """The plain model on official float inputs, one compiled batch shape for all tests."""
    model, params = micro
    fn = jax.jit(lambda v, a: model.apply({"params": params}, v, a))

    def run(video, audio):
        video, audio = np.asarray(video, np.float32), np.asarray(audio, np.float32)
        n = video.shape[0]
        assert n <= REF_BATCH
        pad = lambda x: np.concatenate([x, np.zeros((REF_BATCH - n, *x.shape[1:]), x.dtype)])  # noqa: E731
        return np.asarray(fn(pad(video), pad(audio)))[:n]

    return run


# ------------------------------------------------------------ official window inputs


def test_window_inputs_reproduce_the_official_inputs(reference_path):
    """Every reference case: decoded video -> the official frame/sample indices, the
    official float16-normalised video input (sum) and the log-mel input (<= 1e-4)."""
    cases = [np.load(f) for f in rd.case_files(reference_path)]
    end = {}  # decode only what the cases of a video use (a prefix of the whole-file decode)
    for case in cases:
        need = float(case["v_start_i_sec"]) + max(0.0, float(case["offset_sec"])) + 5.2
        end[str(case["video_file"])] = max(end.get(str(case["video_file"]), 0.0), need)
    decoded = {name: media.decode_media(rd.require(reference_path.parent / "videos" / name), end_sec=sec)
               for name, sec in end.items()}
    for case in cases:
        clip = decoded[str(case["video_file"])]
        w = inference.window_inputs(clip.frames, clip.audio, float(case["v_start_i_sec"]),
                                    float(case["offset_sec"]), config=tiny_config())
        np.testing.assert_array_equal(w.segment_frame_indices, case["segment_frame_indices"])
        assert (w.v_start_frame, w.a_start_sample) == (int(case["v_start_i"]), int(case["a_start_i"]))
        assert w.offset_class == int(case["offset_class"])
        assert w.frames.shape == (120, 224, 224, 3) and w.frames.dtype == np.uint8
        video = w.model_video()
        assert video.shape == (14, 16, 3, 224, 224)
        assert abs(video.astype(np.float64).sum() - float(case["video_input_sum_f64"])) < 1e-6
        assert np.abs(w.audio - case["audio_input"][0]).max() <= TOL


def test_window_inputs_fit_checks_and_official_quirks():
    frames = np.zeros((150, 256, 300, 3), np.uint8)  # 6 s
    audio = np.zeros(150 * 640, np.float32)
    with pytest.raises(ValueError):
        inference.window_inputs(frames, audio, 1.5)  # 1.5 + 5 s > 6 s
    with pytest.raises(ValueError):
        inference.window_inputs(frames, audio, 0.5, offset_sec=1.0)  # audio crop runs past the end
    with pytest.raises(ValueError):
        inference.window_inputs(frames, audio, 0.0, offset_sec=-0.2)  # audio before the start
    # Up to one frame of samples before the start is clamped to 0 (official).
    w = inference.window_inputs(frames, audio, 0.5, offset_sec=-0.52)
    assert w.a_start_sample == 0 and w.v_start_frame == 12
    # The official truncation: 2.28 s is frame 56, and the audio uses the raw seconds.
    long_frames, long_audio = np.zeros((250, 256, 300, 3), np.uint8), np.zeros(250 * 640, np.float32)
    w = inference.window_inputs(long_frames, long_audio, 2.28, offset_sec=0.4)
    assert w.v_start_frame == 56 and w.a_start_sample == 42879  # not 56 * 640 + 6400 = 42240
    # A synchronizability model's window is the 4.48 s / 13-segment crop.
    w = inference.window_inputs(frames, audio, 1.0, config=micro_sync_config())
    assert w.n_segments == 13 and w.frames.shape == (112, 32, 32, 3)
    assert w.segment_frame_indices[0, 0] == 25  # max_v_start 0: segments start at the crop


def test_frame_exact_sec():
    assert int(57 / 25 * 25) == 56  # the quirk frame_exact_sec avoids
    for f in range(0, 20000, 7):
        t = inference.frame_exact_sec(f)
        assert int(t * 25) == f and 0 <= t - f / 25 < 1e-12


def test_segments_from_frames():
    frames = np.arange(120)[:, None, None, None] * np.ones((1, 2, 2, 3), np.int64)
    seg = np.asarray(inference.segments_from_frames(jnp.asarray(frames[None]), 14))
    assert seg.shape == (1, 14, 16, 2, 2, 3)
    np.testing.assert_array_equal(seg[0, :, :, 0, 0, 0], np.arange(14)[:, None] * 8 + np.arange(16)[None])
    with pytest.raises(ValueError):
        inference.segments_from_frames(jnp.asarray(frames[None, :119]), 14)


# --------------------------------------------------------------------- predictions


def test_predict_offsets_on_uint8_inputs(micro, full_forward):
    model, params = micro
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 120, 32, 32, 3), np.uint8)
    audio = rng.standard_normal((3, 14, 1, 128, 66)).astype(np.float32) * 0.5
    seg_u8 = inference.segments_from_frames(frames, 14, xp=np)
    fn = jax.jit(functools.partial(inference.predict_offsets, model, topk=4))
    out = fn(params, seg_u8, audio)
    float_in = np.moveaxis(normalize.video_uint8_to_model_input_np(seg_u8), -1, -3)
    logits = full_forward(float_in, audio)
    np.testing.assert_allclose(out.logits, logits, atol=1e-5)
    np.testing.assert_allclose(out.probs, jax.nn.softmax(logits), atol=1e-6)
    grid = inference.offset_grid(model.config)
    order = np.argsort(-np.asarray(out.probs), axis=-1)[:, :4]
    np.testing.assert_array_equal(out.topk_classes, order)
    np.testing.assert_allclose(out.topk_offsets_sec, grid[order])
    assert np.all(np.diff(np.asarray(out.topk_probs), axis=-1) <= 0)
    with pytest.raises(ValueError, match="offset head"):
        inference.predict_offsets(sf.Synchformer(micro_sync_config()), params, seg_u8, audio)
    with pytest.raises(ValueError, match="synchronizability head"):
        inference.synchronizability_probability(model, params, seg_u8, audio)


def test_offset_grid_follows_the_config():
    np.testing.assert_allclose(inference.offset_grid(micro_config(**{"sync.num_offset_classes": 3,
                                                                       "sync.max_offset_sec": 1.0})), [-1, 0, 1])
    assert inference.offset_grid(micro_config()).tolist()[10] == 0.0


# -------------------------------------------------------------------------- DeSync


class _Calls:
    """Which extractor ran on how many segments (flax method interception, no patching)."""

    def __init__(self):
        self.calls = []

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name in ("video_segment_features", "audio_segment_features"):
            self.calls.append((context.method_name, args[0].shape[0]))
        return next_fun(*args, **kwargs)


def test_desync_protocol_windows_features_once_and_mean_abs_offset(micro, full_forward):
    """Two videos x three audio tracks: the result's logits are those of the full model
    on 0-4.8 s (frames 0-119, samples 0-76799) and 3.2-8 s (frames 80-199, samples
    51200-127999), built independently here; the video extractor runs once per video
    (24 segments), never while scoring tracks; DeSync = mean |argmax offset|."""
    model, params = micro
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 210, 32, 32, 3), np.uint8)  # a bit over 8 s: only 200 used
    base = rng.standard_normal(140000).astype(np.float32) * 0.3
    tracks = np.stack([np.stack([np.roll(base, 6400 * (m + v)) for m in range(3)]) for v in range(2)])[..., :130000]

    scorer = inference.DesyncScorer(model, params)
    calls = _Calls()  # the jitted functions are traced here, under the interceptor
    with nn.intercept_methods(calls):
        vfeat = scorer.video_features(frames)
    assert calls.calls == [("video_segment_features", 2 * 24)]
    assert vfeat.shape == (2, 24, 8, 32)

    calls = _Calls()
    with nn.intercept_methods(calls):
        result = scorer.score(vfeat, tracks)
    assert calls.calls == [("audio_segment_features", 2 * 3 * 24)]  # no video extractor
    assert result.logits.shape == (2, 3, 2, 21)

    videos, specs = [], []
    for v in range(2):
        for m in range(3):
            for f0, s0 in ((0, 0), (80, 51200)):  # 0-4.8 s and 3.2-8.0 s
                seg = inference.segments_from_frames(frames[v, f0:f0 + 120], 14, xp=np)
                videos.append(np.moveaxis(normalize.video_uint8_to_model_input_np(seg, half=False), -1, -3))
                idx = s0 + np.arange(14)[:, None] * 5120 + np.arange(10240)[None]
                specs.append(melspec.log_mel_jax(tracks[v, m][idx]))
    expected = full_forward(np.stack(videos), np.stack(specs)).reshape(2, 3, 2, 21)
    np.testing.assert_allclose(result.logits, expected, atol=TOL)
    grid = inference.offset_grid(model.config)
    offsets = grid[np.argmax(expected, axis=-1)]
    np.testing.assert_allclose(result.offsets_sec, offsets)
    np.testing.assert_allclose(result.desync_sec, np.abs(offsets).mean(-1), atol=1e-7)


def test_desync_returns_known_shifts_with_a_known_compare(micro):
    """Features that carry their time: segment s of the video is at s * 0.32 s, a track's
    segment at s * 0.32 + shift(s); the compare function answers the nearest class of
    the window's mean shift. DeSync must then be the mean over the windows [:14] and
    [-14:] of the |shift| they contain."""
    model, params = micro
    grid = inference.offset_grid(model.config)
    s = np.arange(24) * 0.32
    shifts = np.stack([np.full(24, 0.4), np.full(24, -1.2), np.where(np.arange(24) < 12, 0.6, -2.0),
                       np.full(24, 0.0)])
    vfeat = np.zeros((1, 24, 8, 4), np.float32)
    vfeat[..., 0] = s[None, :, None]
    afeat = np.zeros((1, 4, 24, 6, 4), np.float32)
    afeat[..., 0] = (s[None] + shifts)[None, :, :, None]

    def compare_fn(v, a):  # [N, 14, 8, D], [N, 14, 6, D] -> [N, K]
        shift = a[..., 0].mean(axis=(1, 2)) - v[..., 0].mean(axis=(1, 2))
        return -100.0 * (shift[:, None] - jnp.asarray(grid)[None]) ** 2

    result = inference.desync_from_features(model, params, vfeat, afeat, compare_fn=compare_fn)
    first = (12 * 0.6 + 2 * -2.0) / 14  # segments 0-13 of the third track: ~0.23 s -> 0.2
    last = (2 * 0.6 + 12 * -2.0) / 14  # segments 10-23: ~-1.63 s -> -1.6
    np.testing.assert_allclose(result.offsets_sec[0], [[0.4, 0.4], [-1.2, -1.2], [0.2, -1.6], [0, 0]], atol=1e-6)
    assert abs(first - 0.2) < 0.1 and abs(last + 1.6) < 0.1
    np.testing.assert_allclose(result.desync_sec[0], [0.4, 1.2, 0.9, 0.0], atol=1e-6)


def test_expected_desync_equals_desync_for_confident_logits(micro):
    """The soft DeSync is E|offset| per window, averaged: for sharp logits (one class
    per window) the argmax DeSync; for flat logits the mean |grid| (1.048 s on +-2 s)."""
    model, _ = micro
    grid = inference.offset_grid(model.config)
    logits = np.full((3, 2, 21), -50.0, np.float32)
    for i, (a, b) in enumerate([(10, 10), (12, 4), (0, 20)]):  # 0 / 0 s, +0.4 / -1.2 s, -2 / +2 s
        logits[i, 0, a] = logits[i, 1, b] = 50.0
    np.testing.assert_allclose(inference.expected_desync_sec(model.config, logits), [0.0, 0.8, 2.0], atol=1e-6)
    flat = inference.expected_desync_sec(model.config, np.zeros((1, 2, 21), np.float32))
    np.testing.assert_allclose(flat, [np.abs(grid).mean()], rtol=1e-6)


def test_soft_desync_has_a_gradient_through_the_waveform(micro):
    """Synchformer as a loss: the soft DeSync of `desync(...)` differentiated with respect
    to the raw 16-kHz waveform (log-mel, audio extractor and sync transformer on the
    path). The gradient is finite, not zero, and its directional derivative agrees with
    a central finite difference."""
    model, params = micro
    rng = np.random.default_rng(5)
    vfeat = inference.desync_video_features(model, params, rng.integers(0, 256, (1, 200, 32, 32, 3), np.uint8))
    wave = (0.3 * rng.standard_normal((1, 128000))).astype(np.float32)

    loss = jax.jit(lambda w: inference.expected_desync_sec(model.config, inference.desync(model, params, vfeat,
                                                                                          w).logits).sum())
    grad = np.asarray(jax.jit(jax.grad(loss))(wave))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    direction = grad / np.linalg.norm(grad)  # the steepest direction: the largest, best-measured change
    h = 1e-2
    numeric = (float(loss(wave + h * direction)) - float(loss(wave - h * direction))) / (2 * h)
    analytic = float(np.sum(grad * direction))
    assert numeric == pytest.approx(analytic, rel=0.05), (numeric, analytic)


def test_desync_resize_crop_matches_pil_bicubic():
    Image = pytest.importorskip("PIL.Image")
    h, w = 256, 454
    yy, xx = np.mgrid[0:h, 0:w]
    img = (127 + 60 * np.sin(xx / 7.0) + 50 * np.cos(yy / 5.0)).clip(0, 255)
    img = np.stack([img, img[::-1], img * 0.5 + (xx % 40 > 20) * 100], -1).astype(np.uint8)
    img[100:140, 200:260] = (255, 0, 0)
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
    nw = int(224 * w / h)  # 397
    left = int(round((nw - 224) / 2))  # 86.5 -> 86 (half to even)
    assert left == 86
    for x in (img, noise):
        ours = np.asarray(inference.desync_resize_crop(x[None]))[0]
        pil = np.asarray(Image.fromarray(x).resize((nw, 224), Image.BICUBIC))[:, left:left + 224]
        assert ours.shape == (224, 224, 3)
        assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1
    portrait = np.asarray(inference.desync_resize_crop(np.transpose(img, (1, 0, 2))[None]))[0]
    assert portrait.shape == (224, 224, 3)
    same = np.zeros((2, 224, 224, 3), np.uint8)
    np.testing.assert_array_equal(inference.desync_resize_crop(same), same)


# -------------------------------------------------------------- placement search


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("method", ["vote", "zero"])
def test_search_finds_a_planted_position_with_a_known_scorer(step, method):
    """A bank whose entries carry their start frame and a query planted at frame p: a
    compare function that answers the offset p - t of window t (clipped to the grid)
    must put the best score at p, with every window reading bank entries i + 8k / step."""
    grid = inference.offset_grid(micro_config())
    first, planted, num_windows = 37, 37 + 4 * 30, 200  # candidates: frames 37 .. 37 + step * 199
    hop = 8 // step
    bank = np.zeros((num_windows + hop * 13, 8, 2), np.float32)
    bank[..., 0] = (first + step * np.arange(bank.shape[0]))[:, None]
    afeat = np.zeros((14, 6, 2), np.float32)
    afeat[..., 0] = (planted + 8 * np.arange(14))[:, None]

    def compare_fn(v, a):
        # each segment must agree on the shift, or the window was gathered wrongly
        per_seg = a[..., 0].mean(-1) - v[..., 0].mean(-1)  # [N, 14] frames
        spread = per_seg.max(-1) - per_seg.min(-1)
        off = per_seg.mean(-1) / 25.0
        return -30.0 * (off[:, None] - jnp.asarray(grid)[None]) ** 2 - 1e3 * spread[:, None]

    logits = jax.jit(functools.partial(inference.search_logits, compare_fn, num_windows=num_windows,
                                       step_frames=step, batch=16))(bank, afeat)
    assert logits.shape == (num_windows, 21)
    scores = inference.placement_scores(logits, grid, step_frames=step, method=method)
    starts = first + step * np.arange(num_windows)
    assert starts[int(np.argmax(scores))] == planted
    # Far from the planted position every window answers the clipped class (+-2 s).
    assert int(np.argmax(logits[0])) == 20 and int(np.argmax(logits[-1])) == 0


def test_chunk_scores_align_on_the_query_start():
    """Chunk c of a query planted at candidate p peaks at window p + q_c / step; aligned,
    every chunk peaks at p, and so does their mean."""
    step, planted, num_candidates = 4, 9, 20
    chunk_frames = np.array([0, 120, 172])
    windows = num_candidates + chunk_frames[-1] // step
    per_window = np.full((3, windows), -5.0)
    for c, q in enumerate(chunk_frames):
        per_window[c, planted + q // step] = 0.0
    aligned = inference.combine_chunk_scores(per_window, chunk_frames, step, num_candidates)
    assert aligned.shape == (3, num_candidates)
    assert all(int(np.argmax(row)) == planted for row in aligned)


def test_place_audio_long_query_is_the_mean_of_its_chunks(micro):
    """A 7-s query: two 4.8-s chunks (0 and 2.08 s, on the 4-frame grid); each chunk's
    scores equal a search with that chunk alone, shifted by its start, and the
    placement score is their mean."""
    model, params = micro
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (200, 32, 40, 3), np.uint8)
    query = rng.standard_normal(112000).astype(np.float32) * 0.3  # 175 frames
    res = inference.place_audio(model, params, frames, query, step_frames=4)
    np.testing.assert_allclose(res.chunk_starts_sec, [0.0, 52 / 25])
    num_candidates = (200 - 120 - 52) // 4 + 1
    assert res.scores.shape == (num_candidates,) and res.chunk_scores.shape == (2, num_candidates)
    assert res.pad_sec == 0 and res.logits.shape == (num_candidates, 21)
    np.testing.assert_allclose(res.starts_sec, 4 * np.arange(num_candidates) / 25)
    for c, first in enumerate((0, 52)):
        alone = inference.place_audio(model, params, frames, query[first * 640: first * 640 + 76800], step_frames=4)
        np.testing.assert_allclose(res.chunk_scores[c], alone.scores[first // 4: first // 4 + num_candidates],
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.scores, res.chunk_scores.mean(0), rtol=1e-6)
    assert res.best_sec == res.starts_sec[int(np.argmax(res.scores))]
    with pytest.raises(ValueError, match="fewer than the query's span"):
        inference.place_audio(model, params, frames[:160], query, step_frames=4)


def test_place_audio_bank_windows_equal_independent_forwards(micro, full_forward):
    """The real (micro) model: each searched window's logits equal the full model on the
    window's frames and the padded query; the bank holds P + 13 * hop segments."""
    model, params = micro
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (136, 32, 40, 3), np.uint8)
    query = rng.standard_normal(32000).astype(np.float32) * 0.3  # 2 s: padded to 4.8 s
    res = inference.place_audio(model, params, frames, query, step_frames=4, chunk_size=16)
    num_windows = (136 - 120) // 4 + 1
    assert res.num_video_segments == num_windows + 2 * 13
    pad_frames = ((76800 - 32000) // 2) // 640
    np.testing.assert_allclose(res.starts_sec, (4 * np.arange(num_windows) + pad_frames) / 25)
    assert res.best_sec in res.starts_sec and res.logits.shape == (num_windows, 21)

    wave = np.zeros(76800, np.float32)
    wave[pad_frames * 640: pad_frames * 640 + 32000] = query
    spec = melspec.log_mel_np(wave[np.arange(14)[:, None] * 5120 + np.arange(10240)[None]])
    crop = inference.center_crop(frames, 32)
    videos = [np.moveaxis(normalize.video_uint8_to_model_input_np(
        inference.segments_from_frames(crop[t:t + 120], 14, xp=np)), -1, -3) for t in (0, 8, 16)]
    expected = full_forward(np.stack(videos), np.stack([spec] * 3))
    np.testing.assert_allclose(res.logits[[0, 2, 4]], expected, atol=TOL)
