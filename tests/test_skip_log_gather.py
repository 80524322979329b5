"""`skip_log.gather_items` across two JAX processes (localhost coordinator, gloo CPU
collectives): process 0's eval JSON lists every process's skipped records, not only its
own (each host skips only in its own slice)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from synchformer_jax import skip_log

_PROCESS = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from synchformer_jax.skip_log import gather_items
mine = json.loads(sys.argv[3])
print("GATHERED " + json.dumps(gather_items(mine, 2)), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_one_process_keeps_its_first_items():
    assert skip_log.gather_items(["a", "b", "c"], 2) == ["a", "b"]
    assert skip_log.gather_items([], 5) == []


def test_two_processes_gather_each_others_first_items():
    coordinator = f"localhost:{_free_port()}"
    # Process 1 has more (and longer, non-ASCII, newline-holding) items than process 0.
    items = [["clip a: bad header"], ["clip é: line\nbreak", "clip c: NaN audio", "clip d: not shown"]]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, coordinator, str(i), json.dumps(items[i])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    want = ["clip a: bad header", "clip é: line\nbreak", "clip c: NaN audio"]
    for out in outs:
        line = next(l for l in out.splitlines() if l.startswith("GATHERED "))
        assert json.loads(line[len("GATHERED "):]) == want
