"""`synchformer-jax convert` end to end: official files in, model folders and state dicts out."""
from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from synchformer_jax import cli, pretrained
from synchformer_jax.models import convert_torch as ct
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import tiny_config
from tests import reference_data as rd

TINY_HEADS = ["--set", "video.num_heads=4", "--set", "audio.num_heads=4", "--set", "sync.n_head=4"]


def test_convert_reference_checkpoint_both_ways(reference_path, tmp_path, capsys):
    src = rd.require(reference_path / "model.safetensors")
    heads = [f"{k}={v}" for k, v in rd.head_overrides(reference_path).items()]
    args = ["convert", str(src), "--out", str(tmp_path / "model"), "--torch-out", str(tmp_path / "back.safetensors")]
    for h in heads:
        args += ["--set", h]
    assert cli.main(args) == 0
    assert "round trip flax -> torch -> flax: exact" in capsys.readouterr().out

    # The written torch file is the original state dict, bit for bit, key for key.
    original, back = load_file(str(src)), load_file(str(tmp_path / "back.safetensors"))
    assert set(original) == set(back)
    for key in original:
        np.testing.assert_array_equal(back[key], original[key], err_msg=key)

    # The folder loads with its config and gives the official logits.
    loaded = pretrained.load_model(tmp_path / "model")
    assert loaded.config == ct.infer_config(original, overrides=rd.head_overrides(reference_path))
    case = np.load(rd.case_files(reference_path)[0])
    video = rd.video_input(reference_path, case, rd.constants(reference_path)["rgb_u8_to_model_input_lut"])
    logits = jax.jit(sf.Synchformer(loaded.config).apply)({"params": loaded.params}, video, case["audio_input"])
    np.testing.assert_allclose(logits, case["logits"], atol=1e-4)
    # ... and the exported safetensors carries its config: no overrides needed to read it.
    again = pretrained.load_model(tmp_path / "back.safetensors")
    assert again.config == loaded.config


def test_convert_torch_pickle_checkpoint(tmp_path):
    """A stage-II style `.pt` (tensors under `model`, pickled OmegaConf `args`)."""
    from tests.data.write_torch_file import write_torch_zip

    config = tiny_config()
    params = sf.init_params(config, jax.random.key(0))
    state_dict = ct.flax_to_torch(params)
    args = {"model": {"params": {"transformer": {"params": {"n_head": 4, "n_embd": 64}}}}}
    path = tmp_path / "24-01-04T16-39-21.pt"
    write_torch_zip(path, {"model": state_dict, "args": args, "epoch": 3})
    out = tmp_path / "folder"
    rc = cli.main(["convert", str(path), "--out", str(out), "--set", "video.num_heads=4",
                   "--set", "audio.num_heads=4"])
    assert rc == 0
    loaded = pretrained.load_model(out)
    assert loaded.config == config
    for k, v in traverse_util.flatten_dict(loaded.params).items():
        np.testing.assert_array_equal(v, traverse_util.flatten_dict(params)[k])


def test_convert_stage_one_checkpoint(tmp_path, capsys):
    """A stage-I `epoch_best.pt` (DDP prefixes, 0-d `logit_scale`) converts, loads and runs."""
    from tests.data.write_torch_file import write_torch_zip

    config = tiny_config(kind="avclip")
    params = sf.init_params(config, jax.random.key(1))
    state_dict = {"module." + k: v for k, v in ct.flax_to_torch(params).items()}
    assert state_dict["module.logit_scale"].shape == ()
    path = tmp_path / "epoch_best.pt"
    write_torch_zip(path, {"state_dict": state_dict, "epoch": 7})
    rc = cli.main(["convert", str(path), "--out", str(tmp_path / "folder"), "--torch-out",
                   str(tmp_path / "back.safetensors"), *TINY_HEADS])
    assert rc == 0, capsys.readouterr().err
    loaded = pretrained.load_model(tmp_path / "folder")
    assert loaded.params["logit_scale"].shape == ()
    assert load_file(str(tmp_path / "back.safetensors"))["logit_scale"].shape == ()
    rng = np.random.default_rng(0)
    video = rng.standard_normal((1, 2, 16, 3, 224, 224)).astype(np.float32)
    audio = rng.standard_normal((1, 2, 1, 128, 66)).astype(np.float32)
    out = sf.SegmentAVCLIP(loaded.config).apply({"params": loaded.params}, video, audio)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_misspelt_override_is_a_one_line_error(reference_path, capsys):
    src = rd.require(reference_path / "model.safetensors")
    rc = cli.main(["convert", str(src), *TINY_HEADS, "--set", "sync.n_heads=4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "n_heads" in err, err


def test_bad_inputs_exit_nonzero_with_one_line_naming_the_file(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"model": Evil()}, protocol=2))
    for path in (empty, text, evil, tmp_path / "missing.pt"):
        proc = subprocess.run([sys.executable, "-m", "synchformer_jax.cli", "convert", str(path)],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and lines[0].startswith("error: "), proc.stderr
    assert not marker.exists()
    assert "system" in subprocess.run([sys.executable, "-m", "synchformer_jax.cli", "convert", str(evil)],
                                      capture_output=True, text=True).stderr


def test_unknown_override_is_an_error(reference_path):
    src = rd.require(reference_path / "model.safetensors")
    with pytest.raises((TypeError, ValueError)):
        pretrained.load_model(src, overrides={"video.num_heads": 4, "audio.num_heads": 4, "sync.n_head": 4,
                                              "video.no_such_field": 1})
