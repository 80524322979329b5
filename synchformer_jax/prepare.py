"""`synchformer-jax prepare`: videos or official lists -> sharded records + manifest.json.

    prepare(["videos/"], "records/", split="train")
    prepare(["vggsound_test.txt"], "records/", media_root="vggsound/")  # split "test" from the name

How the work is laid out, and why:

* **Plan first, deterministically.** Inputs become jobs (clip id, file, labels, split),
  sorted by clip id within each split; job `k` of a split goes to shard `k // shard_size`.
  Shard contents therefore depend only on the inputs, never on worker timing, and the
  Beam path (`prepare_beam`) writes byte-identical shards from the same plan. A clip that
  fails to load leaves its shard one record short instead of shifting later shards.
* **Shards are the unit of work and of resume.** A shard is written to `<file>.tmp-<random>`,
  fsynced and renamed, then a small journal entry (`.prepare/<split>/shard-XXXXX.json`,
  itself written atomically) records its sha256, record count, duration and skipped clips.
  After a kill, a rerun keeps every journaled shard whose file is present, redoes the
  rest and ends with the same files as an uninterrupted run. The plan's fingerprint
  (`plan.json`) guards against resuming with different inputs or settings.
* **Loading runs on all cores** in a process pool (spawned, not forked: the parent may
  have imported jax, whose threads make `fork` unsafe). Results are consumed in plan
  order through a bounded window, so memory stays at a few records per worker. A worker
  killed by a crashing decoder breaks the pool; the outstanding clips are then retried
  one at a time in a fresh pool, so the crash is pinned on the one clip that causes it,
  which is skipped.
* **Nothing about one clip is fatal.** Broken, missing, non-media or non-UTF-8-named
  files are listed in the manifest's `skipped` with a one-line reason; the rest is written.
* `manifest.json` has no timestamps, so a rerun reproduces it byte for byte.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import platform
import shutil
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from synchformer_jax import datasets, records
from synchformer_jax.input import shard_sets, shards

PathLike = Union[str, os.PathLike]

# The readers check shard sets against the manifest (`input.shard_sets`): one home for both names.
MANIFEST = shard_sets.MANIFEST
JOURNAL_DIR = ".prepare"
MANIFEST_SCHEMA = shard_sets.PREPARE_SCHEMA
LIST_SUFFIXES = (".txt", ".csv", ".lst")
DEFAULT_SHARD_SIZE = 1024  # ~1-2k records per shard is grain's sweet spot (docs users.md §6)


class PrepareError(ValueError):
    """Unusable arguments or an output folder that cannot be resumed (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Job:
    clip_id: str
    path: str  # where to read the file on this machine
    source: str  # the path relative to its input root: stored in the record and manifest
    labels: dict
    split: str


@dataclasses.dataclass
class SplitPlan:
    split: str
    jobs: list[Job]  # sorted by clip id
    shard_size: int
    skipped: list[dict]  # found while planning (duplicates, undecodable names)
    excluded: dict[str, int]  # filter list name -> clips it removed

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(len(self.jobs) / self.shard_size))

    def shard_jobs(self, index: int) -> list[Job]:
        return self.jobs[index * self.shard_size:(index + 1) * self.shard_size]


@dataclasses.dataclass
class ShardSpec:
    """What writing one shard needs (small, so Beam ships it to workers cheaply)."""
    split: str
    index: int
    file: str
    fmt: str
    fingerprint: str


@dataclasses.dataclass
class Plan:
    name: str
    fmt: str
    max_duration_sec: Optional[float]
    min_duration_sec: Optional[float]
    splits: dict[str, SplitPlan]
    _fingerprints: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def fingerprint(self, split: str) -> str:
        """sha256 of everything that decides the split's shard contents (cached: hashing
        millions of jobs per shard would make planning quadratic)."""
        if split not in self._fingerprints:
            self._fingerprints[split] = self._fingerprint(split)
        return self._fingerprints[split]

    def _fingerprint(self, split: str) -> str:
        sp = self.splits[split]
        blob = json.dumps({
            "record_version": records.VERSION, "name": self.name, "format": self.fmt, "split": split,
            "shard_size": sp.shard_size, "max_duration_sec": self.max_duration_sec,
            "min_duration_sec": self.min_duration_sec, "jobs": [[j.clip_id, j.source, j.labels] for j in sp.jobs],
        }, sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def shard_file(self, split: str, index: int) -> str:
        return shards.shard_name(self.name, split, self.fmt, index, self.splits[split].num_shards)

    def shard_spec(self, split: str, index: int) -> ShardSpec:
        return ShardSpec(split, index, self.shard_file(split, index), self.fmt, self.fingerprint(split))


@dataclasses.dataclass
class PrepareResult:
    out_dir: pathlib.Path
    manifest: dict
    shards_written: int  # in this run
    shards_reused: int  # finished by an earlier (interrupted) run
    splits: list[str]  # the splits of this run (the manifest may hold earlier ones too)


# --------------------------------------------------------------------------- planning

def safe_repr(path: Union[str, bytes]) -> str:
    """A printable, JSON-safe name for any path, including non-UTF-8 ones."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return repr(raw)  # b'...\xff...': shows the exact bytes, ASCII only


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return False


def _walk_folder(root: pathlib.Path, exclude_dirs: Sequence[pathlib.Path]) -> Iterator[pathlib.Path]:
    excluded = {os.path.realpath(d) for d in exclude_dirs}
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.git, our own .prepare journal) and the output folder hold no clips.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in excluded)
        for f in sorted(filenames):
            if not f.startswith("."):
                yield pathlib.Path(dirpath, f)


def _is_list_file(path: pathlib.Path, list_format: str) -> bool:
    if list_format not in ("auto", "folder"):
        return True
    return list_format == "auto" and path.suffix.lower() in LIST_SUFFIXES


def plan_inputs(inputs: Sequence[PathLike], *, fmt: str = "array_record", split: Optional[str] = None,
                name: Optional[str] = None, list_format: str = "auto", media_root: Optional[PathLike] = None,
                shard_size: int = DEFAULT_SHARD_SIZE, exclude: Sequence[PathLike] = (),
                meta: Sequence[PathLike] = (), max_duration_sec: Optional[float] = None,
                min_duration_sec: Optional[float] = None, out_dir: Optional[PathLike] = None,
                named_list: Optional[str] = None) -> Plan:
    """Inputs -> deterministic Plan. Raises PrepareError for arguments that cannot work.

    Each input is a folder (searched recursively; every non-hidden file is tried, since
    which extensions PyAV opens depends on its FFmpeg build), a list/CSV in one of the
    official formats (`.txt`/`.csv`/`.lst`, or any file when `list_format` names a
    format), or a single media file. Clip ids: folder files -> relative path without
    extension; list entries -> the list's id, read from `<media_root>/<id>.mp4`
    (`media_root` defaults to the list's folder); single files -> the file stem.
    `meta` files (VGGSound's `vggsound.csv`) add class labels to list entries.

    `named_list` (a key of `datasets.NAMED_LISTS`): the one input is the folder of the
    official `data/` files and the clips are the list `datasets.build_named_list` assembles
    from them and `meta` (at most one file; default `<folder>/vggsound.csv`), read from
    `media_root` (required); split and name default to the list's. Clips its rules remove
    (filter lists, short clips) are counted as excluded, not listed.
    """
    if fmt not in shards.FORMATS:
        raise PrepareError(f"unknown format {fmt!r}; expected one of {', '.join(shards.FORMATS)}")
    if list_format not in ("auto", "folder") + datasets.LIST_FORMATS:
        raise PrepareError(f"unknown list format {list_format!r}; expected auto, folder or one of "
                           f"{', '.join(datasets.LIST_FORMATS)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise PrepareError(f"shard size must be a positive integer, got {shard_size!r}")
    if split is not None:
        try:
            shards.shard_name("x", split, fmt, 0, 1)
        except ValueError as e:
            raise PrepareError(f"split {split!r}: {e}") from None
    if not inputs:
        raise PrepareError("no inputs given")

    try:
        dropped = datasets.parse_filter_lists(exclude)
    except (OSError, UnicodeDecodeError, datasets.ListError) as e:
        raise PrepareError(f"filter list: {e}") from None
    class_labels: dict[str, dict] = {}
    for m in (() if named_list else meta):
        try:
            class_labels.update(datasets.parse_vggsound_meta(m))
        except (OSError, UnicodeDecodeError, datasets.ListError) as e:
            raise PrepareError(f"meta file: {e}") from None

    raw: list[tuple[Optional[str], str, str, dict, str]] = []  # (clip_id or None, path, source, labels, split)
    planning_skips: dict[str, list[dict]] = collections.defaultdict(list)
    dataset_names: set[str] = set()
    out_dirs = [pathlib.Path(out_dir)] if out_dir is not None else []
    named_excluded: dict[str, str] = {}
    if named_list is not None:
        raw, named_excluded = _named_list_inputs(named_list, inputs, split=split, list_format=list_format,
                                                 media_root=media_root, meta=meta)
        name = name or datasets.NAMED_LISTS[named_list].dataset
        inputs = ()
    for item in inputs:
        path = pathlib.Path(item)
        if not path.exists():
            raise PrepareError(f"{safe_repr(os.fspath(path))}: no such file or folder")
        if path.is_dir():
            if list_format not in ("auto", "folder"):
                raise PrepareError(f"{path}: is a folder, but --list-format {list_format} expects a list file")
            for f in _walk_folder(path, out_dirs):
                rel = f.relative_to(path).as_posix()
                clip_id = rel.rsplit(".", 1)[0] if "." in f.name else rel
                raw.append((clip_id, os.fspath(f), rel, {}, split or "train"))
            dataset_names.add("clips")
        elif _is_list_file(path, list_format):
            try:
                lfmt, entries = datasets.read_list(path, "auto" if list_format == "folder" else list_format)
            except (OSError, UnicodeDecodeError, datasets.ListError) as e:
                raise PrepareError(str(e)) from None
            root = pathlib.Path(media_root) if media_root is not None else path.parent
            if not root.is_dir():
                raise PrepareError(f"{root}: media folder does not exist")
            lsplit = split or datasets.split_from_name(path) or "train"
            for e in entries:
                kind = datasets.id_format(e.clip_id) or lfmt
                try:
                    media = datasets.find_media(root, e.clip_id)
                except datasets.ListError as err:
                    planning_skips[lsplit].append({"clip_id": e.clip_id, "source": e.clip_id, "reason": str(err)})
                    continue
                labels = {"dataset": kind, **class_labels.get(e.clip_id, {}), **e.labels}
                raw.append((e.clip_id, os.fspath(media), media.relative_to(root).as_posix(), labels, lsplit))
                dataset_names.add(kind)
        else:
            raw.append((path.stem if "." in path.name else path.name, os.fspath(path), path.name, {},
                        split or "train"))
            dataset_names.add("clips")

    per_split: dict[str, dict[str, Job]] = collections.defaultdict(dict)
    excluded: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    if named_excluded:
        excluded[split or datasets.NAMED_LISTS[named_list].split].update(named_excluded.values())
    for clip_id, fpath, source, labels, sp in raw:
        if not _is_utf8(fpath):
            planning_skips[sp].append({"clip_id": None, "source": safe_repr(fpath),
                                       "reason": "file name is not valid UTF-8 (rename the file to include it)"})
            continue
        if clip_id in dropped:
            excluded[sp][dropped[clip_id]] += 1
            continue
        jobs = per_split[sp]
        if clip_id in jobs:
            planning_skips[sp].append({"clip_id": clip_id, "source": source,
                                       "reason": f"duplicate clip id (already taken by {jobs[clip_id].source})"})
            continue
        jobs[clip_id] = Job(clip_id, fpath, source, {**labels, "split": sp}, sp)

    if name is None:
        official = dataset_names - {"clips", "fixed_offsets", "sparse_fixed_offsets"}
        name = official.pop() if len(official) == 1 and len(dataset_names) == 1 else "clips"
    try:
        shards.shard_name(name, "x", fmt, 0, 1)
    except ValueError as e:
        raise PrepareError(f"name {name!r}: {e}") from None
    splits = {}
    for sp in sorted(set(per_split) | set(planning_skips) | set(excluded)):
        jobs = sorted(per_split.get(sp, {}).values(), key=lambda j: j.clip_id)
        splits[sp] = SplitPlan(sp, jobs, shard_size, planning_skips.get(sp, []), dict(sorted(excluded[sp].items())))
    return Plan(name, fmt, max_duration_sec, min_duration_sec, splits)


def _named_list_inputs(named_list: str, inputs: Sequence[PathLike], *, split: Optional[str], list_format: str,
                       media_root: Optional[PathLike], meta: Sequence[PathLike]
                       ) -> tuple[list[tuple[str, str, str, dict, str]], dict[str, str]]:
    """`plan_inputs`' raw entries for a named list, and {clip id: why the rules removed it}."""
    if named_list not in datasets.NAMED_LISTS:
        raise PrepareError(f"unknown list {named_list!r}; expected one of {', '.join(datasets.NAMED_LISTS)}")
    if len(inputs) != 1 or not pathlib.Path(inputs[0]).is_dir():
        raise PrepareError(f"--list {named_list}: give one input, the folder holding the official data/ files "
                           f"({', '.join(datasets.NAMED_LISTS[named_list].official_files()[:3])}, ...)")
    if list_format != "auto":
        raise PrepareError(f"--list {named_list} reads the official formats; leave --list-format out")
    if len(meta) > 1:
        raise PrepareError(f"--list {named_list} reads one VGGSound meta file, got {len(meta)}")
    if media_root is None:
        raise PrepareError(f"--list {named_list}: give --media-root, the folder of <ytid>_<startms>_<endms>.mp4")
    root = pathlib.Path(media_root)
    if not root.is_dir():
        raise PrepareError(f"{root}: media folder does not exist")
    try:
        entries, removed = datasets.build_named_list(named_list, inputs[0], meta[0] if meta else None)
    except (OSError, UnicodeDecodeError, datasets.ListError) as e:
        raise PrepareError(str(e)) from None
    lsplit = split or datasets.NAMED_LISTS[named_list].split
    raw = []
    for e in entries:
        media = datasets.find_media(root, e.clip_id)
        labels = {"dataset": datasets.NAMED_LISTS[named_list].dataset, **e.labels}
        raw.append((e.clip_id, os.fspath(media), media.relative_to(root).as_posix(), labels, lsplit))
    return raw, removed


# --------------------------------------------------------------------------- loading (in workers)

def default_loader() -> Callable[..., records.ClipRecord]:
    from synchformer_jax import media

    return media.load_clip


def decoder_versions() -> dict[str, str]:
    from synchformer_jax import media

    return media.decoder_versions()


def _one_line(exc: BaseException) -> str:
    problem = getattr(exc, "problem", None)  # media.MediaError carries the text without the path
    text = problem if problem else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split()) or type(exc).__name__


def load_job(job: Job, loader: Optional[Callable] = None, max_duration_sec: Optional[float] = None,
             min_duration_sec: Optional[float] = None) -> dict:
    """Load and encode one clip. Never raises for a bad clip: returns `{'ok': False, 'reason'}`."""
    try:
        load = loader or default_loader()
        kwargs = {"max_duration_sec": max_duration_sec}
        if min_duration_sec is not None:
            kwargs["min_duration_sec"] = min_duration_sec
        rec = load(job.path, clip_id=job.clip_id, labels=dict(job.labels), **kwargs)
        # The path relative to the input root: shards do not depend on where the media
        # folder was mounted (local run vs Beam workers vs another machine).
        rec.source = job.source
        records.require_finite_audio(rec)  # a NaN clip would stop training at the step that draws it
        data = records.encode(rec)
    except Exception as exc:  # noqa: BLE001 - one bad clip must not stop the run
        return {"ok": False, "clip_id": job.clip_id, "source": job.source, "reason": _one_line(exc)}
    return {"ok": True, "clip_id": job.clip_id, "data": data, "duration_sec": float(rec.duration_sec)}


def run_ordered(fn: Callable[[Job], dict], jobs: Sequence[Job], num_workers: int) -> Iterator[dict]:
    """`fn(job)` for every job, yielded in job order, on `num_workers` processes (0: inline)."""
    if num_workers <= 0:
        yield from map(fn, jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    window = 4 * num_workers  # enough to keep workers busy, bounded so memory stays small
    todo = collections.deque(jobs)
    pending: collections.deque = collections.deque()  # (job, future)
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx)
    try:
        while todo or pending:
            while todo and len(pending) < window:
                job = todo.popleft()
                pending.append((job, pool.submit(fn, job)))
            job, future = pending[0]
            try:
                result = future.result()
            except BrokenProcessPool:
                # Some worker died (a decoder crash). Retry everything outstanding one at
                # a time in fresh pools, so that a crash names its clip.
                outstanding = [j for j, _ in pending]
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                for j in outstanding:
                    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
                    try:
                        yield pool.submit(fn, j).result()
                    except BrokenProcessPool:
                        yield {"ok": False, "clip_id": j.clip_id, "source": j.source,
                               "reason": "the decoder crashed the worker process"}
                    finally:
                        pool.shutdown(wait=True)
                pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx)
                continue
            pending.popleft()
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- output folder

def _journal_dir(out_dir: pathlib.Path, split: str) -> pathlib.Path:
    return out_dir / JOURNAL_DIR / split


def _read_json(path: pathlib.Path) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent or torn: treated as not done


def _split_files(out_dir: pathlib.Path, split: str) -> list[pathlib.Path]:
    out = []
    for p in out_dir.iterdir():
        info = shards.parse_shard_name(p.name.split(shards.TMP_MARK)[0])
        if info and info["split"] == split:
            out.append(p)
    return out


def open_split(out_dir: PathLike, plan: Plan, split: str, *, overwrite: bool = False) -> dict[int, dict]:
    """Ready the output folder for one split; returns the journal of shards already done.

    Raises PrepareError when the folder holds this split prepared from other inputs or
    settings and `overwrite` is False.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jdir = _journal_dir(out_dir, split)
    fingerprint = plan.fingerprint(split)
    stored = _read_json(jdir / "plan.json")
    stale = stored is not None and stored.get("fingerprint") != fingerprint
    foreign = stored is None and any(shards.TMP_MARK not in p.name for p in _split_files(out_dir, split))
    if (stale or foreign) and not overwrite:
        raise PrepareError(f"{out_dir}: split {split!r} was prepared from different inputs or settings; "
                           "use another folder or pass --overwrite to replace it")
    if stale or foreign:
        shutil.rmtree(jdir, ignore_errors=True)
        for p in _split_files(out_dir, split):
            p.unlink()
    for p in _split_files(out_dir, split):
        if shards.TMP_MARK in p.name:
            p.unlink()  # left by a killed run
    jdir.mkdir(parents=True, exist_ok=True)
    for p in jdir.glob(f"*{shards.TMP_MARK}*"):
        p.unlink()
    sp = plan.splits[split]
    shards.write_json_atomic(jdir / "plan.json", {"fingerprint": fingerprint, "num_shards": sp.num_shards,
                                                  "num_jobs": len(sp.jobs), "skipped": sp.skipped,
                                                  "excluded": sp.excluded})
    done = {}
    for index in range(sp.num_shards):
        entry = _read_json(jdir / f"shard-{index:05d}.json")
        if not entry or entry.get("fingerprint") != fingerprint:
            continue
        shard = out_dir / entry["file"]
        if shard.is_file() and shard.stat().st_size == entry["bytes"]:
            done[index] = entry
    return done


def finish_shard(out_dir: PathLike, spec: ShardSpec, results: Iterable[dict]) -> dict:
    """Write the results of one shard's jobs (in plan order) and journal it.

    Idempotent (a Beam retry rewrites the same bytes), and the journal entry appears
    only after the shard file is complete under its final name.
    """
    out_dir = pathlib.Path(out_dir)
    skipped, duration = [], 0.0
    with shards.ShardWriter(out_dir / spec.file, spec.fmt) as writer:
        for result in results:
            if result["ok"]:
                writer.write(result["data"])
                duration += result["duration_sec"]
            else:
                skipped.append({k: result[k] for k in ("clip_id", "source", "reason")})
        info = writer.close()
    entry = {"fingerprint": spec.fingerprint, "index": spec.index, **info,
             "duration_sec": duration, "skipped": skipped}
    shards.write_json_atomic(_journal_dir(out_dir, spec.split) / f"shard-{spec.index:05d}.json", entry)
    return entry


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    from synchformer_jax import __version__

    out = {"synchformer_jax": __version__, "python": platform.python_version()}
    for dist in ("numpy", "array-record", "apache-beam"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(out_dir: PathLike, plan: Plan) -> dict:
    """Merge this plan's splits (from their journals) into `<out_dir>/manifest.json`."""
    out_dir = pathlib.Path(out_dir)
    path = out_dir / MANIFEST
    manifest = _read_json(path) or {}
    if manifest.get("schema") != MANIFEST_SCHEMA:
        manifest = {}
    manifest.update({"schema": MANIFEST_SCHEMA, "record_version": records.VERSION,
                     "tool": tool_versions(), "decoder": decoder_versions()})
    splits = dict(manifest.get("splits", {}))
    for split, sp in plan.splits.items():
        jdir = _journal_dir(out_dir, split)
        entries = [_read_json(jdir / f"shard-{i:05d}.json") for i in range(sp.num_shards)]
        if any(e is None for e in entries):
            raise RuntimeError(f"{out_dir}: split {split!r} is incomplete")
        skipped = sp.skipped + [s for e in entries for s in e["skipped"]]
        splits[split] = {
            "name": plan.name, "format": plan.fmt, "shard_size": sp.shard_size,
            "num_records": sum(e["num_records"] for e in entries),
            "num_inputs": len(sp.jobs) + len(sp.skipped),
            "num_skipped": len(skipped),
            "num_excluded": sum(sp.excluded.values()), "excluded_by": sp.excluded,
            "total_duration_sec": round(sum(e["duration_sec"] for e in entries), 6),
            "max_duration_sec": plan.max_duration_sec, "min_duration_sec": plan.min_duration_sec,
            "shards": [{k: e[k] for k in ("file", "num_records", "sha256", "bytes")} for e in entries],
            "skipped": sorted(skipped, key=lambda s: (s["source"], s["clip_id"] or "")),
        }
    manifest["splits"] = dict(sorted(splits.items()))
    shards.write_json_atomic(path, manifest)
    return manifest


# --------------------------------------------------------------------------- entry point

def prepare(inputs: Sequence[PathLike], out_dir: PathLike, *, format: str = "array_record",  # noqa: A002
            split: Optional[str] = None, name: Optional[str] = None, list_format: str = "auto",
            media_root: Optional[PathLike] = None, num_workers: Optional[int] = None,
            shard_size: int = DEFAULT_SHARD_SIZE, exclude: Sequence[PathLike] = (),
            meta: Sequence[PathLike] = (), max_duration_sec: Optional[float] = None,
            min_duration_sec: Optional[float] = None, overwrite: bool = False, progress: bool = True,
            loader: Optional[Callable[..., records.ClipRecord]] = None,
            named_list: Optional[str] = None) -> PrepareResult:
    """Prepare record shards from videos or official lists (see the module docstring).

    Args:
      inputs: folders, list/CSV files, or media files (see `plan_inputs`).
      out_dir: output folder; rerunning into it resumes an interrupted run.
      format: "array_record" (random access, the default) or "tfrecord".
      split: the split of every input; default: from each list's name, else "train".
      name: dataset name in shard file names; default: the official dataset the lists
        belong to, else "clips".
      list_format: "auto" (by extension and content), "folder", or one of
        `datasets.LIST_FORMATS` to read every file input as that list format.
      media_root: where list ids live (`<media_root>/<id>.mp4`); default: the list's folder.
      num_workers: processes loading clips (default: all cores; 0 loads in this process).
      shard_size: clips per shard (planned; a shard holds fewer if clips are skipped).
      exclude: filter lists (files or folders of .txt) whose ids are left out.
      meta: class-label files (VGGSound `vggsound.csv`): labels `label` and `target`.
      named_list: build the clip list `datasets.NAMED_LISTS[named_list]` from the official
        files in the one input folder (see `plan_inputs`), e.g. "vggsound_sparse_test".
      max_duration_sec: keep at most this much of each clip.
      min_duration_sec: skip clips shorter than this (the official lists drop < 9 s).
      overwrite: replace a split prepared earlier from different inputs or settings.
      loader: `fn(path, clip_id=, labels=, max_duration_sec=[, min_duration_sec=]) -> ClipRecord`, a picklable
        top-level function; default `media.load_clip`.

    Returns:
      PrepareResult with the manifest (also in `<out_dir>/manifest.json`).

    Workers are spawned processes, so a script that calls this with `num_workers > 0`
    needs the usual `if __name__ == "__main__":` guard (the CLI has it).
    """
    out = pathlib.Path(out_dir)
    plan = plan_inputs(inputs, fmt=format, split=split, name=name, list_format=list_format,
                       media_root=media_root, shard_size=shard_size, exclude=exclude, meta=meta,
                       max_duration_sec=max_duration_sec, min_duration_sec=min_duration_sec, out_dir=out,
                       named_list=named_list)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    done = {sp: open_split(out, plan, sp, overwrite=overwrite) for sp in plan.splits}
    todo = [(sp, i) for sp in plan.splits for i in range(plan.splits[sp].num_shards) if i not in done[sp]]
    jobs = [j for sp, i in todo for j in plan.splits[sp].shard_jobs(i)]
    fn = functools.partial(load_job, loader=loader, max_duration_sec=max_duration_sec,
                           min_duration_sec=min_duration_sec)

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="clip", desc="prepare", disable=not progress, file=sys.stderr)
    results = run_ordered(fn, jobs, min(num_workers, len(jobs)) if jobs else 0)

    def counted(n: int) -> Iterator[dict]:
        for _ in range(n):
            result = next(results)
            bar.update(1)
            if not result["ok"]:
                bar.set_postfix_str(f"skipped {result['source']}"[:60], refresh=False)
            yield result

    try:
        for sp, index in todo:
            finish_shard(out, plan.shard_spec(sp, index), counted(len(plan.splits[sp].shard_jobs(index))))
    finally:
        bar.close()
        results.close()
    manifest = write_manifest(out, plan)
    return PrepareResult(out, manifest, shards_written=len(todo),
                         shards_reused=sum(len(d) for d in done.values()), splits=sorted(plan.splits))
