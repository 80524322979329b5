"""Smoke test of bench/side_by_side.py: the JAX side at tiny size on the CPU, and the
table's derived columns (MFU, ratio) on a synthetic report with a torch column."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "side_by_side.py"


def _module():
    spec = importlib.util.spec_from_file_location("side_by_side", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_json_and_table(tmp_path):
    out = tmp_path / "sbs.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--platform", "cpu", "--modes", "infer",
         "--batch-infer", "1", "--steps", "1", "--warmup", "0", "--peak-tflops", "0.1",
         "--profile", "1", "--json-out", str(out), "--levers", "time-pack,attn-micro", "--lever-time-pack", "4"],
        capture_output=True, text=True, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| infer | synchformer-jax | default | float32 | 1 |" in proc.stdout
    # The levers: the time attention packed 4 locations per sequence (16 patches of a 64-px
    # frame), end to end and alone next to the other attention shapes (cuDNN rows are errors
    # on a CPU); both in the printed tables.
    assert "| infer | synchformer-jax | time-pack=4 | float32 | 1 |" in proc.stdout
    assert "| time packed 4 (q 32, kv 34, masked) | xla | fwd+bwd |" in proc.stdout
    assert "| time (q 8, kv 9) | xla | fwd |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["gpu"] is False and report["torch"] is None
    assert "no --torch-python" in report["torch_skipped_reason"]
    res = report["jax"]["infer"]
    assert "error" not in res, res
    assert res["batch"] == 1 and res["finite"] and res["step_s"] > 0
    assert res["xla_flops"] > 0 and res["attention"]["traced_calls"]["xla"] > 0
    packed = report["jax"]["infer:time-pack=4"]
    assert "error" not in packed and packed["finite"], packed
    assert report["attn_micro"]["results"]["time packed 4 (q 32, kv 34, masked) xla fwd"]["ms"] > 0
    row, packed_row = report["rows"]
    assert packed_row["variant"] == "time-pack=4"
    assert row["task"] == "infer" and row["impl"] == "synchformer-jax"
    assert 0 < row["mfu_measured"] and row["clips_per_s"] > 0
    # The analytic count agrees with XLA's cost analysis of the same forward (within 15 %:
    # XLA also counts element-wise ops, softmax, LayerNorm, GELU).
    analytic = report["flops_per_clip"]["infer"]
    assert 0.85 < res["xla_flops"] / analytic < 1.15
    assert "table_markdown" in report
    # --profile: the traced step's op time, placed in the model, printed after the table.
    prof = res["profile"]
    assert "error" not in prof, prof
    assert pathlib.Path(prof["trace"]).is_file() and str(tmp_path / "traces") in prof["trace"]
    assert prof["ops_unmatched_in_hlo_ms"] == 0 and prof["by_category_ms"]["matmul/conv"] > 0
    scopes = {r["scope"] for r in prof["by_scope_ms"]}
    assert {"vfeat_extractor/blocks_*/attn", "vfeat_extractor/blocks_*/timeattn"} & scopes, scopes
    assert "infer: device op time" in proc.stdout and "-ms step" in proc.stdout


def test_rows_ratio_and_mfu():
    mod = _module()
    report = {
        "gpu": True, "args": {"ref_peak_tflops": 800.0, "dtype": "bfloat16"},
        "peak": {"peak_flops": 700e12},
        "flops_per_clip": {"infer": 5.7e12, "stage2": 5.7e12, "stage1": 17.1e12},
        "jax": {"infer": {"batch": 16, "step_s": 0.2, "peak_device_bytes": 8 * 2 ** 30, "compile_s": 30.0},
                "stage1": {"error": "boom"}},
        "torch": {"dtype": "fp16", "results": {"infer": {"batch": 16, "step_s": 0.5, "peak_bytes": 2 ** 30}}},
    }
    rows = mod.rows_of(report)
    jax_row = next(r for r in rows if r["impl"] == "synchformer-jax" and r["task"] == "infer")
    assert abs(jax_row["ratio_vs_torch"] - 2.5) < 1e-9
    assert abs(jax_row["mfu_measured"] - 5.7e12 * 16 / 0.2 / 700e12) < 1e-9
    assert abs(jax_row["mfu_ref"] - 5.7e12 * 16 / 0.2 / 800e12) < 1e-9
    table = mod.fmt_table(rows, report)
    assert "MFU (800 TF)" in table and "2.50x" in table and "error: boom" in table


def test_analytic_flops_official_sizes():
    mod = _module()
    m = mod.model_config_for("full", None, "infer")
    parts = mod.part_flops(m)
    # ~0.4 TFLOP per 0.64-s segment for Motionformer at 224^2, ~5.5 TFLOP per 14 segments.
    assert 0.38e12 < parts["motionformer_per_segment"]["total"] < 0.41e12
    tasks = mod.task_flops(m)
    assert 5.5e12 < tasks["infer"] < 5.9e12
    assert abs(tasks["stage1"] / tasks["extractors_fwd"] - 3.0) < 1e-9
    # The cached stage-II step trains only the projections and transformer: 3x their forward,
    # under 1 % of the raw step.
    sync = parts["sync_transformer_per_clip"]["total"]
    assert abs(tasks["stage2_cached"] - 3.0 * sync) < 1e-3
    assert abs(tasks["stage2"] - tasks["extractors_fwd"] - tasks["stage2_cached"]) < 1e-3
    assert tasks["stage2_cached"] < 0.01 * tasks["stage2"]


def test_train_step_bench_counts_the_same_flops():
    # bench/train_step.py's MFU and side_by_side's divide by the same count.
    sys.path.insert(0, str(REPO / "bench"))
    import model_flops
    import train_step

    from synchformer_jax import experiment

    for stage, task in (("segment_avclip", "stage1"), ("sync", "stage2")):
        config = experiment.default_config(stage)
        m = experiment.model_config(config)
        assert train_step.analytic_flops(config, 3) == 3 * model_flops.task_flops(m)[task]


def test_the_prepared_gpu_call_parses():
    """`bench/gpu_call.sh` is run where device minutes are scarce: its side_by_side.py
    command must parse with today's flags (a renamed flag would cost a whole lease), its
    levers must exist, and the packing it asks for must fit the full-size frame."""
    script = (REPO / "bench" / "gpu_call.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_call.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_prepare.sh")]).returncode == 0
    command = script[script.index("python3 bench/side_by_side.py"):].split("\n\n")[0]
    command = command.split("2>&1")[0].replace("\\\n", " ")
    for shell, value in (('"${torch_args[@]}"', "--torch-python python3 --official-repo .official "
                                                 "--torch-batch-stage1 4"),
                         ('"${DEADLINE_S:-450}"', "450"), ('"$out/sbs.json"', "sbs.json"), ('"$@"', "")):
        assert shell in command, shell
        command = command.replace(shell, value)
    argv = shlex.split(command)[2:]
    args = _module().parse_args(argv)
    known = {"attn-micro", "time-pack", "attention", "scan", "remat-policy", "chunk", "xla-flags", "e2e"}
    assert args.levers and set(args.levers.split(",")) <= known, args.levers
    assert set(args.lever_modes.split(",")) <= {"infer", "stage2", "stage1"}
    assert set(args.lever_attention.split(",")) <= {"xla", "cudnn", "hybrid", "cudnn-train"}
    from synchformer_jax.models.config import ModelConfig
    for pack in args.lever_time_pack.split(","):
        ModelConfig(time_attention_pack=int(pack))  # raises unless it divides the 196 patches
    assert args.deadline_s and args.deadline_s < 540  # ends inside its device call
