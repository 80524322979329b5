"""`synchformer-jax predict`: official parity through the command line, the JSON schema,
sliding windows batched across videos, the synchronizability head, and bad inputs in a
batch (one-line errors, the other files scored, non-zero exit)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib

import av
import jax
import numpy as np
import pytest

from synchformer_jax import cli, inference, pretrained, predict
from tests import reference_data as rd
from tests.test_inference import micro_config, micro_sync_config, random_params

TOL = 1e-4


# ------------------------------------------------------------------------ helpers


def write_video(path, seconds: float, *, audio: bool = True, seed: int = 0, size=(256, 256)) -> pathlib.Path:
    """A contract-conforming mp4 (H.264 25 fps, AAC 16 kHz mono) with moving content;
    the audio runs 0.2 s past the last frame so the video decides the length."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 25))
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast"}
        if audio:
            a_s = c.add_stream("aac", rate=16000, layout="mono")
        for i in range(n):
            img = np.stack([(xx + 3 * i) % 256, (yy * 2 + 5 * i + seed * 40) % 256, (xx + yy + 7 * i) % 256], -1)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        if audio:
            wave = (0.2 * rng.standard_normal(int((seconds + 0.2) * 16000))).astype(np.float32)
            for s in range(0, wave.shape[0], 1024):
                frame = av.AudioFrame.from_ndarray(wave[None, s:s + 1024].copy(), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, s
                c.mux(a_s.encode(frame))
            c.mux(a_s.encode(None))
    return pathlib.Path(path)


def run_cli(args, capsys):
    rc = cli.main(["predict", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def check_record(rec, *, offset: bool = True, sync: bool = False, num_classes: int = 21):
    """The per-video schema of docs/predict.md."""
    assert {"path", "ok", "error", "windows", "aggregate"} <= set(rec)
    if not rec["ok"]:
        assert isinstance(rec["error"], str) and "\n" not in rec["error"] and rec["path"] in rec["error"]
        assert rec["windows"] == [] and rec["aggregate"] is None
        return
    assert rec["error"] is None
    assert isinstance(rec["duration_sec"], float) and isinstance(rec["num_frames"], int)
    assert isinstance(rec["reencoded"], bool) and isinstance(rec["silent"], bool)
    assert rec["windows"]
    for w in rec["windows"]:
        assert {"v_start_sec", "offset_applied_sec", "v_start_frame", "a_start_sample", "offset_applied_class",
                "topk", "sync_prob"} <= set(w)
        assert isinstance(w["v_start_frame"], int) and isinstance(w["a_start_sample"], int)
        if offset:
            assert len(w["logits"]) == len(w["probs"]) == num_classes
            assert abs(sum(w["probs"]) - 1) < 1e-5
            probs = [t["prob"] for t in w["topk"]]
            assert probs == sorted(probs, reverse=True)
            for t in w["topk"]:
                assert set(t) == {"offset_sec", "class", "prob", "logit"}
                assert t["prob"] == w["probs"][t["class"]] and t["logit"] == w["logits"][t["class"]]
        else:
            assert w["topk"] is None
        assert (w["sync_prob"] is not None) == sync
    a = rec["aggregate"]
    assert a["num_windows"] == len(rec["windows"])
    if offset:
        mean = np.mean([w["probs"] for w in rec["windows"]], axis=0)
        np.testing.assert_allclose(a["probs"], mean, atol=1e-7)
        assert a["class"] == int(np.argmax(mean)) and a["confidence"] == pytest.approx(float(mean.max()))
        assert 0 <= a["window_agreement"] <= 1
    if sync:
        assert a["sync_prob"] == pytest.approx(np.mean([w["sync_prob"] for w in rec["windows"]]))


def check_document(doc, n_videos: int):
    assert doc["schema"] == predict.SCHEMA
    assert {"model", "sync_model", "settings", "videos", "num_videos", "num_errors"} <= set(doc)
    assert doc["num_videos"] == len(doc["videos"]) == n_videos
    assert doc["num_errors"] == sum(not v["ok"] for v in doc["videos"])
    grid = doc["model"]["class_grid_sec"]
    assert len(grid) == doc["model"]["num_classes"] and grid[0] == -doc["model"]["max_offset_sec"]


# ------------------------------------------------------------ official parity (CLI)


def test_predict_cli_reproduces_the_reference_logits(reference_path, capsys):
    """The 6 reference cases: `predict VIDEO --v-start-sec T --offset-sec O --json` on the
    real sample videos gives the official logits (and their softmax) within 1e-4."""
    model = rd.require(reference_path / "model.safetensors")
    heads = [a for k, v in rd.head_overrides(reference_path).items() for a in ("--set", f"{k}={v}")]
    for case_file in rd.case_files(reference_path):
        case = np.load(case_file)
        video = rd.require(reference_path.parent / "videos" / str(case["video_file"]))
        rc, out, err = run_cli([video, "--checkpoint", model, *heads, "--v-start-sec", float(case["v_start_i_sec"]),
                                "--offset-sec", float(case["offset_sec"]), "--json", "--no-progress"], capsys)
        assert rc == 0, err
        doc = json.loads(out)
        check_document(doc, 1)
        rec = doc["videos"][0]
        check_record(rec)
        assert rec["path"] == str(video) and rec["reencoded"] is False
        (w,) = rec["windows"]
        assert w["v_start_sec"] == float(case["v_start_i_sec"])
        assert w["offset_applied_sec"] == pytest.approx(float(case["offset_sec"]))
        assert (w["v_start_frame"], w["a_start_sample"]) == (int(case["v_start_i"]), int(case["a_start_i"]))
        assert w["offset_applied_class"] == int(case["offset_class"])
        logits = case["logits"][0].astype(np.float64)
        np.testing.assert_allclose(w["logits"], logits, atol=TOL, err_msg=case_file.name)
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(w["probs"], probs, atol=TOL, err_msg=case_file.name)
        assert w["topk"][0]["class"] == int(np.argmax(logits))
        assert len(w["topk"]) == 5


# ------------------------------------------------- batches, sync head, bad inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, config, seed in (("offset", micro_config(), 1), ("sync", micro_sync_config(), 2)):
        out[name] = pretrained.save_model(root / name, random_params(config, seed), config)
    return out


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, models):
    """One `predict` over a folder with good and bad files, a missing file and an
    unmatched glob; offset + synchronizability models, batch 4, stride 1 s, --jsonl."""
    d = tmp_path_factory.mktemp("videos")
    folder = d / "in"
    (folder / "sub").mkdir(parents=True)
    a = write_video(folder / "a.mp4", 6.2, seed=1)  # windows at 0, 1, 1.2 s
    b = write_video(folder / "sub" / "b.mp4", 8.2, seed=2)  # 0, 1, 2, 3, 3.16 s
    (folder / "notes.mp4").write_text("not a video\n")
    data = a.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) * 2 // 5])
    write_video(folder / "silent_film.mp4", 6.0, audio=False)
    write_video(folder / "short.mp4", 3.0, seed=3)
    (folder / "gone.mp4").symlink_to(d / "deleted.mp4")  # a broken link is reported, not skipped
    (folder / "readme.txt").write_text("ignored: not a video extension")
    missing = d / "missing.mp4"
    pattern = d / "*.webm"
    args = [folder, missing, pattern, "--checkpoint", models["offset"], "--sync-checkpoint", models["sync"],
            "--stride-sec", 1.0, "--batch-size", 4, "--topk", 3, "--jsonl", "--no-progress"]
    out, err = io.StringIO(), io.StringIO()  # capsys is function-scoped; this fixture is not
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["predict", *map(str, args)])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "a": a, "b": b, "folder": folder,
            "missing": missing, "pattern": pattern}


def test_bad_inputs_get_one_line_errors_and_the_rest_is_scored(batch_run):
    r = batch_run
    assert r["rc"] == 1
    folder = r["folder"]
    # (the writer puts the moov box last, so the cut file has no index at all)
    bad = {str(folder / "cut.mp4"): "not a readable media file", str(folder / "notes.mp4"): "not a readable media file",
           str(folder / "short.mp4"): "too short", str(folder / "silent_film.mp4"): "no audio stream",
           str(folder / "gone.mp4"): "broken symbolic link",
           str(r["missing"]): "no such file", str(r["pattern"]): "no files match"}
    lines = r["err"].strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == len(bad), r["err"]
    for path, word in bad.items():
        (line,) = [ln for ln in errors if ln.startswith(f"error: {path}: ")]
        assert word in line, line
    assert lines[-1] == f"{len(bad)} of 9 input(s) could not be scored"

    records = [json.loads(ln) for ln in r["out"].splitlines()]
    names = ("a.mp4", "cut.mp4", "gone.mp4", "notes.mp4", "short.mp4", "silent_film.mp4", "sub/b.mp4")  # sorted
    expected_order = [str(folder / n) for n in names] + [str(r["missing"]), str(r["pattern"])]
    assert [rec["path"] for rec in records] == expected_order
    for rec in records:
        assert rec["schema"] == predict.SCHEMA
        check_record(rec, sync=True)
        assert rec["ok"] == (rec["path"] not in bad)


def test_sliding_windows_batched_across_videos_match_single_windows(batch_run, models):
    """Windows of two videos shared device batches (3 + 5 windows, batch 4 per device,
    split over the 8 test devices); each one's offset logits and p(sync) equal the same
    models on `window_inputs` of that window, run data parallel over all 8 devices and
    on one device."""
    records = {json.loads(ln)["path"]: json.loads(ln) for ln in batch_run["out"].splitlines()}
    from synchformer_jax import media

    off = pretrained.load_model(models["offset"])
    syn = pretrained.load_model(models["sync"])
    # The functions the command compiled (same cache entry: no recompile), fed here one
    # window at a time (repeated 8x), with inputs made independently; and the same on
    # a one-device mesh (repeated 4x).
    all_devices, one_device = predict.local_mesh(), predict.local_mesh(1)
    assert all_devices.size == jax.local_device_count() == 8 and one_device.size == 1
    off_fns = [(predict._jitted(off.config, "offset", 3, m), n) for m, n in ((all_devices, 8), (one_device, 4))]
    syn_fns = [(predict._jitted(syn.config, "sync", 3, m), n) for m, n in ((all_devices, 8), (one_device, 4))]
    off_params, syn_params = jax.device_put(off.params), jax.device_put(syn.params)
    # b: 205 frames, but the official EqualifyFromRight keeps int(25 * 8.2) = 204, so the
    # window that ends with the video starts at frame 79 (3.16 s), not 80.
    for path, starts in ((batch_run["a"], [0.0, 1.0, 1.2]), (batch_run["b"], [0.0, 1.0, 2.0, 3.0, 3.16])):
        rec = records[str(path)]
        assert [w["v_start_sec"] for w in rec["windows"]] == starts
        assert [w["v_start_frame"] for w in rec["windows"]] == [round(s * 25) for s in starts]
        clip = media.conform(path)
        for i, w in enumerate(rec["windows"]):
            t = inference.frame_exact_sec(w["v_start_frame"])
            x = inference.window_inputs(clip.frames, clip.audio, t, config=off.config)
            y = inference.window_inputs(clip.frames, clip.audio, t, config=syn.config)
            assert x.frames.shape == (120, 32, 32, 3) and y.frames.shape == (112, 32, 32, 3)
            for off_fn, n in off_fns:
                logits, _ = off_fn(off_params, np.stack([x.frames] * n), np.stack([x.audio] * n))
                np.testing.assert_allclose(w["logits"], np.asarray(logits)[0], atol=1e-5)
            for syn_fn, n in syn_fns:
                sync_logits = np.asarray(syn_fn(syn_params, np.stack([y.frames] * n), np.stack([y.audio] * n)))[0]
                p = math.exp(sync_logits[1]) / (math.exp(sync_logits[0]) + math.exp(sync_logits[1]))
                assert w["sync_prob"] == pytest.approx(p, abs=1e-6)
            assert w["offset_applied_sec"] == 0.0 and w["offset_applied_class"] == 10


def test_table_output_and_progress_bar(batch_run, models, capsys):
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--stride-sec", 1.0,
                            "--batch-size", 4, "--topk", 3], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{batch_run['a']}  (6.20 s, 3 windows")
    assert "top-3" in lines[1] and "p(sync)" not in lines[1]
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("  video: offset ")
    assert "100%" in err and "1/1" in err  # tqdm on stderr


def test_usage_errors(models, batch_run, capsys):
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--v-start-sec", 0, "--stride-sec", 1],
                           capsys)
    assert rc == 2 and err.startswith("error: ") and "not both" in err and not out
    with pytest.raises(SystemExit):  # argparse: --json and --jsonl exclude each other
        cli.main(["predict", str(batch_run["a"]), "--checkpoint", str(models["offset"]), "--json", "--jsonl"])
    assert "not allowed with argument" in capsys.readouterr().err
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--sync-checkpoint", models["offset"]],
                           capsys)
    assert rc == 2 and err.count("\n") == 1 and "synchronizability" in err and str(models["offset"]) in err
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", batch_run["folder"] / "nothing"], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--devices", 9], capsys)
    assert rc == 2 and err == "error: --devices 9: this process has 8 local device(s)\n" and not out


def test_model_folder_given_as_a_relative_path(batch_run, models, capsys, monkeypatch):
    """orbax restores only absolute paths; `--checkpoint models/x` from the README must work."""
    monkeypatch.chdir(models["offset"].parent)
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"].name, "--json", "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads(out)["videos"][0]["ok"]


def test_one_window_that_does_not_fit_is_an_error_for_that_file(batch_run, models, capsys):
    # 6.2 s: video 2-7 s does not fit (the reference parity test covers windows that do).
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--v-start-sec", 2.0,
                            "--offset-sec", 1.0, "--json", "--no-progress"], capsys)
    assert rc == 1
    doc = json.loads(out)
    check_document(doc, 1)
    (a,) = doc["videos"]
    check_record(a)
    assert not a["ok"] and "does not fit" in a["error"]
    assert err.splitlines()[0] == f"error: {a['error']}" and str(batch_run["a"]) in err


# ------------------------------------------------- offsets, windows, argument checks


def test_bad_offsets_and_non_finite_arguments_are_usage_errors(models, batch_run, capsys):
    """An offset outside the class grid has no class (official example.py only warns and
    labels it with the end class); NaN / infinity would fail per file. All: exit 2, one
    line, before any file is read."""
    a, model = batch_run["a"], models["offset"]
    cases = [(["--offset-sec", 4.9], "outside the model's class grid [-2, 2]"),
             (["--offset-sec", -2.1], "outside the model's class grid"),
             (["--offset-sec", "inf"], "--offset-sec must be a finite"),
             (["--offset-sec", "nan"], "--offset-sec must be a finite"),
             (["--v-start-sec", "nan"], "--v-start-sec must be a finite number >= 0"),
             (["--v-start-sec", -1], "--v-start-sec must be a finite number >= 0"),
             (["--stride-sec", "nan"], "--stride-sec must be a finite number > 0"),
             (["--max-duration-sec", "nan"], "--max-duration-sec must be a finite")]
    for extra, words in cases:
        rc, out, err = run_cli([a, "--checkpoint", model, "--no-progress", *extra], capsys)
        assert rc == 2 and not out and err.count("\n") == 1 and err.startswith("error: "), (extra, err)
        assert words in err, (extra, err)
    # A synchronizability model alone has no offset classes: a large shift is an input.
    rc, out, err = run_cli([batch_run["b"], "--checkpoint", models["sync"], "--offset-sec", 2.5,
                            "--v-start-sec", 0, "--json", "--no-progress"], capsys)
    assert rc == 0 and "warning" not in err and json.loads(out)["videos"][0]["windows"][0]["offset_applied_sec"] == 2.5


def test_offset_between_classes_warns_once_and_is_reported_as_applied(models, batch_run, capsys):
    rc, out, err = run_cli([batch_run["a"], batch_run["b"], "--checkpoint", models["offset"], "--v-start-sec", 0,
                            "--offset-sec", 0.3, "--json", "--no-progress"], capsys)
    assert rc == 0
    (warning,) = err.splitlines()  # once, not per file or window
    assert warning.startswith("warning: --offset-sec +0.30 s is not a class") and "shifted by +0.30 s" in warning
    assert "nearest class, 12 (+0.40 s)" in warning
    for rec in json.loads(out)["videos"]:
        (w,) = rec["windows"]
        # The audio really starts 0.3 s later; the label is the nearest class, as officially.
        assert w["offset_applied_sec"] == 0.3 and w["a_start_sample"] == 4800 and w["offset_applied_class"] == 12
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--v-start-sec", 0,
                            "--offset-sec", 0.4, "--json", "--no-progress"], capsys)
    assert rc == 0 and err == ""  # a class of the grid: no warning


@pytest.mark.parametrize("offset, frames", [(-1.0, [25, 79]), (1.0, [0, 54]), (0.0, [0, 63, 79])])
def test_sliding_windows_with_an_offset_cover_the_clip(models, batch_run, capsys, offset, frames):
    """b: 204 frames / 130 560 samples after EqualifyFromRight, 125-frame windows, stride
    63 frames. A negative offset needs the audio of the first window inside the clip
    (t >= 1 s: frame 25; frame 24 would put it one frame before the start, which the
    official code moves to 0, another shift); a positive one ends the windows where the
    shifted audio ends (t + 1 + 5 <= 8.16 s: frame 54), not at the video's last window."""
    rc, out, err = run_cli([batch_run["b"], "--checkpoint", models["offset"], "--offset-sec", offset,
                            "--stride-sec", 2.5, "--json", "--no-progress"], capsys)
    assert rc == 0, err
    (rec,) = json.loads(out)["videos"]
    assert [w["v_start_frame"] for w in rec["windows"]] == frames
    for w in rec["windows"]:
        t = inference.frame_exact_sec(w["v_start_frame"])
        assert w["a_start_sample"] == int((t + offset) * 16000) >= 0
        assert w["a_start_sample"] + 80000 <= 204 * 640


def test_table_error_line_and_topk_clipped_to_the_classes(models, batch_run, capsys):
    missing = batch_run["missing"]
    rc, out, err = run_cli([missing, "--checkpoint", models["offset"], "--no-progress"], capsys)
    assert rc == 1 and out == f"{missing}: ERROR no such file\n"  # the path once
    assert err.splitlines()[0] == f"error: {missing}: no such file"
    rc, out, err = run_cli([batch_run["a"], "--checkpoint", models["offset"], "--v-start-sec", 0, "--topk", 30,
                            "--json", "--no-progress"], capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["settings"]["topk"] == 21 and len(doc["videos"][0]["windows"][0]["topk"]) == 21
