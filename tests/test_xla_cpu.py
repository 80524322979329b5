"""The XLA:CPU setting the entry points make (YNNPACK fusion off): when it is applied, when
it is left alone, and that it changes speed, not results. Fresh processes, since only a
process's first backend reads XLA_FLAGS."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from synchformer_jax import xla_cpu


@pytest.fixture
def fresh_backends(monkeypatch):
    # This pytest process has run jax already; the rule under test is the one for a
    # process whose backends do not exist yet.
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)


def test_flag_added_for_known_jaxlib_lines(fresh_backends):
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 10))
    assert env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {xla_cpu.FLAG}"
    assert xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 10))  # idempotent
    assert env["XLA_FLAGS"].count(xla_cpu.FLAG_NAME) == 1
    env = {}
    assert xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 11)) and env["XLA_FLAGS"] == xla_cpu.FLAG


def test_flag_left_alone_when_unknown_opted_out_or_user_set(fresh_backends):
    env = {}
    assert not xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 13)) and "XLA_FLAGS" not in env
    env = {xla_cpu.KEEP_ENV: "1"}
    assert not xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 10)) and "XLA_FLAGS" not in env
    user = f"--{xla_cpu.FLAG_NAME}=dot"
    env = {"XLA_FLAGS": user}
    assert not xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 10)) and env["XLA_FLAGS"] == user


def test_too_late_once_backends_exist():
    import jax.numpy as jnp

    jnp.ones(1).block_until_ready()
    env = {}
    assert not xla_cpu.disable_ynn_fusion(env, jaxlib_line=(0, 10)) and "XLA_FLAGS" not in env


def _run(code: str, env_update: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.KEEP_ENV)}
    env.update(env_update, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cli_sets_the_flag_before_jax_starts():
    code = """
        import os
        from synchformer_jax import cli
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
        print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
    """
    out = _run(code, {})
    expected = xla_cpu.FLAG if xla_cpu._jaxlib_line() in xla_cpu.KNOWN_JAXLIB_LINES else ""
    assert out.strip().splitlines()[-1] == "XLA_FLAGS=" + expected
    assert _run(code, {xla_cpu.KEEP_ENV: "1"}).strip().splitlines()[-1] == "XLA_FLAGS="


@pytest.mark.skipif(xla_cpu._jaxlib_line() not in xla_cpu.KNOWN_JAXLIB_LINES,
                    reason="the flag is only set for jaxlib lines known to have it")
def test_flag_changes_speed_not_results(tmp_path):
    """The tiny model's logits and a model gradient with the flag equal those without it,
    and the reduction that jaxlib 0.10.2's YNN path got wrong is right with the flag."""
    code = f"""
        import jax, jax.numpy as jnp, numpy as np
        from synchformer_jax.models import synchformer as sf
        from synchformer_jax.models.config import tiny_config
        config = tiny_config(n_segments=2, **{{"video.img_size": 32}})
        params = sf.init_params(config, jax.random.key(0))
        rng = np.random.default_rng(0)
        video, audio = sf.dummy_inputs(config, 2)
        video = jnp.asarray(rng.uniform(-1, 1, video.shape).astype(np.float32))
        audio = jnp.asarray(rng.normal(0, 0.5, audio.shape).astype(np.float32))
        model = sf.Synchformer(config)
        logits = jax.jit(model.apply)({{"params": params}}, video, audio)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({{"params": p}}, video, audio) ** 2)))(params)
        flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)])
        # A product of broadcast slices reduced over its last axis (see xla_cpu's docstring).
        q, k = (jnp.asarray(rng.normal(size=(1, 1569, 12, 64)).astype(np.float32)) for _ in range(2))
        def pairs(q, k):
            s = lambda t: t[:, 1:].reshape(1, 8, 196, 12, 64)
            return jnp.sum(s(q)[:, :, None] * s(k)[:, None], axis=-1)
        got = np.asarray(jax.jit(pairs)(q, k))
        want = np.einsum("nfphd,ngphd->nfgph", *(np.asarray(t)[:, 1:].reshape(1, 8, 196, 12, 64) for t in (q, k)))
        np.savez("{tmp_path}/out.npz", logits=np.asarray(logits), grad=flat, pairs_err=np.abs(got - want).max())
    """
    results = {}
    for name, env in (("default", {xla_cpu.KEEP_ENV: "1"}), ("no_ynn", {"XLA_FLAGS": xla_cpu.FLAG})):
        _run(code, env)
        results[name] = dict(np.load(tmp_path / "out.npz"))
    np.testing.assert_allclose(results["no_ynn"]["logits"], results["default"]["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["no_ynn"]["grad"], results["default"]["grad"], rtol=1e-4, atol=1e-6)
    assert results["no_ynn"]["pairs_err"] < 1e-3
