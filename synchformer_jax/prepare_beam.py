"""The `prepare` pipeline on Apache Beam (optional extra `beam`), for AudioSet-scale runs.

Same plan, same loader, same shard writer and journal as `prepare.prepare`, so a Beam
run writes byte-identical shards and the same manifest as a local run:

    Create(jobs) -> Map(load_job) -> Partition(ok | skipped) -> (counters)
                                  \\-> GroupByKey(shard) -> Map(finish_shard: sort by plan position, write, journal)

The driver plans (lists are parsed once, deterministically), the workers load and
write, and the driver builds `manifest.json` from the per-shard journal entries after
the pipeline has finished. Shards already journaled by an earlier run are not
scheduled again, so an interrupted Beam run resumes like a local one.

Limits: the output folder must be a file system every worker can write (local disk for
the DirectRunner, a shared mount on a cluster); one shard's records are grouped on one
worker, so `shard_size` x record size must fit in a worker's memory (~1 MB per 10 s
clip at 256 px: the default 1024 is ~1 GB).
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

from synchformer_jax import prepare as prep
from synchformer_jax import records

PathLike = prep.PathLike


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError as e:  # the extra is optional: say how to get it
        raise ImportError("the Beam pipeline needs Apache Beam: pip install 'synchformer-jax[beam]'") from e
    return beam


def _load(item, loader, max_duration_sec, min_duration_sec):
    key, pos, job = item
    result = prep.load_job(job, loader=loader, max_duration_sec=max_duration_sec, min_duration_sec=min_duration_sec)
    return key, (pos, result)


def _write(group, out_dir: str, specs: dict):
    key, values = group
    # Plan order within the shard, whatever order the runner delivered the results in.
    results = [r for _, r in sorted((v for v in values if v is not None), key=lambda v: v[0])]
    entry = prep.finish_shard(out_dir, specs[key], results)
    return key, entry["num_records"]


def build_pipeline(pipeline, plan: prep.Plan, todo: Sequence[tuple[str, int]], out_dir: PathLike, *,
                   loader: Optional[Callable[..., records.ClipRecord]] = None):
    """Add the preparation of shards `todo` ((split, index) pairs) of `plan` to `pipeline`."""
    beam = _import_beam()
    out_dir = os.fspath(out_dir)
    specs = {(sp, i): plan.shard_spec(sp, i) for sp, i in todo}
    items = [((sp, i), pos, job) for sp, i in todo for pos, job in enumerate(plan.splits[sp].shard_jobs(i))]
    load = functools.partial(_load, loader=loader, max_duration_sec=plan.max_duration_sec,
                             min_duration_sec=plan.min_duration_sec)
    ok_counter = beam.metrics.Metrics.counter("synchformer_prepare", "clips_written")
    skip_counter = beam.metrics.Metrics.counter("synchformer_prepare", "clips_skipped")

    def count(kv, counter):
        counter.inc()
        return kv

    loaded = (pipeline
              | "Jobs" >> beam.Create(items, reshuffle=True)
              | "LoadClip" >> beam.Map(load))
    ok, skipped = loaded | "OkOrSkipped" >> beam.Partition(lambda kv, _: 0 if kv[1][1]["ok"] else 1, 2)
    ok = ok | "CountOk" >> beam.Map(count, ok_counter)
    skipped = skipped | "CountSkipped" >> beam.Map(count, skip_counter)
    # Every scheduled shard gets a file, also one whose clips were all skipped.
    placeholders = pipeline | "Shards" >> beam.Create([(key, None) for key in specs])
    return ((ok, skipped, placeholders)
            | "Merge" >> beam.Flatten()
            | "ByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.Map(_write, out_dir=out_dir, specs=specs))


def prepare_beam(inputs: Sequence[PathLike], out_dir: PathLike, *, format: str = "array_record",  # noqa: A002
                 split: Optional[str] = None, name: Optional[str] = None, list_format: str = "auto",
                 media_root: Optional[PathLike] = None, shard_size: int = prep.DEFAULT_SHARD_SIZE,
                 exclude: Sequence[PathLike] = (), meta: Sequence[PathLike] = (),
                 max_duration_sec: Optional[float] = None, min_duration_sec: Optional[float] = None,
                 overwrite: bool = False, loader: Optional[Callable[..., records.ClipRecord]] = None,
                 pipeline_options: Any = None, runner: Optional[str] = None) -> prep.PrepareResult:
    """`prepare.prepare` on a Beam runner (DirectRunner unless options say otherwise).

    Arguments as `prepare.prepare`; `pipeline_options` is an
    `apache_beam.options.pipeline_options.PipelineOptions` (or a list of flags), `runner`
    a runner name. Returns the same PrepareResult.
    """
    beam = _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    out = pathlib.Path(out_dir)
    plan = prep.plan_inputs(inputs, fmt=format, split=split, name=name, list_format=list_format,
                            media_root=media_root, shard_size=shard_size, exclude=exclude,
                            meta=meta, max_duration_sec=max_duration_sec, min_duration_sec=min_duration_sec,
                            out_dir=out)
    if out.exists() and not out.is_dir():
        raise prep.PrepareError(f"{out}: exists and is not a folder")
    done = {sp: prep.open_split(out, plan, sp, overwrite=overwrite) for sp in plan.splits}
    todo = [(sp, i) for sp in plan.splits for i in range(plan.splits[sp].num_shards) if i not in done[sp]]
    if todo:
        if pipeline_options is None or isinstance(pipeline_options, (list, tuple)):
            pipeline_options = PipelineOptions(list(pipeline_options or []))
        with beam.Pipeline(runner=runner, options=pipeline_options) as pipeline:
            build_pipeline(pipeline, plan, todo, out, loader=loader)
    manifest = prep.write_manifest(out, plan)
    return prep.PrepareResult(out, manifest, shards_written=len(todo),
                              shards_reused=sum(len(d) for d in done.values()), splits=sorted(plan.splits))
