"""Named lists: the official VGGSound-Sparse (Picked, Clean) test list and the
synchronizability test list, built from the official files plus VGGSound's meta csv.

Rules (official `dataset/vggsound.py`: VGGSound -> VGGSoundSparse ->
VGGSoundSparsePickedCleanTest; `scripts/test_syncability.py`): meta rows on a filter list
go first (lines compared verbatim), a clip's class is the last remaining meta row of its
YouTube id, clips = split list ids with a meta row, classes marked `y` in
picked_sparse_classes.csv; the synchronizability list also drops 10 clips < 9.6 s.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from synchformer_jax import cli, datasets, prepare as prep
from synchformer_jax.evaluators import coverage
from synchformer_jax.input import shards
from tests.test_prepare import make_video
from tests.test_shards import official_data_dir

SHORT = "-7tYmeOmsRg_180000_190000"  # one of the 10 clips of scripts/test_syncability.py

# A synthetic vggsound.csv (ytid,start_sec,label,split; no header) and the clips it makes.
META_ROWS = [
    "aaaaaaaaaaa,0,dog barking,test",  # picked, in the test list: listed
    'bbbbbbbbbbb,5,"lions roaring",test',  # picked, but on the extra filter list
    "ccccccccccc,1,airplane,test",  # not a picked class
    "ddddddddddd,2,dog barking,train",  # picked, train split (not in vggsound_test.txt)
    "-7tYmeOmsRg,180,lions roaring,test",  # picked; one of the 10 short clips
    "eeeeeeeeeee,0,dog barking,test",  # csv says test, but vggsound_test.txt does not list it
    "ggggggggggg,0,dog barking,test",  # in the test list, but the id's last row is airplane ...
    "ggggggggggg,30,airplane,train",  # ... so its class is airplane (official video2target by ytid)
    "hhhhhhhhhhh,0,airplane,test",  # the converse: the id's last row is a picked class
    "hhhhhhhhhhh,40,lions roaring,train",
    "iiiiiiiiiii,0,dog barking,test",  # the id's last row is filtered out, so ...
    "iiiiiiiiiii,20,airplane,train",  # ... the class comes from the row before
    "jjjjjjjjjjj,0,dog barking,test",  # filtered_broken.txt writes it with .mp4: no match, kept
    "kkkkkkkkkkk,000030,dog barking,test",  # zero-padded start, as in VGGSound's csv
]
TEST_LIST = ["aaaaaaaaaaa_0_10000", "bbbbbbbbbbb_5000_15000", "ccccccccccc_1000_11000", SHORT,
             "fffffffffff_3000_13000",  # no meta row: not listed
             "ggggggggggg_0_10000", "hhhhhhhhhhh_0_10000", "iiiiiiiiiii_0_10000", "jjjjjjjjjjj_0_10000",
             "kkkkkkkkkkk_30000_40000"]
# The official lists for these files; targets index the sorted picked classes.
DOG, LIONS = {"label": "dog barking", "target": 0}, {"label": "lions roaring", "target": 1}
SPARSE_TEST = [(SHORT, LIONS), ("aaaaaaaaaaa_0_10000", DOG), ("hhhhhhhhhhh_0_10000", LIONS),
               ("iiiiiiiiiii_0_10000", DOG), ("jjjjjjjjjjj_0_10000", DOG), ("kkkkkkkkkkk_30000_40000", DOG)]


def make_official_dir(root, meta_rows=META_ROWS):
    """The official data/ layout with synthetic contents (every official filter file present)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vggsound_test.txt").write_text("\n".join(TEST_LIST) + "\n")
    (root / "picked_sparse_classes.csv").write_text(
        "class\tis_sparse\nairplane\tn\ndog barking\ty\nlions roaring\ty\n")
    for name in datasets.OFFICIAL_FILES:
        if name.startswith(("filtered_examples_vggsound/", "filtered_examples_vggsound_extra/")):
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_text("")
    (root / "filtered_examples_vggsound_extra" / "test_failed_manual_inspection.txt").write_text(
        "bbbbbbbbbbb_5000_15000\n")
    (root / "filtered_examples_vggsound" / "145.txt").write_text("iiiiiiiiiii_20000_30000\n")
    (root / "filtered_examples_vggsound" / "filtered_broken.txt").write_text("jjjjjjjjjjj_0_10000.mp4\n")
    (root / "vggsound.csv").write_text("\n".join(meta_rows) + "\n")
    return root


def as_pairs(entries):
    return [(e.clip_id, e.labels) for e in entries]


def test_synthetic_lists_follow_the_official_rules(tmp_path):
    d = make_official_dir(tmp_path / "lists")
    entries, removed = datasets.build_named_list("vggsound_sparse_test", d)
    assert as_pairs(entries) == SPARSE_TEST
    assert removed == {"bbbbbbbbbbb_5000_15000": "test_failed_manual_inspection.txt",
                       "ggggggggggg_0_10000": "class of its YouTube id (last vggsound.csv row) is not picked"}

    entries, removed = datasets.build_named_list("vggsound_sparse_syncability_test", d, meta=d / "vggsound.csv")
    assert as_pairs(entries) == [p for p in SPARSE_TEST if p[0] != SHORT]
    assert removed[SHORT] == datasets.SYNCABILITY_SHORT_REASON and len(removed) == 3


def test_official_facts():
    assert len(datasets.SYNCABILITY_SHORT_CLIPS) == 10 and SHORT in datasets.SYNCABILITY_SHORT_CLIPS
    assert all(datasets.id_format(c) == "vggsound" for c in datasets.SYNCABILITY_SHORT_CLIPS)
    for nl in datasets.NAMED_LISTS.values():
        files = nl.official_files()
        assert all(f in datasets.OFFICIAL_FILES or f in datasets.OFFICIAL_GIT_BLOBS for f in files), files
        assert "filtered_examples_vggsound_extra/test_failed_manual_inspection.txt" in files


@pytest.mark.parametrize("rows, match", [
    (["aaaaaaaaaaa,0"], r"vggsound.csv:1: expected VGGSound's ytid,start_sec,label,split"),
    (["ytid,start,label,split"], r"vggsound.csv:1: expected"),  # a header
    (["aaaaaaaaaaa,0,dog barking,test", "short,0,dog barking,test"], r"vggsound.csv:2: 'short' is not an 11"),
    (["aaaaaaaaaaa,0,dog barking,test"], r"vggsound.csv: has no row of 1 of the 2 classes .*'lions roaring'"),
])
def test_bad_meta_names_the_file(tmp_path, rows, match):
    d = make_official_dir(tmp_path / "lists", meta_rows=rows)
    with pytest.raises(datasets.ListError, match=match):
        datasets.build_named_list("vggsound_sparse_test", d)


def test_missing_official_files_are_named(tmp_path):
    d = make_official_dir(tmp_path / "lists")
    (d / "filtered_examples_vggsound" / "region_tube.txt").unlink()  # a partial copy would filter less
    with pytest.raises(datasets.ListError, match=r"region_tube.txt: missing .*fetch_official"):
        datasets.build_named_list("vggsound_sparse_test", d)
    d = make_official_dir(tmp_path / "lists2")
    (d / "vggsound.csv").unlink()
    with pytest.raises(datasets.ListError, match=r"vggsound.csv: missing \(VGGSound meta; or pass its path\)"):
        datasets.build_named_list("vggsound_sparse_test", d)
    bad_classes = tmp_path / "lists3"
    make_official_dir(bad_classes)
    (bad_classes / "picked_sparse_classes.csv").write_text("class,is_sparse\ndog barking,y\n")  # commas
    with pytest.raises(datasets.ListError, match=r"picked_sparse_classes.csv:1: expected class<TAB>is_sparse"):
        datasets.build_named_list("vggsound_sparse_test", bad_classes)


def test_prepare_named_list_counts_and_coverage(tmp_path, capsys):
    d = make_official_dir(tmp_path / "lists")
    media = tmp_path / "media"
    for i, clip in enumerate(["aaaaaaaaaaa_0_10000", "hhhhhhhhhhh_0_10000"]):
        make_video(media / f"{clip}.mp4", seconds=0.5, seed=i)
    out = tmp_path / "records"
    argv = ["prepare", str(d), "--list", "vggsound_sparse_syncability_test", "--media-root", str(media),
            "--out", str(out), "--workers", "0", "--no-progress"]
    assert cli.main(argv) == 0
    assert "test: 2 clips" in capsys.readouterr().out
    sp = json.loads((out / prep.MANIFEST).read_text())["splits"]["test"]
    assert sp["name"] == "vggsound_sparse_syncability"
    assert sp["num_inputs"] == 5 and sp["num_records"] == 2 and sp["num_skipped"] == 3
    assert sp["excluded_by"] == {datasets.SYNCABILITY_SHORT_REASON: 1, "test_failed_manual_inspection.txt": 1,
                                 "class of its YouTube id (last vggsound.csv row) is not picked": 1}
    cov = coverage.list_coverage([str(p) for p in shards.list_shards(out, "test")])
    assert (cov.listed, cov.prepared, cov.excluded) == (5, 2, 3)
    assert {m["clip_id"] for m in cov.missing} == {"iiiiiiiiiii_0_10000", "jjjjjjjjjjj_0_10000",
                                                   "kkkkkkkkkkk_30000_40000"}
    from tests.test_prepare import read_split

    recs = read_split(out, "test")
    assert [(r.clip_id, r.labels) for r in recs] == [
        ("aaaaaaaaaaa_0_10000", {"dataset": "vggsound_sparse_syncability", **DOG, "split": "test"}),
        ("hhhhhhhhhhh_0_10000", {"dataset": "vggsound_sparse_syncability", **LIONS, "split": "test"})]

    plan = prep.plan_inputs([d], named_list="vggsound_sparse_test", media_root=media, meta=[d / "vggsound.csv"])
    assert plan.name == "vggsound_sparse" and [j.clip_id for j in plan.splits["test"].jobs] == [
        c for c, _ in SPARSE_TEST]


@pytest.mark.parametrize("extra, match", [
    ([], None),  # the meta is missing from the folder: named, with how to get it
    (["--media-root", "MEDIA", "--meta", "a.csv", "--meta", "b.csv"], "reads one VGGSound meta file"),
    (["--media-root", "MEDIA", "--list-format", "vggsound"], "leave --list-format out"),
])
def test_cli_named_list_errors(tmp_path, capsys, extra, match):
    d = make_official_dir(tmp_path / "lists")
    (tmp_path / "media").mkdir()
    args = [a.replace("MEDIA", str(tmp_path / "media")) for a in extra]
    if not extra:
        (d / "vggsound.csv").unlink()
        args = ["--media-root", str(tmp_path / "media")]
    assert cli.main(["prepare", str(d), "--list", "vggsound_sparse_test", "--out", str(tmp_path / "o"),
                     "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert (match or f"{d / 'vggsound.csv'}: missing") in err
    assert cli.main(["prepare", str(d), "--list", "vggsound_sparse_test", "--out", str(tmp_path / "o")]) == 2
    assert "--media-root" in capsys.readouterr().err


def test_git_blob_id_and_fetch(tmp_path):
    src = tmp_path / "vggsound.csv"
    src.write_text("\n".join(META_ROWS) + "\n")
    if shutil.which("git"):
        assert datasets.git_blob_id(src) == subprocess.run(["git", "hash-object", str(src)], capture_output=True,
                                                           text=True, check=True).stdout.strip()
    data = src.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    dest = tmp_path / "lists" / "vggsound.csv"
    assert datasets.fetch(src.as_uri(), dest, git_blob_sha1=blob) == dest and dest.read_bytes() == data
    with pytest.raises(datasets.ChecksumError, match="git blob id"):
        datasets.fetch(src.as_uri(), tmp_path / "other.csv", git_blob_sha1="0" * 40)
    with pytest.raises(ValueError, match="exactly one"):
        datasets.fetch(src.as_uri(), dest)
    with pytest.raises(ValueError, match="40 hex"):
        datasets.fetch(src.as_uri(), dest, git_blob_sha1="0" * 64)
    # fetch_official knows vggsound.csv by its git id; a mirror with other content is refused.
    with pytest.raises(datasets.ChecksumError):
        datasets.fetch_official("vggsound.csv", tmp_path / "o", base_url=tmp_path.as_uri() + "/")


# ------------------------------------------------------------------- the real official files

def test_real_official_files():
    d = official_data_dir()
    # The git blob id of the shared copy is the one in the official tree at OFFICIAL_COMMIT.
    assert datasets.git_blob_id(d / "picked_sparse_classes.csv") == "f087837728cf74a528e4f7a7a223f6688a88696e"
    assert datasets.parse_sparse_classes(d / "picked_sparse_classes.csv") == [
        "chopping wood", "dog barking", "hammering nails", "ice cracking", "lions roaring", "people eating apple",
        "people eating crisps", "people sneezing", "playing badminton", "playing tennis", "skateboarding",
        "striking bowling"]
    test = set(datasets.parse_vggsound_list(d / "vggsound_test.txt"))
    assert datasets.SYNCABILITY_SHORT_CLIPS <= test
    # One of the 10 is already on the extra (manual inspection) list of the Clean test set.
    extra = datasets.official_filter_ids(d / "filtered_examples_vggsound_extra")
    assert sorted(datasets.SYNCABILITY_SHORT_CLIPS & set(extra)) == ["F9bJVVYgFl4_73000_83000"]
    # VGGSoundSparsePickedCleanTestFixedOffsets: the 444 is_sync rows minus the VGGSound
    # filter lists (not the extra one) = 439, all in the test split.
    fixed = set(datasets.parse_sparse_fixed_offsets_csv(d / "vggsound_sparse_clean_fixed_offsets.csv"))
    assert fixed <= test
    assert len(fixed - set(datasets.official_filter_ids(d / "filtered_examples_vggsound"))) == 439


def test_real_official_files_with_a_stand_in_meta(tmp_path):
    """vggsound.csv is not here: a stand-in that gives the 600 annotated clips of
    vggsound_sparse_clean.csv a picked class and every other test clip another one. The
    counts check that every real filter list is read (verbatim) and applied."""
    d = official_data_dir()
    import csv

    with open(d / "vggsound_sparse_clean.csv", newline="") as f:
        annotated = {(r["video_id"], int(r["start_sec"])) for r in csv.DictReader(f)}
    rows = [f"{y},{s},dog barking,test" for y, s in sorted(annotated)]
    for c in sorted(datasets.parse_vggsound_list(d / "vggsound_test.txt")):
        ytid, start = c[:11], int(c[12:].split("_")[0]) // 1000
        if (ytid, start) not in annotated and ytid not in {y for y, _ in annotated}:
            rows.append(f"{ytid},{start},airplane,test")
    classes = datasets.parse_sparse_classes(d / "picked_sparse_classes.csv")
    rows += [f"{chr(97 + i) * 11},0,{c},train" for i, c in enumerate(classes)]
    meta = tmp_path / "vggsound.csv"
    meta.write_text("\n".join(rows) + "\n")
    sparse, removed = datasets.build_named_list("vggsound_sparse_test", d, meta)
    # 555 annotated clips are in vggsound_test.txt; 13 are on filtered_examples_vggsound,
    # 95 more on the extra list (its 103 are all annotated test clips, 8 also on the first).
    assert len(sparse) == 447 and len(removed) == 555 - 447
    assert sum(v == "test_failed_manual_inspection.txt" for v in removed.values()) == 95
    sync, removed = datasets.build_named_list("vggsound_sparse_syncability_test", d, meta)
    assert len(sync) == 438  # F9bJVVYgFl4_73000_83000 was already out
    assert {e.clip_id for e in sparse} - {e.clip_id for e in sync} == datasets.SYNCABILITY_SHORT_CLIPS - {
        "F9bJVVYgFl4_73000_83000"}
