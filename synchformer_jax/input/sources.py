"""Record sources: ArrayRecord (random access) and TFRecord (streaming or indexed) shards.

Both yield the raw bytes of one `records.ClipRecord` per element. A record that cannot
be read comes out as a `Broken(where, error)` marker instead of an exception, so that
one damaged record in a dataset of millions costs one example, not the run; the
pipeline counts and logs the markers (`pipeline.py`).

* `ArrayRecordSource`: grain's `ArrayRecordDataSource` (random access over all shards,
  so grain can shuffle globally and resume exactly) with per-record error capture; a
  shard that cannot be opened at all takes one `Broken` slot instead of its records.

`expand_paths` (from `shard_sets`) turns a glob / directory / list into the shard list,
refusing incomplete shard sets and directories that hold several splits.
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

import concurrent.futures
import dataclasses
import logging
import os
import struct
import threading
from typing import List, Optional, Sequence, Tuple

import grain
import numpy as np

from synchformer_jax.input.shard_sets import expand_paths, manifest_entry
from synchformer_jax.input.shards import ShardError, masked_crc32c, parse_shard_name

__all__ = ["Broken", "ArrayRecordSource", "TFRecordShardDataset", "TFRecordIndexedSource", "tfrecord_index",
           "expand_paths"]

_log = logging.getLogger(__name__)
_U64 = struct.Struct("<Q")  # TFRecord framing (see the module docstring)
_U32 = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class Broken:
    """A record that could not be used: where it is (shard:index or clip id / source)
    and why. Travels through the pipeline in place of the example."""
    where: str
    error: str


# ------------------------------------------------------------------------- ArrayRecord


@dataclasses.dataclass(frozen=True)
class _ShardSpan:
    """A whole shard with its record count, as grain's `FileInstruction`: given these,
    grain does not open every shard a second time to count its records."""
    filename: str
    skip: int
    take: int
    examples_in_shard: int


_OPEN_THREADS = 16  # shards opened side by side at start-up (network storage: latency-bound)


def _open_array_record(path: str) -> Tuple[Optional[int], str]:
    """`(num_records, "")` of one shard, or `(None, what is wrong)`.

    Riegeli reads a file's tail (the postscript) when the reader is closed, so a
    truncated shard opens with 0 records and fails only at `close()`; both are tried.
    """
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
        return int(n), ""
    except Exception as exc:  # noqa: BLE001 - the library raises bare RuntimeErrors
        problem = " ".join(str(exc).split())
    if _looks_like_tfrecord(path):
        return None, "holds TFRecord records, not ArrayRecord (check data.format and the shard glob)"
    return None, f"not a readable ArrayRecord file, truncated or damaged ({problem})"


def _looks_like_tfrecord(path: str) -> bool:
    """True when the file starts with a TFRecord header whose length CRC checks out."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return len(head) == 12 and masked_crc32c(head[:8]) == _U32.unpack_from(head, 8)[0]


class ArrayRecordSource:
    """Random-access source over ArrayRecord shards; unreadable records -> `Broken`.

    A shard that cannot be opened at all (truncated, damaged tail, another format under
    an ArrayRecord name) does not stop the run either: it is reported loudly at start-up
    with the number of clips lost (from `manifest.json` when prepare wrote one), and
    takes one slot in place of its records that reads as `Broken`, so it is also counted
    and named in the pipeline's skip reports, like a TFRecord shard whose framing breaks
    (`TFRecordIndexedSource`). Without damage, index `i` is the same record as in grain's
    `ArrayRecordDataSource` over the same files, so resumes and shuffles are unchanged.
    A file *named* as a TFRecord shard is a configuration error (`ValueError`).

    Picklable (grain re-opens the files in each worker process).
    """

    def __init__(self, paths):
        self._paths = expand_paths(paths)
        for p in self._paths:
            info = parse_shard_name(p)
            if info and info["format"] != "array_record":
                raise ValueError(f"{p} is a {info['format']} shard, not ArrayRecord (check data.format)")
        with concurrent.futures.ThreadPoolExecutor(min(_OPEN_THREADS, len(self._paths))) as pool:
            opened = list(pool.map(_open_array_record, self._paths))
        self._damaged = {}
        for shard, (path, (n, problem)) in enumerate(zip(self._paths, opened)):
            if n is None:
                self._damaged[shard] = Broken(path, f"{problem}; {_lost(path)} skipped")
                _log.warning("ArrayRecord shard %s: %s; %s skipped", path, problem, _lost(path))
        if len(self._damaged) == len(self._paths):
            raise ShardError(f"none of the {len(self._paths)} ArrayRecord shard(s) can be read; the first, "
                             f"{self._paths[0]}: {self._damaged[0].error}")
        counts = [1 if n is None else n for n, _ in opened]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Where each readable shard begins inside grain's source (damaged shards are left out of it).
        readable = [n is not None for n, _ in opened]
        self._grain_starts = np.concatenate([[0], np.cumsum([n or 0 for n, _ in opened])]).astype(np.int64)
        self._src = grain.sources.ArrayRecordDataSource(
            [_ShardSpan(p, 0, n, n) for p, (n, _), ok in zip(self._paths, opened, readable) if ok])

    @property
    def paths(self) -> List[str]:
        return list(self._paths)

    def shard_lengths(self) -> List[Optional[int]]:
        """Records per shard, None for a shard that cannot be opened."""
        return [None if k in self._damaged else int(n) for k, n in enumerate(np.diff(self._starts))]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> Tuple[int, int]:
        """`(shard, index in the shard)` of a global index."""
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} outside 0..{len(self) - 1}")
        shard, local = self._locate(index)
        if shard in self._damaged:
            return self._damaged[shard]
        try:
            return self._src[int(self._grain_starts[shard]) + local]
        except Exception as exc:  # noqa: BLE001 - any reader failure must only cost this record
            return Broken(f"{self._paths[shard]}#{local}", f"{type(exc).__name__}: {exc}")

    def get_many(self, indices: Sequence[int]) -> list:
        """`[self[i] for i in indices]`, the records of undamaged shards in one parallel read
        (array_record's ParallelReadRecords through grain's `__getitems__`). It pays where
        reads decompress: 1.9x the records per second of one-by-one reads for 315-kB zstd
        records on 2 cores; for uncompressed records it is 0.3-0.4x, so the feature cache
        reads one by one (bench/feature_cache.py --reads)."""
        indices = [int(i) for i in indices]
        where = [self._locate(i) if 0 <= i < len(self) else (None, None) for i in indices]
        bulk = [k for k, (shard, _) in enumerate(where) if shard is not None and shard not in self._damaged]
        out = [None] * len(indices)
        if bulk:
            try:
                got = self._src.__getitems__([int(self._grain_starts[where[k][0]]) + where[k][1] for k in bulk])
            except Exception:  # noqa: BLE001 - one unreadable record: read one by one, so only it is Broken
                got = [self[indices[k]] for k in bulk]
            for k, data in zip(bulk, got):
                out[k] = data
        return [self[i] if data is None else data for i, data in zip(indices, out)]

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._paths)} shards, {len(self)} records)"


def _lost(path: str) -> str:
    entry = manifest_entry(path)
    if entry and entry.get("num_records") is not None:
        return f"its {entry['num_records']} clip(s) (per manifest.json) are"
    return "its clips (count unknown: no manifest.json lists it) are"


# --------------------------------------------------------------------------- TFRecord


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
