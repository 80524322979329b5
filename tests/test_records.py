"""The record schema round-trips and rejects damaged bytes with a clear reason."""
import numpy as np
import pytest

from synchformer_jax import records


def _record():
    return records.ClipRecord(clip_id="vid/ü_0_10000", video_mp4=b"\x00\x01mp4bytes", fps=25.0,
                              audio=np.linspace(-1, 1, 1601, dtype=np.float32), duration_sec=10.0,
                              num_frames=250, labels={"split": "test", "offset_sec": -1.6, "classes": [3, 7]},
                              source="/data/x.mp4", decoder={"av": "18.1.0"})


def test_round_trip():
    rec = _record()
    back = records.decode(records.encode(rec))
    assert back.video_mp4 == rec.video_mp4 and back.labels == rec.labels and back.clip_id == rec.clip_id
    np.testing.assert_array_equal(back.audio, rec.audio)
    assert back.audio.dtype == np.float32
    assert records.decode_header(records.encode(rec))["num_frames"] == 250


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:5], "too short"),
    (lambda b: b"XXXX" + b[4:], "not a synchformer-jax record"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:-10], "truncated"),
])
def test_damaged_bytes(mutate, message):
    with pytest.raises(records.RecordError, match=message):
        records.decode(mutate(records.encode(_record())))


def test_stereo_audio_is_refused():
    rec = _record()
    rec.audio = np.zeros((2, 10), np.float32)
    with pytest.raises(records.RecordError, match="mono"):
        records.encode(rec)


def test_non_finite_audio_is_named():
    rec = _record()
    records.require_finite_audio(rec)  # finite: no error
    rec.audio = np.array(rec.audio)
    rec.audio[[800, 900]] = [np.nan, -np.inf]
    with pytest.raises(records.RecordError, match=r"2 non-finite sample\(s\) \(NaN or inf\), the first at sample 800"):
        records.require_finite_audio(rec)
