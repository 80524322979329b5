"""`synchformer-jax` command line.

Subcommands so far: `convert` (official checkpoints <-> model folders) and `info`.
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

    from synchformer_jax import checkpoint, export
    from synchformer_jax.models import convert_torch

    src = pathlib.Path(args.source)
    modules = args.modules.split(",") if args.modules else None
    loaded = checkpoint.load_model(src, overrides=_parse_overrides(args.set), modules=modules)
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
        provenance = {"source": str(src), "source_sha256": checkpoint.sha256_of(src) if src.is_file() else None,
                      "notes": loaded.notes, "modules": modules}
        out = checkpoint.save_model(args.out, loaded.params, loaded.config, passthrough=loaded.passthrough,
                                    provenance=provenance, overwrite=args.overwrite)
        print(f"wrote model folder {out}")
    if args.torch_out:
        export.save_torch_state_dict(args.torch_out, loaded.params, loaded.config, loaded.passthrough)
        print(f"wrote PyTorch-compatible state dict {args.torch_out}")
    if not args.out and not args.torch_out:
        print("nothing written (give --out and/or --torch-out)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from synchformer_jax import checkpoint

    loaded = checkpoint.load_model(args.source, overrides=_parse_overrides(args.set))
    print(json.dumps({"config": loaded.config.to_dict(), "params": _count(loaded.params),
                      "notes": loaded.notes}, indent=1))
    return 0


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from synchformer_jax import checkpoint, torch_pickle
    from synchformer_jax.models import convert_torch

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (torch_pickle.TorchFileError, torch_pickle.UnsafePickleError, convert_torch.ConversionError,
            checkpoint.CheckpointError) as e:
        message = str(e)
        source = str(getattr(args, "source", ""))
        if source and source not in message:
            message = f"{source}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
