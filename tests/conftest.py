"""Test session set-up: 8 fake CPU devices, float32 matmuls, reference-data location."""
import os

# Must happen before jax is imported anywhere: every test sees 8 CPU devices so that
# sharding code paths run here exactly as on a pod slice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# The CLI turns XLA:CPU's YNNPACK fusions off (synchformer_jax/xla_cpu.py) when it runs in
# a process whose backends have not started; in this one process that would depend on
# test order. The suite keeps jax's default (what library users get); tests/test_xla_cpu.py
# runs the CLI's setting in fresh processes.
os.environ.setdefault("SYNCHFORMER_JAX_KEEP_YNN", "1")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference" / "tiny"


def reference_dir() -> pathlib.Path:
    """The parity set: `SYNCHFORMER_REFERENCE_DIR` or the shared tiny set.

    A folder named by the variable must exist (the tests fail otherwise); the default
    folder is optional because users of a plain checkout do not have it.
    """
    named = os.environ.get("SYNCHFORMER_REFERENCE_DIR")
    if named:
        path = pathlib.Path(named)
        if not path.is_dir():
            pytest.fail(f"SYNCHFORMER_REFERENCE_DIR={named} does not exist")
        return path
    if not DEFAULT_REFERENCE_DIR.is_dir():
        pytest.skip(f"no reference set: {DEFAULT_REFERENCE_DIR} is absent and SYNCHFORMER_REFERENCE_DIR is unset")
    return DEFAULT_REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_path() -> pathlib.Path:
    return reference_dir()
