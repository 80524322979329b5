"""The procedural dataset: determinism, event alignment, records and shards."""
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from synchformer_jax import records, synthetic
from synchformer_jax.input import pipeline


def test_make_clip_shapes_and_determinism():
    f1, a1, e1 = synthetic.make_clip(7, duration_sec=3.0, height=64, width=96)
    f2, a2, e2 = synthetic.make_clip(7, duration_sec=3.0, height=64, width=96)
    f3, _, e3 = synthetic.make_clip(8, duration_sec=3.0, height=64, width=96)
    assert f1.shape == (75, 64, 96, 3) and f1.dtype == np.uint8
    assert a1.shape == (75 * 640,) and a1.dtype == np.float32
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(a1, a2)
    assert e1 == e2
    assert not np.array_equal(f1, f3) or e1 != e3


@pytest.mark.parametrize("seed", range(5))
def test_events_are_sparse_irregular_and_on_the_frame_grid(seed):
    _, _, events = synthetic.make_clip(seed, duration_sec=10.0, height=32, width=32)
    times = np.array([e["time_sec"] for e in events])
    assert 2 <= len(events) <= 5
    assert np.all(np.diff(times) >= 1.0 - 1e-9)  # min gap
    np.testing.assert_allclose(times * 25, np.round(times * 25), atol=1e-9)
    assert all(e["kind"] in synthetic.EVENT_KINDS and e["sound"] in synthetic.SOUND_KINDS for e in events)


def test_sound_onsets_coincide_with_visual_events():
    frames, audio, events = synthetic.make_clip(3, duration_sec=6.0, height=64, width=64, kinds=("flash",))
    rms = np.sqrt(np.mean(audio.reshape(-1, 640) ** 2, axis=1))  # one value per video frame
    bright = frames.reshape(frames.shape[0], -1).mean(axis=1)
    for e in events:
        k = e["frame"]
        # The sound starts in the event's frame (louder than anything before it)...
        assert rms[k] > 5 * np.median(rms)
        assert rms[k] > 3 * rms[k - 1]
        # ...and the flash peaks in that same frame.
        assert bright[k] > bright[k - 1] + 50


def test_make_dataset_writes_decodable_records(tmp_path):
    paths = synthetic.make_dataset(tmp_path, n_train=2, n_eval=1, seed=3, num_shards=2, duration_sec=6.0)
    assert len(paths["train"]) == 2 and len(paths["eval"]) == 1
    reader = ArrayRecordReader(paths["eval"][0])
    rec = records.decode(reader.read())
    reader.close()
    assert rec.clip_id == "eval_000000" and rec.num_frames == 150
    assert rec.audio.shape == (96000,) and rec.sample_rate == 16000 and rec.fps == 25.0
    assert {"offset_sec", "vstart_sec", "events"} <= set(rec.labels)
    frames = pipeline.decode_video_bytes(rec.video_mp4)
    assert frames.shape == (150, 256, 256, 3)
    # Lossy H.264, but the picture survives the round trip.
    ref, _, _ = synthetic.make_clip(rec.labels["synthetic_seed"], duration_sec=6.0)
    assert np.abs(frames.astype(np.int16) - ref).mean() < 4.0


def test_fixed_offsets_fit_the_clip():
    rng = np.random.default_rng(0)
    assert synthetic._fixed_offset(rng, 4.0) is None
    for duration in (6.0, 10.0):
        offs = set()
        for _ in range(200):
            off, vstart = synthetic._fixed_offset(rng, duration)
            offs.add(off)
            assert -2.0 <= off <= 2.0 and 0.0 <= vstart
            assert vstart + 5.0 <= duration + 1e-9
            assert vstart + off >= -1e-9 and vstart + off + 5.0 <= duration + 1e-9
            assert abs(vstart * 25 - round(vstart * 25)) < 1e-6
        assert max(abs(o) for o in offs) == min(2.0, duration - 5.0)


def _onset_profile(frames, audio):
    bright = frames.reshape(frames.shape[0], -1).mean(axis=1)
    rms = np.sqrt(np.mean(audio.reshape(-1, 640) ** 2, axis=1))  # one value per video frame
    return bright, rms


@pytest.mark.parametrize("seed", range(3))
def test_onset_clip_lamp_and_hum_start_in_the_same_frame(seed):
    frames, audio, events = synthetic.make_clip(seed, duration_sec=7.4, height=48, width=48, cue="onset")
    assert len(events) == 1 and events[0]["kind"] == "onset"
    k = events[0]["frame"]
    lo, hi = synthetic.onset_range_sec(7.4)
    assert lo <= events[0]["time_sec"] <= hi
    bright, rms = _onset_profile(frames, audio)
    # Off before the onset frame, on from it: a step in both streams at the same frame.
    assert bright[k] > bright[k - 1] + 20 and rms[k] > 4 * rms[k - 1]
    assert np.all(bright[k:] > bright[:k].max()) and np.all(rms[k:] > 3 * rms[:k].max())


@pytest.mark.parametrize("duration,inside", [(7.4, 1.0), (10.0, 0.85)])
def test_onset_range_lies_inside_the_windows(duration, inside):
    """7.4-s clips: inside the segments of every stage-II window; 10-s clips (long enough
    for stage I): inside most of them."""
    from synchformer_jax.input import transforms

    lo, hi = synthetic.onset_range_sec(duration)
    v_len, a_len = int(duration * 25), int(duration * 16000)
    rng = np.random.default_rng(0)
    held = []
    for _ in range(400):
        crop = transforms.temporal_crop_and_offset(v_len, a_len, rng=rng)
        # The centred segments cover frames [2, 122) of the 125-frame crop.
        v0, v1 = (crop.v_start_i + 2) / 25, (crop.v_start_i + 122) / 25
        a0, a1 = (crop.a_start_i + 2 * 640) / 16000, (crop.a_start_i + 122 * 640) / 16000
        t = rng.uniform(lo, hi)
        held.append(v0 < t < v1 and a0 < t < a1)
    assert np.mean(held) >= inside
    with pytest.raises(ValueError, match="cannot hold"):
        synthetic.onset_range_sec(6.0)


def test_onset_clip_with_events_and_cue_free_distractor():
    frames, audio, events = synthetic.make_clip_with_events(2, [3.0], duration_sec=6.0, height=40, width=40,
                                                            cue="onset")
    assert events[0]["frame"] == 75
    bright, rms = _onset_profile(frames, audio)
    assert bright[75] > bright[74] + 20 and rms[75] > 4 * rms[74]
    frames, audio, events = synthetic.make_clip_with_events(2, [], duration_sec=6.0, height=40, width=40,
                                                            cue="onset")
    bright, rms = _onset_profile(frames, audio)
    assert events == [] and np.abs(np.diff(bright)).max() < 10 and rms.max() < 0.1
    with pytest.raises(ValueError, match="at most one"):
        synthetic.make_clip_with_events(2, [1.0, 2.0], duration_sec=6.0, cue="onset")
    with pytest.raises(ValueError, match="cue must be"):
        synthetic.make_clip(2, duration_sec=6.0, cue="blink")


def _digest(clip) -> str:
    import hashlib
    import json

    frames, audio, events = clip
    d = hashlib.sha256()
    d.update(frames.tobytes())
    d.update(audio.tobytes())
    d.update(json.dumps(events, sort_keys=True).encode())
    return d.hexdigest()[:16]


def test_onset_clips_are_unchanged_and_a_pulse_is_their_start():
    """The onset cue's bytes are those of the implementation before the pulse cue (the
    demo's datasets depend on them); a pulse clip of the same seed is that clip up to its
    switch-off."""
    onset = synthetic.make_clip(0, duration_sec=7.4, height=48, width=48, cue="onset")
    assert _digest(onset) == "875d9762f323c237"
    assert _digest(synthetic.make_clip(5, duration_sec=10.0, height=32, width=40, cue="onset",
                                       onset_sec=(2.0, 3.0))) == "aaca251d8253f19f"
    kw = dict(duration_sec=6.0, height=40, width=40, cue="onset")
    assert _digest(synthetic.make_clip_with_events(2, [3.0], **kw)) == "ee42613ae240b339"
    assert _digest(synthetic.make_clip_with_events(2, [], **kw)) == "95372205711e2374"
    assert _digest(synthetic.make_clip(1, duration_sec=6.0, height=32, width=32)) == "a26da1c0d5f3e351"
    frames, audio, events = synthetic.make_clip(0, duration_sec=7.4, height=48, width=48, cue="pulse")
    k = events[0]["frame"]
    assert k == onset[2][0]["frame"]
    end = k + 3
    np.testing.assert_array_equal(frames[:end], onset[0][:end])
    np.testing.assert_array_equal(audio[:end * 640], onset[1][:end * 640])
    assert not np.array_equal(frames[end:], onset[0][end:])


def _lamp_brightness(frames, on_frame, off_frame):
    """Mean brightness per frame over the lamp disc: the pixels that change by far more
    than the room's +30 when the lamp switches (frames `off_frame` -> `on_frame`)."""
    x = frames.astype(np.float32).mean(axis=-1)
    disc = (x[on_frame] - x[off_frame]) > 65
    assert disc.sum() > 0.05 * disc.size  # a large lamp, not a few pixels
    return x[:, disc].mean(axis=1)


@pytest.mark.parametrize("seed,pulse_frames", [(0, 3), (1, 3), (2, 6)])
def test_pulse_lamp_is_on_exactly_in_its_frames(seed, pulse_frames):
    frames, audio, events = synthetic.make_clip(seed, duration_sec=7.4, height=48, width=48, cue="pulse",
                                                pulse_frames=pulse_frames)
    assert events == [{"time_sec": events[0]["frame"] / 25, "frame": events[0]["frame"], "kind": "pulse",
                       "sound": "hum", "duration_sec": pulse_frames / 25}]
    lo, hi = synthetic.onset_range_sec(7.4)
    assert lo <= events[0]["time_sec"] <= hi
    k = events[0]["frame"]
    lamp = _lamp_brightness(frames, k, k - 1)
    lit = np.zeros(len(lamp), bool)
    lit[k:k + pulse_frames] = True
    assert lamp[lit].min() > lamp[~lit].max() + 60
    # Deterministic from the seed.
    again = synthetic.make_clip(seed, duration_sec=7.4, height=48, width=48, cue="pulse", pulse_frames=pulse_frames)
    np.testing.assert_array_equal(again[0], frames)
    np.testing.assert_array_equal(again[1], audio)
    assert again[2] == events


def test_pulse_hum_is_confined_to_its_span_and_the_distractor_is_cue_free():
    """Against the cue-free clip of the same seed (same room, lamp, noise): the pulse adds
    the hum in its frames plus a 5-ms release, and nothing anywhere else."""
    kw = dict(duration_sec=6.0, height=40, width=40, cue="pulse")
    frames, audio, events = synthetic.make_clip_with_events(4, [2.5], **kw)
    still, quiet, none = synthetic.make_clip_with_events(4, [], **kw)
    assert none == [] and events[0]["frame"] == 62 and events[0]["duration_sec"] == 0.12
    i0, i1, release = 62 * 640, 65 * 640, 80
    hum = (audio.astype(np.float64) - quiet)
    assert np.all(hum[:i0] == 0) and np.all(hum[i1 + release:] == 0)
    peak = np.abs(hum[i0:i1]).max()
    assert peak > 0.1
    # Full level through the three frames (5-ms attack aside)...
    frame_rms = np.sqrt(np.mean(hum[i0:i1].reshape(3, 640) ** 2, axis=1))
    assert frame_rms.min() > 0.5 * frame_rms.max()
    # ...then a linear release under a falling bound: no step at the end.
    bound = peak * (release - np.arange(release)) / release + 1e-6
    assert np.all(np.abs(hum[i1:i1 + release]) <= bound)
    assert np.abs(hum[i1:i1 + 10]).max() > 0.3 * peak
    # The picture: the lamp is lit in the pulse's frames only; the distractor never.
    lamp = _lamp_brightness(frames, 62, 61)
    dark = _lamp_brightness(np.concatenate([frames[62:63], still]), 0, 62)[1:]
    assert lamp[62:65].min() > max(lamp[:62].max(), lamp[65:].max()) + 60
    assert dark.max() < lamp[62:65].min() - 60  # (the silent square crossing the lamp moves the mean a bit)
    np.testing.assert_array_equal(frames[:62], still[:62])
    np.testing.assert_array_equal(frames[65:], still[65:])


def test_pulse_records_and_config_path(tmp_path):
    """`make_dataset(cue="pulse")` and the trainer's `data.synthetic_clip` route."""
    from synchformer_jax import experiment, train

    config = experiment.default_config(experiment.STAGE_SYNC)
    config.data.synthetic_train, config.data.synthetic_eval = 1, 1
    config.data.synthetic_clip = dict(cue="pulse", pulse_frames=4, height=32, width=32, duration_sec=7.4)
    train_paths, eval_paths = train.data_paths(config, tmp_path)
    for path in train_paths + eval_paths:
        reader = ArrayRecordReader(path)
        rec = records.decode(reader.read())
        reader.close()
        (event,) = rec.labels["events"]
        assert event["kind"] == "pulse" and event["duration_sec"] == 0.16
        frames, _, events = synthetic.make_clip(rec.labels["synthetic_seed"], **config.data.synthetic_clip.to_dict())
        assert events == [event] and rec.num_frames == frames.shape[0] == 185


def test_pulse_bad_inputs():
    with pytest.raises(ValueError, match="pulse_frames"):
        synthetic.make_clip(0, duration_sec=7.4, height=32, width=32, cue="pulse", pulse_frames=0)
    with pytest.raises(ValueError, match="pulse_frames"):
        synthetic.make_clip_with_events(0, [3.0], duration_sec=6.0, height=32, width=32, cue="pulse",
                                        pulse_frames=1.5)
    with pytest.raises(ValueError, match="does not end inside"):  # 5.92 s + 3 frames > 6 s
        synthetic.make_clip_with_events(0, [5.92], duration_sec=6.0, height=32, width=32, cue="pulse")
    with pytest.raises(ValueError, match="does not end inside"):
        synthetic.make_clip(0, duration_sec=7.4, height=32, width=32, cue="pulse", onset_sec=(7.3, 7.35))
    with pytest.raises(ValueError, match="at most one"):
        synthetic.make_clip_with_events(0, [1.0, 2.0], duration_sec=6.0, cue="pulse")
    with pytest.raises(ValueError, match="cue must be one of .*'pulse'"):
        synthetic.make_clip_with_events(0, [1.0], duration_sec=6.0, cue="blink")
