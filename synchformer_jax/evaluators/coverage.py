"""How much of a prepared list an evaluation covered: `listed`, `evaluated`, `missing`.

`synchformer-jax prepare` writes only the clips it could load; a listed clip whose media
is absent or unreadable is left out of the shards and named, with its reason, in the
split's `manifest.json` entry (`num_inputs` counts the list rows or files it was given;
clips a filter list removed are `num_excluded`, on purpose and not counted as listed).
An evaluation of the shards alone would report a result over a partial official set as
if it were the full one. `list_coverage` finds, for the evaluated shard files, the
manifest entries that wrote them, and `ListCoverage.report` sets what they list against
what the evaluation scored.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Sequence

from synchformer_jax.input import shard_sets
from synchformer_jax.input.shards import ShardError

MANIFEST = shard_sets.MANIFEST
SHOWN_IDS = 20  # missing ids named in a report; the count is always complete


@dataclasses.dataclass
class ListCoverage:
    listed: int  # list rows (or files) prepare was given, filter-list exclusions not included
    excluded: int  # removed by filter lists (`prepare --exclude`)
    prepared: int  # records in the evaluated shards
    missing: list[dict]  # {"clip_id", "reason"} of listed clips prepare could not write
    shards_evaluated: int
    shards_prepared: int  # of the splits the evaluated shards belong to
    manifests: list[str]  # "<manifest path>:<split>"

    def report(self, evaluated: Optional[int]) -> dict:
        """The coverage fields of an evaluation record; `evaluated`: clips it scored."""
        return {"listed": self.listed, "evaluated": evaluated, "missing": len(self.missing),
                "missing_ids": [m["clip_id"] for m in self.missing[:SHOWN_IDS]],
                "missing_reasons": _reason_counts(self.missing),
                "excluded_by_filters": self.excluded, "prepared": self.prepared,
                "shards_evaluated": self.shards_evaluated, "shards_prepared": self.shards_prepared,
                "manifests": self.manifests}

    def warning(self, evaluated: Optional[int]) -> Optional[str]:
        """One line when the evaluation did not score every listed clip, else None."""
        parts = []
        if self.missing:
            shown = ", ".join(m["clip_id"] for m in self.missing[:5])
            more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
            parts.append(f"{len(self.missing)} missing from the prepared data ({shown}{more})")
        if self.shards_evaluated < self.shards_prepared:
            parts.append(f"only {self.shards_evaluated} of {self.shards_prepared} shards evaluated")
        elif evaluated is not None and evaluated < self.prepared:
            parts.append(f"{self.prepared - evaluated} prepared clips skipped at evaluation")
        if not parts:
            return None
        scored = "?" if evaluated is None else str(evaluated)
        return f"warning: {scored} of {self.listed} listed clips evaluated: " + "; ".join(parts)


def _reason_counts(missing: Sequence[dict]) -> dict:
    counts: dict = {}
    for m in missing:
        counts[m["reason"]] = counts.get(m["reason"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _read_manifest(directory: pathlib.Path) -> Optional[dict]:
    """The prepare manifest of `directory`; None when there is none or it is unreadable
    (then there is no account to give, not an error of the evaluation)."""
    try:
        manifest = shard_sets.read_manifest(str(directory))
    except ShardError:
        return None
    return manifest if manifest is not None and isinstance(manifest.get("splits"), dict) else None


def list_coverage(paths: Sequence[str]) -> Optional[ListCoverage]:
    """The prepare manifests' account of the shard files `paths`, or None when any of them
    was not written by `prepare` (no manifest beside it lists it: synthetic sets, shards
    copied without their manifest), since a partial account would understate `listed`."""
    splits: dict[tuple[str, str], dict] = {}  # (manifest, split) -> its entry
    used: dict[tuple[str, str], set] = {}  # (manifest, split) -> the evaluated files of it
    manifests: dict[pathlib.Path, Optional[dict]] = {}
    for path in paths:
        directory = pathlib.Path(os.path.abspath(path)).parent
        if directory not in manifests:
            manifests[directory] = _read_manifest(directory)
        manifest = manifests[directory]
        if manifest is None:
            return None
        name = os.path.basename(path)
        for split, entry in manifest["splits"].items():
            if any(s.get("file") == name for s in entry.get("shards", ())):
                key = (str(directory / MANIFEST), split)
                splits[key] = entry
                used.setdefault(key, set()).add(name)
                break
        else:
            return None
    if not splits:
        return None
    missing: list[dict] = []
    listed = excluded = prepared = shards_prepared = 0
    for key, entry in splits.items():
        listed += int(entry.get("num_inputs", 0))
        excluded += int(entry.get("num_excluded", 0))
        shards_prepared += len(entry.get("shards", ()))
        prepared += sum(int(s.get("num_records", 0)) for s in entry.get("shards", ()) if s.get("file") in used[key])
        missing.extend({"clip_id": s.get("clip_id") or s.get("source", "?"), "reason": s.get("reason", "?")}
                       for s in entry.get("skipped", ()))
    return ListCoverage(listed=listed, excluded=excluded, prepared=prepared, missing=missing,
                        shards_evaluated=sum(len(u) for u in used.values()), shards_prepared=shards_prepared,
                        manifests=[f"{m}:{s}" for m, s in splits])
