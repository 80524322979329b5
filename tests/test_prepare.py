"""`prepare`: folders and official lists -> shards + manifest; skipped files; kill and resume; CLI."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from synchformer_jax import cli, prepare as prep, records
from synchformer_jax.input import shards

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_video(path, seconds=2.0, size=(64, 64), seed=0, codec="libx264", fps=25, sr=16000):
    """A small H.264/AAC mp4 whose content depends on `seed` (so clips differ)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            vs.options = {"preset": "ultrafast"}
        aus = c.add_stream("aac", rate=sr)
        aus.layout = "mono"
        base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        t = np.arange(int(seconds * sr)) / sr
        wav = (0.1 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(np.float32)[None]
        for s in range(0, wav.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, s:s + 1024]), format="fltp", layout="mono")
            frame.sample_rate = sr
            for p in aus.encode(frame):
                c.mux(p)
        for p in aus.encode():
            c.mux(p)
    return path


def make_folder(root, n=5, broken=True, seconds=1.0):
    root = pathlib.Path(root)
    for i in range(n):
        make_video(root / ("sub" if i % 2 else "") / f"clip{i:02d}.mp4", seconds=seconds, seed=i)
    if broken:
        (root / "zero.mp4").write_bytes(b"")
        (root / "text.mp4").write_text("this is not a video\n")
    return root


def read_split(out_dir, split):
    return [records.decode(b) for b in shards.iter_records(shards.list_shards(out_dir, split))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("videos"))


# ------------------------------------------------------------------------------ folders

@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_folder_to_shards_with_skipped_files(folder, tmp_path, fmt):
    res = prep.prepare([folder], tmp_path / "out", format=fmt, shard_size=2, num_workers=0, progress=False)
    m = json.loads((tmp_path / "out" / prep.MANIFEST).read_text())
    assert m == res.manifest
    sp = m["splits"]["train"]
    assert sp["format"] == fmt and sp["num_inputs"] == 7 and sp["num_records"] == 5 and sp["num_skipped"] == 2
    # 7 inputs sorted by id -> 4 shards of 2 planned slots; the broken files leave gaps.
    assert [s["file"] for s in sp["shards"]] == [f"clips-train.{fmt}-{i:05d}-of-00004" for i in range(4)]
    assert sum(s["num_records"] for s in sp["shards"]) == 5
    for s in sp["shards"]:
        assert shards.sha256_file(tmp_path / "out" / s["file"]) == s["sha256"]
    reasons = {s["source"]: s["reason"] for s in sp["skipped"]}
    assert set(reasons) == {"zero.mp4", "text.mp4"}
    assert "empty" in reasons["zero.mp4"] and all("\n" not in r for r in reasons.values())
    assert m["decoder"]["av"] == av.__version__ and m["tool"]["synchformer_jax"]
    recs = read_split(tmp_path / "out", "train")
    ids = [r.clip_id for r in recs]
    assert ids == sorted(ids) == ["clip00", "clip02", "clip04", "sub/clip01", "sub/clip03"]
    assert abs(sp["total_duration_sec"] - sum(r.duration_sec for r in recs)) < 1e-6
    assert recs[0].labels["split"] == "train" and recs[3].source == "sub/clip01.mp4"
    assert recs[0].audio.dtype == np.float32 and recs[0].num_frames > 0


def test_pool_and_inline_give_identical_shards(folder, tmp_path):
    a = prep.prepare([folder], tmp_path / "a", shard_size=3, num_workers=0, progress=False)
    b = prep.prepare([folder], tmp_path / "b", shard_size=3, num_workers=2, progress=False)
    assert a.manifest == b.manifest
    again = prep.prepare([folder], tmp_path / "b", shard_size=3, num_workers=2, progress=False)
    assert again.shards_written == 0 and again.shards_reused == 3 and again.manifest == b.manifest


def test_array_record_random_access(folder, tmp_path):
    prep.prepare([folder], tmp_path, shard_size=2, num_workers=0, progress=False)
    paths = shards.list_shards(tmp_path, "train")
    reader = shards.ArrayRecordShards(paths)
    ids = [records.decode(reader[i]).clip_id for i in range(len(reader))]
    assert records.decode(reader[-1]).clip_id == ids[-1] and len(ids) == 5
    source = shards.data_source(paths)
    assert len(source) == 5 and records.decode(source[2]).clip_id == ids[2]


def test_non_utf8_name_is_reported(tmp_path):
    src = tmp_path / "in"
    make_video(src / "good.mp4", seconds=0.5)
    bad = os.path.join(os.fsencode(src), b"bad\xff.mp4")
    try:
        with open(bad, "wb") as f:
            f.write((src / "good.mp4").read_bytes())
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 names")
    m = prep.prepare([src], tmp_path / "out", num_workers=0, progress=False).manifest
    sp = m["splits"]["train"]
    assert sp["num_records"] == 1
    (skip,) = sp["skipped"]
    assert skip["source"].startswith("b'") and "\\xff" in skip["source"] and "UTF-8" in skip["reason"]
    json.dumps(m, ensure_ascii=True)


# ------------------------------------------------------------------------- official lists

def test_vggsound_list_with_fixed_offsets_and_filters(tmp_path):
    media = tmp_path / "media"
    ids = ["abcdefghijk_0_10000", "abc-efg_ijk_5000_15000", "zzzzzzzzzzz_1000_11000"]
    for i, clip in enumerate(ids[:2]):
        make_video(media / f"{clip}.mp4", seconds=0.5, seed=i)
    lst = tmp_path / "vggsound_test.txt"
    lst.write_text("\n".join(ids) + "\n")
    offsets = tmp_path / "test_size21_crop5_min-2.00_max2.00.csv"
    offsets.write_text("path,offset_sec,vstart_sec\n" + "".join(f"{c},0.4,2.28\n" for c in ids))
    flt = tmp_path / "filters"
    flt.mkdir()
    (flt / "filtered_broken.txt").write_text("abc-efg_ijk_5000_15000.mp4\n")

    m = prep.prepare([lst], tmp_path / "out", media_root=media, num_workers=0, progress=False).manifest
    sp = m["splits"]["test"]  # split from the list's name
    assert sp["name"] == "vggsound" and sp["shards"][0]["file"].startswith("vggsound-test.array_record-")
    assert sp["num_records"] == 2 and sp["skipped"][0]["clip_id"] == "zzzzzzzzzzz_1000_11000"
    assert "no such file" in sp["skipped"][0]["reason"]

    meta = tmp_path / "vggsound.csv"
    meta.write_text("abcdefghijk,0,dog barking,test\nabc-efg_ijk,5,cat purring,test\n")
    m = prep.prepare([offsets], tmp_path / "out2", media_root=media, exclude=[flt], meta=[meta], num_workers=0,
                     progress=False).manifest
    sp = m["splits"]["test"]
    assert sp["num_records"] == 1 and sp["num_excluded"] == 1 and sp["excluded_by"] == {"filtered_broken.txt": 1}
    (rec,) = read_split(tmp_path / "out2", "test")
    assert rec.labels == {"dataset": "vggsound", "label": "dog barking", "target": 1, "offset_sec": 0.4,
                          "vstart_sec": 2.28, "split": "test"}
    assert rec.source == "abcdefghijk_0_10000.mp4"


def test_several_lists_give_several_splits(tmp_path):
    media = tmp_path / "media"
    for i, clip in enumerate(["aaaaaaaaaaa_0_10000", "bbbbbbbbbbb_0_10000", "ccccccccccc_0_10000"]):
        make_video(media / f"{clip}.mp4", seconds=0.5, seed=i)
    (tmp_path / "vggsound_valid.txt").write_text("aaaaaaaaaaa_0_10000\n")
    (tmp_path / "vggsound_test.txt").write_text("bbbbbbbbbbb_0_10000\nccccccccccc_0_10000\n")
    m = prep.prepare([tmp_path / "vggsound_valid.txt", tmp_path / "vggsound_test.txt"], tmp_path / "out",
                     media_root=media, num_workers=0, progress=False).manifest
    assert {k: v["num_records"] for k, v in m["splits"].items()} == {"test": 2, "valid": 1}
    # Preparing one split again keeps the other in the manifest.
    m2 = prep.prepare([tmp_path / "vggsound_test.txt"], tmp_path / "out", media_root=media, num_workers=0,
                      progress=False).manifest
    assert m2 == m


def test_lrs3_ids_map_to_nested_files(tmp_path):
    media = tmp_path / "lrs3"
    make_video(media / "pretrain" / "-MTRxRO5SRA" / "00002.mp4", seconds=0.5)
    lst = tmp_path / "lrs3_test.txt"
    lst.write_text("pretrain/-MTRxRO5SRA/00002\n")
    m = prep.prepare([lst], tmp_path / "out", media_root=media, num_workers=0, progress=False).manifest
    assert m["splits"]["test"]["shards"][0]["file"] == "lrs3-test.array_record-00000-of-00001"
    (rec,) = read_split(tmp_path / "out", "test")
    assert rec.clip_id == "pretrain/-MTRxRO5SRA/00002"


def test_changed_inputs_need_overwrite(folder, tmp_path):
    prep.prepare([folder], tmp_path, shard_size=4, num_workers=0, progress=False)
    with pytest.raises(prep.PrepareError, match="different inputs"):
        prep.prepare([folder], tmp_path, shard_size=3, num_workers=0, progress=False)
    m = prep.prepare([folder], tmp_path, shard_size=3, num_workers=0, progress=False, overwrite=True).manifest
    assert len(m["splits"]["train"]["shards"]) == 3
    assert sorted(p.name for p in tmp_path.glob("clips-train.*")) == [s["file"] for s in m["splits"]["train"]["shards"]]


def crashing_loader(path, clip_id=None, labels=None, max_duration_sec=None):
    """Stands in for a decoder that segfaults on one file (module level: workers import it)."""
    if os.path.basename(path).startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    from synchformer_jax import media

    return media.load_clip(path, clip_id=clip_id, labels=labels, max_duration_sec=max_duration_sec)


def test_worker_crash_skips_only_that_clip(tmp_path):
    src = make_folder(tmp_path / "in", n=3, broken=False, seconds=0.5)
    make_video(src / "crash.mp4", seconds=0.5, seed=9)
    m = prep.prepare([src], tmp_path / "out", shard_size=2, num_workers=2, progress=False,
                     loader=crashing_loader).manifest
    sp = m["splits"]["train"]
    assert sp["num_records"] == 3 and [s["source"] for s in sp["skipped"]] == ["crash.mp4"]
    assert "crashed" in sp["skipped"][0]["reason"]


def nan_audio_loader(path, *, clip_id, labels, max_duration_sec=None):
    """`media.load_clip`, except that files named `nan*` come back with NaN samples, as a
    loader reading damaged float PCM would give them."""
    from synchformer_jax import media

    rec = media.load_clip(path, clip_id=clip_id, labels=labels, max_duration_sec=max_duration_sec)
    if os.path.basename(path).startswith("nan"):
        rec.audio = np.array(rec.audio)
        rec.audio[100:110] = np.nan
    return rec


def test_a_clip_with_non_finite_audio_is_skipped_and_listed(tmp_path):
    src = make_folder(tmp_path / "in", n=2, broken=False, seconds=0.5)
    make_video(src / "nan.mp4", seconds=0.5, seed=5)
    m = prep.prepare([src], tmp_path / "out", shard_size=4, num_workers=0, progress=False,
                     loader=nan_audio_loader).manifest
    sp = m["splits"]["train"]
    assert sp["num_records"] == 2 and [s["source"] for s in sp["skipped"]] == ["nan.mp4"]
    assert "10 non-finite sample(s)" in sp["skipped"][0]["reason"]
    assert sorted(r.clip_id for r in read_split(tmp_path / "out", "train")) == ["clip00", "sub/clip01"]


# ------------------------------------------------------------------------- kill and resume

def test_sigkill_then_rerun_gives_the_same_output(tmp_path):
    src = make_folder(tmp_path / "in", n=8, broken=True, seconds=1.0)
    clean = prep.prepare([src], tmp_path / "clean", shard_size=1, num_workers=0, progress=False).manifest

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "synchformer_jax.cli", "prepare", str(src), "--out", str(out),
           "--shard-size", "1", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # Own session, so the kill reaches the worker processes too (a real `kill -9` of a
    # job would take its process group).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = out / prep.JOURNAL_DIR / "train"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and len(list(journal.glob("shard-*.json"))) < 2:
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list(journal.glob("shard-*.json")))
    assert 2 <= done_before < 10 and not (out / prep.MANIFEST).exists()

    res = prep.prepare([src], out, shard_size=1, num_workers=0, progress=False)
    assert res.shards_reused >= done_before and res.shards_written == 10 - res.shards_reused
    assert res.manifest == clean
    assert not list(out.rglob("*.tmp-*"))
    for s in clean["splits"]["train"]["shards"]:
        assert (out / s["file"]).read_bytes() == (tmp_path / "clean" / s["file"]).read_bytes()


# ------------------------------------------------------------------------------------ CLI

def test_cli_prepare(folder, tmp_path, capsys):
    assert cli.main(["prepare", str(folder), "--out", str(tmp_path), "--workers", "0", "--shard-size", "4",
                     "--format", "tfrecord", "--split", "valid", "--no-progress"]) == 0
    m = json.loads((tmp_path / prep.MANIFEST).read_text())
    assert m["splits"]["valid"]["num_records"] == 5
    assert "2 skipped" in capsys.readouterr().out


def test_cli_single_file_failure_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_text("nope")
    assert cli.main(["prepare", str(bad), "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "broken.mp4" in err and "\n" not in err


@pytest.mark.parametrize("args", [["--format", "parquet"], ["--shard-size", "0"], ["--list-format", "kinetics"]])
def test_cli_bad_arguments(folder, tmp_path, args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", str(folder), "--out", str(tmp_path), *args])
    assert e.value.code != 0


def test_cli_missing_input(tmp_path, capsys):
    assert cli.main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
