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
