"""`synchformer-jax` command line.

Subcommands: `convert` (official checkpoints <-> model folders), `info`, `prepare`.
Errors on user input are one line naming the file, with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
from typing import Any, Optional, Sequence

import numpy as np


def _parse_overrides(items: Optional[Sequence[str]]) -> dict[str, Any]:
    """`["video.num_heads=4", "dtype=bfloat16"]` -> typed dict (Python literals where they parse)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _count(tree: Any) -> int:
    import jax

    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def cmd_convert(args: argparse.Namespace) -> int:
    from flax import traverse_util

    from synchformer_jax import export, pretrained
    from synchformer_jax.models import convert_torch

    src = pathlib.Path(args.source)
    modules = args.modules.split(",") if args.modules else None
    loaded = pretrained.load_model(src, overrides=_parse_overrides(args.set), modules=modules)
    print(f"loaded {src}: kind={loaded.config.kind} head={loaded.config.sync.head} "
          f"segments={loaded.config.n_segments} params={_count(loaded.params):,}")
    for note in loaded.notes:
        print(f"  note: {note}")
    for name, sub in loaded.params.items():
        print(f"  {name:<16} {_count(sub):>12,}")

    # Both directions every time: the params must come back to the same state dict.
    state_dict = convert_torch.flax_to_torch(loaded.params, loaded.passthrough)
    again = convert_torch.torch_to_flax(state_dict, loaded.config, modules=modules)
    mismatched = [k for k, v in traverse_util.flatten_dict(again.params).items()
                  if not np.array_equal(v, traverse_util.flatten_dict(loaded.params)[k])]
    if mismatched:
        raise SystemExit(f"error: {src}: round trip changed {len(mismatched)} tensors, e.g. {mismatched[0]}")
    print(f"round trip flax -> torch -> flax: exact ({len(state_dict)} official tensors)")

    if args.out:
        provenance = {"source": str(src), "source_sha256": pretrained.sha256_of(src) if src.is_file() else None,
                      "notes": loaded.notes, "modules": modules}
        out = pretrained.save_model(args.out, loaded.params, loaded.config, passthrough=loaded.passthrough,
                                    provenance=provenance, overwrite=args.overwrite)
        print(f"wrote model folder {out}")
    if args.torch_out:
        export.save_torch_state_dict(args.torch_out, loaded.params, loaded.config, loaded.passthrough)
        print(f"wrote PyTorch-compatible state dict {args.torch_out}")
    if not args.out and not args.torch_out:
        print("nothing written (give --out and/or --torch-out)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from synchformer_jax import pretrained

    loaded = pretrained.load_model(args.source, overrides=_parse_overrides(args.set))
    print(json.dumps({"config": loaded.config.to_dict(), "params": _count(loaded.params),
                      "notes": loaded.notes}, indent=1))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from synchformer_jax import prepare

    try:
        result = prepare.prepare(
            args.inputs, args.out, format=args.format, split=args.split, name=args.name,
            list_format=args.list_format, media_root=args.media_root, num_workers=args.workers,
            shard_size=args.shard_size, exclude=args.exclude or (),
            meta=args.meta or (), max_duration_sec=args.max_duration_sec,
            min_duration_sec=args.min_duration_sec, overwrite=args.overwrite, progress=not args.no_progress)
    except prepare.PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = result.manifest["splits"]
    for split in result.splits:
        s = splits[split]
        print(f"{split}: {s['num_records']} clips ({s['total_duration_sec'] / 3600:.2f} h) in "
              f"{len(s['shards'])} {s['format']} shards, {s['num_skipped']} skipped, {s['num_excluded']} excluded")
    print(f"wrote {result.out_dir / prepare.MANIFEST} ({result.shards_written} shards written, "
          f"{result.shards_reused} reused from an earlier run)")
    # One media file that could not be used is an error of the command, not a report.
    if len(args.inputs) == 1 and pathlib.Path(args.inputs[0]).is_file() and not _is_list(args):
        skipped = [s for sp in splits.values() for s in sp["skipped"]]
        if skipped and not sum(sp["num_records"] for sp in splits.values()):
            print(f"error: {args.inputs[0]}: {skipped[0]['reason']}", file=sys.stderr)
            return 1
    return 0


def _is_list(args: argparse.Namespace) -> bool:
    from synchformer_jax import prepare

    return args.list_format not in ("auto", "folder") or \
        pathlib.Path(args.inputs[0]).suffix.lower() in prepare.LIST_SUFFIXES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="videos (folders, files) or official lists -> ArrayRecord/TFRecord "
                                       "shards + manifest.json; resumes after an interruption")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folder of videos (recursive), video file, or official list/CSV (VGGSound, LRS3, "
                        "AudioSet ids; fixed-offset CSVs)")
    p.add_argument("--out", required=True, help="output folder (rerun into it to resume)")
    p.add_argument("--format", choices=("array_record", "tfrecord"), default="array_record")
    p.add_argument("--list-format", default="auto",
                   choices=("auto", "folder", "vggsound", "lrs3", "audioset", "fixed_offsets", "sparse_fixed_offsets"))
    p.add_argument("--media-root", help="folder holding <id>.mp4 for list inputs (default: the list's folder)")
    p.add_argument("--split", help="split name for all inputs (default: from the list name, else train)")
    p.add_argument("--name", help="dataset name in shard file names (default: vggsound/lrs3/audioset or clips)")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: all cores; 0: inline)")
    p.add_argument("--shard-size", type=_positive_int, default=1024, help="clips per shard")
    p.add_argument("--exclude", action="append", metavar="LIST",
                   help="filter list file or folder of lists whose ids are left out (repeatable)")
    p.add_argument("--meta", action="append", metavar="CSV",
                   help="class labels for list inputs: VGGSound's vggsound.csv (repeatable)")
    p.add_argument("--max-duration-sec", type=float, help="keep at most this much of each clip")
    p.add_argument("--min-duration-sec", type=float, help="skip clips shorter than this (official: 9)")
    p.add_argument("--overwrite", action="store_true", help="replace a split prepared from other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synchformer-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="official checkpoint (.pt/.pth/.safetensors) or model folder -> "
                                       "model folder and/or PyTorch-compatible safetensors")
    p.add_argument("source", help="official .pt/.pth (stage I, II, III, MMAudio), .safetensors, or a model folder")
    p.add_argument("--out", help="write a model folder here (orbax params + model_config.json)")
    p.add_argument("--torch-out", help="write an official-layout state dict (.safetensors) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    p.add_argument("--modules", help="convert only these top-level modules, comma separated "
                                     "(e.g. vfeat_extractor for MMAudio's visual-only file)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. video.num_heads=4 (repeatable)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("info", help="print the model config and parameter count of a checkpoint")
    p.add_argument("source")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_info)

    _add_prepare_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from synchformer_jax import pretrained, torch_pickle
    from synchformer_jax.models import convert_torch

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (torch_pickle.TorchFileError, torch_pickle.UnsafePickleError, convert_torch.ConversionError,
            pretrained.CheckpointError) as e:
        message = str(e)
        source = str(getattr(args, "source", ""))
        if source and source not in message:
            message = f"{source}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
