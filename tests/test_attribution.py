"""Evidence attribution: interval convention, masking, scoring rule, model wrapper, plot, CLI."""
from __future__ import annotations

import fractions
import json
import os
import pathlib

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synchformer_jax import attribution as at
from synchformer_jax import cli, pretrained, synthetic
from synchformer_jax.input import melspec, normalize, transforms
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import tiny_config

CONFIG = tiny_config(**{"video.img_size": 32, "video.depth": 1, "audio.num_layers": 1, "sync.n_layer": 1})
V_START, OFFSET = 1.0, 0.4


def random_params(config, seed):
    """N(0, 0.05) parameters of the model's shapes (no init compilation: much faster here)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), sf.abstract_params(config))


# ------------------------------------------------------------------ intervals, masking


def test_frame_intervals_by_presentation_time():
    of = at.frame_intervals(125)
    np.testing.assert_array_equal(of[:10], [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(np.bincount(of), [3, 2] * 25)  # 2.5 frames per interval on average
    for f, i in enumerate(of):  # frame f's timestamp f/25 lies in [0.1 i, 0.1 (i + 1)), exactly
        t = fractions.Fraction(f, 25)
        assert fractions.Fraction(i, 10) <= t < fractions.Fraction(i + 1, 10)


def test_sample_intervals():
    of = at.sample_intervals(80000)
    np.testing.assert_array_equal(of, np.arange(80000) // 1600)
    np.testing.assert_array_equal(np.bincount(of), [1600] * 50)


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_masking_puts_distractor_exactly_at_masked_intervals(xp):
    rng = np.random.default_rng(0)
    base_v = rng.integers(0, 128, (125, 2, 3, 3), dtype=np.uint8)
    dist_v = rng.integers(128, 256, (125, 2, 3, 3), dtype=np.uint8)
    base_a = rng.uniform(-1, 0, 80000).astype(np.float32)
    dist_a = rng.uniform(0.5, 1, 80000).astype(np.float32)
    masks = at.sample_masks(rng, 6, 50)
    mixed_v = np.asarray(at.mix_stream(base_v, dist_v, masks, at.frame_intervals(125), xp))
    mixed_a = np.asarray(at.mix_stream(base_a, dist_a, masks, at.sample_intervals(80000), xp))
    assert mixed_v.shape == (6, 125, 2, 3, 3) and mixed_v.dtype == np.uint8
    assert mixed_a.shape == (6, 80000) and mixed_a.dtype == np.float32
    for k in range(6):
        for f in range(125):
            want = dist_v[f] if masks[k, (2 * f) // 5] else base_v[f]
            np.testing.assert_array_equal(mixed_v[k, f], want)
        for i in range(50):
            span = slice(1600 * i, 1600 * (i + 1))
            np.testing.assert_array_equal(mixed_a[k, span], (dist_a if masks[k, i] else base_a)[span])


# ---------------------------------------------------------------------- scoring rule


def _binomial_band(n_correct: int, sigmas: float = 5.0) -> float:
    return sigmas * np.sqrt(0.25 / n_correct)


def test_scores_of_a_predictor_of_known_behaviour():
    """Correct only when video interval J and audio interval I are both kept."""
    J, I, TRUE, K = 17, 31, 10, 512
    video, dvideo = np.zeros((125, 1, 1, 3), np.uint8), np.ones((125, 1, 1, 3), np.uint8)
    audio, daudio = np.zeros(80000, np.float32), np.ones(80000, np.float32)
    v_frames = np.flatnonzero(at.frame_intervals(125) == J)
    a_samples = np.flatnonzero(at.sample_intervals(80000) == I)
    calls = []

    def predict(v, a):
        v, a = np.asarray(v), np.asarray(a)
        calls.append(v.shape[0])
        kept = (v[:, v_frames] == 0).all(axis=(1, 2, 3, 4)) & (a[:, a_samples] == 0).all(axis=1)
        return np.eye(21)[np.where(kept, TRUE, TRUE + 5)]

    res = at.attribute(predict, video, audio, dvideo, daudio, TRUE, num_samples=K, batch_size=64, seed=3)
    assert set(calls) == {64}
    for name, special in (("video", J), ("audio", I)):
        s = res[name]
        assert s.scores.shape == (50,)
        assert s.num_correct == int((~s.masks[:, special]).sum())  # exactly the masks that kept it
        assert s.scores[special] == 1.0
        others = np.delete(s.scores, special)
        assert np.all(np.abs(others - 0.5) < _binomial_band(s.num_correct)), others
        assert abs(others.mean() - 0.5) < _binomial_band(s.num_correct * 49)


def test_an_ignored_stream_scores_one_half_everywhere_and_tolerance():
    J, TRUE, K = 5, 7, 256
    v_frames = np.flatnonzero(at.frame_intervals(125) == J)

    def predict(v, a):  # audio ignored; when J is masked the prediction is 2 classes off
        kept = (np.asarray(v)[:, v_frames] == 0).all(axis=(1, 2, 3, 4))
        return np.eye(21)[np.where(kept, TRUE + 1, TRUE + 3)]

    zv, ov = np.zeros((125, 1, 1, 3), np.uint8), np.ones((125, 1, 1, 3), np.uint8)
    za, oa = np.zeros(80000, np.float32), np.ones(80000, np.float32)
    res = at.attribute(predict, zv, za, ov, oa, TRUE, num_samples=K, batch_size=100)  # 256 = 2 x 100 + 56 (padded)
    a = res["audio"]
    assert a.num_correct == K and a.predictions.shape == (K,)
    assert np.all(np.abs(a.scores - 0.5) < _binomial_band(K))
    assert res["video"].scores[J] == 1.0  # TRUE + 1 counts as correct with tolerance 1
    strict = at.attribute(predict, zv, za, ov, oa, TRUE, num_samples=32, batch_size=32, tolerance=0)
    assert strict["audio"].num_correct == 0 and np.isnan(strict["audio"].scores).all()


def test_audio_level_gain_matches_typical_loudness():
    rng = np.random.default_rng(0)
    clip = rng.normal(0, 0.01, 80000).astype(np.float32)
    clip[40000:41600] += 0.5 * np.sin(np.arange(1600) / 3.0)  # one loud event: not the typical level
    distractor = rng.normal(0, 0.04, 80000).astype(np.float32)
    gain = at.audio_level_gain(clip, distractor)
    assert gain == pytest.approx(0.25, rel=0.03)
    assert at.audio_level_gain(clip, np.zeros(80000, np.float32)) == 1.0  # a silent distractor stays silent
    assert at.audio_level_gain(distractor, distractor) == pytest.approx(1.0)


def test_stream_peak_needs_a_peak_above_chance():
    """An ignored stream still has a highest score somewhere (set by the mask seed); it
    must not count as a peak at the event even when it lands on the event's interval."""
    J, TRUE = 23, 4

    def ignores(masks):
        return np.eye(21)[np.full(len(masks), TRUE)]

    def needs_j(masks):
        return np.eye(21)[np.where(np.asarray(masks)[:, J], TRUE + 6, TRUE)]

    noise = at.attribute_stream(ignores, 50, TRUE, num_samples=256, seed=0)
    lucky = int(np.nanargmax(noise.scores))
    chance = at.stream_peak(noise, lucky)
    assert chance["peak_interval"] == lucky and chance["num_correct"] == 256
    assert 1.0 < chance["peak_z"] < 4.0 and not chance["significant"] and not chance["peak_at_event"]
    assert at.stream_peak(noise, lucky, min_z=chance["peak_z"] - 1e-6)["peak_at_event"]  # the z rule decides

    real = at.attribute_stream(needs_j, 50, TRUE, num_samples=256, seed=0)
    hit = at.stream_peak(real, J - 1)  # within the default window (-1..+2) of the event
    assert hit["peak_interval"] == J and hit["peak_score"] == 1.0 and hit["peak_at_event"]
    assert hit["peak_z"] == pytest.approx(0.5 / real.standard_error())
    assert not at.stream_peak(real, J + 5)["peak_at_event"]  # significant, but elsewhere
    # Two essential intervals tie at 1.0: the peak is the one nearer the event (either way
    # a maximum), and an event far from both still misses.
    def needs_both(masks):
        masks = np.asarray(masks)
        return np.eye(21)[np.where(masks[:, J] | masks[:, J + 8], TRUE + 6, TRUE)]  # True: masked

    both = at.attribute_stream(needs_both, 50, TRUE, num_samples=256, seed=0)
    assert both.scores[J] == both.scores[J + 8] == 1.0
    assert at.stream_peak(both, J)["peak_interval"] == J and at.stream_peak(both, J + 8)["peak_interval"] == J + 8
    assert at.stream_peak(both, J + 8)["peak_at_event"] and not at.stream_peak(both, J + 4)["peak_at_event"]
    none = at.attribute_stream(needs_j, 50, TRUE + 9, num_samples=16)  # never correct
    assert at.stream_peak(none, J) == {**at.stream_peak(none, J), "peak_interval": -1, "peak_at_event": False}
    json.dumps(at.stream_peak(none, J))


# ------------------------------------------------------------------ the model wrapper


@pytest.fixture(scope="module")
def tiny_run():
    model = sf.Synchformer(CONFIG)
    params = random_params(CONFIG, 0)
    frames, audio, events = synthetic.make_clip_with_events(0, [3.5], duration_sec=7.0, height=36, width=36)
    dframes, daudio, _ = synthetic.make_clip_with_events(1, [], duration_sec=5.0, height=40, width=40)
    result = at.attribute_clip(model, params, frames, audio, v_start_sec=V_START, offset_sec=OFFSET,
                               distractor_frames=dframes, distractor_audio=daudio, num_samples=16, batch_size=8,
                               events=events)
    return dict(model=model, params=params, frames=frames, audio=audio, result=result)


def test_attribute_clip_on_a_tiny_model(tiny_run):
    r, model, params = tiny_run["result"], tiny_run["model"], tiny_run["params"]
    grid = transforms.class_grid()
    assert r.true_class == 12 and r.grid[r.true_class] == pytest.approx(OFFSET)
    assert r.v_start_sec == V_START and r.a_start_sec == pytest.approx(V_START + OFFSET)
    for s in (r.video, r.audio):
        assert s.scores.shape == (50,) and s.masks.shape == (16, 50) and s.predictions.shape == (16,)
        assert np.all(np.isnan(s.scores)) or np.all((s.scores >= 0) & (s.scores <= 1))
    # The segments cover frames 2..121 / samples 1280..78079 of the crop: interval 49 is unseen.
    assert np.flatnonzero(~r.video_seen).tolist() == [49] and np.flatnonzero(~r.audio_seen).tolist() == [49]
    assert r.video_crop.shape == (125, 32, 32, 3) and r.audio_crop.shape == (80000,)

    # The unmasked prediction is the model's on the official test-time inputs.
    plan = transforms.plan_sync_example(tiny_run["frames"].shape[0], tiny_run["audio"].shape[0], 36, 36, train=False,
                                        offset_sec=OFFSET, v_start_i_sec=V_START, crop_size=32)
    v_u8, a_seg = transforms.apply_plan(tiny_run["frames"], tiny_run["audio"], plan)
    video = normalize.video_uint8_to_model_input_np(np.moveaxis(v_u8, -1, -3))[None]
    audio = melspec.log_mel_jax(a_seg)[None]
    logits = np.asarray(jax.jit(model.apply)({"params": params}, video, audio)[0], np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(r.probabilities, probs, atol=1e-5)
    assert r.predicted_class == int(np.argmax(logits))
    assert len(grid) == len(r.probabilities)
    json.dumps(r.to_json())  # JSON-able (NaN -> null)


def test_masking_with_the_clip_itself_changes_nothing(tiny_run):
    """The cached-feature paths agree with the full forward: a self-distractor keeps every
    masked prediction equal to the unmasked one."""
    v0, a0 = int(V_START * 25), int((V_START + OFFSET) * 16000)  # where the crops start
    r = at.attribute_clip(tiny_run["model"], tiny_run["params"], tiny_run["frames"], tiny_run["audio"],
                          v_start_sec=V_START, offset_sec=OFFSET, distractor_frames=tiny_run["frames"][v0:],
                          distractor_audio=tiny_run["audio"][a0:], num_samples=8, batch_size=8)
    assert (r.video.predictions == r.predicted_class).all()
    assert (r.audio.predictions == r.predicted_class).all()
    assert r.predicted_class == tiny_run["result"].predicted_class


def test_plot_is_a_valid_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = at.plot_attribution(tiny_run["result"], tmp_path / "fig" / "attribution.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600


def test_wrong_model_head_is_refused(tiny_run):
    syncab = sf.Synchformer(tiny_config(**{"sync.head": "synchronizability", "n_segments": 13}))
    with pytest.raises(ValueError, match="offset model"):
        at.attribute_clip(syncab, tiny_run["params"], tiny_run["frames"], tiny_run["audio"], v_start_sec=1.0,
                          offset_sec=0.0, distractor_frames=tiny_run["frames"], distractor_audio=tiny_run["audio"])


# ---------------------------------------------------------------------------- CLI


def _write_clip(path: pathlib.Path, frames: np.ndarray, audio: np.ndarray) -> pathlib.Path:
    """H.264 + 16 kHz PCM in Matroska (conform re-encodes it to the contract)."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"crf": "18", "preset": "ultrafast"}
        as_ = c.add_stream("pcm_s16le", rate=16000)
        as_.layout = "mono"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            for p in vs.encode(vf):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None]
        for s in range(0, pcm.shape[1], 1600):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + 1600]), format="s16", layout="mono")
            af.sample_rate, af.pts = 16000, s
            for p in as_.encode(af):
                c.mux(p)
        for p in as_.encode():
            c.mux(p)
    return path


def test_attribute_cli_writes_json_and_png(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model_dir = pretrained.save_model(tmp_path / "model", tiny_run["params"], CONFIG)
    frames, audio, _ = synthetic.make_clip_with_events(4, [3.0], duration_sec=6.0, height=64, width=64)
    video = _write_clip(tmp_path / "clip.mkv", frames, audio)
    out = tmp_path / "out"
    rc = cli.main(["attribute", str(video), "--checkpoint", str(model_dir), "--v-start-sec", "0.5",
                   "--offset-sec", "-0.2", "--samples", "8", "--batch-size", "8", "--match-audio-level",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "attribution.json").read_text())
    assert record["true_offset_sec"] == pytest.approx(-0.2) and len(record["video"]["scores"]) == 50
    assert record["video"]["num_masks"] == 8 and record["audio"]["window_start_sec"] == pytest.approx(0.3)
    assert record["distractor_audio_gain"] > 0 and record["distractor_audio_gain"] != 1.0
    assert (out / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    # A missing file is one error line, not a traceback.
    assert cli.main(["attribute", str(tmp_path / "nope.mp4"), "--checkpoint", str(model_dir),
                     "--out", str(out)]) == 2
    assert "nope.mp4" in capsys.readouterr().err


def test_attribute_cli_offsets_off_and_outside_the_grid(tiny_run, tmp_path, capsys):
    """0.3 s lies between classes 11 (0.2) and 12 (0.4): the audio is shifted 0.3 s, the
    masks are scored against class 12, and both are said (a warning, the summary line,
    the JSON). Outside the grid, and non-finite values, are usage errors (exit 2)."""
    model_dir = pretrained.save_model(tmp_path / "model", tiny_run["params"], CONFIG)
    frames, audio, _ = synthetic.make_clip_with_events(4, [3.0], duration_sec=6.0, height=64, width=64)
    video = _write_clip(tmp_path / "clip.mkv", frames, audio)
    out = tmp_path / "out"
    common = [str(video), "--checkpoint", str(model_dir), "--samples", "8", "--batch-size", "8", "--no-plot",
              "--out", str(out)]
    rc = cli.main(["attribute", *common, "--v-start-sec", "0.5", "--offset-sec", "0.3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (warning,) = [line for line in captured.err.splitlines() if not line.startswith("note: no ")]
    assert warning.startswith("warning: --offset-sec +0.30 s is not a class") and "class, 12 (+0.40 s)" in warning
    assert captured.out.startswith("true offset +0.30 s (between classes: scored against the nearest, "
                                   "class 12 = +0.40 s), predicted ")
    record = json.loads((out / "attribution.json").read_text())
    assert record["offset_sec"] == pytest.approx(0.3) and record["true_offset_sec"] == pytest.approx(0.3)
    assert record["true_class"] == 12 and record["true_class_offset_sec"] == pytest.approx(0.4)
    assert record["offset_on_grid"] is False
    assert record["audio"]["window_start_sec"] == pytest.approx(0.8)  # really 0.3 s after the video's 0.5 s
    for extra, words in ((["--offset-sec", "2.5"], "outside the model's class grid"),
                         (["--offset-sec", "nan"], "--offset-sec must be a finite"),
                         (["--v-start-sec", "inf"], "--v-start-sec must be a finite")):
        assert cli.main(["attribute", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    with pytest.raises(ValueError, match="outside the model's class grid"):
        at.attribute_clip(sf.Synchformer(CONFIG), tiny_run["params"], frames, audio, v_start_sec=0.5,
                          offset_sec=-2.2, distractor_frames=frames, distractor_audio=audio)


def test_attribute_cli_refuses_counts_that_give_no_scores(tiny_run, tmp_path, capsys):
    """No masks, no batch, a negative tolerance: usage errors (exit 2) before any work,
    where they were a ZeroDivisionError traceback or an all-null JSON with exit 0. A
    distractor too short for the crop is named as the file at fault."""
    model_dir = pretrained.save_model(tmp_path / "model", tiny_run["params"], CONFIG)
    frames, audio, _ = synthetic.make_clip_with_events(4, [3.0], duration_sec=6.0, height=64, width=64)
    video = _write_clip(tmp_path / "clip.mkv", frames, audio)
    short = _write_clip(tmp_path / "short.mkv", frames[:50], audio[:32000])
    out = tmp_path / "out"
    common = [str(video), "--checkpoint", str(model_dir), "--no-plot", "--out", str(out)]
    for extra, words in ((["--samples", "0"], "--samples must be >= 1, got 0"),
                         (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                         (["--tolerance", "-1"], "--tolerance must be >= 0, got -1"),
                         (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0")):
        assert cli.main(["attribute", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not out.exists()
    assert cli.main(["attribute", *common, "--samples", "8", "--batch-size", "8", "--distractor", str(short)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {short}: the distractor is too short"), err
    for kw, words in ((dict(num_samples=0), "num_samples"), (dict(batch_size=0), "batch_size"),
                      (dict(tolerance=-1), "tolerance"), (dict(p_mask=1.0), "p_mask")):
        with pytest.raises(ValueError, match=words):
            at.attribute_clip(sf.Synchformer(CONFIG), tiny_run["params"], frames, audio, v_start_sec=0.5,
                              offset_sec=0.0, distractor_frames=frames, distractor_audio=audio, **kw)


# ------------------------------------------------------------ isolated-event check


@pytest.mark.skipif(not os.environ.get("SYNCHFORMER_DEMO_MODEL"),
                    reason="needs a demo-trained model folder in SYNCHFORMER_DEMO_MODEL (synchformer-jax demo)")
def test_demo_model_attribution_peaks_at_an_isolated_event(tmp_path):
    # A pulse-demo model (`synchformer-jax demo --config configs/demo_pulse.py`); the
    # check reads the cue it was trained on from the model folder.
    report = at.isolated_event_check(os.environ["SYNCHFORMER_DEMO_MODEL"], plot_path=tmp_path / "event.png")
    assert report["passed"], json.dumps(report, indent=1)


def test_isolated_event_check_runs_on_a_random_model(tiny_run, tmp_path):
    """The check's plumbing (the model is untrained, so `passed` is whatever it is)."""
    model_dir = pretrained.save_model(tmp_path / "model", tiny_run["params"], CONFIG)
    report = at.isolated_event_check(model_dir, num_samples=8, batch_size=8)
    # No provenance: the onset cue.
    assert report["event"]["time_sec"] == 5.0 and report["event"]["kind"] == "onset" == report["kind"]
    # Event at 5.0 s (frame 125); video crop from 2.4 s (frame 60: event = crop frame 65 ->
    # interval 26), audio crop from 2.8 s (event = crop sample 35200 -> interval 22).
    assert report["v_start_sec"] == 2.4 and report["a_start_sec"] == 2.8
    assert report["video"]["event_interval"] == 26 and report["audio"]["event_interval"] == 22
    assert isinstance(report["passed"], bool) and report["true_class"] == 12
    json.dumps(report)
    pulse = at.isolated_event_check(model_dir, num_samples=8, batch_size=8, kind="pulse", distractor_onset_sec=5.4)
    assert pulse["event"]["kind"] == "pulse" and pulse["event"]["duration_sec"] == pytest.approx(0.12)
    assert pulse["video"]["event_interval"] == 26 and pulse["distractor_onset_sec"] == 5.4
    # A pulse-demo model folder: its provenance names the cue, the check follows it.
    pulse_dir = pretrained.save_model(tmp_path / "pulse_model", tiny_run["params"], CONFIG,
                                      provenance={"source": "synchformer-jax demo",
                                                  "synthetic_clip": {"cue": "pulse", "height": 72, "width": 72}})
    assert at.isolated_event_check(pulse_dir, num_samples=8, batch_size=8)["event"]["kind"] == "pulse"
    with pytest.raises(ValueError, match="distractor_onset_sec"):
        at.isolated_event_check(model_dir, num_samples=8, kind="flash", distractor_onset_sec=5.4)
