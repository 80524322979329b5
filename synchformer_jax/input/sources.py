"""Record sources: ArrayRecord (random access) and TFRecord (streaming or indexed) shards.

Both yield the raw bytes of one `records.ClipRecord` per element. A record that cannot
be read comes out as a `Broken(where, error)` marker instead of an exception, so that
one damaged record in a dataset of millions costs one example, not the run; the
pipeline counts and logs the markers (`pipeline.py`).

* `ArrayRecordSource`: grain's `ArrayRecordDataSource` (random access over all shards,
  so grain can shuffle globally and resume exactly) with per-record error capture.
* `TFRecordShardDataset`: a grain `IterDataset` over one TFRecord file, written here
  rather than `grain.experimental.TFRecordIterDataset` because that reader does not
  verify the CRCs (its source has a TODO), and a flipped bit in a video would
  otherwise surface as a confusing decode error or, worse, as a slightly wrong clip.
  Its iterator state is the byte offset of the next record, so it resumes exactly.
* `TFRecordIndexedSource`: random access over TFRecord shards (evaluation, and training
  where seeks are cheap), from a byte-offset index that one pass over the record
  *headers* builds (12 bytes read per record, the data is skipped with a seek; cached
  per file, size and mtime). Damage that ends a shard's framing (a corrupt length or a
  truncated tail) takes one slot at the end of that shard and reads as `Broken`, like a
  damaged record.

TFRecord framing: `u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`
(little-endian); the writers and the (NumPy, ~6 ms per 0.8 MB record) CRC32C live in
`input.shards`. `shards.iter_tfrecord` is the plain reader for tools; this one is a
grain dataset with resumable state that turns damage into `Broken` markers.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import struct
import threading
from typing import List, Optional, Sequence, Tuple, Union

import grain
import numpy as np

from synchformer_jax.input.shards import masked_crc32c

__all__ = ["Broken", "ArrayRecordSource", "TFRecordShardDataset", "TFRecordIndexedSource", "tfrecord_index",
           "expand_paths"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Broken:
    """A record that could not be used: where it is (shard:index or clip id / source)
    and why. Travels through the pipeline in place of the example."""
    where: str
    error: str


def expand_paths(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """A glob, a directory, one path or a list of them -> sorted file list.

    Sorted so that every host and every restart sees the same shard order (the global
    shuffle and the per-host slicing are defined on that order).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            out.extend(sorted(os.path.join(p, f) for f in os.listdir(p)))
        elif any(c in p for c in "*?["):
            out.extend(sorted(glob.glob(p)))
        else:
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no shards match {paths}")
    return sorted(out)


# ------------------------------------------------------------------------- ArrayRecord


class ArrayRecordSource:
    """Random-access source over ArrayRecord shards; unreadable records -> `Broken`.

    Picklable (grain re-opens the files in each worker process).
    """

    def __init__(self, paths):
        self._paths = expand_paths(paths)
        self._src = grain.sources.ArrayRecordDataSource(self._paths)

    @property
    def paths(self) -> List[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int):
        try:
            return self._src[index]
        except Exception as exc:  # noqa: BLE001 - any reader failure must only cost this record
            return Broken(self._where(index), f"{type(exc).__name__}: {exc}")

    def _where(self, index: int) -> str:
        """`path#local_index` of a global index (only computed for a failure)."""
        from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

        start = 0
        for p in self._paths:
            try:
                reader = ArrayRecordReader(p)
                n = reader.num_records()
                reader.close()
            except Exception:  # noqa: BLE001
                break
            if index < start + n:
                return f"{p}#{index - start}"
            start += n
        return f"record {index} of {len(self._paths)} ArrayRecord shard(s)"

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._paths)} shards, {len(self)} records)"


# --------------------------------------------------------------------------- TFRecord

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class _TFRecordIterator(grain.DatasetIterator):
    def __init__(self, path: str, verify: bool):
        super().__init__()
        self._path = path
        self._verify = verify
        self._offset = 0
        self._index = 0
        self._file = None
        self._done = False

    def _open(self):
        if self._file is None:
            self._file = open(self._path, "rb")  # noqa: SIM115 - kept open across __next__
        self._file.seek(self._offset)
        return self._file

    def __next__(self):
        if self._done:
            raise StopIteration
        f = self._open()
        where = f"{self._path}#{self._index} (byte {self._offset})"
        head = f.read(12)
        if not head:
            self._done = True
            raise StopIteration
        if len(head) < 12:
            return self._stop(where, "truncated record header at the end of the file")
        (length,) = _U64.unpack_from(head)
        (len_crc,) = _U32.unpack_from(head, 8)
        if masked_crc32c(head[:8]) != len_crc:
            # The length itself is untrusted: there is no way to find the next record.
            return self._stop(where, "length CRC mismatch; the rest of the shard is skipped")
        data = f.read(length)
        tail = f.read(4)
        if len(data) < length or len(tail) < 4:
            return self._stop(where, "truncated record at the end of the file")
        self._offset += 12 + length + 4
        self._index += 1
        if self._verify and masked_crc32c(data) != _U32.unpack(tail)[0]:
            return Broken(where, "data CRC mismatch")
        return data

    def _stop(self, where: str, error: str) -> Broken:
        _log.warning("TFRecord %s: %s", where, error)
        self._done = True
        return Broken(where, error)

    def get_state(self):
        return {"offset": self._offset, "index": self._index, "done": self._done}

    def set_state(self, state):
        self._offset = int(state["offset"])
        self._index = int(state["index"])
        self._done = bool(state["done"])

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()


class TFRecordShardDataset(grain.IterDataset):
    """Records of one TFRecord file, in order; damaged ones come out as `Broken`.

    `verify=True` checks the data CRC of every record (~8 ms per 10-s clip record).
    """

    def __init__(self, path, verify: bool = True):
        super().__init__()
        self._path = os.fspath(path)
        self._verify = verify

    def __iter__(self):
        return _TFRecordIterator(self._path, self._verify)

    def __str__(self) -> str:
        return f"TFRecordShardDataset({self._path})"


# ------------------------------------------------------------- TFRecord, indexed


@dataclasses.dataclass(frozen=True)
class TFRecordIndex:
    """Where the records of one TFRecord file are: `offsets[i]` is the byte offset of
    record `i`'s header, `lengths[i]` its data length; `damage` = `(where, error)` when
    the framing breaks before the end of the file (nothing after it can be found)."""
    offsets: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]
    damage: Optional[Tuple[str, str]] = None

    @property
    def slots(self) -> int:
        """Records plus one slot for the damage, if any."""
        return len(self.offsets) + (self.damage is not None)


_INDEX_CACHE: dict = {}
_INDEX_LOCK = threading.Lock()


def _build_index(path: str) -> TFRecordIndex:
    offsets: List[int] = []
    lengths: List[int] = []
    damage = None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            where = f"{path}#{len(offsets)} (byte {offset})"
            f.seek(offset)
            head = f.read(12)
            if len(head) < 12:
                damage = (where, "truncated record header at the end of the file")
                break
            (length,) = _U64.unpack_from(head)
            if masked_crc32c(head[:8]) != _U32.unpack_from(head, 8)[0]:
                damage = (where, "length CRC mismatch; the rest of the shard is skipped")
                break
            if offset + 12 + length + 4 > size:
                damage = (where, "truncated record at the end of the file")
                break
            offsets.append(offset)
            lengths.append(length)
            offset += 12 + length + 4
    return TFRecordIndex(np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), damage)


def tfrecord_index(path) -> TFRecordIndex:
    """The record index of one TFRecord file (one pass over the headers; cached while
    the file keeps its size and modification time)."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with _INDEX_LOCK:
        hit = _INDEX_CACHE.get(key)
    if hit is None:
        hit = _build_index(path)
        with _INDEX_LOCK:
            for old in [k for k in _INDEX_CACHE if k[0] == path]:
                del _INDEX_CACHE[old]  # the file changed: its old index is stale
            _INDEX_CACHE[key] = hit
    return hit


class TFRecordIndexedSource:
    """Random-access source over TFRecord shards, like `ArrayRecordSource`:
    `len`, `source[i]` -> record bytes or `Broken`. Global index = position in the sorted
    shard list, then in the file; a shard whose framing breaks has one extra slot at its
    end that reads as `Broken` (so the damage is reported, once per read of that slot).

    Reads open the file, seek and read one record: no handle is held, so the source is
    thread-safe and a pickled copy (grain worker processes) carries the index and reads
    without indexing again.
    `verify=True` checks each record's data CRC.
    """

    def __init__(self, paths, verify: bool = True):
        self._paths = expand_paths(paths)
        self._verify = verify
        self._index = [tfrecord_index(p) for p in self._paths]
        self._starts = np.concatenate([[0], np.cumsum([ix.slots for ix in self._index])]).astype(np.int64)

    @property
    def paths(self) -> List[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} outside 0..{len(self) - 1}")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        path, ix, local = self._paths[shard], self._index[shard], index - int(self._starts[shard])
        if local == len(ix.offsets):
            return Broken(*ix.damage)
        offset, length = int(ix.offsets[local]), int(ix.lengths[local])
        where = f"{path}#{local} (byte {offset})"
        try:
            with open(path, "rb") as f:
                f.seek(offset + 12)
                data = f.read(length)
                tail = f.read(4)
        except OSError as exc:
            return Broken(where, f"{type(exc).__name__}: {exc}")
        if len(data) < length or len(tail) < 4:
            return Broken(where, "truncated record (the file changed after it was indexed)")
        if self._verify and masked_crc32c(data) != _U32.unpack(tail)[0]:
            return Broken(where, "data CRC mismatch")
        return data

    def __repr__(self) -> str:
        return f"TFRecordIndexedSource({len(self._paths)} shards, {len(self)} records)"
