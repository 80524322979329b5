"""`synchformer-jax` command line.

Subcommands: `convert` (official checkpoints <-> model folders), `info`, `prepare`,
`train` and `eval` (ml_collections configs with `--config.x.y=value` overrides), `demo`,
`predict` (synchformer_jax/predict.py), `desync` (desync_eval.py), `attribute` (attribution.py),
`export` (serving.py).
Errors on user input are one line naming the file, with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import pathlib
import re
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
    from synchformer_jax.input.shards import sha256_file
    from synchformer_jax.models import convert_torch

    src = pathlib.Path(args.source)
    modules = args.modules.split(",") if args.modules else None
    loaded = pretrained.load_model(src, overrides=_parse_overrides(args.set), modules=modules)
    sync = loaded.config.sync
    grid = (f" classes={sync.num_offset_classes} (+-{sync.max_offset_sec:g} s)"
            if loaded.config.kind == "sync" and sync.head == "offset" else "")
    print(f"loaded {src}: kind={loaded.config.kind} head={sync.head}{grid} "
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
        provenance = {"source": str(src), "source_sha256": sha256_file(src) if src.is_file() else None,
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
            min_duration_sec=args.min_duration_sec, overwrite=args.overwrite, progress=not args.no_progress,
            named_list=args.named_list)
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
    from synchformer_jax import datasets

    p.add_argument("--list", dest="named_list", metavar="NAME", choices=tuple(datasets.NAMED_LISTS),
                   help="a list the official code assembles from several files: INPUT is the folder of the "
                        "official data/ files, --meta VGGSound's vggsound.csv (default INPUT/vggsound.csv); "
                        + "; ".join(f"{k}: {v.official}" for k, v in datasets.NAMED_LISTS.items()))
    p.add_argument("--max-duration-sec", type=float, help="keep at most this much of each clip")
    p.add_argument("--min-duration-sec", type=float, help="skip clips shorter than this (official: 9)")
    p.add_argument("--overwrite", action="store_true", help="replace a split prepared from other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_prepare)


# ---------------------------------------------------------------- train / eval --------
# `--config FILE[:ARG]` is an ml_collections config file (`get_config(ARG)`); every other
# `--config.a.b=value` on the command line overrides one field, type-checked against the
# field's current value by `ml_collections.config_flags` (a typo is an error naming the
# field, with a "did you mean"). The absl flags live in a private `FlagValues`, so the
# other subcommands and library users never see them.
class ConfigError(ValueError):
    """A config file or a `--config.*` override that cannot be applied."""


def load_config(spec: str, overrides: Sequence[str] = ()):
    """`configs/sync.py:vggsound` + `["--config.optim.lr=1e-5", ...]` -> locked ConfigDict."""
    from absl import flags
    from ml_collections import config_flags

    path = spec.split(":", 1)[0]
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"{path}: no such config file")
    argv = ["synchformer-jax", f"--config={spec}", *overrides]
    for arg in overrides:
        if not arg.startswith(("--config.", "-config.")) and arg.startswith("-") and not _is_number(arg):
            raise ConfigError(f"unknown option {arg.split('=', 1)[0]} (config fields are --config.<field>=VALUE)")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
        config = fv.config
    except (AttributeError, KeyError) as e:  # unknown field: name the whole path, keep the suggestion
        bad = _unknown_override(spec, overrides)
        hint = re.search(r"Did you mean [^?]*\?", str(e).replace("\\", ""))
        raise ConfigError(f"--config.{bad}: no such field in {spec}" + (f" ({hint.group(0)})" if hint else "")) from e
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:  # keep the config file's own error line
            message = f"{spec}: " + message.strip().splitlines()[-1]
        elif "is not supported for overriding" in message:
            message = (message.split(" is not supported")[0].replace("Type <class 'NoneType'> of field", "field")
                       + " defaults to None, which cannot be overridden from the command line; "
                         "set it in a config file")
        raise ConfigError(message) from e
    except Exception as e:  # errors raised by the config file itself
        raise ConfigError(f"{spec}: {type(e).__name__}: {e}") from e
    from synchformer_jax import experiment

    try:
        experiment.check_values(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _unknown_override(spec: str, overrides: Sequence[str]) -> str:
    """The first `--config.a.b` override whose path the unmodified config lacks."""
    base = load_config(spec)
    for arg in overrides:
        if not arg.lstrip("-").startswith("config."):
            continue
        path = arg.lstrip("-").split("=", 1)[0][len("config."):]
        node = base
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                return path
            node = node[part]
    return "?"


def _distributed_reason() -> Optional[str]:
    """Why this process is one of several (the env the launchers set), or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    return None


def init_distributed(mode: str = "auto") -> None:
    """`jax.distributed.initialize()` before anything touches a device.

    auto: when the environment names several processes (SLURM with more than one task,
    Open MPI, or `JAX_COORDINATOR_ADDRESS`); on: always (Cloud TPU pod slices, whose
    metadata JAX reads itself); off: never. Arguments come from the environment (JAX's
    cluster detection, `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
    `JAX_LOCAL_DEVICE_IDS`).
    """
    import jax

    reason = _distributed_reason() if mode == "auto" else ("--distributed on" if mode == "on" else None)
    if not reason:
        return
    kw = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    logging.getLogger(__name__).info("jax.distributed: process %d of %d (%s), %d local / %d global devices",
                                     jax.process_index(), jax.process_count(), reason,
                                     jax.local_device_count(), jax.device_count())


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # orbax logs every checkpoint phase at INFO through absl.
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.WARNING)


def _json_default(x: Any):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    _setup_logging(args.verbose)
    init_distributed(args.distributed)
    from synchformer_jax import train
    from synchformer_jax.input import pipeline

    pipeline.mark_absl_flags_parsed()  # grain workers read an absl flag (no app.run here)
    final = train.train_and_evaluate(config, args.workdir)
    print(json.dumps({k: v for k, v in final.items() if not isinstance(v, (list, dict))}, default=_json_default))
    return 0


def _apply_split(config, split: str):
    """`--split test`: the config's `test` group (README protocol) replaces the valid set."""
    if split == "valid":
        return config
    if "test" not in config:
        raise ConfigError("--split test: the config has no `test` group (shards, rounds, fixed_offsets)")
    with config.unlocked():
        config.data.eval_shards = config.test.shards
        config.data.eval_rounds = config.test.rounds
        config.data.fixed_offsets = config.test.fixed_offsets
    return config


EVAL_SKIPS_SHOWN = 50  # skipped records listed in the eval JSON; skipped.jsonl has every one


def cmd_eval(args: argparse.Namespace) -> int:
    from synchformer_jax import experiment

    config = _apply_split(load_config(args.config, args.overrides), args.split)
    if args.offset_checkpoint and config.stage != experiment.STAGE_SYNCHRONIZABILITY:
        raise ConfigError(f"--offset-checkpoint: offsets are scored next to a synchronizability model; "
                          f"{args.config} is a {config.stage} config")
    _setup_logging(args.verbose)
    init_distributed(args.distributed)
    import jax

    from synchformer_jax import checkpoint, train
    from synchformer_jax.evaluators.coverage import list_coverage
    from synchformer_jax.metric_writers import json_values
    from synchformer_jax.input import pipeline
    from synchformer_jax.skip_log import SkipLog, gather_items

    pipeline.mark_absl_flags_parsed()
    workdir = pathlib.Path(args.workdir)
    trainer = train.build_trainer(config)
    train.check_batch_sizes(config, trainer.mesh, training=False)
    want = trainer.task.model_config
    if args.checkpoint in ("best", "latest"):
        which = checkpoint.BEST if args.checkpoint == "best" else checkpoint.CHECKPOINTS
        if not (workdir / which).is_dir():
            raise ConfigError(f"{workdir / which}: no {args.checkpoint} checkpoints (was {workdir} trained?)")
        params, saved = checkpoint.restore_params(workdir, which)
        if saved.replace(dtype=want.dtype) != want:
            raise ConfigError(f"{workdir / which}: the checkpoint's model differs from the config's "
                              f"(checkpoint {saved.to_dict()}, config {want.to_dict()})")
        with checkpoint.ocp.CheckpointManager((workdir / which).absolute(),
                                              item_names=("state", "data", "config")) as mngr:
            step = mngr.latest_step()
    else:  # a model folder or an official / converted file: all of the model must be in it
        from synchformer_jax import pretrained

        loaded = pretrained.load_model(args.checkpoint, overrides=dict(config.init_overrides))
        if loaded.config.replace(dtype=want.dtype) != want:
            raise ConfigError(f"{args.checkpoint}: its model ({loaded.config.kind}, head {loaded.config.sync.head}, "
                              f"{loaded.config.n_segments} segments) differs from the config's")
        params, step = loaded.params, None
    params = jax.device_put(params, trainer.state_shardings.params)
    offset_model = _offset_model(args.offset_checkpoint, config, trainer) if args.offset_checkpoint else None
    # Exactly the shards the config names for this split (the train shards only when they
    # are the evaluation set); generated clips only when no shards are configured at all.
    eval_paths = train.eval_data_paths(config, workdir)
    coverage = list_coverage(eval_paths)
    skips = pipeline.SkipReport()
    skip_log = SkipLog(workdir, jax.process_index(), jax.process_count())
    try:
        batches = train.eval_batches(config, trainer.task, eval_paths,
                                     spec=offset_model.task.example_spec if offset_model else None)
        metrics = train.evaluate(trainer, params, batches, config.train.eval_max_batches, skips=skips,
                                 offset_model=offset_model)
    except train.EmptyEvaluationError as e:
        print(f"error: {train.eval_data_spec(config, workdir)}: {e}", file=sys.stderr)
        return 1
    finally:
        skip_log.append(f"eval_{args.split}", step, skips.items, checkpoint=args.checkpoint)
    record = {"checkpoint": args.checkpoint, "step": step, "split": args.split, "stage": config.stage,
              "eval_shards": train.eval_data_spec(config, workdir), "eval_files": eval_paths,
              "eval_rounds": config.data.eval_rounds, "fixed_offsets": config.data.fixed_offsets,
              "metrics": metrics,
              **({"offset_checkpoint": args.offset_checkpoint,
                  "example_segments": offset_model.task.example_spec.segments} if offset_model else {}),
              # The first skipped records of every process (each host skips only in its own
              # slice); all of them are in skipped.jsonl (skipped.<process>.jsonl).
              "skipped": gather_items(skips.items, EVAL_SKIPS_SHOWN), "skipped_log": str(skip_log.path)}
    if coverage is not None:
        record["coverage"] = coverage.report(metrics.get("clips_evaluated"))
    name = f"eval_{args.split}_{pathlib.Path(args.checkpoint).name}.json"
    out = pathlib.Path(args.out) if args.out else workdir / name
    if jax.process_index() == 0:
        warning = coverage.warning(metrics.get("clips_evaluated")) if coverage is not None else None
        if warning:
            print(warning, file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_values(record), indent=1, default=_json_default, allow_nan=False))
        scalars = {k: v for k, v in json_values(metrics).items() if isinstance(v, (int, float)) or v is None}
        print(json.dumps(scalars, allow_nan=False))
        print(f"wrote {out}")
    return 0


def _offset_model(path: str, config, trainer):
    """`--offset-checkpoint`: the stage-II model, at the config's compute dtype, on the
    trainer's mesh; a file that cannot be read or does not fit is one line naming it."""
    from synchformer_jax import pretrained, torch_pickle, train
    from synchformer_jax.models import convert_torch

    try:
        # The synchronizability config's init_overrides describe its init_from, which is
        # the stage-II model (sizes a state dict does not store).
        loaded = pretrained.load_model(path, overrides=dict(config.init_overrides))
    except (pretrained.CheckpointError, convert_torch.ConversionError, torch_pickle.TorchFileError,
            torch_pickle.UnsafePickleError) as e:
        message = str(e)
        raise ConfigError(f"--offset-checkpoint {message}" if message.startswith(path)
                          else f"--offset-checkpoint {path}: {message}") from None
    model_config = loaded.config.replace(dtype=trainer.task.model_config.dtype)
    try:
        return train.build_offset_model(trainer, loaded.params, model_config)
    except ValueError as e:
        raise ConfigError(f"--offset-checkpoint {path}: {e}") from None


def _add_train_eval_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE[:ARG]",
                        help="ml_collections config file, e.g. configs/sync.py:vggsound; any field can then be "
                             "overridden with --config.<field>=VALUE (e.g. --config.optim.lr=1e-5)")
    common.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, config.json")
    common.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                        help="jax.distributed.initialize(): auto = when SLURM (>1 task), Open MPI or "
                             "JAX_COORDINATOR_ADDRESS say so; on = always (TPU pod slices)")
    common.add_argument("--verbose", action="store_true", help="also orbax's per-checkpoint INFO logs")

    p = sub.add_parser("train", parents=[common], help="train a stage from a config (resumes from --workdir)")
    p.set_defaults(fn=cmd_train, accepts_config_overrides=True)

    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint of --workdir; writes metrics JSON")
    p.add_argument("--checkpoint", default="best",
                   help="best | latest (of --workdir), or a model folder / official .pt / .safetensors")
    p.add_argument("--split", choices=("valid", "test"), default="valid",
                   help="valid: data.eval_shards as in training; test: the config's `test` group "
                        "(README protocol: random offsets, 2 / 25 rounds)")
    p.add_argument("--out", help="metrics JSON path (default: WORKDIR/eval_<split>_<checkpoint>.json)")
    p.add_argument("--offset-checkpoint", metavar="MODEL",
                   help="synchronizability configs: a stage-II offset model (training workdir, model folder or "
                        "official .pt) scored on the same examples, cut to its segments (14: 4.8 s); adds the "
                        "offset metrics of the clips accepted as synchronizable per p threshold (paper Fig. 4 "
                        "right) as metrics.offset_at_sync_threshold")
    p.set_defaults(fn=cmd_eval, accepts_config_overrides=True)


def cmd_cache(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from synchformer_jax import experiment

    if config.stage != experiment.STAGE_SYNC:
        raise ConfigError(f"{args.config} is a {config.stage!r} config; the feature cache serves stage-II "
                          f"({experiment.STAGE_SYNC!r}) training")
    out = args.out or config.data.get("feature_cache", "")
    if not out:
        raise ConfigError("where to: pass --out DIR or set --config.data.feature_cache=DIR")
    try:
        from synchformer_jax.feature_cache_build import parse_part

        part = parse_part(args.part)
    except ValueError as e:
        raise ConfigError(f"--part: {e}") from None
    if args.batch_size < 1 or args.decode_threads < 0:
        raise ConfigError("--batch-size must be >= 1 and --decode-threads >= 0")
    _setup_logging(args.verbose)
    from synchformer_jax import feature_cache_build, train

    workdir = pathlib.Path(args.workdir or out)
    train_paths, _ = train.data_paths(config, workdir)
    manifest = feature_cache_build.build_for_config(
        config, train_paths, out_dir=out, part=part, batch_size=args.batch_size, dtype=args.dtype,
        decode_threads=args.decode_threads, overwrite=args.overwrite)
    summary = {"out": str(out), "part": args.part, "complete": manifest is not None}
    if manifest is not None:
        summary.update(num_clips=manifest["num_clips"], skipped=len(manifest["skipped"]),
                       bytes_per_clip=round(manifest["bytes_per_clip"]),
                       extractor_params_sha256=manifest["extractor_params_sha256"])
    print(json.dumps(summary))
    return 0


def _add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="stage II: the frozen extractors' features of every training clip, computed "
                                     "once (then train with --config.data.feature_cache=DIR)")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="the stage-II config that will train on the cache (its training shards, init_from "
                        "extractors and compute dtype); --config.<field>=VALUE overrides as in train")
    p.add_argument("--out", help="cache folder (default: the config's data.feature_cache)")
    p.add_argument("--workdir", help="where the synthetic set is made when the config names no shards "
                                     "(default: --out)")
    p.add_argument("--part", default="0/1", metavar="I/N",
                   help="build source shards I, I+N, I+2N, ... only: N processes (one per accelerator or host) "
                        "share one build in one folder; the last to finish writes the manifest")
    p.add_argument("--batch-size", type=int, default=64, help="segments per extractor call (default 64)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage dtype of the features (default float16: 2.5 MB per 10-s clip at full size)")
    p.add_argument("--decode-threads", type=int, default=4,
                   help="threads decoding clips ahead of the extractors (0: decode inline; default 4: a 10-s "
                        "clip takes ~0.1-0.15 s of one core to decode and ~0.07 s of an H100 to extract)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild shards that the folder holds from other extractors or settings")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(fn=cmd_cache, accepts_config_overrides=True)


def cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from synchformer_jax import demo

    # Progress lines of the trainer (every `log_every` steps) without library chatter.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("synchformer_jax").setLevel(logging.INFO)
    try:
        results = demo.run_demo(args.workdir, fast=args.fast, config_path=args.config,
                                overrides=_parse_overrides(args.set))
    except KeyError as e:
        print(f"error: --set: {e.args[0]}", file=sys.stderr)
        return 2
    # The full demo fails (exit 1) when it misses its accuracy targets.
    return 0 if (args.fast or results["passed"]) else 1


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="CPU demo: synthetic clips -> stage I -> stage II of a tiny model -> "
                                    "held-out accuracy table and a model folder (<workdir>/model)")
    p.add_argument("--workdir", default="workdir/demo",
                   help="where the data, both runs, results.json and the model go (rerun to resume)")
    p.add_argument("--fast", action="store_true", help="a few steps per stage: checks the set-up in ~1.5 minutes "
                                                        "(accuracy near chance)")
    p.add_argument("--config", help="demo config file (default: configs/demo.py of the source tree)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for both stages (seed=1, data.synthetic_seed=1) or one "
                        "(sync.train.num_steps=2000, segment_avclip.optim.lr=2e-4); repeatable")
    p.set_defaults(fn=cmd_demo)


def cmd_desync(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from synchformer_jax import desync_eval, inference, pretrained
    from synchformer_jax.models.config import HEAD_OFFSET, KIND_SYNC

    def usage(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        windows = desync_eval.window_segments(args.audio_length)
    except ValueError as e:
        return usage(f"--audio-length {args.audio_length}: {e}")
    for folder, flag in ((args.video_dir, "--video-dir"), (args.audio_dir, "--audio-dir")):
        if not pathlib.Path(folder).is_dir():
            return usage(f"{folder}: no such folder ({flag})")
    # A checkpoint problem is exit 2 before any file is read (main() prints it), as in predict.
    loaded = pretrained.load_model(args.checkpoint, overrides=_parse_overrides(args.set))
    config = loaded.config
    if config.kind != KIND_SYNC or config.sync.head != HEAD_OFFSET:
        raise pretrained.CheckpointError(f"{args.checkpoint}: DeSync needs an offset (stage II) model, this one is "
                                         f"kind {config.kind!r} with the {config.sync.head!r} head")
    grid = inference.offset_grid(config)

    def on_clip(clip) -> None:
        tqdm.write(f"{clip.name}  {clip.offsets_sec[0]:+.1f} s  {clip.offsets_sec[1]:+.1f} s  "
                   f"DeSync {clip.desync_sec:.2f} s  ({pathlib.Path(clip.audio).name})", file=sys.stdout)

    def on_excluded(item) -> None:
        tag = "error" if item.kind == "error" else "note"
        tqdm.write(f"{tag}: {item.line()}", file=sys.stderr)

    report = desync_eval.evaluate_desync(
        config, loaded.params, args.video_dir, args.audio_dir, clip_sec=args.audio_length, names=args.names,
        chunk_size=args.chunk_size, on_clip=on_clip, on_excluded=on_excluded, progress=not args.no_progress)
    errors = len(report.errors)
    window_text = " and ".join(f"{a}-{b}" for a, b in windows)
    if report.desync_sec is None:
        print("error: no pair of files could be scored", file=sys.stderr)
    else:
        print(f"DeSync {report.desync_sec:.4f} s: mean over {len(report.clips)} clip(s) of "
              f"{args.audio_length:g} s (segment windows {window_text}); "
              f"{len(report.excluded)} file(s) left out, {errors} of them unreadable or too short")
    if args.json_out:
        lengths = inference.desync_lengths(args.audio_length)
        doc = {"schema": desync_eval.SCHEMA,
               "model": {"path": str(args.checkpoint), "head": config.sync.head, "n_segments": config.n_segments,
                         "dtype": "float32", "matmul_precision": desync_eval.MATMUL_PRECISION,
                         "class_grid_sec": [round(float(g), 6) for g in grid]},
               "settings": {"video_dir": str(args.video_dir), "audio_dir": str(args.audio_dir),
                            "audio_length_sec": args.audio_length, "frames": lengths.frames,
                            "samples": lengths.samples, "segments": lengths.segments, "windows": windows,
                            "names": args.names},
               **report.to_dict()}
        out = pathlib.Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    return 1 if errors or report.desync_sec is None else 0


def _add_desync_parser(sub) -> None:
    from synchformer_jax.desync_eval import NAME_RULES

    p = sub.add_parser("desync", help="av-benchmark's DeSync of generated audio files against their videos "
                                      "(pairs by file name; one number, per-clip results)")
    p.add_argument("--video-dir", required=True, help="folder of .mp4 videos (any frame rate; silent is fine)")
    p.add_argument("--audio-dir", required=True, help="folder of .wav / .flac audio, named like the videos")
    p.add_argument("--audio-length", type=float, default=8.0,
                   help="seconds used of every clip, av-benchmark's --audio_length (default 8; at least 4.8)")
    p.add_argument("--checkpoint", required=True,
                   help="offset model: model folder, official .pt, or MMAudio/av-benchmark's "
                        "synchformer_state_dict.pth (the whole AudioSet model)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. video.num_heads=4 (repeatable)")
    p.add_argument("--names", choices=NAME_RULES, default="stem",
                   help="stem: audio a.wav scores video a.mp4; av-benchmark: audio stems first renamed by "
                        "av-benchmark's VGGSound rule (zxpo56cpUBU_000007-0 -> zxpo56cpUBU_000007)")
    p.add_argument("--chunk-size", type=_positive_int, help="segments per extractor call (bounds memory)")
    p.add_argument("--json-out", metavar="FILE", help="write every clip, every left-out file and the mean here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(fn=cmd_desync)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synchformer-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="official checkpoint (.pt/.pth/.safetensors) or model folder -> "
                                       "model folder and/or PyTorch-compatible safetensors")
    p.add_argument("source", help="official .pt/.pth (stage I, II, III, MMAudio), .safetensors, or a model folder")
    p.add_argument("--out", help="write a model folder here (orbax params + model_config.json)")
    p.add_argument("--torch-out", help="write an official-layout state dict (.safetensors) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    p.add_argument("--modules", help="convert only these top-level modules, comma separated (e.g. "
                                     "vfeat_extractor: the part of synchformer_state_dict.pth, a whole "
                                     "AudioSet model, that MMAudio conditions on)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model config override, e.g. video.num_heads=4 (repeatable)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("info", help="print the model config and parameter count of a checkpoint")
    p.add_argument("source")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_info)

    _add_prepare_parser(sub)
    _add_train_eval_parsers(sub)
    _add_cache_parser(sub)
    _add_demo_parser(sub)
    _add_desync_parser(sub)
    # Each command module builds its own parser (imports stay light until a command runs).
    from synchformer_jax import attribution, predict, serving

    predict.add_predict_parser(sub)
    attribution.add_attribute_parser(sub)
    serving.add_export_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from synchformer_jax import pretrained, torch_pickle, xla_cpu
    from synchformer_jax.input.shards import ShardError
    from synchformer_jax.models import convert_torch

    xla_cpu.disable_ynn_fusion()  # before any command runs jax: see xla_cpu

    parser = build_parser()
    # train/eval pass the `--config.x.y=value` overrides on to ml_collections.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_config_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.fn(args)
    except (ConfigError, ShardError) as e:  # ShardError: an incomplete shard set, a folder of several splits
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (torch_pickle.TorchFileError, torch_pickle.UnsafePickleError, convert_torch.ConversionError,
            pretrained.CheckpointError) as e:
        message = str(e)
        source = str(getattr(args, "source", ""))
        if source and source not in message:
            message = f"{source}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the training errors below, raised before or after any step
        from synchformer_jax import feature_cache, resume, train

        if isinstance(e, (feature_cache.CacheMismatchError, train.PartialInitError, resume.ResumeError)):
            print(f"error: {e}", file=sys.stderr)  # the set-up does not fit: fix the config
            return 2
        if isinstance(e, train.EmptyEvaluationError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
