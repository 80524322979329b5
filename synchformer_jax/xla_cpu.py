"""XLA:CPU compiler settings for this model, applied by the command-line entry points.

jaxlib 0.10 to 0.12 compile CPU matmuls, element-wise ops and reductions into YNNPACK
fusions by default. For this model the other path (XLA's own dot and loop emitters) is
faster: the full-size forward on 2 cores of an Intel Xeon took 25.0 s instead of 32.7 s
per clip, and one Motionformer block 255-280 ms instead of 285-318 ms (docs/benchmarks.md,
"Full-size side by side, CPU"); with jaxlib 0.12.0.1 on 2 AMD EPYC cores, 31.9 s instead
of 40.4 s (forward) and 32.5 s instead of 40.8 s (stage-II step). The YNN path also
miscompiles on jaxlib 0.10.2: a product of two broadcast operands reduced over their last
axis, the operands being slices of a larger array, returned wrong values under `jit`
(tests/test_xla_cpu.py keeps that case; 0.12.0.1 gets it right).
The model's own code does not take that form, so the setting is about speed. Of the
fusion kinds tried on the block (none, `reduce`, `dot`, `eltwise`, the default), none
was the fastest; `dot` alone was the slowest of the matmul settings (363 ms).

Only the process's first backend reads `XLA_FLAGS`, so the setting must be made before
jax runs anything. An unknown flag aborts XLA, so it is added only for the jaxlib lines
whose XLA has it (checked: 0.10.2 and 0.12.0.1 ran with it, 0.11.0 and 0.11.2 carry the
flag name).
`SYNCHFORMER_JAX_KEEP_YNN=1`, or an `XLA_FLAGS` that already names the flag, leaves the
choice to the user. Library users who want the same speed call `disable_ynn_fusion()`
before their first jax computation.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import MutableMapping, Optional

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
# An empty list of fusion kinds: no YNNPACK fusions at all.
FLAG = f"--{FLAG_NAME}="
KNOWN_JAXLIB_LINES = ((0, 10), (0, 11), (0, 12))
KEEP_ENV = "SYNCHFORMER_JAX_KEEP_YNN"


def _jaxlib_line() -> Optional[tuple[int, int]]:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _backends_started() -> bool:
    if "jax" not in sys.modules:  # not imported, so nothing started (and no import here)
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else False


def disable_ynn_fusion(environ: Optional[MutableMapping[str, str]] = None,
                       jaxlib_line: Optional[tuple[int, int]] = None) -> bool:
    """Add `FLAG` to `XLA_FLAGS`; returns whether YNN fusion is off for the next backend.

    Nothing is changed when the user opted out (`SYNCHFORMER_JAX_KEEP_YNN=1`), when their
    `XLA_FLAGS` already set the flag (their value stands), when this jaxlib line is not
    known to have the flag, or when jax's backends already exist (too late to matter).
    """
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if FLAG_NAME in flags:
        return FLAG in flags.split()
    if environ.get(KEEP_ENV, "") not in ("", "0"):
        return False
    line = _jaxlib_line() if jaxlib_line is None else jaxlib_line
    if line not in KNOWN_JAXLIB_LINES or _backends_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
