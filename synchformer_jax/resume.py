"""What a restarted run may change in its config.

A restart in a workdir that holds checkpoints resumes the run. Each checkpoint stores the
config that wrote it, so the restart can say what a changed config does:

* The architecture (`stage`, `model.*`) must be the one the checkpoint was trained as: a
  change either fails in orbax with a shape error that names no config key, or, worse,
  restores the same arrays into another function (more heads of the same width). That
  is a `ResumeError` naming each key with both values. The settings that only change how
  the same model is computed (`EXECUTION`: remat, scanned blocks, packed time attention)
  are not the architecture: they resume like the settings below.
* Anything that changes the shape of the optimizer state (`optim.name`, `optim.frozen`,
  `optim.clip_norm` on or off) fails to restore; the data iterator's state only fits the
  pipeline that wrote it (`data.num_workers`, `data.format`, `data.tfrecord_access`).
  Both failures become `ResumeError`s listing the config's changes.
* Everything else resumes (a longer schedule, another learning rate, evaluation
  settings) but is no longer the run that started: each change is logged as a warning
  and appended to `<workdir>/config_changes.jsonl`, and `config.json` holds the new
  config, so what a run was trained with stays on record.

Keys that exist on one side only (a config written by an older version) are not
changes: a new key's default is what the older code did.

A restart may also find other hardware (a preempted pod job restarted on another slice).
The checkpoint's data state (`RunPosition`) records what that needs:

* The device count the run's recipe was scaled for: the official recipes scale the
  learning rate (stages II/III) and divide the warm-up (stage I) by the number of
  devices, and stage I draws InfoNCE negatives per device. A restart on other devices
  keeps the recipe the run started with (the same optimisation, the same pools), logs it,
  and records the device count's change (`run.devices`).
* The process count and the number of examples consumed: the saved iterator state counts
  positions in each process's slice of the global stream, so on another process count
  it would repeat or skip data. There the stream starts again at the global example the
  run had reached (`run.processes` recorded), which holds the same examples as the
  uninterrupted run's, up to the records skipped as broken.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Optional, Sequence

import ml_collections

log = logging.getLogger(__name__)

CHANGES_FILE = "config_changes.jsonl"
# Keys whose change makes another model: resuming would mislabel a new run as the old one.
ARCHITECTURE = ("stage", "model.")
# Model keys that change how the same function is computed, not the function or its
# parameters (rematerialisation, scanned blocks, packed time attention): a restart may
# switch them, to fit another device's memory say, as a logged change.
EXECUTION = ("model.remat", "model.remat_policy", "model.scan_blocks", "model.time_attention_pack")
# Keys the data iterator's saved state depends on (grain's per-worker states, the
# ArrayRecord vs streamed-TFRecord state layouts).
ITERATOR = ("data.num_workers", "data.format", "data.tfrecord_access")


class ResumeError(ValueError):
    """The workdir's checkpoint cannot be resumed with this config."""


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.key}: {json.dumps(self.before)} -> {json.dumps(self.after)}"

    def put_back(self) -> str:
        """The command-line override that restores the checkpoint's value."""
        value = self.before
        text = json.dumps(value) if not isinstance(value, str) else (value if value else "''")
        return f"--config.{self.key}={text}"


DATA_STATE_FORMAT = 2  # 1: the bare iterator state (before RunPosition)


@dataclasses.dataclass(frozen=True)
class RunPosition:
    """A checkpoint's data state: the iterator's state and where the run stands."""
    iterator: Any
    examples: Optional[int]  # global training examples consumed (None: format 1)
    processes: Optional[int]  # process count that wrote the iterator state
    devices: Optional[int]  # device count of the writing run
    recipe_devices: Optional[int]  # device count the device-scaled recipe uses

    def to_json(self) -> dict:
        return {"format": DATA_STATE_FORMAT, "iterator": self.iterator, "examples": self.examples,
                "processes": self.processes, "devices": self.devices, "recipe_devices": self.recipe_devices}

    @classmethod
    def from_json(cls, saved: Any) -> "RunPosition":
        if not (isinstance(saved, dict) and "format" in saved):
            return cls(saved, None, None, None, None)
        if saved["format"] > DATA_STATE_FORMAT:
            raise ResumeError(f"the checkpoint's data state has format {saved['format']}, newer than this "
                              f"synchformer-jax reads ({DATA_STATE_FORMAT}): update it to resume")
        return cls(saved["iterator"], saved["examples"], saved["processes"], saved["devices"],
                   saved["recipe_devices"])

    def topology_changes(self, processes: int, devices: int) -> list["Change"]:
        """The hardware changes of a restart, as config-like changes (`run.*`)."""
        found = []
        if self.processes is not None and self.processes != processes:
            found.append(Change("run.processes", self.processes, processes))
        if self.devices is not None and self.devices != devices:
            found.append(Change("run.devices", self.devices, devices))
        return found


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def as_json(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as the checkpoint stores it (tuples as lists, through JSON)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config))


def changes(saved: dict, current: ml_collections.ConfigDict | dict) -> list[Change]:
    """Values that differ between the checkpoint's config and `current` (keys on both sides)."""
    before, after = _flatten(as_json(saved)), _flatten(as_json(current))
    return [Change(k, before[k], after[k]) for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]


def _matching(found: Sequence[Change], prefixes: Sequence[str]) -> list[Change]:
    return [c for c in found if any(c.key == p or (p.endswith(".") and c.key.startswith(p)) for p in prefixes)]


def _listing(found: Sequence[Change]) -> str:
    return "; ".join(str(c) for c in found)


def _advice(found: Sequence[Change]) -> str:
    return ("put the checkpoint's values back (" + " ".join(c.put_back() for c in found)
            + "), or start a new run in another workdir (--config.init_from=<this workdir> takes its "
              "weights where the stage allows)")


def check_architecture(workdir: pathlib.Path, step: int, found: Sequence[Change]) -> None:
    """Raise when the model or stage differ from the checkpoint's (before restoring)."""
    arch = [c for c in _matching(found, ARCHITECTURE) if c.key not in EXECUTION]
    if arch:
        raise ResumeError(f"{workdir}: its checkpoint (step {step}) was trained as another model; "
                          f"changed: {_listing(arch)}; {_advice(arch)}")


def state_error(workdir: pathlib.Path, step: int, found: Sequence[Change], exc: BaseException) -> ResumeError:
    """The error for a train state that does not restore: what changed, then orbax's words.

    Only the optimizer settings change the state's tree once the model is the same, so
    they are named as the cause when they changed; otherwise every change is listed."""
    first = str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__
    culprits = _matching(found, ("optim.",)) or list(found)
    if culprits:
        return ResumeError(f"{workdir}: the checkpoint of step {step} does not restore with this config "
                           f"({first}); changed since it was written: {_listing(culprits)}; {_advice(culprits)}")
    return ResumeError(f"{workdir}: the checkpoint of step {step} does not restore ({type(exc).__name__}: {first})")


def iterator_error(workdir: pathlib.Path, step: int, found: Sequence[Change], exc: BaseException) -> ResumeError:
    """The error for a data-iterator state that does not fit this pipeline."""
    culprits = _matching(found, ITERATOR)
    if culprits:
        return ResumeError(f"{workdir}: the data iterator state of step {step} was written by another data "
                           f"pipeline ({_listing(culprits)}); resume with {' '.join(c.put_back() for c in culprits)}")
    # No recorded change explains it: most likely a TFRecord run from before
    # data.tfrecord_access existed (its checkpoints hold a stream state).
    return ResumeError(
        f"{workdir}: the data iterator state of step {step} does not fit this data pipeline "
        f"({type(exc).__name__}: {exc}); resume with the data.format / data.tfrecord_access the run "
        f"started with (TFRecord runs from before data.tfrecord_access existed: \"stream\")")


def record(workdir: pathlib.Path, step: int, found: Sequence[Change], write: bool = True) -> None:
    """Log the changes a resumed run goes on with and append them to `config_changes.jsonl`."""
    if not found:
        return
    log.warning("resuming step %d with a changed config: %s", step, _listing(found))
    if write:
        with (workdir / CHANGES_FILE).open("a") as f:
            f.write(json.dumps({"step": step, "changes": {c.key: [c.before, c.after] for c in found}}) + "\n")


def history(workdir: str | pathlib.Path) -> list[dict]:
    """The recorded changes of a run, oldest first (empty when none)."""
    path = pathlib.Path(workdir) / CHANGES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
