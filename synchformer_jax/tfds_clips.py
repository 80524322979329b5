"""A tensorflow-datasets builder for your own clips (fine-tuning on your own data).

For people whose datasets live in TFDS (a `data_dir` on local disk or GCS, `tfds build`,
`dataset_info.json` with split sizes and metadata), this builder turns folders of videos,
or lists in the official formats, into a TFDS dataset that `synchformer-jax train` and
`eval` read directly:

    from synchformer_jax.tfds_clips import ClipsConfig, SynchformerClips

    builder = SynchformerClips(data_dir="~/tensorflow_datasets", config=ClipsConfig(
        name="my_lipsync", splits={"train": ["videos/train/"], "test": ["videos/test/"]}))
    builder.download_and_prepare()
    # -> ~/tensorflow_datasets/synchformer_clips/my_lipsync/1.0.0/
    #        synchformer_clips-train.array_record-00000-of-00004 ...

    synchformer-jax train --config configs/sync.py --workdir runs/finetune \\
        --config.init_from=<a stage-II model> \\
        --config.data.train_shards='~/tensorflow_datasets/synchformer_clips/my_lipsync/1.0.0/*-train.array_record*' \\
        --config.data.eval_shards='~/tensorflow_datasets/synchformer_clips/my_lipsync/1.0.0/*-test.array_record*'

What it shares with `synchformer-jax prepare`, and why: the same input planning (folders,
list formats, `media_root`, filter lists, `vggsound.csv` labels, duration limits), the
same loader (every clip brought to the 25 fps / 256 px / 16 kHz contract in-process) and
the same record bytes, stored in the TFDS feature `record` (next to `clip_id`). So a clip
gives the same training examples from either output, and the readers unwrap TFDS's
`tf.Example` around the record (`records.decode`) wherever the shards come from.

A clip that cannot be used (broken or truncated file, no audio, too short, non-finite
audio) is skipped with a warning and listed in the dataset's metadata
(`metadata.json`: `skipped`, one `{"split", "clip_id", "source", "reason"}` per clip);
`builder.info.metadata["skipped"]` after building, or `tfds.builder_from_directory(...)`
later. Clips load on `num_workers` processes, as in `prepare`.

ArrayRecord is the default and only writable format here: TFDS writes TFRecord only
with TensorFlow installed (a TFRecord dataset built elsewhere reads like this one).
TFDS shuffles the examples by key when writing; training reshuffles anyway.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from synchformer_jax import prepare

log = logging.getLogger(__name__)


def features() -> tfds.features.FeaturesDict:
    """One example: the clip id and the record bytes (`records.encode`)."""
    return tfds.features.FeaturesDict({
        "clip_id": tfds.features.Text(),
        "record": tfds.features.Tensor(shape=(), dtype=np.object_),
    })


@dataclasses.dataclass(eq=False)
class ClipsConfig(tfds.core.BuilderConfig):
    """One dataset of your clips.

    `splits`: split name -> inputs as `synchformer-jax prepare` takes them (folders,
    list/CSV files in the official formats, single media files). The remaining fields are
    `prepare`'s options of the same names.
    """
    splits: dict = dataclasses.field(default_factory=dict)
    media_root: Optional[str] = None
    list_format: str = "auto"
    meta: Sequence[str] = ()
    exclude: Sequence[str] = ()
    max_duration_sec: Optional[float] = None
    min_duration_sec: Optional[float] = None
    num_workers: Optional[int] = None  # processes loading clips; None: all cores, 0: in this process


class SynchformerClips(tfds.core.GeneratorBasedBuilder):
    """Audio-visual clips as synchformer-jax records, one TFDS example per clip."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "synchformer-jax record schema version 1 in the `record` feature."}

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        if not isinstance(kwargs.get("config"), ClipsConfig):
            raise ValueError("SynchformerClips needs config=ClipsConfig(name=..., splits={split: [inputs]}), "
                             f"got {kwargs.get('config')!r}")
        super().__init__(file_format=file_format, **kwargs)
        self._skipped: list[dict] = []

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Audio-visual clips at the Synchformer input contract (25 fps, shorter side 256, "
                        "16 kHz mono): `record` holds the synchformer-jax record bytes "
                        "(synchformer_jax.records.decode).",
            features=features(),
            metadata=tfds.core.MetadataDict(skipped=[]),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if not cfg.splits:
            raise ValueError(f"ClipsConfig {cfg.name!r}: no splits (splits={{'train': ['videos/']}})")
        generators = {}
        for split, inputs in cfg.splits.items():
            inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
            plan = prepare.plan_inputs(inputs, split=split, name=self.name, list_format=cfg.list_format,
                                       media_root=cfg.media_root, exclude=cfg.exclude, meta=cfg.meta,
                                       max_duration_sec=cfg.max_duration_sec,
                                       min_duration_sec=cfg.min_duration_sec)
            planned = plan.splits[split]
            # Planning's own finds (duplicate ids, undecodable names) are skips too.
            self._skipped.extend(dict(entry, split=split) for entry in planned.skipped)
            generators[split] = self._generate_examples(split, planned.jobs)
        return generators

    def _generate_examples(self, split: str, jobs: Sequence[prepare.Job]):
        cfg = self.builder_config
        load = functools.partial(prepare.load_job, max_duration_sec=cfg.max_duration_sec,
                                 min_duration_sec=cfg.min_duration_sec)
        workers = (os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers
        results = prepare.run_ordered(load, jobs, min(workers, len(jobs)))
        try:
            for result in results:
                if not result["ok"]:
                    log.warning("skipping %s (%s): %s", result["source"], split, result["reason"])
                    self._skipped.append({"split": split, "clip_id": result["clip_id"],
                                          "source": result["source"], "reason": result["reason"]})
                    continue
                yield result["clip_id"], {"clip_id": result["clip_id"], "record": result["data"]}
        finally:
            results.close()
            self.info.metadata["skipped"] = sorted(self._skipped,
                                                   key=lambda s: (s["split"], s["clip_id"] or "", s["source"]))
