"""The one record schema: one audio-visual clip as bytes.

A record holds the contract-conforming video (H.264 mp4 bytes at 25 fps, shorter side
256), the audio decoded once to 16 kHz mono float32 PCM (decoding AAC again in every
epoch would cost CPU and, across decoder versions, exactness), and metadata: clip id,
duration, fps, sample rate, labels and the decoder versions used.

Layout (little-endian), chosen so that decoding is a JSON parse and zero-copy views:
    b"SFJR" | u32 version | u32 header_len | header (UTF-8 JSON) | blobs
The header lists each blob as `[offset, length]` relative to the blob area, plus dtype
and shape for arrays. Nothing here needs TensorFlow; the same bytes go into ArrayRecord
and TFRecord shards. Readers also take a record wrapped in a `tf.Example` as its bytes
feature `record` (how the TFDS builder `tfds_clips` stores it).
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

MAGIC = b"SFJR"
VERSION = 1
_PREFIX = struct.Struct("<4sII")


class RecordError(ValueError):
    """Bytes that are not a valid record; the message says what is wrong."""


@dataclasses.dataclass
class ClipRecord:
    clip_id: str
    video_mp4: bytes  # H.264 mp4 at the input contract (25 fps, shorter side 256, even sides)
    audio: np.ndarray  # float32 [N] mono PCM at `sample_rate`
    fps: float = 25.0
    sample_rate: int = 16000
    duration_sec: float = 0.0
    num_frames: int = 0
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)  # class ids, fixed offsets, split...
    source: str = ""  # original path or URL, for error reports
    decoder: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. {"av": "18.1.0", "ffmpeg": ...}


def encode(record: ClipRecord) -> bytes:
    audio = np.ascontiguousarray(record.audio, dtype="<f4")
    if audio.ndim != 1:
        raise RecordError(f"{record.clip_id}: audio must be mono [N], got shape {audio.shape}")
    blobs = [("video_mp4", bytes(record.video_mp4)), ("audio", audio.tobytes())]
    offsets, pos = {}, 0
    for name, data in blobs:
        offsets[name] = [pos, len(data)]
        pos += len(data)
    header = {
        "clip_id": record.clip_id, "fps": float(record.fps), "sample_rate": int(record.sample_rate),
        "duration_sec": float(record.duration_sec), "num_frames": int(record.num_frames),
        "labels": record.labels, "source": record.source, "decoder": record.decoder,
        "blobs": offsets, "audio_dtype": "<f4", "audio_shape": list(audio.shape),
    }
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(head)), head] + [d for _, d in blobs])


def require_finite_audio(record: ClipRecord) -> None:
    """Raise `RecordError` when the PCM holds NaN or infinite samples.

    A damaged recording (or a custom loader's bug) can give non-finite samples while the
    video is fine. One such clip makes a training step's loss NaN, which stops the run,
    and a relaunch draws the same clip again; in evaluation it is scored on garbage.
    So readers treat it as a broken record and `prepare` does not write it.
    """
    bad = ~np.isfinite(np.asarray(record.audio))
    if bad.any():
        first = int(np.argmax(bad))
        raise RecordError(f"audio has {int(bad.sum())} non-finite sample(s) (NaN or inf), the first at sample "
                          f"{first} ({first / max(int(record.sample_rate), 1):.2f} s)")


def decode_header(data: bytes) -> dict[str, Any]:
    """The metadata alone (cheap: no blob is touched)."""
    return _split(data)[0]


def decode(data: bytes) -> ClipRecord:
    header, blob_area = _split(data)
    blobs = header.pop("blobs")

    def blob(name: str) -> memoryview:
        start, length = blobs[name]
        if start + length > len(blob_area):
            raise RecordError(f"record {header.get('clip_id')!r}: blob {name!r} is truncated")
        return blob_area[start:start + length]

    audio = np.frombuffer(blob("audio"), dtype=header.pop("audio_dtype")).reshape(header.pop("audio_shape"))
    return ClipRecord(video_mp4=bytes(blob("video_mp4")), audio=audio, **header)


def _tf_example_record(view: memoryview) -> memoryview:
    """The record inside a `tf.Example` (TFDS datasets of `tfds_clips.SynchformerClips`
    store it as the bytes feature `record`). `view` is not a record either way; the
    error says which kind of foreign bytes it is."""
    from google.protobuf.message import DecodeError
    from tensorflow_datasets.proto import tf_example_generated_pb2 as tf_example

    example = tf_example.Example()
    try:
        example.ParseFromString(bytes(view))
    except DecodeError:
        raise RecordError(f"not a synchformer-jax record (magic {bytes(view[:4])!r})") from None
    features = example.features.feature
    if "record" not in features:
        raise RecordError("a tf.Example without a 'record' feature (it has: "
                          f"{', '.join(sorted(features)) or 'none'}), not a clip of synchformer_jax.tfds_clips; "
                          "make records with `synchformer-jax prepare` or that builder")
    values = features["record"].bytes_list.value
    if len(values) != 1:
        raise RecordError(f"a tf.Example whose 'record' feature holds {len(values)} byte strings, not 1")
    return memoryview(values[0])


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(data)
    if view[:len(MAGIC)] != MAGIC and view[:1] == b"\x0a":  # a tf.Example's first field tag
        view = _tf_example_record(view)
    if len(view) < _PREFIX.size:
        raise RecordError(f"record of {len(view)} bytes is too short")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise RecordError(f"not a synchformer-jax record (magic {bytes(magic)!r})")
    if version > VERSION:
        raise RecordError(f"record version {version} is newer than this reader ({VERSION})")
    start = _PREFIX.size
    if start + head_len > len(view):
        raise RecordError("record header is truncated")
    try:
        header = json.loads(bytes(view[start:start + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"record header is not valid JSON: {e}") from None
    return header, view[start + head_len:]
