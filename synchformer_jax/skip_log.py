"""`<workdir>/skipped.jsonl`: every record a run or an evaluation skipped, across resumes.

One JSON object per line: `{"phase", "step", "skipped": "<clip and source>: <reason>"}`
plus what the writer adds (the eval command: the checkpoint). Phases: `train` (`step`:
the step whose batch it was), `eval` (the trainer's evaluation at `step`), and
`eval_<split>` (the `eval` command; `step`: the checkpoint's). The in-memory
`pipeline.SkipReport` restarts with every process and log lines rotate away; this file
is where the skipped clip ids stay.

A resumed training run draws the batches after its checkpoint again, so `resume(step)`
drops the trainer's lines after that step (they are written again, once) and returns the
number of training skips up to it, from which the run's count continues. With several
processes each writes its own file (`skipped.<process>.jsonl`): a broken record is in
exactly one host's slice.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

FILE = "skipped.jsonl"
TRAINER_PHASES = ("train", "eval")


class SkipLog:
    def __init__(self, workdir: str | os.PathLike, process_index: int = 0, process_count: int = 1):
        name = FILE if process_count == 1 else f"skipped.{process_index}.jsonl"
        self.path = pathlib.Path(workdir) / name

    def read(self) -> list[dict]:
        """The entries, in order; a torn last line (a killed run) is left out."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def resume(self, step: int) -> int:
        """Forget the trainer's entries after `step`; returns its `train` entries up to it."""
        if not self.path.exists():
            return 0
        keep = [e for e in self.read() if e.get("phase") not in TRAINER_PHASES or int(e.get("step", 0)) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        return sum(1 for e in keep if e.get("phase") == "train")

    def append(self, phase: str, step: int | None, items: Sequence[str], **extra) -> None:
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps({"phase": phase, "step": step, "skipped": item, **extra}) + "\n")


def gather_items(items: Sequence[str], limit: int) -> list[str]:
    """The first `limit` of every process's `items`, process 0's first, on every process.

    A broken record is in exactly one host's slice, so a report written by process 0
    alone (the eval JSON) needs the others' descriptions; through the collectives, not
    the workdir, which need not be a file system every process sees at that moment.
    """
    import jax

    mine = list(items[:limit])
    if jax.process_count() == 1:
        return mine
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(mine).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [item for row, size in zip(every, sizes) for item in json.loads(row[:size].tobytes().decode("utf-8"))]
