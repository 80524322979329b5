"""Metric writers: JSON lines, hand-encoded TensorBoard event files, progress bar."""
import importlib.util
import io
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from synchformer_jax import metric_writers as mw
from synchformer_jax.input.shards import masked_crc32c

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


# --------------------------------------------------------------------------- a tiny independent decoder

def _read_varint(buf, pos):
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _fields(buf):
    """(field, wire_type, value) of a protobuf message; length-delimited values as bytes."""
    pos, out = 0, []
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        else:
            raise AssertionError(f"unexpected wire type {wt}")
        out.append((field, wt, val))
    return out


def _read_events(path):
    data = open(path, "rb").read()
    pos, events = 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        payload = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(payload)
        pos += 16 + n
        ev = {"scalars": {}}
        for field, wt, val in _fields(payload):
            if field == 1:
                assert wt == 1
                ev["wall_time"] = struct.unpack("<d", val)[0]
            elif field == 2:
                assert wt == 0
                ev["step"] = val - (1 << 64) if val >> 63 else val
            elif field == 3:
                ev["file_version"] = val.decode()
            elif field == 5:
                for f, _, value_msg in _fields(val):
                    assert f == 1
                    parts = {f2: v2 for f2, _, v2 in _fields(value_msg)}
                    ev["scalars"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        events.append(ev)
    return events


# --------------------------------------------------------------------------- tests

def test_varint_known_encodings():
    assert mw._varint(0) == b"\x00"
    assert mw._varint(1) == b"\x01"
    assert mw._varint(300) == b"\xac\x02"  # the protobuf documentation's example
    assert mw._varint(-1) == b"\xff" * 9 + b"\x01"  # int64 negatives: 10 bytes
    # Event{step: 150}: key (2<<3|0)=0x10, then 150 = 0x96 0x01.
    assert mw.encode_event(0.0, 150)[9:] == b"\x10\x96\x01"


def test_tensorboard_writer_round_trip(tmp_path):
    with mw.TensorBoardWriter(str(tmp_path)) as w:
        w.write(1, {"loss": 2.5, "lr": np.float32(1e-4), "acc": jnp.asarray(0.75)})
        w.write(2, {"eval": {"precision": 0.5, "per_class": [0.1, 0.2], "name": "x"}, "n": 3})
        w.write(3, {"skipped": [1, 2]})  # nothing scalar: no event at all
        w.write(2**40, {"big": -1.0})
    events = _read_events(w.path)
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["scalars"] == {}
    assert [e.get("step", 0) for e in events[1:]] == [1, 2, 2**40]
    assert events[1]["scalars"] == pytest.approx({"loss": 2.5, "lr": 1e-4, "acc": 0.75})
    assert events[2]["scalars"] == {"eval/precision": 0.5, "n": 3.0}
    assert events[3]["scalars"] == {"big": -1.0}
    assert all(e["wall_time"] > 1.6e9 for e in events)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package (not a dependency) is not installed")
def test_tensorboard_reads_our_event_file(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator, event_file_loader

    with mw.TensorBoardWriter(str(tmp_path)) as w:
        for step in range(5):
            w.write(step, {"train/loss": 1.0 / (step + 1), "train/lr": 0.1 * step})
    events = list(event_file_loader.EventFileLoader(w.path).Load())
    assert events[0].file_version == "brain.Event:2"
    assert events[3].step == 2 and events[3].summary.value[0].tag == "train/loss"
    # The accumulator is what the TensorBoard UI uses: it must see our scalars.
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == list(range(5))
    assert [s.value for s in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])


def test_jsonl_writer(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with mw.JsonlWriter(str(path)) as w:
        w.write(10, {"loss": jnp.asarray(1.5), "per_class": np.array([0.5, 1.0]), "nested": {"n": np.int64(3)},
                     "bad": float("nan")})
    # Appending: a resumed run continues the same file.
    with mw.JsonlWriter(str(path)) as w:
        w.write(20, {"loss": 1.0})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 10, "loss": 1.5, "per_class": [0.5, 1.0], "nested": {"n": 3}, "bad": None},
                     {"step": 20, "loss": 1.0}]


def test_writers_are_noops_off_process_zero(tmp_path):
    w = mw.create_default_writer(str(tmp_path / "run"), process_index=1)
    w.write(1, {"loss": 1.0})
    w.flush()
    w.close()
    assert not (tmp_path / "run").exists()
    bar = mw.progress_bar(range(3), process_index=1)
    assert list(bar) == [0, 1, 2] and bar.disable


def test_multi_writer_forwards_and_closes(tmp_path):
    with mw.create_default_writer(str(tmp_path)) as w:  # process_index from jax: 0 here
        w.write(5, {"a": 1.0})
        w.write_scalars(6, {"a": 2.0})
    jsonl, tb = w.writers
    assert jsonl._f is None and tb._f is None
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 6]
    assert [e["scalars"] for e in _read_events(tb.path)[1:]] == [{"a": 1.0}, {"a": 2.0}]


def test_progress_bar_shows_rate_and_eta():
    out = io.StringIO()
    bar = mw.progress_bar(total=10, desc="train", initial=4, process_index=0, file=out, mininterval=0)
    bar.update(3)
    bar.close()
    text = out.getvalue()
    assert "train" in text and "7/10" in text
    assert "<" in text and "step/s" in text  # elapsed<remaining (ETA), rate
