"""Parity with the official Synchformer code at other sizes, seeds, class counts and heads.

For each variant of `parity_variants.py` (v1-v5: tiny models, seconds each; v6/v7: the
full official sync.yaml and segment_avclip.yaml, minutes and GBs each, only with `--full`)
a torch-side child (`official_parity_worker.py`, run by `--torch-python`) builds the
official model from the checkout at `--official-repo`, re-randomises every weight, runs
the official forward on seeded inputs it makes itself and saves the weights as its
trainer would (`trainer.pt` with OmegaConf `args`, or stage I's `epoch_best.pt`). This
process never imports torch: it converts that file with
`synchformer_jax.pretrained.load_model(file, overrides=<the variant's head counts>)`,
checks the converted config against the table and the official head counts, runs the
float32 Flax model on the same inputs and compares every stage both sides expose:

  stages II/III  AST tokens after its last LayerNorm, Motionformer tokens after its last
                 block, afeat/vfeat, aproj/vproj outputs, tokens after the position
                 embedding, every block output, ln_f, logits
  stage I        the same extractor tokens, encoder outputs, normalised embeddings, the
                 clamped temperature, the stored logit_scale, the contrastive loss
                 (synchformer_jax.losses.segment_infonce against the official loss)

rel = max |ours - official| / max |official| per stage; a variant passes when every stage
has rel <= --tol (1e-4), the config and head counts are as built, and the file converts.
Exit status 1 when a variant fails.

    python bench/official_parity.py --torch-python <torch-venv>/bin/python \\
        --official-repo <Synchformer checkout> [--variants v1,v3|all] [--full] [--json-out F]

The torch Python needs torch, omegaconf, einops, timm (0.6.x; it imports torchvision,
which the worker stubs when none that works is installed), transformers (4.x), ftfy (stage I).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench/ also when imported by path
from hostinfo import cpu_model  # noqa: E402
from parity_variants import VARIANTS, Variant  # noqa: E402

from synchformer_jax import xla_cpu  # noqa: E402

WORKER = os.path.join(HERE, "official_parity_worker.py")
DEFAULT_TOL = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", required=True, help="python executable with torch and the official deps")
    ap.add_argument("--official-repo", required=True, help="checkout of github v-iashin/Synchformer")
    ap.add_argument("--variants", default="all",
                    help="comma-separated names (" + ", ".join(VARIANTS) + ") or 'all' (the tiny ones; "
                         "with --full also the full-size ones)")
    ap.add_argument("--full", action="store_true", help="also the full-size variants (minutes and GBs each)")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL, help="largest relative difference that passes")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--work-dir", default=None,
                    help="keep each variant's inputs, outputs and checkpoint here (default: a temp dir, removed)")
    ap.add_argument("--json-out", default=None)
    return ap.parse_args(argv)


def select_variants(spec: str, full: bool) -> list[Variant]:
    if spec == "all":
        return [v for v in VARIANTS.values() if full or not v.full]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    chosen = [VARIANTS[n] for n in names]
    too_big = [v.name for v in chosen if v.full and not full]
    if too_big:
        raise SystemExit(f"error: full-size variant(s) {', '.join(too_big)} take minutes and GBs each: add --full")
    return chosen


def check_torch_side(args) -> None:
    """Fail early, in one line, when the torch Python or the checkout cannot work."""
    if not shutil.which(args.torch_python) and not os.path.exists(args.torch_python):
        raise SystemExit(f"error: --torch-python {args.torch_python!r} not found")
    if not os.path.isfile(os.path.join(args.official_repo, "configs", "sync.yaml")):
        raise SystemExit(f"error: --official-repo {args.official_repo!r} is not a Synchformer checkout "
                         "(no configs/sync.yaml)")
    # Not timm: it imports torchvision, which the worker stubs where none works.
    probe = subprocess.run([args.torch_python, "-c", "import torch, einops, omegaconf, transformers"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"error: {args.torch_python} cannot import the official deps: {last}")


# ---- torch side ---------------------------------------------------------------------------
def run_worker(args, variant: Variant, out: str) -> dict:
    cmd = [args.torch_python, WORKER, "--official-repo", os.path.abspath(args.official_repo),
           "--variant", variant.name, "--out", out, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"torch worker failed (exit {proc.returncode}): {tail[0]}")
    with open(os.path.join(out, "worker_result.json")) as f:
        return json.load(f)


# ---- JAX side -----------------------------------------------------------------------------
def difference(ours, official, tol: float) -> dict:
    a, b = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)], "pass": False}
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    rel = max_abs / scale if scale else max_abs
    return {"max_abs": max_abs, "max_rel": rel, "official_max_abs": scale, "pass": bool(rel <= tol)}


def sync_model_stages(model, params, video, audio) -> dict:
    """Ours, under the names the worker uses; one jitted forward with the sown stages."""
    import jax

    def forward(p, v, a):
        logits, state = model.apply({"params": p}, v, a, mutable=["intermediates"])
        return logits, state["intermediates"]

    logits, im = jax.jit(forward)(params, video, audio)
    t = im["transformer"]
    return {"ast_last_hidden_state": im["afeat_extractor"]["last_hidden_state"][0],
            "mf_tokens_last_block": im["vfeat_extractor"]["tokens_last_block"][0],
            "afeat": im["afeat"][0], "vfeat": im["vfeat"][0],
            "aproj_out": im["aproj_out"][0], "vproj_out": im["vproj_out"][0],
            "tokens_after_pos_emb": t["tokens_after_pos_emb"][0],
            "block_outs": np.stack(t["block_outs"]), "ln_f_out": t["ln_f_out"][0], "logits": logits}


def segment_avclip_stages(model, params, video, audio) -> dict:
    import jax
    from synchformer_jax import losses
    from synchformer_jax.models import synchformer as sf

    def forward(p, v, a):
        (v_emb, a_emb, temperature), state = model.apply({"params": p}, v, a, mutable=["intermediates"])
        return v_emb, a_emb, temperature, losses.segment_infonce(v_emb, a_emb, temperature), state["intermediates"]

    v_emb, a_emb, temperature, loss, im = jax.jit(forward)(params, video, audio)
    # The encoder outputs before normalisation (a scale error would vanish in the embeddings).
    v_enc = jax.jit(lambda p, v: sf.extract_video_features(model, p, v))(params, video)
    a_enc = jax.jit(lambda p, a: sf.extract_audio_features(model, p, a))(params, audio)
    return {"ast_last_hidden_state": im["a_encoder"]["last_hidden_state"][0],
            "mf_tokens_last_block": im["v_encoder"]["tokens_last_block"][0],
            "v_encoder_out": v_enc, "a_encoder_out": a_enc, "v_emb": v_emb, "a_emb": a_emb,
            "temperature": temperature, "logit_scale": params["logit_scale"], "loss": loss}


def config_differences(got, expected) -> list[str]:
    from flax import traverse_util

    a = traverse_util.flatten_dict(got.to_dict(), sep=".")
    b = traverse_util.flatten_dict(expected.to_dict(), sep=".")
    return [f"{k}: {a.get(k)!r} (expected {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_variant(variant: Variant, work: str, worker: dict, tol: float) -> dict:
    """Convert the worker's checkpoint as a user would and compare; one result row."""
    import jax.numpy as jnp
    from synchformer_jax import pretrained
    from synchformer_jax.models import synchformer as sf

    row: dict = {"checkpoint": worker["checkpoint"], "n_params": worker["n_params"], "torch_build_s": worker["build_s"],
                 "torch_forward_s": worker["forward_s"], "problems": []}
    if worker["official_heads"] != variant.expected_heads():
        row["problems"].append(f"official heads {worker['official_heads']} != table {variant.expected_heads()}")
    t0 = time.perf_counter()
    loaded = pretrained.load_model(os.path.join(work, worker["checkpoint"]), overrides=variant.overrides())
    row["convert_s"] = time.perf_counter() - t0
    row["notes"] = loaded.notes
    row["problems"] += [f"config {d}" for d in config_differences(loaded.config, variant.expected_config())]

    video = jnp.asarray(np.load(os.path.join(work, "video.npy")))
    audio = jnp.asarray(np.load(os.path.join(work, "audio.npy")))
    official = np.load(os.path.join(work, "official_outputs.npz"))
    model = sf.build_model(loaded.config)
    t0 = time.perf_counter()
    stages = (segment_avclip_stages if variant.is_stage_one else sync_model_stages)(
        model, loaded.params, video, audio)
    row["jax_s"] = time.perf_counter() - t0
    row["stages"] = {name: difference(ours, official[name], tol) for name, ours in stages.items()}
    if "logits" in stages:
        row["argmax_equal"] = bool(np.array_equal(np.argmax(stages["logits"], -1), np.argmax(official["logits"], -1)))
    return row


def summarise(row: dict) -> dict:
    """Worst stage by relative difference, the final outputs, the verdict."""
    stages = row.get("stages", {})
    measured = {k: v for k, v in stages.items() if "max_rel" in v}
    if measured:
        worst = max(measured, key=lambda k: measured[k]["max_rel"])
        row["worst_stage"] = worst
        row["max_abs"] = max(v["max_abs"] for v in measured.values())
        row["max_rel"] = measured[worst]["max_rel"]
    shapes = [f"{k} shape {v['shape']}" for k, v in stages.items() if "shape" in v]
    row["problems"] = row.get("problems", []) + shapes
    row["pass"] = bool(stages) and all(v["pass"] for v in stages.values()) and not row["problems"] \
        and "error" not in row
    return row


def _sci(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def format_table(rows: list[dict], tol: float) -> str:
    lines = [f"| variant | covers | file, --set | max abs (all stages) | max rel (worst stage) | "
             f"logits or embeddings: abs / rel | pass at {tol:g} |", "|---|---|---|---:|---|---|---|"]
    for r in rows:
        sets = " ".join(f"{k}={v}" for k, v in r.get("overrides", {}).items()) or "none"
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['covers']} | {r.get('checkpoint', '-')}, {sets} | - | - | - | "
                         f"ERROR: {r['error']} |")
            continue
        final = [k for k in ("logits", "v_emb", "a_emb") if k in r["stages"]]
        out = "; ".join(f"{k} {_sci(r['stages'][k].get('max_abs'))} / {_sci(r['stages'][k].get('max_rel'))}"
                        for k in final)
        verdict = "PASS" if r["pass"] else "FAIL: " + "; ".join(r["problems"] or ["a stage over tol"])
        lines.append(f"| {r['variant']} | {r['covers']} | {r['checkpoint']}, {sets} | {_sci(r.get('max_abs'))} | "
                     f"{_sci(r.get('max_rel'))} ({r.get('worst_stage', '-')}) | {out} | {verdict} |")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = select_variants(args.variants, args.full)
    check_torch_side(args)
    xla_cpu.disable_ynn_fusion()  # as the command-line tool runs the model (before jax starts)
    import jax

    # torch float32 matmuls on a CPU are exact float32; on a GPU so are these then.
    jax.config.update("jax_default_matmul_precision", "highest")

    root = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="official_parity_")
    rows, torch_versions = [], None
    try:
        for variant in variants:
            work = os.path.join(root, variant.name)
            row = {"variant": variant.name, "covers": variant.covers, "overrides": variant.overrides(),
                   "spec": variant.to_json()}
            try:
                worker = run_worker(args, variant, work)
                torch_versions = torch_versions or {**worker["versions"], "torchvision": worker["torchvision"]}
                row.update(check_variant(variant, work, worker, args.tol))
            except Exception as e:  # noqa: BLE001 - a failing variant is a row, the others still run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(summarise(row))
            print(f"[parity] {variant.name}: {'PASS' if row['pass'] else 'FAIL'} "
                  f"(max rel {_sci(row.get('max_rel'))} in {row.get('worst_stage', '-')})", flush=True)
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)  # full-size checkpoints are GBs
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(format_table(rows, args.tol))
    if args.json_out:
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                  "machine": {"cpu": cpu_model(), "cpus_allowed": len(os.sched_getaffinity(0)),
                              "jax_backend": jax.default_backend()},
                  "versions": {"jax_side": versions(), "torch_side": torch_versions},
                  "tol": args.tol, "rows": rows}
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1, default=float)
    return 0 if rows and all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
