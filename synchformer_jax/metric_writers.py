"""Metric writers: JSON lines, TensorBoard event files (no TensorFlow), and a progress bar.

Every writer takes `write(step, metrics)` with a (possibly nested) dict of numbers and
writes only on process 0: each process computes the same globally reduced metrics, and
several processes appending to one file would interleave or clobber it. On other
processes the writers create no file and do nothing.

The TensorBoard writer encodes the event file itself. `clu.metric_writers`,
`flax.metrics.tensorboard` and `tensorboard`'s own writer all import TensorFlow, and
`tensorboardX` is one more dependency for ~60 lines of protobuf: an event file is a
TFRecord stream (`u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`,
little-endian) of `tensorflow.Event` messages:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first event carries `file_version = "brain.Event:2"`; TensorBoard shows the others'
`simple_value`s as scalars.
"""
from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import socket
import struct
import time

import numpy as np

from synchformer_jax.input.shards import masked_crc32c


def _is_main_process(process_index: int | None) -> bool:
    if process_index is None:
        import jax  # deferred: a writer used from a plain script needs no backend until here
        process_index = jax.process_index()
    return process_index == 0


def json_values(value):
    """Plain JSON-able Python from numpy/jax scalars and arrays, recursively.

    Non-finite floats become None: strict JSON has no NaN/Infinity, and readers such as
    `jq` or JavaScript reject Python's `NaN` extension.
    """
    if isinstance(value, dict):
        return {str(k): json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_values(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if hasattr(value, "__array__") and not isinstance(value, numbers.Number):
        arr = np.asarray(value)
        return json_values(arr.tolist()) if arr.ndim else json_values(arr.item())
    if isinstance(value, np.generic):
        return json_values(value.item())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return str(value)


def flatten_scalars(metrics: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a/b": 1.0}`, keeping only scalars (lists, strings and None
    are dropped: TensorBoard scalars cannot hold them)."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_scalars(value, name + "/"))
            continue
        if isinstance(value, (str, bool)) or value is None:
            continue
        if hasattr(value, "__array__") and not isinstance(value, numbers.Number):
            arr = np.asarray(value)
            if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
                continue
            value = arr.item()
        if isinstance(value, numbers.Real):
            out[name] = float(value)
    return out


class MetricWriter:
    """The interface: `write(step, metrics)`, `flush()`, `close()`; a context manager."""

    def write(self, step: int, metrics: dict) -> None:
        raise NotImplementedError

    # The name `clu.metric_writers` uses, so call sites read the same either way.
    def write_scalars(self, step: int, metrics: dict) -> None:
        self.write(step, metrics)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlWriter(MetricWriter):
    """One JSON object per `write`: `{"step": step, **metrics}` (nested dicts kept).

    Appends, so that a resumed run continues the same file; flushed after every line,
    so that a crash loses nothing already reported (metric writes are rare and small).
    """

    def __init__(self, path: str, process_index: int | None = None):
        self.path = path
        self._f = None
        if _is_main_process(process_index):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict) -> None:
        if self._f is None:
            return
        record = {"step": int(step), **json_values(dict(metrics))}
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------- protobuf wire format

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    # int64 fields encode negatives as their 64-bit two's complement (10 bytes).
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: dict | None = None) -> bytes:
    """A serialized `Event` message (see the module docstring for the schema)."""
    out = bytearray(_key(1, _FIXED64) + struct.pack("<d", wall_time))
    if step:  # proto3 leaves default values out
        out += _key(2, _VARINT) + _varint(int(step))
    if file_version is not None:
        out += _len_field(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(
            _len_field(1, _len_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + struct.pack("<f", value))
            for tag, value in scalars.items())
        out += _len_field(5, summary)
    return bytes(out)


def tfrecord_frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardWriter(MetricWriter):
    """Scalars to `logdir/events.out.tfevents.<time>.<host>.<pid>`, no TensorFlow needed.

    Nested dicts become `/`-joined tags; non-scalar values are skipped (use the JSON-lines
    writer for those). A new file per writer instance, as TensorBoard expects: it reads all
    event files of a directory and merges them by step.
    """

    _instances = itertools.count()

    def __init__(self, logdir: str, process_index: int | None = None, flush_every_s: float = 10.0):
        self.logdir = logdir
        self.path = None
        self._f = None
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        if _is_main_process(process_index):
            os.makedirs(logdir, exist_ok=True)
            now = time.time()
            # time + host + pid + a per-process counter: writers started in the same second,
            # by one process or several sharing the directory, still get their own files.
            name = (f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
                    f".{next(TensorBoardWriter._instances)}")
            self.path = os.path.join(logdir, name)
            self._f = open(self.path, "wb")
            self._f.write(tfrecord_frame(encode_event(now, file_version="brain.Event:2")))
            self._f.flush()

    def write(self, step: int, metrics: dict) -> None:
        if self._f is None:
            return
        scalars = flatten_scalars(dict(metrics))
        if not scalars:
            return
        self._f.write(tfrecord_frame(encode_event(time.time(), int(step), scalars=scalars)))
        # Buffered between flushes: TensorBoard polls files anyway, and a flush per training
        # step on a network filesystem costs more than the step's logging.
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class MultiWriter(MetricWriter):
    """Forwards every call to each of `writers` (each does its own process-0 check)."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write(self, step: int, metrics: dict) -> None:
        for w in self.writers:
            w.write(step, metrics)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def create_default_writer(workdir: str, process_index: int | None = None) -> MultiWriter:
    """JSON lines at `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`."""
    return MultiWriter([JsonlWriter(os.path.join(workdir, "metrics.jsonl"), process_index),
                        TensorBoardWriter(os.path.join(workdir, "tensorboard"), process_index)])


# --------------------------------------------------------------------------- progress bar

def progress_bar(iterable=None, total: int | None = None, desc: str | None = None, unit: str = "step",
                 initial: int = 0, process_index: int | None = None, **kwargs):
    """A tqdm bar showing count, rate and ETA (`[elapsed<remaining, rate]`), on process 0.

    `initial` lets a resumed run start the bar at its restored step, so the rate and ETA
    count only this run's steps. Other processes get a disabled bar that still iterates
    and accepts `update`/`set_postfix`, so call sites need no branches.
    """
    # Plain tqdm, not tqdm.auto: logs of batch jobs and notebooks then look the same.
    # Its default format already reads `n/total [elapsed<remaining, rate]`.
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                disable=not _is_main_process(process_index), **kwargs)
