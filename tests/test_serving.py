"""`jax.export` serving: same logits as the model after a file round trip, a loader without
Flax or the model code, clear errors on wrong inputs, the `export` command."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from synchformer_jax import cli, pretrained, serving, serving_loader
from synchformer_jax.input import melspec, normalize, transforms
from synchformer_jax.models import synchformer as sf
from synchformer_jax.models.config import tiny_config


CONFIG = tiny_config(**{"video.img_size": 32, "video.depth": 1, "audio.num_layers": 1, "sync.n_layer": 1})
BATCH = 2


def random_params(config, seed):
    """N(0, 0.05) parameters of the model's shapes (no init compilation: much faster here)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), sf.abstract_params(config))


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, 1)


@pytest.fixture(scope="module")
def exported(params, tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    serving.export_model(params, CONFIG, out, batch=BATCH)
    return out


@pytest.fixture(scope="module")
def served(exported):
    return serving_loader.load(exported)


@pytest.fixture(scope="module")
def reference(params):
    """The in-process model, always called with batches of BATCH (one compilation)."""
    apply = jax.jit(sf.Synchformer(CONFIG).apply)

    def run(video, audio):
        out = []
        for i in range(0, len(video), BATCH):
            v, a = video[i:i + BATCH], audio[i:i + BATCH]
            k = len(v)
            v = np.concatenate([v, np.repeat(v[:1], BATCH - k, 0)])
            a = np.concatenate([a, np.repeat(a[:1], BATCH - k, 0)])
            out.append(np.asarray(apply({"params": params}, v, a))[:k])
        return np.concatenate(out)

    return run


def _model_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    video = normalize.video_uint8_to_model_input_np(rng.integers(0, 256, (n, 14, 16, 3, 32, 32), dtype=np.uint8))
    audio = rng.normal(0, 1, (n, 14, 1, 128, 66)).astype(np.float32)
    return video, audio


def test_contract(exported):
    c = json.loads((exported / serving.CONTRACT_FILE).read_text())
    assert c["inputs"]["video"] == {"shape": [2, 14, 16, 3, 32, 32], "dtype": "float32", "layout": "B S T C H W",
                                    "values": "official normalised RGB in [-1, 1]"}
    assert c["inputs"]["audio"]["shape"] == [2, 14, 1, 128, 66]
    assert c["outputs"]["logits"] == {"shape": [2, 21], "dtype": "float32", "layout": "B C"}
    assert c["classes"]["offset_sec"][0] == -2.0 and c["classes"]["offset_sec"][10] == 0.0
    assert len(c["classes"]["offset_sec"]) == 21
    assert set(c["platforms"]) == {"cpu", "cuda"} and c["jax_version"] == jax.__version__
    assert c["model_config"] == CONFIG.to_dict()
    # The preprocessing text gives this model's sizes, not the official 224 px.
    assert "centre 32 crop" in c["preprocessing"] and "224" not in c["preprocessing"]
    assert "5 s crops" in c["preprocessing"] and "14 centred segments" in c["preprocessing"]


def test_exported_logits_equal_the_model_after_a_file_round_trip(served, reference):
    video, audio = _model_inputs(3)  # 3 clips: one full call of 2 and one padded call
    logits = served(video, audio)
    assert logits.shape == (3, 21) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference(video, audio), atol=1e-5, rtol=1e-5)


def test_raw_inputs_variant_preprocesses_like_the_pipeline(params, reference, tmp_path):
    serving.export_model(params, CONFIG, tmp_path, batch=1, inputs="raw", platforms=("cpu",))
    raw = serving_loader.load(tmp_path)
    assert raw.specs["video"]["shape"] == [1, 125, 32, 32, 3] and raw.specs["audio"]["shape"] == [1, 80000]
    rng = np.random.default_rng(2)
    crop_v = rng.integers(0, 256, (1, 125, 32, 32, 3), dtype=np.uint8)
    crop_a = rng.normal(0, 0.1, (1, 80000)).astype(np.float32)
    seg = transforms.generate_segments(125, 80000, n_segments=14)  # official test-time segments
    video = normalize.video_uint8_to_model_input_np(np.moveaxis(transforms.take_video_segments(crop_v[0], seg), -1, -3))
    audio = melspec.log_mel_jax(transforms.take_audio_segments(crop_a[0], seg))
    want = reference(video[None], np.asarray(audio)[None])
    np.testing.assert_allclose(raw(crop_v, crop_a), want, atol=1e-5, rtol=1e-5)


def test_wrong_inputs_give_clear_errors(exported, served):
    video, audio = _model_inputs(2)
    with pytest.raises(ValueError, match=r"video: expected shape \[n, 14, 16, 3, 32, 32\].*got \[2, 14, 16, 3, 64, 64\]"):
        served(np.zeros((2, 14, 16, 3, 64, 64), np.float32), audio)
    with pytest.raises(ValueError, match=r"audio: expected shape \[n, 14, 1, 128, 66\].*got \[2, 14, 128, 66\]"):
        served(video, audio[:, :, 0])
    with pytest.raises(ValueError, match="video: expected floating point"):
        served(video.astype(np.int32), audio)
    with pytest.raises(ValueError, match="video has 2 clips, audio 1"):
        served(video, audio[:1])
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        serving_loader.load(exported / "nope")


def test_loader_needs_neither_flax_nor_the_model_code(exported, served):
    video, audio = _model_inputs(1)
    np.savez(exported.parent / "inputs.npz", video=video, audio=audio)
    want = served(video, audio)
    script = textwrap.dedent(f"""
        import sys
        for name in ("flax", "optax", "orbax", "orbax.checkpoint", "synchformer_jax.models", "synchformer_jax.input",
                     "synchformer_jax.pretrained"):
            sys.modules[name] = None  # poisoned: any import of them raises ImportError
        import numpy as np
        from synchformer_jax.serving_loader import load
        d = np.load({str(exported.parent / "inputs.npz")!r})
        logits = load({str(exported)!r})(d["video"], d["audio"])
        assert not [m for m in sys.modules if m.startswith(("flax", "synchformer_jax.models"))
                    and sys.modules[m] is not None]
        np.save({str(exported.parent / "logits.npy")!r}, logits)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(exported.parent / "logits.npy"), want)


def test_export_command(params, tmp_path, capsys):
    model_dir = pretrained.save_model(tmp_path / "model", params, CONFIG)
    out = tmp_path / "served"
    assert cli.main(["export", str(model_dir), "--out", str(out), "--batch", "1", "--platforms", "cpu",
                     "--model-folder", "--torch-safetensors"]) == 0
    text = capsys.readouterr().out
    assert "inference.jax_exported" in text and "logits float32 [1, 21]" in text
    assert (out / "model" / "model_config.json").exists() and (out / "model.safetensors").exists()
    assert pretrained.load_model(out / "model.safetensors").config == CONFIG
    # A second export into the same folder needs --overwrite.
    assert cli.main(["export", str(model_dir), "--out", str(out), "--batch", "1", "--platforms", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(model_dir), "--out", str(out), "--batch", "1", "--platforms", "cpu",
                     "--overwrite", "--dtype", "bfloat16"]) == 0
    c = json.loads((out / serving.CONTRACT_FILE).read_text())
    assert c["compute_dtype"] == "bfloat16" and c["platforms"] == ["cpu"]
    assert c["model_config"]["dtype"] == "bfloat16" and c["inputs"]["video"]["dtype"] == "float32"
    # A model of another kind is refused with one line.
    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--batch", "1"]) == 2
