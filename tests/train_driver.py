"""Runs `train.train_and_evaluate` in its own process, for the trainer tests that need a
process of their own: several JAX processes on one machine (test_train_distributed.py)
and runs killed with SIGKILL (test_train_resume.py).

    python tests/train_driver.py --config CONFIG.json --workdir DIR
        [--coordinator localhost:PORT --num-processes N --process-id I]
        [--cache-dir DIR] [--batch-log FILE] [--stall-save-at STEP]

The number of local CPU devices comes from `SYNCHFORMER_TEST_LOCAL_DEVICES` (set by
`train_helpers.driver_env`), because it must be fixed before jax is imported.

Test hooks (they wrap library functions from outside, so the trainer runs unmodified):
* `--batch-log`: one JSON line per training batch the loop draws: the step it feeds,
  the global example numbers and a digest of the bytes, to show that a resumed run sees
  the batches the uninterrupted run saw.
* `--stall-save-at K`: the checkpoint of step K stops just before orbax commits it (the
  rename of its temporary folder) and the process announces that by creating
  `<workdir>/stalled_save_K`; the test kills it there, mid-write.
"""
from __future__ import annotations

import argparse
import os
import sys

_LOCAL = int(os.environ.get("SYNCHFORMER_TEST_LOCAL_DEVICES", "8"))
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_LOCAL}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


NON_FINITE_EXIT = 3  # = train_helpers.NON_FINITE_EXIT (not imported: it must not touch jax first)


def _parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--coordinator", default="")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--batch-log", default="")
    p.add_argument("--stall-save-at", type=int, default=0)
    return p.parse_args(argv)


class _LoggedIterator:
    """The train iterator with every drawn batch appended to a JSON-lines file."""

    def __init__(self, it, path: pathlib.Path, first_step: int):
        self._it, self._path, self._step = it, path, first_step

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._step += 1
        digest = hashlib.sha256()
        for k in sorted(batch):
            if k != "meta":
                digest.update(k.encode())
                digest.update(np.ascontiguousarray(batch[k]).tobytes())
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": self._step, "index": np.asarray(batch["index"]).tolist(),
                                "clip_id": [str(c) for c in batch["meta"]["clip_id"]],
                                "digest": digest.hexdigest()}) + "\n")
        return batch

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def _install_batch_log(train, checkpoint, workdir: pathlib.Path, path: pathlib.Path) -> None:
    # The step the loop starts from is the latest complete checkpoint, exactly as the
    # trainer decides it; the wrapper numbers the batches from there.
    ckpts = checkpoint.RunCheckpoints(workdir)
    first = ckpts.latest_step() or 0
    ckpts.close()
    original = train.train_iterator

    def train_iterator(config, task, paths, **kw):
        return _LoggedIterator(original(config, task, paths, **kw), path, first)

    train.train_iterator = train_iterator


def _install_stalled_save(workdir: pathlib.Path, step: int) -> None:
    import asyncio

    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        # Everything of the step is written at this point, only the commit is missing:
        # the folder still has its temporary name.
        if self.get_final().name == str(step) and self.get_final().parent.name == "checkpoints":
            (workdir / f"stalled_save_{step}").write_text(str(self.get()))
            await asyncio.sleep(3600)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv=None) -> None:
    args = _parse(argv)
    # The trainer's own lines (steps, resumes); orbax and jax only when they warn.
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s [p{args.process_id}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("synchformer_jax").setLevel(logging.INFO)
    # The test session's numerics (tests/conftest.py).
    jax.config.update("jax_default_matmul_precision", "highest")
    if args.cache_dir:
        # Restarted runs load the compiled step instead of compiling it again.
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.num_processes > 1:
        # CPU collectives across processes go through gloo (the jax default on CPU;
        # set explicitly so that a changed default cannot turn this into a hang).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    assert jax.local_device_count() == _LOCAL, (jax.local_device_count(), _LOCAL)
    assert jax.process_count() == args.num_processes

    import ml_collections

    from synchformer_jax import checkpoint, train

    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = ml_collections.ConfigDict(json.loads(pathlib.Path(args.config).read_text()))
    if args.batch_log:
        _install_batch_log(train, checkpoint, workdir, pathlib.Path(args.batch_log))
    if args.stall_save_at:
        _install_stalled_save(workdir, args.stall_save_at)
    try:
        train.train_and_evaluate(config, workdir)
    except train.NonFiniteLossError as exc:
        # A distinct exit status: the test tells this stop from a crash.
        print(f"NonFiniteLossError: {exc}", flush=True)
        sys.exit(NON_FINITE_EXIT)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
