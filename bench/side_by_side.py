"""synchformer-jax next to the official PyTorch Synchformer: inference, stage II, stage I.

One command, one machine, the same input shapes. Prints one table (step time, clips/s,
MFU, peak memory, JAX/torch ratio) and optionally writes everything as JSON.

Tasks (`--modes`, comma separated):
* `infer`:  forward pass of the full `configs/sync.yaml` model on a batch of clips
  (14 segments of 16x224x224 RGB + 128x66 log-mel each), inputs already on the device;
* `stage2`: one training step of stage II (frozen extractors forward only, projections +
  sync transformer forward and backward, optimizer update);
* `stage1`: one training step of stage I (Segment AVCLIP: both extractors forward and
  backward), at the largest batch that fits (`--batch-stage1 auto`: XLA's buffer plan of a
  small batch predicts it, a run at the prediction verifies it, stepping down on OOM; the
  torch worker doubles until CUDA runs out of memory, then bisects).

synchformer-jax runs `train.build_trainer`'s own jitted, donated train step (uint8 frame
span + waveform in, segmenting, normalisation and log-mel on the device) in bfloat16
compute with float32 master weights on a GPU, float32 on a CPU. The official model runs
in a subprocess of `--torch-python` (`torch_official_train_worker.py`) under its own
recipe: fp16 autocast + GradScaler, Adam (stage II) / AdamW (stage I), clip 1.0, fp16
video, on CUDA; float32 on a CPU. Each JAX case also runs in a fresh subprocess, so
peak memory is per case and this process never touches the accelerator.

FLOPs: an analytic count of the model's matmuls and attention (bench/model_flops.py; 2 per multiply-add;
training: 3x forward for trained parts, 1x for frozen ones); `--flops` prints it per
part next to XLA's `cost_analysis()` of the compiled forward passes and steps. MFU =
analytic FLOPs / step time / peak, against the peak measured here (a large matmul in
the compute dtype) and against `--ref-peak-tflops` (default 800, an H100's measured
bf16 matmul rate) on GPUs.

    python bench/side_by_side.py --size tiny                     # CPU smoke, JAX only
    python bench/side_by_side.py --size full --modes infer,stage2 --threads 2 \
        --torch-python /path/to/torch-venv/bin/python --official-repo /path/to/Synchformer
    python bench/side_by_side.py --size full --json-out sbs.json \
        --torch-python python3 --official-repo .official        # GPU
    python bench/side_by_side.py --flops --size full              # FLOP table only (CPU)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ also when imported by path
import op_profile  # noqa: E402  (imports jax only to capture)
from model_flops import part_flops, task_flops  # noqa: E402  (standard library only)
from hostinfo import cpu_model, pin_threads  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # the parent reads models/config.py (no jax) without an install
    sys.path.insert(0, str(REPO))
from synchformer_jax import xla_cpu  # noqa: E402  (standard library only)
WORKER = HERE / "torch_official_train_worker.py"
MODES = ("infer", "stage2", "stage1")
GIB = 2 ** 30


# ================================================================ arguments ====================
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="full", choices=["tiny", "full"],
                    help="full: the official sizes; tiny: models.config.tiny_config widths (configs/tiny.py)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="tiny only: frame size (default 64, or 224 when the torch side runs: the official "
                         "Motionformer takes 224 px without interpolation)")
    ap.add_argument("--modes", default="infer,stage2,stage1")
    ap.add_argument("--platform", default=None, choices=["cpu", "gpu", "cuda"],
                    help="JAX platform of the benchmark processes (default: jax's default backend)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="JAX compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    ap.add_argument("--batch-infer", type=int, default=None, help="clips per forward (GPU 16, CPU full 1, tiny 4)")
    ap.add_argument("--batch-stage2", type=int, default=None, help="clips per stage-II step (GPU 16, CPU full 1, tiny 4)")
    ap.add_argument("--batch-stage1", default=None,
                    help="clips per stage-I step, or 'auto' (largest that fits; default on GPUs); CPU full 1, tiny 2")
    ap.add_argument("--max-batch", type=int, default=64, help="upper bound of the stage-I batch search")
    ap.add_argument("--remat", default="off", choices=["off", "on", "both"], help="stage I: model.remat")
    ap.add_argument("--remat-policy", default="nothing", choices=["nothing", "dots"],
                    help="what a rematerialised block keeps (model.remat_policy): nothing = full recompute, "
                         "dots = the weight matmuls' outputs")
    ap.add_argument("--scan-blocks", action="store_true",
                    help="JAX: model.scan_blocks (each extractor's blocks as one lax.scan: one block "
                         "compiled; with remat, recompute bounded to a block)")
    ap.add_argument("--scan-stage1", action="store_true",
                    help="JAX: scanned blocks for the stage-I cases only (with remat: half the compile time, "
                         "memory bounded to one block's recompute); inference and stage II stay unrolled")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "hybrid", "cudnn-train"],
                    help="attention kernel of the JAX model (auto: cuDNN fused for 16-bit on GPU, else XLA, "
                         "and XLA for training odd lengths; hybrid: cuDNN for query blocks of >= 64 tokens "
                         "(space attention), XLA for the 8-frame time attention and the single CLS query; "
                         "cudnn-train: auto, and cuDNN also trains odd lengths, padded to even)")
    ap.add_argument("--time-pack", type=int, default=1,
                    help="JAX: model.time_attention_pack (spatial locations per time-attention sequence; "
                         "1 = one 8-frame sequence per location)")
    ap.add_argument("--lever-time-pack", default="14",
                    help="the packings the time-pack lever runs, comma separated")
    ap.add_argument("--levers", default="",
                    help="extra JAX variants, comma separated: scan (each task with the other --scan-blocks "
                         "setting), remat-policy (stage I with remat and the other --remat-policy), attention "
                         "(infer, stage II, stage I with the other kernels: xla, hybrid; stage I also cudnn-train), "
                         "attn-micro (each Motionformer attention shape alone, "
                         "cuDNN vs XLA vs cuDNN padded to even, forward and forward+backward; the time "
                         "attention also packed, --lever-time-pack), time-pack (each task with the time "
                         "attention packed, --lever-time-pack), chunk (infer with extractors chunked over segments), xla-flags (infer + "
                         "stage II with --lever-xla-flags), e2e (stage II fed from host uint8 batches, "
                         "with and without prefetch; host-to-device bytes and rates)")
    ap.add_argument("--lever-modes", default="infer,stage2,stage1",
                    help="the tasks the per-task levers (time-pack, scan, remat-policy, attention) run")
    ap.add_argument("--lever-attention", default="xla,hybrid,cudnn,cudnn-train",
                    help="the kernels the attention lever runs (cudnn-train: stage I only)")
    ap.add_argument("--levers-only", action="store_true",
                    help="run only the lever variants (give --batch-stage1 for the stage-I ones)")
    ap.add_argument("--from-json", default=None, help="re-print the table of an earlier --json-out and exit")
    ap.add_argument("--lever-xla-flags", default="--xla_gpu_enable_triton_gemm=false")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for every JAX case")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (median reported; GPU 10, CPU 2, tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (GPU 2, CPU 0, tiny 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (pinned)")
    ap.add_argument("--bytes-limit-gib", type=float, default=None,
                    help="memory budget of the stage-I search (default: the device's bytes_limit)")
    ap.add_argument("--mem-fraction", type=float, default=0.95, help="XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="use this peak instead of measuring it (skips the matmul microbenchmark)")
    ap.add_argument("--ref-peak-tflops", type=float, default=None,
                    help="reference peak for a second MFU column (default 800 on GPUs, none on CPUs)")
    ap.add_argument("--torch-python", default=None, help="python with torch + the official deps")
    ap.add_argument("--official-repo", default=None, help="checkout of github.com/v-iashin/Synchformer")
    ap.add_argument("--torch-batch-stage1", default=None,
                    help="the official model's stage-I batch (default: --batch-stage1; it fits 4 clips per 80 GB)")
    ap.add_argument("--torch-device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda when the JAX side is on a GPU, else cpu")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--init", default="fast", choices=["fast", "model"],
                    help="JAX parameters: fast = drawn on the host with numpy (see host_params); model = "
                         "the jitted Flax init (slow to compile at full size)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="wall-clock budget of the whole run: later cases are skipped (and the running one "
                         "is stopped) so that the table still prints before it")
    ap.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per JAX case / torch worker")
    ap.add_argument("--flops", action="store_true",
                    help="only the FLOP table: analytic per part vs XLA cost analysis (compile only, CPU)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, trace STEPS more steps of every JAX case with jax.profiler and "
                         "print where the device time went (op categories, model scopes, top ops; "
                         "bench/op_profile.py); traces kept under --profile-dir")
    ap.add_argument("--profile-dir", default=None,
                    help="where the traces go (default: a 'traces' folder beside --json-out, else ./sbs_traces)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def model_config_for(size: str, img_size: int | None, stage: str):
    """The ModelConfig the benchmark uses (no jax import: for the parent)."""
    from synchformer_jax.models.config import ModelConfig, tiny_config

    base = tiny_config() if size == "tiny" else ModelConfig()
    if size == "tiny":
        base = base.replace(**{"video.img_size": img_size or 64})
    if stage == "stage1":
        base = base.replace(kind="avclip")
    return base


# ================================================================ JAX child ====================
def _peak_dev_bytes(dev):
    try:
        return (dev.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return None


def _bytes_limit(dev):
    try:
        return (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001
        return None


class AttentionLog:
    """Counts which kernel each attention call asked for and whether cuDNN accepted it."""

    def __init__(self, mode: str):
        import jax

        from synchformer_jax.models import layers

        self.counts = {"cudnn": 0, "cudnn_rejected": 0, "xla": 0}
        self.rejections: list[str] = []
        if mode == "xla":
            layers._use_cudnn = lambda q: False
        elif mode == "cudnn":
            layers._use_cudnn = lambda q: True
        elif mode == "hybrid":  # cuDNN only where a query block is long enough to fill its tiles
            orig_use = layers._use_cudnn
            layers._use_cudnn = lambda q: orig_use(q) and q.shape[1] >= 64
        elif mode == "cudnn-train":  # this child process only
            os.environ[layers.ODD_LENGTH_GRAD_ENV] = "cudnn"
        orig = jax.nn.dot_product_attention

        def wrapped(*a, implementation=None, **k):
            try:
                out = orig(*a, implementation=implementation, **k)
            except Exception as e:  # noqa: BLE001 - layers.attention falls back to XLA
                if implementation == "cudnn":
                    self.counts["cudnn_rejected"] += 1
                    if len(self.rejections) < 3:
                        self.rejections.append(f"{type(e).__name__}: {str(e)[:200]}")
                raise
            self.counts["cudnn" if implementation == "cudnn" else "xla"] += 1
            return out

        jax.nn.dot_product_attention = wrapped

    def report(self, hlo_text: str | None) -> dict:
        r = {"traced_calls": dict(self.counts), "rejections": self.rejections}
        if hlo_text is not None:
            r["cudnn_fmha_custom_calls_in_hlo"] = hlo_text.count("__cudnn$fmha")
        return r


def _hlo_text(compiled):
    try:
        return compiled.as_text()
    except Exception:  # noqa: BLE001
        return None


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        f = float((cost or {}).get("flops", 0.0))
        return f if f > 0 else None
    except Exception:  # noqa: BLE001
        return None


def _mem_analysis(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
        r = {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                              "output_size_in_bytes", "alias_size_in_bytes")}
        r["planned_bytes"] = (r["temp_size_in_bytes"] + r["argument_size_in_bytes"]
                              + r["output_size_in_bytes"] - r["alias_size_in_bytes"])
        return r
    except Exception:  # noqa: BLE001
        return {}


def _profile(spec, run, text: str | None) -> dict | None:
    """`spec["profile"]` more steps under the profiler, summarised per op (op_profile);
    `text` is the compiled module's HLO (`_hlo_text`)."""
    if not spec.get("profile"):
        return None
    try:
        if text is None:
            raise RuntimeError("the compiled module has no HLO text")
        trace_dir = os.path.join(spec["profile_dir"], re.sub(r"[^\w.=-]", "_", spec["label"]))
        trace = op_profile.capture(run, spec["profile"], trace_dir)
        with open(os.path.join(trace_dir, "module.hlo.txt"), "w") as f:  # to re-summarise offline
            f.write(text)
        summary = op_profile.summarise(op_profile.load_op_times(trace, op_profile.module_name(text)),
                                       op_profile.parse_hlo(text), spec["profile"])
        summary["trace"] = trace
        print(op_profile.format_summary(summary, title=f"profile {spec['label']}: "), flush=True)
        return summary
    except Exception as e:  # noqa: BLE001 - a profile is extra; the timing stands without it
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _time(fn, warmup: int, steps: int):
    import jax

    out = None
    for _ in range(warmup):
        out = fn()
        jax.block_until_ready(out)
    times, cpu = [], []
    for _ in range(steps):
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return times, cpu, out


def child_peak(spec) -> dict:
    """Device facts and the measured matmul peak in the compute dtype."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    gpu = dev.platform != "cpu"
    n, reps = (8192, 8) if gpu else (2048, 4)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (n, n), jnp.float32).astype(spec["dtype"])
    y = jax.random.normal(keys[1], (n, n), jnp.float32).astype(spec["dtype"])

    @jax.jit
    def chain(x, y):  # independent products of random operands (no zeros, no cache reuse)
        return [(x * (1.0 + i / 64)) @ y for i in range(reps)]

    jax.block_until_ready(chain(x, y))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(chain(x, y))
        best = min(best, time.perf_counter() - t)
    import flax
    import jaxlib
    import optax
    return {"peak_flops": 2.0 * n ** 3 * reps / best, "matmul": f"{reps} x {n}^3 {spec['dtype']}",
            "platform": dev.platform, "device_kind": getattr(dev, "device_kind", str(dev)),
            "bytes_limit": _bytes_limit(dev),
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "flax": flax.__version__, "optax": optax.__version__}}


def host_params(abstract, model_config, seed: int = 0):
    """Parameters drawn on the host with numpy: N(0, 0.02) weights, LayerNorm scales 1,
    biases 0, the stage-I temperature at its init. For timing only: a jitted Flax init of
    237M parameters costs tens of seconds of compilation (threefry) per process, this ~2 s."""
    import jax
    import numpy as np
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(jax.tree.map(lambda x: x, abstract), sep="/")
    out = {}
    for k, x in flat.items():
        name = k.rsplit("/", 1)[-1]
        if name == "logit_scale":
            v = np.full(x.shape, model_config.init_temperature, np.float32)
        elif name == "bias":
            v = np.zeros(x.shape, np.float32)
        elif name == "scale":
            v = np.ones(x.shape, np.float32)
        else:
            v = (0.02 * rng.standard_normal(x.shape, dtype=np.float32))
        out[k] = v
    return traverse_util.unflatten_dict(out, sep="/")


def child_infer(spec) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from synchformer_jax.models import synchformer as sf

    att = AttentionLog(spec["attention"])
    m = model_config_for(spec["size"], spec.get("img_size"), "infer").replace(
        dtype=spec["dtype"], scan_blocks=bool(spec.get("scan_blocks")), time_attention_pack=spec.get("time_pack") or 1)
    model = sf.Synchformer(m)
    dev = jax.devices()[0]
    phases = {}
    t = time.perf_counter()
    if spec.get("init") == "model":
        params = jax.jit(sf.init_params, static_argnums=0)(m, jax.random.key(0))
    else:
        params = jax.device_put(host_params(sf.abstract_params(m), m))
    jax.block_until_ready(params)
    phases["init_s"] = time.perf_counter() - t
    b = spec["batch"]
    v, a = m.video, m.audio
    # Drawn on the device: normalised RGB in [-1, 1] in the compute dtype (the official
    # video is fp16), log-mel ~ N(0, 0.5^2) in float32.
    t = time.perf_counter()
    kv, ka = jax.random.split(jax.random.key(0))
    video = jax.jit(lambda k: jax.random.uniform(
        k, (b, m.n_segments, v.num_frames, 3, v.img_size, v.img_size), jnp.float32, -1.0, 1.0
    ).astype(spec["dtype"]))(kv)
    audio = jax.jit(lambda k: 0.5 * jax.random.normal(
        k, (b, m.n_segments, 1, a.num_mel_bins, a.max_spec_t), jnp.float32))(ka)
    jax.block_until_ready((video, audio))
    phases["inputs_s"] = time.perf_counter() - t
    chunk = spec.get("chunk")

    def forward(p, video, audio):
        if chunk:
            vf = sf.extract_video_features(model, p, video, chunk_size=chunk)
            af = sf.extract_audio_features(model, p, audio, chunk_size=chunk)
            return sf.compare(model, p, vf, af)
        return model.apply({"params": p}, video, audio)

    t = time.perf_counter()
    compiled = jax.jit(forward).lower(params, video, audio).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, video, audio))  # first run: cuDNN graph builds, autotuning
    phases["first_run_s"] = time.perf_counter() - t
    times, cpu, out = _time(lambda: compiled(params, video, audio), spec["warmup"], spec["steps"])
    logits = np.asarray(out, np.float32)
    hlo_text = _hlo_text(compiled)
    profile = _profile(spec, lambda: compiled(params, video, audio), hlo_text)
    return {"batch": b, "compile_s": compile_s, "phases": phases, "times_s": times, "step_s": statistics.median(times),
            "profile": profile,
            "cpu_s_per_step": statistics.median(cpu), "xla_flops": _cost_flops(compiled),
            "memory_plan": _mem_analysis(compiled), "peak_device_bytes": _peak_dev_bytes(dev),
            "finite": bool(np.isfinite(logits).all()), "attention": att.report(hlo_text),
            "chunk": chunk}


def _case_config(spec, batch):
    """The trainer config of bench/train_step.py's case for `spec` at `batch` clips."""
    import train_step as ts  # bench/train_step.py: the benchmark configs and host batches

    case = ("tiny" if spec["size"] == "tiny" else "full") + ("-I" if spec["kind"] == "stage1" else "-II")
    config = ts.case_config(case, batch, spec["dtype"], spec.get("remat", False))
    with config.unlocked():
        config.model.scan_blocks = bool(spec.get("scan_blocks") or (spec["kind"] == "stage1" and spec.get("scan_stage1")))
        config.model.remat_policy = spec.get("remat_policy") or "nothing"
        config.model.time_attention_pack = spec.get("time_pack") or 1
        if spec["size"] == "tiny" and spec.get("img_size"):
            config.model.video.img_size = spec["img_size"]
    return config


def _trainer_case(spec, batch):
    """(trainer, state, device batch, rng) of stage `spec['kind']` at `batch` clips."""
    import jax

    import train_step as ts  # bench/train_step.py: the benchmark configs and host batches

    from synchformer_jax import sharding, train
    from synchformer_jax.input import device as device_lib

    config = _case_config(spec, batch)
    trainer = train.build_trainer(config)
    t = time.perf_counter()
    if spec.get("init") == "model":
        state, _ = train.initial_state(trainer, jax.random.key(0))
    else:  # host-drawn parameters (see host_params), the trainer's own optimizer init
        import jax.numpy as jnp

        from synchformer_jax import optim

        abstract = train._abstract_state(trainer.task, trainer.tx, config.optim.frozen)
        params = jax.device_put(host_params(abstract.params, trainer.task.model_config),
                                trainer.state_shardings.params)
        trainable, _ = optim.split_params(params, config.optim.frozen)
        opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(trainable)
        state = train.TrainState(jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings.step),
                                 params, opt_state)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    hb = ts.host_batch(trainer.task, batch)
    gbatch = device_lib.host_to_global(hb, trainer.mesh, sharding.BATCH_AXES)
    jax.block_until_ready(gbatch)
    return trainer, state, gbatch, hb, jax.random.key(1), {"init_s": init_s, "inputs_s": time.perf_counter() - t}


def _compile_step(trainer, state, gbatch, rng):
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, gbatch, rng).compile()
    return compiled, time.perf_counter() - t


def _abstract_compile(spec, batch):
    """Compile the step for `batch` without allocating state (for the buffer plan)."""
    import jax
    import train_step as ts

    from synchformer_jax import train

    config = _case_config(spec, batch)
    trainer = train.build_trainer(config)
    abstract = train._abstract_state(trainer.task, trainer.tx, config.optim.frozen)
    hb = ts.host_batch(trainer.task, 1)
    gb = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype, sharding=sharding_for(trainer))
          for k, v in hb.items()}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                            trainer.state_shardings)
    rng = jax.random.key(1)
    t = time.perf_counter()
    compiled = trainer.train_step.lower(abstract, gb, rng).compile()
    return compiled, time.perf_counter() - t


def sharding_for(trainer):
    from synchformer_jax import sharding
    return sharding.batch_sharding(trainer.mesh)


def child_train(spec) -> dict:
    import jax
    import numpy as np

    att = AttentionLog(spec["attention"])
    dev = jax.devices()[0]
    search = []
    batch = spec["batch"]
    if batch == "auto":
        limit = spec.get("bytes_limit") or _bytes_limit(dev)
        if not limit:
            raise RuntimeError("batch 'auto' needs a device that reports bytes_limit")
        b0 = 2
        c0, cs0 = _abstract_compile(spec, b0)
        p0 = _mem_analysis(c0)["planned_bytes"]
        fixed = _mem_analysis(c0)["argument_size_in_bytes"]
        per = max((p0 - fixed) / b0, 1.0)
        pred = int(min(spec["max_batch"], max(1, (0.95 * limit - fixed) // per)))
        search.append({"batch": b0, "planned_bytes": p0, "compile_s": cs0, "how": "plan"})
        print(f"plan: batch {b0} -> {p0 / GIB:.2f} GiB (compile {cs0:.0f} s); predicted batch {pred}", flush=True)
        del c0
        # Refine with the plan at the prediction (the activations are not exactly linear).
        for _ in range(3):
            c1, cs1 = _abstract_compile(spec, pred)
            p1 = _mem_analysis(c1)["planned_bytes"]
            search.append({"batch": pred, "planned_bytes": p1, "compile_s": cs1, "how": "plan"})
            print(f"plan: batch {pred} -> {p1 / GIB:.2f} GiB of {limit / GIB:.2f} (compile {cs1:.0f} s)", flush=True)
            del c1
            if p1 <= 0.95 * limit:
                break
            per = max((p1 - fixed) / pred, 1.0)
            pred = int(max(1, min(pred - 1, (0.95 * limit - fixed) // per)))
        candidates = [pred, max(1, pred - max(1, pred // 8)), max(1, pred // 2)]
    else:
        candidates = [int(batch)]

    last_err = None
    for b in dict.fromkeys(candidates):
        try:
            trainer, state, gbatch, hb, rng, phases = _trainer_case(spec, b)
            print(f"batch {b}: state and inputs ready ({phases['init_s']:.0f} s + {phases['inputs_s']:.0f} s)", flush=True)
            compiled, compile_s = _compile_step(trainer, state, gbatch, rng)
            print(f"batch {b}: compiled in {compile_s:.0f} s", flush=True)
            holder = {"state": state}
            t = time.perf_counter()
            holder["state"], _ = compiled(holder["state"], gbatch, rng)  # first run: cuDNN graphs, autotuning
            jax.block_until_ready(holder["state"])
            phases["first_run_s"] = time.perf_counter() - t

            def step():
                holder["state"], metrics = compiled(holder["state"], gbatch, rng)
                return holder["state"], metrics

            times, cpu, (state, metrics) = _time(step, spec["warmup"], spec["steps"])
            loss = float(metrics["loss"])
            hlo_text = _hlo_text(compiled)
            profile = _profile(spec, step, hlo_text)
            res = {"batch": b, "compile_s": compile_s, "phases": phases, "times_s": times, "step_s": statistics.median(times),
                   "cpu_s_per_step": statistics.median(cpu), "xla_flops": _cost_flops(compiled),
                   "memory_plan": _mem_analysis(compiled), "peak_device_bytes": _peak_dev_bytes(dev),
                   "loss": loss, "finite": bool(np.isfinite(loss)), "remat": spec.get("remat", False),
                   "attention": att.report(hlo_text), "search": search, "profile": profile,
                   "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params)))}
            if spec.get("e2e"):
                res["e2e"] = _e2e(trainer, compiled, holder, hb, rng, spec)
            return res
        except Exception as e:  # noqa: BLE001 - an OOM at the predicted batch: step down
            last_err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            search.append({"batch": b, "run": "failed", "error": last_err})
            print(f"[jax {spec['kind']}] batch {b} failed: {last_err}", flush=True)
            if batch != "auto":
                break
    raise RuntimeError(f"no batch ran ({last_err}); search: {json.dumps(search)}")


def _e2e(trainer, compiled, holder, hb, rng, spec) -> dict:
    """Training loop fed from host batches: host-to-device bytes and rates, and steps with
    and without prefetch (the next batch's transfer issued before waiting on the step)."""
    import jax
    import numpy as np

    from synchformer_jax import sharding
    from synchformer_jax.input import device as device_lib

    hosts = [hb, {k: (v + 1 if v.dtype == np.uint8 else v) for k, v in hb.items()}]

    def put(h):
        return device_lib.host_to_global(h, trainer.mesh, sharding.BATCH_AXES)

    out = {}
    nbytes = sum(v.nbytes for v in hb.values())
    t = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(put(hosts[0]))
    out["h2d_batch_bytes"] = nbytes
    out["h2d_batch_s"] = (time.perf_counter() - t) / 3
    # What shipping float16 segments (the official input) would move instead of the uint8 span.
    m = trainer.task.model_config
    v = m.video
    seg = np.zeros((hb["video"].shape[0], m.n_segments, v.num_frames, 3, v.img_size, v.img_size), np.float16)
    t = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(jax.device_put(seg))
    out["fp16_segments_bytes"] = seg.nbytes
    out["fp16_segments_h2d_s"] = (time.perf_counter() - t) / 3
    del seg
    n = spec["steps"]
    for prefetch in (False, True):
        jax.block_until_ready(holder["state"])
        t = time.perf_counter()
        nxt = put(hosts[0])
        for i in range(n):
            cur = nxt
            if prefetch:
                nxt = put(hosts[(i + 1) % 2])
            holder["state"], metrics = compiled(holder["state"], cur, rng)
            jax.block_until_ready(holder["state"])
            if not prefetch:
                nxt = put(hosts[(i + 1) % 2])
        out["step_s_prefetch" if prefetch else "step_s_no_prefetch"] = (time.perf_counter() - t) / n
    return out


def child_attn_micro(spec) -> dict:
    """The three attention shapes of one Motionformer block at the inference batch, alone:
    XLA vs cuDNN vs cuDNN on lengths padded to even, forward and forward + backward,
    bfloat16 (median of 20 after 3 warm-ups); and the time attention packed
    (`spec['lever_time_packs']`, motionformer.packed_time_attention), XLA vs cuDNN."""
    import jax
    import jax.numpy as jnp

    from synchformer_jax.models import layers

    m = model_config_for(spec["size"], spec.get("img_size"), "infer")
    v = m.video
    n = spec["batch"] * m.n_segments
    h, d = v.num_heads, v.embed_dim // v.num_heads
    tv, sp = v.temporal_patches, v.spatial_patches
    time_flops = 4.0 * (n * sp) * tv * (tv + 1) * h * d
    # name: (query shape, key shape, mask, useful FLOPs); "tflops" below are useful FLOPs
    # per second (a packed time attention does (8p + 2) / 9 times the products).
    shapes = {f"time (q {tv}, kv {tv + 1})": ((n * sp, tv), (n * sp, tv + 1), None, time_flops),
              f"space (q {sp}, kv {sp + 1})": ((n * tv, sp), (n * tv, sp + 1), None,
                                               4.0 * (n * tv) * sp * (sp + 1) * h * d),
              f"cls (q 1, kv {tv * sp + 1})": ((n, 1), (n, tv * sp + 1), None, 4.0 * n * (tv * sp + 1) * h * d)}
    from synchformer_jax.models import motionformer as mf
    for pack in spec.get("lever_time_packs") or []:
        if sp % pack == 0 and pack > 1:
            shapes[f"time packed {pack} (q {tv * pack}, kv {tv * pack + 2}, masked)"] = (
                (n * sp // pack, tv * pack), (n * sp // pack, tv * pack + 2),
                jnp.asarray(mf.time_pack_mask(tv, pack))[None, None], time_flops)
    dt = jnp.dtype(spec["dtype"])
    out = {}
    for name, ((bq, lq), (bk, lk), mask, flops) in shapes.items():
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (bq, lq, h, d), jnp.float32).astype(dt)
        k = jax.random.normal(ks[1], (bk, lk, h, d), jnp.float32).astype(dt)
        vv = jax.random.normal(ks[2], (bk, lk, h, d), jnp.float32).astype(dt)
        # cudnn-padded: lengths padded to even with a padding mask (layers.even_padded_attention),
        # the way cuDNN can train these odd lengths (SYNCHFORMER_JAX_ODD_ATTENTION_GRAD=cudnn).
        for impl in ("xla", "cudnn") + (("cudnn-padded",) if mask is None else ()):
            for mode in ("fwd", "fwd+bwd"):
                def f(q, k, vv, impl=impl, mask=mask):
                    if impl == "cudnn-padded":
                        return layers.even_padded_attention(q, k, vv, scale=d ** -0.5, implementation="cudnn")
                    return jax.nn.dot_product_attention(q, k, vv, mask=mask, scale=d ** -0.5, implementation=impl)
                fn = jax.jit(f) if mode == "fwd" else jax.jit(jax.grad(
                    lambda q, k, vv, impl=impl: jnp.sum(f(q, k, vv, impl).astype(jnp.float32)), argnums=(0, 1, 2)))
                key = f"{name} {impl} {mode}"
                try:
                    jax.block_until_ready(fn(q, k, vv))
                    times, _, _ = _time(lambda: fn(q, k, vv), 3, 20)
                    t = statistics.median(times)
                    out[key] = {"ms": 1e3 * t, "tflops": (flops * (1 if mode == "fwd" else 3)) / t / 1e12}
                except Exception as e:  # noqa: BLE001
                    out[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(key, out[key], flush=True)
    return {"batch": spec["batch"], "results": out}


def child_flops(spec) -> dict:
    """Analytic vs XLA cost analysis, per part and per task (compile only)."""
    import jax
    import jax.numpy as jnp

    from synchformer_jax.models import synchformer as sf

    m = model_config_for(spec["size"], spec.get("img_size"), "infer").replace(dtype="float32")
    model = sf.Synchformer(m)
    params = sf.abstract_params(m)
    v, a = m.video, m.audio
    out = {"analytic": part_flops(m), "analytic_tasks": task_flops(m), "xla": {}}

    def xla(fn, *args):
        return _cost_flops(jax.jit(fn).lower(*args).compile())

    seg = jax.ShapeDtypeStruct((1, v.num_frames, 3, v.img_size, v.img_size), jnp.float32)
    spec_a = jax.ShapeDtypeStruct((1, a.num_mel_bins, a.max_spec_t), jnp.float32)
    out["xla"]["motionformer_per_segment"] = xla(
        lambda p, x: model.apply({"params": p}, x, method="video_segment_features"), params, seg)
    out["xla"]["ast_per_segment"] = xla(
        lambda p, x: model.apply({"params": p}, x, method="audio_segment_features"), params, spec_a)
    vf = jax.ShapeDtypeStruct((1, m.n_segments, v.temporal_patches, v.embed_dim), jnp.float32)
    af = jax.ShapeDtypeStruct((1, m.n_segments, a.time_patches, a.hidden_size), jnp.float32)
    out["xla"]["sync_transformer_per_clip"] = xla(lambda p, x, y: sf.compare(model, p, x, y), params, vf, af)
    vid = jax.ShapeDtypeStruct((1, m.n_segments, v.num_frames, 3, v.img_size, v.img_size), jnp.float32)
    aud = jax.ShapeDtypeStruct((1, m.n_segments, 1, a.num_mel_bins, a.max_spec_t), jnp.float32)
    out["xla"]["infer_per_clip"] = xla(lambda p, x, y: model.apply({"params": p}, x, y), params, vid, aud)
    for kind in ("stage2", "stage1"):
        s = dict(spec, kind=kind, dtype="float32")
        out["xla"][f"{kind}_per_clip"] = _cost_flops(_abstract_compile(s, 1)[0])
    return out


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    t0 = time.perf_counter()
    try:
        fn = {"peak": child_peak, "infer": child_infer, "stage2": child_train, "stage1": child_train,
              "flops": child_flops, "attn_micro": child_attn_micro}[spec["kind"]]
        result = fn(spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"}
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["spec"] = spec
    print("RESULT " + json.dumps(result), flush=True)


# ================================================================ parent =======================
def child_env(args, extra_flags: str = "") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    flags = " ".join(f for f in [env.get("XLA_FLAGS", ""), args.xla_flags, extra_flags] if f).strip()
    if args.threads == 1:
        flags = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    if args.platform:
        env["JAX_PLATFORMS"] = "cuda" if args.platform == "gpu" else args.platform
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.mem_fraction))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


_START = time.monotonic()
_DEADLINE_MARGIN_S = 15.0  # left for the table and the JSON


def time_left(args) -> float:
    if not args.deadline_s:
        return float("inf")
    return args.deadline_s - _DEADLINE_MARGIN_S - (time.monotonic() - _START)


def run_child(args, spec: dict, extra_flags: str = "") -> dict:
    label = spec.get("label", spec["kind"])
    timeout = min(args.case_timeout, time_left(args))
    if timeout < 20:
        print(f"[jax] {label}: skipped (deadline)", flush=True)
        return {"error": "skipped: --deadline-s reached", "spec": spec}
    print(f"[jax] {label} ...", flush=True)
    t = time.perf_counter()
    import tempfile
    import threading

    # The child's stdout is echoed as it comes (with the seconds since the case started),
    # so that a case stopped at its timeout still shows how far it got.
    progress: list[str] = []
    res_box: dict = {}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                                env=child_env(args, extra_flags))

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("RESULT "):
                    res_box["res"] = json.loads(line[len("RESULT "):])
                elif line.strip():
                    progress.append(f"{time.perf_counter() - t:.0f}s {line}")
                    print(f"   [{time.perf_counter() - t:5.0f} s] " + line, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(timeout=5)
            print(f"[jax] {label}: timed out after {timeout:.0f} s", flush=True)
            return {"error": f"timed out after {timeout:.0f} s", "progress": progress[-20:], "spec": spec}
        reader.join(timeout=30)
        err.seek(0)
        stderr = err.read()
    res = res_box.get("res")
    if res is None:
        tail = " | ".join(stderr.strip().splitlines()[-4:])
        res = {"error": f"exit {proc.returncode}: {tail[-600:]}", "spec": spec}
    elif "error" in res:
        print("   " + "\n   ".join(stderr.strip().splitlines()[-6:]), flush=True)
    res["xla_flags"] = child_env(args, extra_flags).get("XLA_FLAGS", "")
    msg = res.get("error") or f"step {res.get('step_s', 0):.4g} s, batch {res.get('batch')}"
    print(f"[jax] {label}: {msg} ({time.perf_counter() - t:.0f} s)", flush=True)
    return res


def run_torch(args, gpu: bool, img_size) -> tuple[dict | None, str | None]:
    if not args.torch_python:
        return None, "no --torch-python given"
    if not args.official_repo or not os.path.isfile(os.path.join(args.official_repo, "configs", "sync.yaml")):
        return None, f"--official-repo {args.official_repo!r} is not an official Synchformer checkout"
    if args.size == "tiny" and img_size != 224:
        return None, "the official Motionformer takes 224-px frames: use --img-size 224 at --size tiny"
    device = args.torch_device or ("cuda" if gpu else "cpu")
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="sbs_torch_"), "torch_result.json")
    modes = [m for m in args.modes.split(",") if m in MODES]
    b1 = args.torch_batch_stage1 or args.batch_stage1
    b1 = b1 if device == "cuda" or b1 != "auto" else "1"
    cmd = [args.torch_python, str(WORKER), "--official-repo", os.path.abspath(args.official_repo),
           "--modes", ",".join(modes), "--device", device, "--size", args.size,
           "--batch-infer", str(args.batch_infer), "--batch-stage2", str(args.batch_stage2),
           "--batch-stage1", str(b1), "--max-batch", str(args.max_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--json-out", out]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("[torch] " + " ".join(cmd), flush=True)
    timeout = min(args.case_timeout * max(1, len(modes)), time_left(args))
    if timeout < 20:
        return None, "skipped: --deadline-s reached"
    try:
        proc = subprocess.run(cmd, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if not os.path.exists(out):
        return None, f"torch worker failed (exit {rc})"
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    os.rmdir(os.path.dirname(out))
    if rc != 0:
        res["worker_exit"] = rc
    return res, None


def defaults(args, gpu: bool) -> None:
    full = args.size == "full"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if gpu else "float32"
    if args.size == "tiny" and args.img_size is None:
        args.img_size = 224 if args.torch_python else 64
    pick = lambda g, c, t: t if not full else (g if gpu else c)  # noqa: E731
    args.batch_infer = args.batch_infer or pick(16, 1, 4)
    args.batch_stage2 = args.batch_stage2 or pick(16, 1, 4)
    args.batch_stage1 = args.batch_stage1 or pick("auto", "1", "2")
    args.steps = args.steps or pick(10, 2, 3)
    args.warmup = args.warmup if args.warmup is not None else pick(2, 0, 1)
    if args.ref_peak_tflops is None and gpu:
        args.ref_peak_tflops = 800.0


def _detect_gpu(args) -> bool:
    if args.platform:
        return args.platform in ("gpu", "cuda")
    # Ask a throwaway process, so this one never holds the accelerator.
    code = "import jax; print('BACKEND', jax.default_backend())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(args))
    for line in proc.stdout.splitlines():
        if line.startswith("BACKEND "):
            return line.split()[1] in ("gpu", "cuda", "rocm")
    return False


# ---------------------------------------------------------------- table ------------------------
def rows_of(report) -> list[dict]:
    """One row per (task, implementation, variant) with the derived numbers."""
    peak = report.get("peak", {}).get("peak_flops")
    ref = report["args"].get("ref_peak_tflops")
    flops = report["flops_per_clip"]
    rows = []

    def add(task, impl, variant, r, dtype):
        if r is None:
            return
        row = {"task": task, "impl": impl, "variant": variant, "dtype": dtype}
        if "error" in r:
            row["error"] = r["error"]
            rows.append(row)
            return
        b = r["batch"]
        step = r["step_s"]
        f = flops[task] * b
        mem = r.get("peak_device_bytes") or r.get("peak_bytes")
        row.update(batch=b, step_s=step, clips_per_s=b / step, model_tflop_per_step=f / 1e12,
                   mfu_measured=(f / step / peak) if peak else None,
                   mfu_ref=(f / step / (ref * 1e12)) if ref else None,
                   peak_mem_gib=(mem / GIB) if mem else None,
                   peak_rss_gib=(r["peak_rss_bytes"] / GIB) if r.get("peak_rss_bytes") else None,
                   compile_s=r.get("compile_s"), xla_tflop_per_step=(r["xla_flops"] / 1e12) if r.get("xla_flops") else None)
        rows.append(row)

    jdt = report["args"]["dtype"]
    for key, r in report.get("jax", {}).items():
        task, _, variant = key.partition(":")
        add(task, "synchformer-jax", variant or "default", r, jdt)
    t = report.get("torch") or {}
    for task, r in (t.get("results") or {}).items():
        add(task, "official PyTorch", "default", r, t.get("dtype", ""))
    # Ratio: JAX default variant over torch, clips/s.
    base = {r["task"]: r for r in rows if r["impl"] == "official PyTorch" and "error" not in r}
    for r in rows:
        if r["impl"] == "synchformer-jax" and "error" not in r and r["task"] in base:
            r["ratio_vs_torch"] = r["clips_per_s"] / base[r["task"]]["clips_per_s"]
    return rows


def fmt_table(rows, report) -> str:
    gpu = report.get("gpu")
    ref = report["args"].get("ref_peak_tflops")
    mem_head = "peak dev GiB" if gpu else "peak RSS GiB"
    head = ["task", "implementation", "variant", "dtype", "batch", "step s", "clips/s",
            "MFU (measured peak)"] + ([f"MFU ({ref:.0f} TF)"] if ref else []) + [mem_head, "compile s", "JAX/torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    for r in rows:
        if "error" in r:
            cells = [r["task"], r["impl"], r["variant"], r["dtype"], "", "error: " + r["error"][:120]]
            cells += [""] * (len(head) - len(cells))
        else:
            mem = r.get("peak_mem_gib") if gpu else r.get("peak_rss_gib")
            cells = [r["task"], r["impl"], r["variant"], r["dtype"], str(r["batch"]), f"{r['step_s']:.4g}",
                     f"{r['clips_per_s']:.4g}", pct(r["mfu_measured"])] + ([pct(r["mfu_ref"])] if ref else []) + [
                "" if mem is None else f"{mem:.2f}", "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
                "" if r.get("ratio_vs_torch") is None else f"{r['ratio_vs_torch']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_profiles(report) -> str:
    """The `--profile` summaries of the JAX cases, after the table."""
    out = []
    for key, r in report.get("jax", {}).items():
        if (r.get("profile") or {}).get("op_ms_per_step") is not None:
            out.append("\n" + op_profile.format_summary(r["profile"], title=f"{key}: ", step_ms=r["step_s"] * 1e3))
    return "\n".join(out)


def fmt_attn_micro(report) -> str:
    """The attention micro-benchmark as a table: ms per call by shape, kernel and pass."""
    res = ((report.get("attn_micro") or {}).get("results")) or {}
    if not res:
        return ""
    lines = ["\n", f"attention alone, one Motionformer block at {report['attn_micro'].get('batch')} clips "
             "(TFLOP/s of useful FLOPs):", "| shape | kernel | pass | ms | TFLOP/s |", "|---|---|---|---:|---:|"]
    for key, r in res.items():
        shape, impl, mode = key.rsplit(" ", 2)
        cells = ([f"{r['ms']:.3f}", f"{r['tflops']:.3g}"] if "ms" in r else ["error: " + r.get("error", "")[:100], ""])
        lines.append("| " + " | ".join([shape, impl, mode] + cells) + " |")
    return "\n".join(lines)


def fmt_flops(fl: dict) -> str:
    lines = ["| part | analytic GFLOP | XLA cost analysis GFLOP |", "|---|---:|---:|"]
    an, x = fl["analytic"], fl.get("xla", {})
    for key in ("motionformer_per_segment", "ast_per_segment", "sync_transformer_per_clip"):
        xv = x.get(key)
        lines.append(f"| {key} | {an[key]['total'] / 1e9:,.2f} | {'' if xv is None else f'{xv / 1e9:,.2f}'} |")
    t = fl["analytic_tasks"]
    for key, an_v in (("infer_per_clip", t["infer"]), ("stage2_per_clip", t["stage2"]),
                      ("stage1_per_clip", t["stage1"])):
        xv = x.get(key)
        lines.append(f"| {key} | {an_v / 1e9:,.1f} | {'' if xv is None else f'{xv / 1e9:,.1f}'} |")
    return "\n".join(lines)


def run_default_case(args, report, common, mode, batch, remat, gpu, key=None):
    key = key or mode
    spec = dict(common, kind=mode, batch=batch, remat=remat, label=key)
    res = run_child(args, spec)
    if ("error" in res and args.attention == "auto" and gpu
            and not res["error"].startswith(("skipped", "timed out"))):
        # cuDNN attention failed at compile or run time: the XLA kernel is the fallback.
        res2 = run_child(args, dict(spec, attention="xla", label=key + " (xla attention)"))
        res2["fallback_from"] = res["error"]
        res = res2
    report["jax"][key] = res
    write_json(args.json_out, report)


def _default_result(report, mode):
    """The first successful default run of `mode` (`stage1`, `stage1:remat`, ...; no lever)."""
    return next((r for k, r in report["jax"].items()
                 if k in (mode, f"{mode}:remat", f"{mode}:no-remat") and r.get("batch")), None)


def _like_default(args, report, mode, batches):
    """Batch and remat for a lever run of `mode`: those of its default run when there is
    one (a like-for-like time), else the requested ones."""
    ref = _default_result(report, mode)
    if ref is not None:
        return ref["batch"], bool(ref.get("remat"))
    return batches[mode], mode == "stage1" and args.remat == "on"


def run_levers(args, report, common, modes, levers, batches):
    if "attn-micro" in levers:
        spec = dict(common, kind="attn_micro", batch=batches["infer"], label="attn-micro")
        report["attn_micro"] = run_child(args, spec)
        write_json(args.json_out, report)
    # The per-task levers run for --lever-modes only, cheapest task first.
    lever_modes = [m for m in ("infer", "stage2", "stage1") if m in modes and m in args.lever_modes.split(",")]
    if "time-pack" in levers:
        for pack in [p for p in common["lever_time_packs"] if p != args.time_pack]:
            for mode in lever_modes:
                b, remat = _like_default(args, report, mode, batches)
                spec = dict(common, kind=mode, batch=b, remat=remat, time_pack=pack,
                            label=f"{mode}:time-pack={pack}")
                report["jax"][spec["label"]] = run_child(args, spec)
                write_json(args.json_out, report)
    if "scan" in levers:
        for mode in lever_modes:
            b, remat = _like_default(args, report, mode, batches)
            spec = dict(common, kind=mode, batch=b, remat=remat, scan_blocks=not args.scan_blocks,
                        label=f"{mode}:scan={'on' if not args.scan_blocks else 'off'}")
            report["jax"][spec["label"]] = run_child(args, spec)
            write_json(args.json_out, report)
    if "remat-policy" in levers and "stage1" in lever_modes:
        other = "dots" if args.remat_policy == "nothing" else "nothing"
        spec = dict(common, kind="stage1", batch=_like_default(args, report, "stage1", batches)[0], remat=True,
                    remat_policy=other, label=f"stage1:remat-policy={other}")
        report["jax"][spec["label"]] = run_child(args, spec)
        write_json(args.json_out, report)
    others = [k for k in args.lever_attention.split(",") if k and k != args.attention and not
              (args.attention == "auto" and k == "cudnn")]
    if "attention" in levers:
        # Mode outer: the cheap inference / stage-II variants first, the stage-I ones (which
        # can take minutes each) last, so that a deadline cuts the expensive ones.
        for mode in lever_modes:
            for other in others:
                if other == "cudnn-train" and mode != "stage1":
                    continue  # the same as auto where the extractors are not trained
                b, remat = (_like_default(args, report, mode, batches) if mode == "stage1"
                            else (batches[mode], False))
                spec = dict(common, kind=mode, batch=b, remat=remat, attention=other,
                            label=f"{mode}:attention={other}")
                report["jax"][spec["label"]] = run_child(args, spec)
                write_json(args.json_out, report)
    if "chunk" in levers and "infer" in modes:
        spec = dict(common, kind="infer", batch=batches["infer"], chunk=14, label="infer:chunk=14")
        report["jax"][spec["label"]] = run_child(args, spec)
        write_json(args.json_out, report)
    if "xla-flags" in levers:
        for mode in [m for m in ("infer", "stage2") if m in modes]:
            spec = dict(common, kind=mode, batch=batches[mode], label=f"{mode}:flags")
            report["jax"][spec["label"]] = run_child(args, spec, extra_flags=args.lever_xla_flags)
            write_json(args.json_out, report)
    if "e2e" in levers and "stage2" in modes:
        spec = dict(common, kind="stage2", batch=batches["stage2"], e2e=True, label="stage2:e2e")
        report["jax"][spec["label"]] = run_child(args, spec)
        write_json(args.json_out, report)


def write_json(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print(fmt_table(rows_of(report), report) + fmt_attn_micro(report) + fmt_profiles(report))
        return 0
    cpus = pin_threads(args.threads, single_thread_xla=False)
    xla_cpu.disable_ynn_fusion()  # as the CLI does; the JAX children inherit XLA_FLAGS
    gpu = _detect_gpu(args)
    defaults(args, gpu)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown --modes {bad}; choose from {MODES}")
    levers = [x for x in args.levers.split(",") if x]
    common = {"size": args.size, "img_size": args.img_size, "dtype": args.dtype, "attention": args.attention,
              "steps": args.steps, "warmup": args.warmup, "max_batch": args.max_batch,
              "bytes_limit": int(args.bytes_limit_gib * GIB) if args.bytes_limit_gib else None,
              "init": args.init, "profile": args.profile, "scan_blocks": args.scan_blocks,
              "scan_stage1": args.scan_stage1,
              "remat_policy": args.remat_policy, "time_pack": args.time_pack,
              "lever_time_packs": [int(x) for x in args.lever_time_pack.split(",") if x],
              "profile_dir": os.path.abspath(args.profile_dir or os.path.join(
                  os.path.dirname(os.path.abspath(args.json_out)) if args.json_out else ".",
                  "traces" if args.json_out else "sbs_traces"))}

    if args.flops:
        res = run_child(args, dict(common, kind="flops", platform="cpu"))
        print(fmt_flops(res) if "error" not in res else res["error"])
        write_json(args.json_out, {"flops": res})
        return 0 if "error" not in res else 1

    report = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"nproc": os.cpu_count(), "cpus_used": cpus, "platform": platform.platform(),
                          "cpu": cpu_model()},
              "gpu": gpu, "args": vars(args), "jax": {}, "torch": None}
    mcfg = {t: model_config_for(args.size, args.img_size, t) for t in MODES}
    report["flops_per_clip"] = {t: task_flops(mcfg[t])[t] for t in MODES}
    report["flops_parts"] = part_flops(mcfg["infer"])
    fl = report["flops_per_clip"]
    print("model TFLOP per clip: " + ", ".join(f"{t} {fl[t] / 1e12:.3f}" for t in MODES), flush=True)

    if not args.no_jax:
        if args.peak_tflops:
            report["peak"] = {"peak_flops": args.peak_tflops * 1e12, "matmul": "given (--peak-tflops)",
                              "device_kind": "gpu" if gpu else "cpu"}
        else:
            report["peak"] = run_child(args, dict(common, kind="peak"))
        pk = report["peak"].get("peak_flops")
        if pk:
            print(f"[jax] matmul peak: {pk / 1e12:.1f} TFLOP/s ({report['peak'].get('matmul')}) on "
                  f"{report['peak'].get('device_kind')}", flush=True)
        write_json(args.json_out, report)
        batches = {"infer": args.batch_infer, "stage2": args.batch_stage2, "stage1": args.batch_stage1}
        # Order: the cheap, certain cases first, then the torch worker, then the stage-I
        # search and the levers, so that a run cut short still has a side-by-side table.
        for mode in [m for m in ("infer", "stage2") if m in modes and not args.levers_only]:
            run_default_case(args, report, common, mode, batches[mode], False, gpu)
    torch_res, skip = run_torch(args, gpu, args.img_size)
    report["torch"], report["torch_skipped_reason"] = torch_res, skip
    if skip:
        print(f"[torch] skipped: {skip}", flush=True)
    write_json(args.json_out, report)
    if not args.no_jax:
        if "stage1" in modes and not args.levers_only:
            for remat in ([False, True] if args.remat == "both" else [args.remat == "on"]):
                run_default_case(args, report, common, "stage1", batches["stage1"], remat, gpu,
                                 key=None if args.remat != "both" else f"stage1:{'remat' if remat else 'no-remat'}")
        run_levers(args, report, common, modes, levers, batches)
    rows = rows_of(report)
    report["rows"] = rows
    table = fmt_table(rows, report)
    report["table_markdown"] = table
    print()
    pk = report.get("peak", {}).get("peak_flops")
    print(f"device: {report.get('peak', {}).get('device_kind', '?')}; JAX {args.dtype}; measured matmul peak "
          f"{'' if not pk else f'{pk / 1e12:.1f} TFLOP/s'}"
          + (f"; torch {'fp16' if gpu else 'float32'} matmul {torch_res['matmul_peak_flops'] / 1e12:.1f} TFLOP/s"
             if torch_res and torch_res.get("matmul_peak_flops") else ""))
    print(table + fmt_attn_micro(report) + fmt_profiles(report))
    write_json(args.json_out, report)
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
