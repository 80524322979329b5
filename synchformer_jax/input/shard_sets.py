"""Which shard files a data spec means, and whether they are the whole set.

A run that silently reads part of a dataset looks like a run that read all of it: the
loss goes down, the metrics come out, and the missing clips show nowhere. So a spec
that asks for a *set* (a glob or a directory) is checked before anything is read:

* **Numbered sets.** Shards named `<name>-<split>.<format>-<i>-of-<n>` (`shards.shard_name`)
  say how many there are; every set a glob or directory matches must be complete, and
  one name/split/format must not come with two shard counts (leftovers of an earlier
  run). A glob that matches two formats is refused too: one reader reads one format.
* **The manifest.** `prepare` writes `manifest.json` beside its shards, listing each
  split's files, record counts and sizes. Every shard the manifest lists for a split
  the spec touches must exist. A shard whose size differs from the manifest's is only
  warned about: the readers skip and report what is unreadable in it, record by
  record, and the rest of it is still good data.
* **A directory** means one shard set. One that holds several (prepare's `train` and
  `test` splits side by side, say) is an error that names the sets and the glob for
  each, rather than a guess: training on every split in a folder would train on the
  evaluation clips.

Explicitly named files are taken as given (a subset chosen on purpose, e.g. the one
shard a feature-cache worker reads); only their existence is checked. Temporary files
of a writer still at work (`shards.TMP_MARK`) and the manifest itself never count as
shards.
"""
from __future__ import annotations

import collections
import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

from synchformer_jax.input.shards import TMP_MARK, ShardError, parse_shard_name

__all__ = ["MANIFEST", "PREPARE_SCHEMA", "expand_paths", "check_complete", "manifest_entry", "read_manifest"]

MANIFEST = "manifest.json"
PREPARE_SCHEMA = "synchformer-jax/prepare/1"
_SHOW = 10  # missing shards named in a message; the count says how many more

_log = logging.getLogger(__name__)

Spec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def expand_paths(paths: Spec) -> List[str]:
    """A glob, a directory, one path or a list of them -> sorted file list.

    Sorted so that every host and every restart sees the same shard order (the global
    shuffle and the per-host slicing are defined on that order). Globs and directories
    must name complete shard sets (see the module docstring); `ShardError` otherwise.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            out.extend(_directory_set(p))
        elif any(c in p for c in "*?["):
            found = [f for f in sorted(glob.glob(p)) if _counts_as_shard(f)]
            if not found:
                raise FileNotFoundError(f"no shards match {p!r}")
            check_complete(found, p)
            out.extend(found)
        else:
            if "://" not in p and not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such shard file")
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no shards match {paths}")
    return sorted(out)


def _counts_as_shard(path: str) -> bool:
    name = os.path.basename(path)
    return TMP_MARK not in name and name != MANIFEST and os.path.isfile(path)


_SetKey = Tuple[str, str, str, str]  # directory, name, split, format


def _numbered_sets(files: Sequence[str]) -> Dict[_SetKey, Dict[int, Dict[int, str]]]:
    """`{(dir, name, split, format): {num_shards: {index: path}}}` of the tfds-named files."""
    sets: Dict[_SetKey, Dict[int, Dict[int, str]]] = collections.defaultdict(dict)
    for f in files:
        info = parse_shard_name(f)
        if info is not None:
            key = (os.path.dirname(os.path.abspath(f)), info["name"], info["split"], info["format"])
            sets[key].setdefault(info["num_shards"], {})[info["index"]] = f
    return sets


def _set_label(key: _SetKey) -> str:
    return f"{key[1]}-{key[2]}.{key[3]}"


def _directory_set(directory: str) -> List[str]:
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if not f.startswith("."))
    files = [f for f in files if _counts_as_shard(f)]
    sets = _numbered_sets(files)
    if not sets:
        # Shards named some other way: the directory is all there is to go by.
        if not files:
            raise FileNotFoundError(f"{directory}: no shard files in this directory")
        return files
    if len(sets) > 1:
        listed = ", ".join(f"{_set_label(k)} ({', '.join(str(n) for n in sorted(v))} shards)"
                           for k, v in sorted(sets.items()))
        example = os.path.join(directory, f"{_set_label(min(sets))}-*")
        raise ShardError(f"{directory}: holds several shard sets ({listed}); a directory means one set, so "
                         f"name the split you want with a glob, e.g. {example!r}")
    (key, by_count), = sets.items()
    found = [f for shards in by_count.values() for f in shards.values()]
    check_complete(found, directory)
    return sorted(found)


def check_complete(files: Sequence[str], spec: str) -> None:
    """Raise `ShardError` unless `files` (what `spec` matched) are whole shard sets."""
    sets = _numbered_sets(files)
    formats = sorted({k[3] for k in sets})
    if len(formats) > 1:
        raise ShardError(f"{spec!r} matches shards of {len(formats)} formats ({', '.join(formats)}); "
                         "one data set is read in one format (data.format): name one in the glob")
    for key, by_count in sorted(sets.items()):
        if len(by_count) > 1:
            counts = " and ".join(f"{n} ({len(s)} present)" for n, s in sorted(by_count.items()))
            raise ShardError(f"{spec!r}: shard set {_set_label(key)} in {key[0]} comes with two shard counts, "
                             f"{counts}: shards of another run are mixed in; remove the stale ones")
        (num, present), = by_count.items()
        missing = [i for i in range(num) if i not in present]
        if missing:
            names = ", ".join(f"{i:05d}" for i in missing[:_SHOW])
            more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
            raise ShardError(f"{spec!r}: shard set {_set_label(key)} in {key[0]} lacks {len(missing)} of its "
                             f"{num} shards ({names}{more} of {num:05d}); a shard set is read whole or not at all "
                             "(is prepare still running, or was it interrupted?)")
        _check_manifest(key, spec)


def read_manifest(directory: str) -> Optional[dict]:
    """The prepare manifest of `directory`, or None (absent, or another tool's file)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != PREPARE_SCHEMA:
        return None  # e.g. a feature cache's manifest: says nothing about these shards
    return manifest


def _check_manifest(key: _SetKey, spec: str) -> None:
    directory, name, split, fmt = key
    manifest = read_manifest(directory)
    entry = (manifest or {}).get("splits", {}).get(split)
    if not entry or entry.get("name") != name or entry.get("format") != fmt:
        return
    where = os.path.join(directory, MANIFEST)
    missing, resized = [], []
    for shard in entry.get("shards", []):
        path = os.path.join(directory, shard["file"])
        try:
            size = os.path.getsize(path)
        except OSError:
            missing.append(shard["file"])
            continue
        if shard.get("bytes") is not None and size != shard["bytes"]:
            resized.append(f"{shard['file']} ({size} bytes, listed {shard['bytes']})")
    if missing:
        more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
        raise ShardError(f"{spec!r}: {where} lists {len(entry['shards'])} shard(s) of split {split!r}, but "
                         f"{len(missing)} are missing: {', '.join(missing[:_SHOW])}{more}")
    for r in resized:
        _log.warning("%s: shard %s differs in size from %s; its unreadable records will be skipped and reported",
                     spec, r, where)


def manifest_entry(path: str) -> Optional[dict]:
    """The manifest's entry (`file`, `num_records`, `sha256`, `bytes`) for one shard, or None."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        manifest = read_manifest(directory)
    except ShardError:
        return None
    for entry in (manifest or {}).get("splits", {}).values():
        for shard in entry.get("shards", []):
            if shard.get("file") == name:
                return shard
    return None
