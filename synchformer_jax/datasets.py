"""The official Synchformer dataset lists: parsing, id -> media file, fetching by URL.

Formats (facts from the official repository's `data/` folder):

* VGGSound split lists `vggsound_{train,valid,test}.txt`: one id per line,
  `<ytid>_<startms>_<endms>` (YouTube ids are 11 characters and may contain `_`/`-`).
* LRS3 lists `lrs3_{train,valid,test}.txt`: `pretrain/<video>/<clip>`.
* AudioSet ids: `<eval|balanced|unbalanced>/<ytid>_<startms>_<endms>`; the files live under
  the long folder names (`eval_segments`, `balanced_train_segments`,
  `unbalanced_train_segments`), which the AudioSet filter lists also use.
* VGGSound meta `vggsound.csv` (no header): `ytid,start_sec,label,split`; the class index is
  the label's position among the sorted unique labels.
* Fixed-offset CSVs `fixed_offsets_<dataset>/<split>_size21_crop5_min-2.00_max2.00.csv`:
  header `path,offset_sec,vstart_sec`, keys as above.
* `vggsound_sparse_clean_fixed_offsets.csv`: header
  `dataset_name,video_id,vstart_sec,offset_sec,is_sync`; only `is_sync == 1` rows are used.
* Filter lists `filtered_examples_*/ *.txt`: one id per line (some with `.mp4`).
* `picked_sparse_classes.csv` (tab separated, header `class  is_sparse`): the 12
  VGGSound-Sparse classes are the rows marked `y`.

Named lists (`NAMED_LISTS`, `build_named_list`) are the lists the official code assembles
from several of these files rather than reads from one: the VGGSound-Sparse (Picked, Clean)
test set and the synchronizability test set (the same minus 10 clips < 9.6 s).

Media files live at `<root>/<id>.mp4` (for LRS3 the id already holds
`pretrain/<video>/<clip>`; AudioSet ids use the long folder name on disk). Nothing here
reads a fixed location: the caller passes the files, or fetches them by URL with a
pinned sha256 (see `data/README.md` for the official files and their checksums).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
import re
import tempfile
import urllib.request
from typing import Iterable, Optional, Union

from synchformer_jax.input.shards import sha256_file

PathLike = Union[str, os.PathLike]

LIST_FORMATS = ("vggsound", "lrs3", "audioset", "fixed_offsets", "sparse_fixed_offsets")
SPLITS = ("train", "valid", "test")

_YT = r"[A-Za-z0-9_-]{11}"
ID_PATTERNS = {
    "vggsound": re.compile(rf"^{_YT}_\d+_\d+$"),
    "lrs3": re.compile(r"^pretrain/[A-Za-z0-9_-]+/\d+$"),
    "audioset": re.compile(rf"^(eval|balanced|unbalanced)(_segments|_train_segments)?/{_YT}_\d+_\d+$"),
}
# AudioSet: short folder names in ids and fixed-offset keys -> folder names on disk.
AUDIOSET_DIRS = {"eval": "eval_segments", "balanced": "balanced_train_segments",
                 "unbalanced": "unbalanced_train_segments"}
_AUDIOSET_SHORT = {v: k for k, v in AUDIOSET_DIRS.items()}


def canonical_id(clip_id: str) -> str:
    """One spelling per clip: AudioSet long folder names become the short ones (`eval/...`)."""
    head, sep, tail = clip_id.partition("/")
    if sep and head in _AUDIOSET_SHORT:
        return f"{_AUDIOSET_SHORT[head]}/{tail}"
    return clip_id


class ListError(ValueError):
    """A list / CSV that does not follow its format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class FixedOffset:
    offset_sec: float  # audio shift relative to video, a grid value in [-2, 2]
    vstart_sec: float  # video crop start (multiples of 0.04 s; see official_spec §4.7 on truncation)


# --------------------------------------------------------------------------- reading

def _lines(path: PathLike) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]


def _parse_ids(path: PathLike, fmt: str) -> list[str]:
    pattern = ID_PATTERNS[fmt]
    ids = []
    for lineno, line in _lines(path):
        if not pattern.match(line):
            raise ListError(f"{path}:{lineno}: {line!r} is not a {fmt} clip id")
        ids.append(canonical_id(line))
    return ids


def parse_vggsound_list(path: PathLike) -> list[str]:
    """`vggsound_{train,valid,test}.txt` -> ids `<ytid>_<startms>_<endms>`, file order."""
    return _parse_ids(path, "vggsound")


def parse_lrs3_list(path: PathLike) -> list[str]:
    """`lrs3_{train,valid,test}.txt` -> ids `pretrain/<video>/<clip>`."""
    return _parse_ids(path, "lrs3")


def parse_audioset_list(path: PathLike) -> list[str]:
    """AudioSet lists -> ids `<eval|balanced|unbalanced>/<ytid>_<startms>_<endms>`."""
    return _parse_ids(path, "audioset")


def _read_csv(path: PathLike, required: Iterable[str]) -> list[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = set(required) - set(reader.fieldnames or ())
        if missing:
            raise ListError(f"{path}:1: header {reader.fieldnames} lacks {sorted(missing)}")
        return [(i, row) for i, row in enumerate(reader, 2)]


def _float(path, lineno, row, key) -> float:
    try:
        return float(row[key])  # Python float parsing, as the official code (exactness matters)
    except (TypeError, ValueError):
        raise ListError(f"{path}:{lineno}: {key}={row.get(key)!r} is not a number") from None


def parse_fixed_offsets_csv(path: PathLike) -> dict[str, FixedOffset]:
    """`path,offset_sec,vstart_sec` CSV -> {clip id: FixedOffset}; duplicate ids must agree."""
    out: dict[str, FixedOffset] = {}
    for lineno, row in _read_csv(path, ("path", "offset_sec", "vstart_sec")):
        key = canonical_id(row["path"].strip())
        value = FixedOffset(_float(path, lineno, row, "offset_sec"), _float(path, lineno, row, "vstart_sec"))
        if out.setdefault(key, value) != value:
            raise ListError(f"{path}:{lineno}: {key!r} appears twice with different offsets")
    return out


def sparse_fixed_offsets_rows(path: PathLike) -> list[tuple[str, FixedOffset, bool]]:
    """Every row of `vggsound_sparse_clean_fixed_offsets.csv`: (video_id, offsets, is_sync).

    Ids repeat across rows (a clip annotated more than once, usually with one `is_sync`
    row), so this is a list, not a dict.
    """
    return [(row["video_id"].strip(),
             FixedOffset(_float(path, lineno, row, "offset_sec"), _float(path, lineno, row, "vstart_sec")),
             row["is_sync"].strip() == "1")
            for lineno, row in _read_csv(path, ("video_id", "vstart_sec", "offset_sec", "is_sync"))]


def parse_sparse_fixed_offsets_csv(path: PathLike) -> dict[str, FixedOffset]:
    """`vggsound_sparse_clean_fixed_offsets.csv` -> {video_id: FixedOffset} of the `is_sync == 1`
    rows (444 of 646). The official `VGGSoundSparsePickedCleanTestFixedOffsets` keeps these
    after the `filtered_examples_vggsound` lists, which drop 5 of them: 439 clips evaluated
    (`prepare --exclude filtered_examples_vggsound`)."""
    out: dict[str, FixedOffset] = {}
    for key, value, is_sync in sparse_fixed_offsets_rows(path):
        if is_sync and out.setdefault(key, value) != value:
            raise ListError(f"{path}: {key!r} has two is_sync rows with different offsets")
    return out


@dataclasses.dataclass(frozen=True)
class MetaRow:
    lineno: int
    ytid: str
    clip_id: str  # `<ytid>_<start*1000>_<(start+10)*1000>`
    label: str


def _vggsound_csv_rows(path: PathLike) -> list[MetaRow]:
    """`vggsound.csv` rows in file order, read as the official code reads them
    (`csv.reader(quotechar='"')`, no header; the split column is not needed)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f, quotechar='"'), 1) if r]
    out = []
    for lineno, r in rows:
        try:
            start, label = int(r[1]), r[2]
        except (IndexError, ValueError):
            raise ListError(f"{path}:{lineno}: expected VGGSound's ytid,start_sec,label,split "
                            f"(no header), got {r!r}") from None
        out.append(MetaRow(lineno, r[0], f"{r[0]}_{start * 1000}_{(start + 10) * 1000}", label))
    return out


def parse_vggsound_meta(path: PathLike) -> dict[str, dict]:
    """`vggsound.csv` (`ytid,start_sec,label,split`, no header) -> {clip id: labels}.

    Labels: `{"label": name, "target": class index}`, the index being the label's rank
    among the sorted unique labels, as the official VGGSound dataset numbers classes.
    """
    rows = _vggsound_csv_rows(path)
    target = {label: t for t, label in enumerate(sorted({r.label for r in rows}))}
    return {r.clip_id: {"label": r.label, "target": target[r.label]} for r in rows}


def merge_fixed_offsets(*tables: dict[str, FixedOffset]) -> dict[str, FixedOffset]:
    """One dict from several splits' tables, as the official loader does; duplicates must agree."""
    out: dict[str, FixedOffset] = {}
    for table in tables:
        for key, value in table.items():
            if out.setdefault(key, value) != value:
                raise ListError(f"clip {key!r} has different fixed offsets in different files")
    return out


def parse_filter_lists(paths: Iterable[PathLike]) -> dict[str, str]:
    """Filter lists (files, or folders of `*.txt`) -> {clip id: name of the list that drops it}.

    Some lists (`filtered_broken.txt`, the LRS3 ones) write ids with a `.mp4` suffix and
    the AudioSet ones use long folder names; both are normalised so that the ids compare
    equal to the split lists'.
    """
    out: dict[str, str] = {}
    files: list[pathlib.Path] = []
    for p in paths:
        p = pathlib.Path(p)
        files.extend(sorted(p.glob("*.txt")) if p.is_dir() else [p])
    for f in files:
        for _, line in _lines(f):
            out.setdefault(canonical_id(line[:-4] if line.endswith(".mp4") else line), f.name)
    return out


# --------------------------------------------------------------------------- named lists

# scripts/test_syncability.py, get_set_of_video_ids_shorter_than_9_6_sec (official code at
# OFFICIAL_COMMIT): the synchronizability test leaves these VGGSound-Sparse clips out as
# shorter than 9.6 s. Facts copied from there (the script writes them with ".mp4").
SYNCABILITY_SHORT_CLIPS = frozenset({
    "-7tYmeOmsRg_180000_190000", "1_Q80fDGLRM_10000_20000", "8qsCZLEoA1Q_4000_14000",
    "F9bJVVYgFl4_73000_83000", "KQAR_64a35I_11000_21000", "TgJHM5oSWio_8000_18000",
    "U9PyY8Ldf9A_5000_15000", "aUfDxRelPHg_22000_32000", "cLpDBj--as0_8000_18000",
    "cRT5SWbyA54_4000_14000",
})
SYNCABILITY_SHORT_REASON = "shorter than 9.6 s (scripts/test_syncability.py)"


@dataclasses.dataclass(frozen=True)
class NamedList:
    """A clip list the official code assembles from several files of its `data/` folder.

    The files are found by their official names in one folder (the layout `fetch_official`
    writes); the VGGSound meta `vggsound.csv` may live elsewhere.
    """
    dataset: str  # dataset name of the shards
    split: str
    split_list: str  # the VGGSound split ids
    classes: str  # TSV `class<TAB>is_sparse`: the classes marked `y` are kept
    filters: tuple[str, ...]  # folders whose every *.txt removes meta rows (official filter_bad_examples)
    drop: frozenset = frozenset()  # further clip ids removed after that
    drop_reason: str = ""
    official: str = ""  # what it reproduces

    def official_files(self) -> list[str]:
        """The OFFICIAL_FILES / OFFICIAL_GIT_BLOBS names it reads (fetch them with `fetch_official`)."""
        names = [self.split_list, self.classes, "vggsound.csv"]
        names += sorted(n for n in OFFICIAL_FILES if n.split("/")[0] in self.filters)
        return names


_SPARSE_FILTERS = ("filtered_examples_vggsound", "filtered_examples_vggsound_extra")
NAMED_LISTS = {
    "vggsound_sparse_test": NamedList(
        "vggsound_sparse", "test", "vggsound_test.txt", "picked_sparse_classes.csv", _SPARSE_FILTERS,
        official="dataset/vggsound.py: VGGSoundSparsePickedCleanTest('test'), the README's VGGSound-Sparse"),
    "vggsound_sparse_syncability_test": NamedList(
        "vggsound_sparse_syncability", "test", "vggsound_test.txt", "picked_sparse_classes.csv",
        _SPARSE_FILTERS, SYNCABILITY_SHORT_CLIPS, SYNCABILITY_SHORT_REASON,
        official="scripts/test_syncability.py: VGGSoundSparsePickedCleanTest('test') minus the clips "
                 "shorter than 9.6 s"),
}


def read_vggsound_meta_rows(path: PathLike) -> list[MetaRow]:
    """`vggsound.csv` rows in file order (`_vggsound_csv_rows`), refusing an empty file
    and ids that are not YouTube ids (a file that is not VGGSound's meta)."""
    rows = _vggsound_csv_rows(path)
    if not rows:
        raise ListError(f"{path}: empty; expected VGGSound's vggsound.csv (ytid,start_sec,label,split)")
    for r in rows:
        if not re.fullmatch(_YT, r.ytid):
            raise ListError(f"{path}:{r.lineno}: {r.ytid!r} is not an 11-character YouTube id")
    return rows


def parse_sparse_classes(path: PathLike) -> list[str]:
    """`picked_sparse_classes.csv` / `sparse_classes.csv` (tab separated `class,is_sparse`, with a
    header) -> the sorted classes marked `y`; a class's position is its VGGSound-Sparse target."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f, quotechar='"', delimiter="\t"), 1) if r]
    for lineno, r in rows:
        if len(r) < 2:
            raise ListError(f"{path}:{lineno}: expected class<TAB>is_sparse, got {r!r}")
    classes = sorted({r[0] for _, r in rows if r[1] == "y"})
    if not classes:
        raise ListError(f"{path}: no class is marked 'y' in its is_sparse column")
    return classes


def official_filter_ids(folder: PathLike) -> dict[str, str]:
    """Every line of every `*.txt` in `folder` -> the file's name, compared verbatim as the
    official `filter_bad_examples` does (a line written `<id>.mp4` then matches no clip;
    `parse_filter_lists` normalises those, which can differ for the class of a YouTube id)."""
    out: dict[str, str] = {}
    for f in sorted(pathlib.Path(folder).glob("*.txt")):
        with open(f, encoding="utf-8") as fh:
            for line in fh.read().splitlines():
                out.setdefault(line, f.name)
    return out


def _official_path(official_dir: pathlib.Path, name: str, what: str) -> pathlib.Path:
    path = official_dir / name
    if not path.exists():
        raise ListError(f"{path}: missing ({what}); get it with "
                        f"synchformer_jax.datasets.fetch_official({name!r}, {str(official_dir)!r})")
    return path


def build_named_list(name: str, official_dir: PathLike, meta: Optional[PathLike] = None
                     ) -> tuple[list[ListEntry], dict[str, str]]:
    """One of NAMED_LISTS, exactly as the official code assembles it.

    `official_dir` holds the official `data/` files under their names; `meta` is VGGSound's
    `vggsound.csv` (default `<official_dir>/vggsound.csv`). The rules, from
    `dataset/vggsound.py` (VGGSound -> VGGSoundSparse -> VGGSoundSparsePickedCleanTest):

    1. meta rows whose clip id is a line of a filter list are dropped (`filter_bad_examples`;
       both `filtered_examples_vggsound/` and `filtered_examples_vggsound_extra/`);
    2. a clip's class is the label of the *last* remaining meta row of its YouTube id
       (`video2target` is keyed by the 11-character id);
    3. the clips are the split list's ids that have a remaining meta row (the csv's split
       column is not read), sorted;
    4. only the classes marked `y` in `picked_sparse_classes.csv` are kept; labels become
       `{"label": class, "target": its index among the sorted picked classes}`;
    5. then the list's `drop` ids go (`scripts/test_syncability.py`: 10 clips < 9.6 s).

    Returns the entries (sorted by id) and, for reporting, {clip id: why it is not listed}
    of the split's clips of a picked class (by their own meta row) that the rules removed.
    `vggsound_sparse_clean.csv` plays no part (only the fixed-offset variant has its own CSV).
    """
    if name not in NAMED_LISTS:
        raise ListError(f"unknown list {name!r}; known: {', '.join(NAMED_LISTS)}")
    nl = NAMED_LISTS[name]
    official_dir = pathlib.Path(official_dir)
    if not official_dir.is_dir():
        raise ListError(f"{official_dir}: not a folder (expected the official data/ files)")
    split_ids = parse_vggsound_list(_official_path(official_dir, nl.split_list, "VGGSound split ids"))
    classes = parse_sparse_classes(_official_path(official_dir, nl.classes, "the picked classes"))
    bad: dict[str, str] = {}
    for folder in nl.filters:
        _official_path(official_dir, folder, "official filter lists")
        for fname in (n for n in OFFICIAL_FILES if n.split("/")[0] == folder):
            _official_path(official_dir, fname, "official filter list")  # a partial copy would filter less
        for clip, list_name in official_filter_ids(official_dir / folder).items():
            bad.setdefault(clip, list_name)
    meta_path = pathlib.Path(meta) if meta is not None else _official_path(
        official_dir, "vggsound.csv", "VGGSound meta; or pass its path")
    rows = read_vggsound_meta_rows(meta_path)
    absent = sorted(set(classes) - {r.label for r in rows})
    if absent:
        raise ListError(f"{meta_path}: has no row of {len(absent)} of the {len(classes)} classes of "
                        f"{nl.classes} ({', '.join(map(repr, absent[:3]))}{', ...' if len(absent) > 3 else ''}); "
                        "expected VGGSound's vggsound.csv")

    kept = [r for r in rows if r.clip_id not in bad]
    ytid_label = {r.ytid: r.label for r in kept}  # the last row of an id wins, as in the official dict
    available = {r.clip_id for r in kept}
    target = {c: t for t, c in enumerate(classes)}
    entries, dropped = [], {}
    own_label = {r.clip_id: r.label for r in rows}
    for clip in sorted(set(split_ids)):
        if clip in available and ytid_label[clip[:11]] in target:
            if clip in nl.drop:
                dropped[clip] = nl.drop_reason
            else:
                label = ytid_label[clip[:11]]
                entries.append(ListEntry(clip, {"label": label, "target": target[label]}))
        elif own_label.get(clip) in target:  # a picked clip the rules removed: say why
            dropped[clip] = bad.get(clip, "class of its YouTube id (last vggsound.csv row) is not picked")
    return entries, dropped


# --------------------------------------------------------------------------- detection

def detect_list_format(path: PathLike) -> str:
    """Which of LIST_FORMATS a list/CSV file is, from its header or first id."""
    lines = _lines(path)
    if not lines:
        raise ListError(f"{path}: empty list")
    first = lines[0][1]
    header = [c.strip() for c in first.split(",")]
    if header[:3] == ["path", "offset_sec", "vstart_sec"]:
        return "fixed_offsets"
    if {"video_id", "vstart_sec", "offset_sec", "is_sync"} <= set(header):
        return "sparse_fixed_offsets"
    for fmt, pattern in ID_PATTERNS.items():
        if pattern.match(first):
            return fmt
    raise ListError(f"{path}:{lines[0][0]}: cannot tell the list format from {first!r} "
                    f"(expected one of {', '.join(LIST_FORMATS)})")


def id_format(clip_id: str) -> Optional[str]:
    for fmt, pattern in ID_PATTERNS.items():
        if pattern.match(clip_id):
            return fmt
    return None


def split_from_name(path: PathLike) -> Optional[str]:
    """`vggsound_test.txt` -> 'test', `test_size21_crop5_....csv` -> 'test', else None."""
    stem = pathlib.Path(path).stem
    m = re.search(r"(?:^|_)(train|valid|test)(?:_|$)", stem)
    return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class ListEntry:
    clip_id: str
    labels: dict


def read_list(path: PathLike, list_format: str = "auto") -> tuple[str, list[ListEntry]]:
    """Any official list/CSV -> (format, entries in file order); fixed offsets become labels."""
    fmt = detect_list_format(path) if list_format == "auto" else list_format
    if fmt in ID_PATTERNS:
        # Every line is checked against the format (given or detected from line 1).
        return fmt, [ListEntry(i, {}) for i in _parse_ids(path, fmt)]
    if fmt in ("fixed_offsets", "sparse_fixed_offsets"):
        table = (parse_fixed_offsets_csv(path) if fmt == "fixed_offsets"
                 else parse_sparse_fixed_offsets_csv(path))
        return fmt, [ListEntry(k, {"offset_sec": v.offset_sec, "vstart_sec": v.vstart_sec})
                     for k, v in table.items()]
    raise ListError(f"{path}: unknown list format {list_format!r}; expected auto or one of {', '.join(LIST_FORMATS)}")


def media_path(root: PathLike, clip_id: str, ext: str = ".mp4") -> pathlib.Path:
    """Where the official layout keeps a clip: `<root>/<id><ext>` (ids may hold folders;
    AudioSet's `eval/x` lives at `<root>/eval_segments/x<ext>`)."""
    if clip_id.startswith("/") or ".." in clip_id.split("/"):
        raise ListError(f"clip id {clip_id!r} points outside the media folder")
    *folders, name = clip_id.split("/")
    if len(folders) == 1 and folders[0] in AUDIOSET_DIRS and id_format(clip_id) == "audioset":
        folders = [AUDIOSET_DIRS[folders[0]]]
    return pathlib.Path(root, *folders, name + ext)


def find_media(root: PathLike, clip_id: str, ext: str = ".mp4") -> pathlib.Path:
    """`media_path`, or `<root>/<id><ext>` verbatim when only that exists (AudioSet kept
    under the short folder names)."""
    official = media_path(root, clip_id, ext)
    if not official.exists():
        *folders, name = clip_id.split("/")
        plain = pathlib.Path(root, *folders, name + ext)
        if plain.exists():
            return plain
    return official


# --------------------------------------------------------------------------- fetching

class ChecksumError(IOError):
    pass


# The official repository's `data/` files at a pinned commit, with their sha256 (computed
# from the repository at that commit). Files absent here (audioset.csv, a few AudioSet
# filter lists and the train fixed offsets of VGGSound / AudioSet) are too large for the
# snapshot the checksums came from: fetch them with `fetch` and a checksum you computed
# from a copy you trust. `vggsound.csv` is pinned by its git blob id instead (below).
OFFICIAL_COMMIT = "b66668a1521d7567cc760e5544b2b5b53179b687"
OFFICIAL_BASE_URL = f"https://raw.githubusercontent.com/v-iashin/Synchformer/{OFFICIAL_COMMIT}/data/"
OFFICIAL_FILES = {
    "audioset_labels.csv": "38240592340c0ec89cab52727f4d499ea4f6bece8b5f0cc7b9c96a2d0c37c90a",
    "filtered_examples_audioset/less_than_9s_in_frames.txt": "7a08db37070fe246b5959383a3911e53976e3e1e8c16561daf5d6ea1d4e5e67a",
    "filtered_examples_lrs/less_than_9s.txt": "cca92c838cd3db4997bb6f18ebd257e3620c96f5b8cc74ab280124e44730ee32",
    "filtered_examples_lrs/less_than_9s_corr_names.txt": "0e92b7e13be222586bc1886c2fbcb689e15902556652cafc2438302a38424cc3",
    "filtered_examples_lrs_extra/less_than_9.5s.txt": "4e9bd1fd4467174a7ecea67a502313f35ac74fe437cfd19120159a4700d263cf",
    "filtered_examples_vggsound/145.txt": "c98b56b2e95cf6819bd93b5669d8d262dcb111e396832dd8f6e372382876934a",
    "filtered_examples_vggsound/190.txt": "0871636453127340310e36f4f5a24119964b1ac090f240053cde739be73043dc",
    "filtered_examples_vggsound/299.txt": "5511aef6fc842ad541c34559595d1fdf4aa715be77cf46ac82b77894669984d3",
    "filtered_examples_vggsound/filtered_80_video_has_still_frames.txt": "479dc5f2b0ed5ce914bc1e72fd3f75377b93568e10543a9522455e503a62304c",
    "filtered_examples_vggsound/filtered_audio_has_0_std.txt": "5d87afa10c61fa8cf7611aa51637a8fa2939fa62ebdac0cb9036b9c863f95271",
    "filtered_examples_vggsound/filtered_broken.txt": "9c1af5483a222a89ba56ee87c09fa98af1e7b0d59cb8671e9fcb0289340654a0",
    "filtered_examples_vggsound/filtered_in_0_dists_group.txt": "499fab60ea67c798796c7a6f774f230c94f902bbb1b2aaf4e39933f3504eec15",
    "filtered_examples_vggsound/filtered_manually_found.txt": "80bbd2601923c4dc8dfa99325e1c6327659804c8c1ebb991d0a3952d05779a03",
    "filtered_examples_vggsound/less_than_9s_frames_segments.txt": "be79923b18e0a7a88c8e7315afa4f28404aec596483d4abf4ba75d24f1bf9280",
    "filtered_examples_vggsound/region_app.txt": "e8c3093ee847dfe7bd7f06d99d42f0d09dba40e6e6a4a7a2db85de6f1589f630",
    "filtered_examples_vggsound/region_babies.txt": "d266e2e223c90ed7964671faf71aa42be00900b2e65a67aa2fe8244656fb970f",
    "filtered_examples_vggsound/region_bird.txt": "1b0b9547413136c1bf1ed5d471f4cb3e22353b7b17c3f3a59ab6d9754abf5131",
    "filtered_examples_vggsound/region_blue_circle.txt": "31fe03147ea2172827be064f4b3741dbddc21cd23a3a6c2c85d4c426369fcef1",
    "filtered_examples_vggsound/region_flipped.txt": "57d748560e1a1697a59aa7ea7899217742cea5e77c09bde0a922bdc0725092df",
    "filtered_examples_vggsound/region_footsteps.txt": "8423dd8349573952dcfa06b1599318f582e70972dac4391192b95c5894468b15",
    "filtered_examples_vggsound/region_tube.txt": "fecdc8070323c311d7744b1679460d2b683696070ef91fef9215ceea8db568ae",
    "filtered_examples_vggsound_extra/test_failed_manual_inspection.txt": "e3d52b441d25c54bcc55948ceb2159b9a4d61e99c876756ea6a31a85a7afee68",
    "filtered_examples_vggsound_shorter/less_than_9.5s.txt": "1f2e43b27061906ebc7dcde1c345a9ff3542325464327e6884c4aeac5b27ab79",
    "fixed_offsets_audioset/test_size21_crop5_min-2.00_max2.00.csv": "80e8130f87499a289dd9785ea48bd051bc56b0fd8b0764e458ff42e9c619ff1d",
    "fixed_offsets_audioset/valid_size21_crop5_min-2.00_max2.00.csv": "072c4979930654e4983a72fbace4dc3260265e9cbe9768b5d543641adb5d091a",
    "fixed_offsets_lrs3/test_size21_crop5_min-2.00_max2.00.csv": "f0c730466836f4dd5b9144ac45c25c09eaebe69bb204ededca30f4462fad415e",
    "fixed_offsets_lrs3/train_size21_crop5_min-2.00_max2.00.csv": "e07d56d6db5e77ef231b662c8035a68a57a98e96a37c7c1bb304cc7d79e89024",
    "fixed_offsets_lrs3/valid_size21_crop5_min-2.00_max2.00.csv": "72bb3625109f6fc990de35e0afe92dce8d7b51e9fbaf02b4a5f029df7b54f5ed",
    "fixed_offsets_vggsound/test_size21_crop5_min-2.00_max2.00.csv": "74acd77730060043c3e9cc21b63076b2b772e9cb992cf47b39fb3509a4824bae",
    "fixed_offsets_vggsound/valid_size21_crop5_min-2.00_max2.00.csv": "b83ffa6c63c72abf9e9471f9651be6c0a5b5f1644fa0852d5a930527f4d44cb4",
    "lrs3_test.txt": "1b55367312cabd90a2cecbe22779ecc98952fad157d328b803882a4884088df9",
    "lrs3_train.txt": "80e81dabe15abeaab46b3d408fa83928fad95171dfa2bfc4dc8b60d3b958335c",
    "lrs3_valid.txt": "1fadebff69192ef7ae4a94312a51015d6407bf219348fd141d7abf64f1d7522d",
    "picked_sparse_classes.csv": "d03a7d73d88e309995ef13c135c896367e666873aaaf2e135f8ffe39424e103e",
    "vggsound_sparse_clean.csv": "32332bfe8af249b1441214ada2d29c2064e04b4a7aa6becac3c2bb0fde6efcaf",
    "vggsound_sparse_clean_fixed_offsets.csv": "aded674cb97d6ca496b182b1801a69bdba5d6c9f1fc43547d934c4538d6fc961",
    "vggsound_test.txt": "742338bad5c6b64d99e6595cd627412c2ff91d4d7aef0cfc0b6956121544b3e0",
    "vggsound_train.txt": "fda6bc82a75a86cabc3f2dffd6564ab9537b77f67baa5b3f8cd867147a0b8fcd",
    "vggsound_valid.txt": "8a80d419b4f6689f6f6a51ac30bfa29ce7ecaf8821fed061d511a5b436a94a9c",
}


# Official files whose sha256 is not known here, pinned by their git blob id in the tree of
# OFFICIAL_COMMIT (`git ls-tree`): SHA-1 of b"blob <size>\0" + content, as `git hash-object`.
# vggsound.csv is VGGSound's meta (also published at
# https://www.robots.ox.ac.uk/~vgg/data/vggsound/vggsound.csv, not verified to be identical);
# the official code reads this copy.
OFFICIAL_GIT_BLOBS = {
    "vggsound.csv": "dbcbf5b74781d564a456af5587cd85227a4517aa",
}


def fetch_official(name: str, dest_dir: PathLike, *, base_url: str = OFFICIAL_BASE_URL) -> pathlib.Path:
    """Download one official file (a key of OFFICIAL_FILES or OFFICIAL_GIT_BLOBS) to
    `dest_dir/<name>`, verified."""
    dest = pathlib.Path(dest_dir, *name.split("/"))
    if name in OFFICIAL_GIT_BLOBS:
        return fetch(base_url + name, dest, git_blob_sha1=OFFICIAL_GIT_BLOBS[name])
    if name not in OFFICIAL_FILES:
        known = sorted({*OFFICIAL_FILES, *OFFICIAL_GIT_BLOBS})
        raise KeyError(f"{name!r} is not a known official file; known: {', '.join(known)}")
    return fetch(base_url + name, dest, OFFICIAL_FILES[name])


def git_blob_id(path: PathLike) -> str:
    """The id git gives the file's content (`git hash-object`)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))  # noqa: S324 - git's id, not a security hash
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: PathLike, sha256: Optional[str] = None, *, git_blob_sha1: Optional[str] = None,
          timeout: float = 60.0) -> pathlib.Path:
    """Download `url` to `dest` unless it is already there with the right checksum.

    A checksum is required, the sha256 or (for files known only by their git id) the git
    blob id: lists decide what is evaluated, so a silently changed file would change
    reported numbers. The file appears under `dest` only once verified.
    """
    dest = pathlib.Path(dest)
    if (sha256 is None) == (git_blob_sha1 is None):
        raise ValueError("give exactly one checksum: sha256 or git_blob_sha1")
    kind, digits, digest = (("sha256", 64, sha256_file) if sha256 is not None
                            else ("git blob id", 40, git_blob_id))
    given = sha256 if sha256 is not None else git_blob_sha1
    expected = given.lower().strip()
    if not re.fullmatch(rf"[0-9a-f]{{{digits}}}", expected):
        raise ValueError(f"{kind} {given!r} is not {digits} hex digits")
    if dest.is_file() and digest(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        actual = digest(tmp)
        if actual != expected:
            raise ChecksumError(f"{url}: {kind} {actual} does not match the expected {expected}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
