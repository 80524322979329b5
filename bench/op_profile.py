"""Where a compiled step's device time goes: a `jax.profiler` trace summarised per HLO op.

The GPU runs measured 23 % MFU without saying what filled the other 77 % (docs/
benchmarks.md lists two suspects). This module answers that in the same call that times
the step, without TensorBoard or xprof: `jax.profiler.trace(create_perfetto_trace=True)`
writes a Chrome-trace JSON whose op events carry `hlo_module` and `hlo_op` (GPU kernels
and XLA:CPU thunks alike). Each HLO op is then classified from the compiled module's own
text (matmul, fused attention, reduction, elementwise, layout) and placed in the model by
its `op_name` metadata, which carries the Flax module path
(`vfeat_extractor/blocks_3/timeattn/...`; block indices are folded into `blocks_*`).

    trace = capture(lambda: compiled(*args), steps=2, trace_dir="prof")
    summary = summarise(load_op_times(trace, module_name(compiled.as_text())),
                        parse_hlo(compiled.as_text()), steps=2)
    print(format_summary(summary))

or, for a trace folder that holds the module's text as `*.hlo.txt` (what
`side_by_side.py --profile` leaves): `python bench/op_profile.py TRACE_DIR [--steps N]`.

Summed op time can exceed wall time on a CPU (thunks run concurrently on its threads);
on a GPU with one compute stream it is the busy time of the device.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Callable, Iterable, Optional

MATMUL = "matmul/conv"
ATTENTION = "fused attention"
REDUCTION = "reduction (norms, softmax)"
ELEMENTWISE = "elementwise"
LAYOUT = "layout (transpose/copy/concat)"
COLLECTIVE = "collective"
OTHER = "other"
CATEGORIES = (MATMUL, ATTENTION, REDUCTION, ELEMENTWISE, LAYOUT, COLLECTIVE, OTHER)

# Opcodes that only move or reinterpret data.
_MOVEMENT = {"parameter", "constant", "bitcast", "reshape", "transpose", "copy", "broadcast", "slice",
             "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "tuple", "get-tuple-element",
             "reverse", "gather", "iota", "bitcast-convert", "copy-start", "copy-done"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Control flow whose body ops are traced as events of their own (XLA:CPU's while thunk
# spans every iteration of a scan): summed, they would count the body twice.
_CONTAINERS = {"while", "conditional", "call"}


@dataclasses.dataclass
class HloOp:
    name: str
    opcode: str
    category: str
    scope: str  # Flax module path, block indices folded ("" when the op has no metadata)
    direction: str  # "fwd" or "bwd" (inside a transpose of the forward)
    primitive: str  # the jax primitive of the op's metadata (dot_general, reduce_sum, ...)


_COMP_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _split_type(rest: str) -> str:
    """`rest` after `name =`: drops the result type (which may be a tuple with spaces) and
    returns `opcode(operands), attributes`."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[i + 1:].lstrip()
        return ""
    parts = rest.split(None, 1)
    return parts[1] if len(parts) == 2 else ""


def _computations(hlo_text: str) -> dict[str, list[tuple[str, str, str]]]:
    """Computation name -> [(instruction, opcode, rest of line)] of an HLO module's text."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    current: Optional[list] = None
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and "->" in line and "=" not in line.split("->")[0].split("(")[0]:
            m = _COMP_HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(1), [])
                continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = _split_type(m.group(2))
        om = re.match(r"([\w\-]+)\(", body)
        if om:
            current.append((m.group(1), om.group(1), body))
    return comps


def _attr(body: str, key: str) -> Optional[str]:
    m = re.search(key + r'="([^"]*)"', body)
    return m.group(1) if m else None


def _called(body: str) -> list[str]:
    found = re.findall(r"\b(?:calls|to_apply|body|condition)=(\{[^}]*\}|%?[\w.\-]+)", body)
    return [c.strip().lstrip("%") for group in found for c in group.strip("{}").split(",") if c.strip()]


def _opcodes_under(comps, names: Iterable[str], seen=None) -> set[str]:
    seen = set() if seen is None else seen
    out: set[str] = set()
    for name in names:
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for _, opcode, body in comps[name]:
            out.add(opcode)
            if opcode == "custom-call":
                out.add("custom-call:" + (_attr(body, "custom_call_target") or ""))
            out |= _opcodes_under(comps, _called(body), seen)
    return out


def _category(opcode: str, body: str, comps) -> str:
    target = (_attr(body, "custom_call_target") or "").lower()
    if opcode == "custom-call":
        if any(k in target for k in ("fmha", "flash", "attention")):
            return ATTENTION
        if any(k in target for k in ("gemm", "matmul", "conv", "cublas")):
            return MATMUL
    if opcode in ("dot", "convolution"):
        return MATMUL
    if opcode.startswith(_COLLECTIVES):
        return COLLECTIVE
    inner = _opcodes_under(comps, _called(body)) if opcode in ("fusion", "async-start", "call") else set()
    if opcode == "fusion":
        backend = body.split("backend_config=", 1)[1] if "backend_config=" in body else ""
        if any(k in backend for k in ("__triton_gemm", "__cudnn$fusion", "cublas", "__triton_nested_gemm")):
            return MATMUL
        if any(t.startswith("custom-call:") and "fmha" in t.lower() for t in inner):
            return ATTENTION
        if "dot" in inner or "convolution" in inner:
            return MATMUL
        if "reduce" in inner or "reduce-window" in inner:
            return REDUCTION
        if inner and inner <= _MOVEMENT:
            return LAYOUT
        return ELEMENTWISE
    if opcode in ("reduce", "reduce-window"):
        return REDUCTION
    if opcode in _MOVEMENT:
        return LAYOUT
    return OTHER


# Dense layers named inside a block part (Motionformer qkv/proj/fc1/fc2, AST query/key/
# value/dense, the aggregators' in_proj/out_proj/linear1/linear2): folded into the part.
_PROJECTIONS = {"qkv", "proj", "fc1", "fc2", "query", "key", "value", "dense", "in_proj", "out_proj",
                "linear1", "linear2"}
_WRAPPER = re.compile(r"^(transpose|jvp|vmap|pjit|remat|checkpoint|jit)\((.*)\)$")


def _scope(op_name: str) -> tuple[str, str, str]:
    """`jit(step)/transpose(jvp(Model))/vfeat_extractor/blocks_3/attn/dot_general` ->
    (`vfeat_extractor/blocks_*/attn`, `bwd`, `dot_general`)."""
    op_name = op_name.split(";")[0]
    direction = "bwd" if "transpose(" in op_name else "fwd"
    parts = [p for p in op_name.split("/") if p]
    primitive = parts[-1] if parts else ""
    keep = []
    for p in parts[1:-1]:
        while True:  # peel transpose(jvp(...)) and friends
            m = _WRAPPER.match(p)
            if not m:
                break
            p = m.group(2)
        if not re.fullmatch(r"[A-Za-z_]\w*", p) or p.lstrip("_")[:1].isupper():  # classes, methods, vmap specs
            continue
        if p in ("rematted_computation", "checkpoint", "remat", "while", "body", "cond", "eval_jaxpr"):
            continue
        keep.append(re.sub(r"_(\d+)$", "_*", p))
    # A rematerialised module repeats its path (`v_encoder/v_encoder/blocks_*/...`).
    width = 1
    while 2 * width <= len(keep):
        if keep[:width] == keep[width:2 * width]:
            del keep[:width]
        else:
            width += 1
    while len(keep) > 1 and keep[-1] in _PROJECTIONS:  # a block part's matmuls stay with the part
        keep.pop()
    return "/".join(keep), direction, primitive


def parse_hlo(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction of a compiled module's text -> its category and model scope."""
    comps = _computations(hlo_text)
    ops: dict[str, HloOp] = {}
    for comp in comps.values():
        for name, opcode, body in comp:
            op_name = _attr(body, "op_name") or ""
            if not op_name and opcode == "fusion":  # the fused root's metadata
                for called in _called(body):
                    for _, _, inner_body in reversed(comps.get(called, [])):
                        op_name = _attr(inner_body, "op_name") or ""
                        if op_name:
                            break
            scope, direction, primitive = _scope(op_name)
            if not scope:  # e.g. XLA:CPU's reduce-window wrappers: the scope of what they read
                operands = re.findall(r"%([\w.\-]+)", body.split(")", 1)[0])
                source = next((ops[o] for o in operands if o in ops and ops[o].scope), None)
                if source is not None:
                    scope, direction = source.scope, source.direction
            ops[name] = HloOp(name, opcode, _category(opcode, body, comps), scope, direction, primitive)
    return ops


def module_name(hlo_text: str) -> str:
    m = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    return m.group(1) if m else ""


def capture(run: Callable[[], object], steps: int, trace_dir: str) -> str:
    """Runs `run()` `steps` times (each waited on) under the profiler; returns the
    Chrome-trace JSON (`.json.gz`) it wrote under `trace_dir`."""
    import jax

    os.makedirs(trace_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run())
    new = sorted(set(glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)) - before,
                 key=os.path.getmtime)
    if not new:
        raise RuntimeError(f"the profiler wrote no trace JSON under {trace_dir}")
    return new[-1]


def load_op_times(trace_path: str, module: str = "") -> dict[str, dict]:
    """HLO op -> {"us": summed duration, "count": events} for one module's ops.

    Only device processes (`/device:...`) are read when they hold op events (GPU kernels;
    the host-side events of the same ops would count them twice); otherwise all (CPU).
    `module` matches `hlo_module` exactly or as a prefix (`jit_step` vs `jit_step.42`).
    """
    with gzip.open(trace_path, "rt") if trace_path.endswith(".gz") else open(trace_path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process = {e.get("pid"): (e.get("args") or {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}

    # XLA:CPU runs a multi-threaded op (a dot, a large fusion) asynchronously: its event
    # covers the launch only and an `end: <op>` event marks its completion, so an op's
    # time is from its start to the end of its k-th `end:` event.
    ends: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("end: "):
            ends[e["name"][len("end: "):]].append(float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)))
    for v in ends.values():
        v.sort()

    def op_events(device_only: bool):
        picked = []
        for e in events:
            args = e.get("args") or {}
            if e.get("ph") != "X" or "hlo_op" not in args:
                continue
            if device_only and not process.get(e.get("pid"), "").startswith("/device:"):
                continue
            picked.append(e)
        picked.sort(key=lambda e: float(e.get("ts", 0.0)))
        used: dict[str, int] = collections.defaultdict(int)
        for e in picked:
            args = e["args"]
            ts, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
            done = ends.get(e["name"], [])
            i = used[e["name"]]
            while i < len(done) and done[i] < ts:
                i += 1
            if i < len(done):
                dur = max(dur, done[i] - ts)
                i += 1
            used[e["name"]] = i
            mod = str(args.get("hlo_module", ""))
            if module and not (mod == module or mod.startswith(module + ".") or module.startswith(mod + ".")):
                continue
            yield args["hlo_op"], dur

    found = list(op_events(device_only=True)) or list(op_events(device_only=False))
    times: dict[str, dict] = collections.defaultdict(lambda: {"us": 0.0, "count": 0})
    for op, dur in found:
        times[op]["us"] += dur
        times[op]["count"] += 1
    return dict(times)


def summarise(op_times: dict[str, dict], ops: dict[str, HloOp], steps: int, top: int = 12) -> dict:
    """Per step: time by category, by model scope (scope x direction) and the top ops.
    Loop and branch ops (`_CONTAINERS`) are left out of the sums: their events contain
    their body's ops, which are counted themselves; their time is reported apart."""
    containers = {n: t for n, t in op_times.items() if n in ops and ops[n].opcode in _CONTAINERS}
    op_times = {n: t for n, t in op_times.items() if n not in containers}
    total = sum(t["us"] for t in op_times.values())
    by_cat: dict[str, float] = collections.defaultdict(float)
    by_scope: dict[tuple, dict] = collections.defaultdict(lambda: collections.defaultdict(float))
    unknown = 0.0
    rows = []
    for name, t in op_times.items():
        op = ops.get(name)
        if op is None:
            unknown += t["us"]
            by_cat[OTHER] += t["us"]
            rows.append((t["us"], name, "?", OTHER, "", ""))
            continue
        by_cat[op.category] += t["us"]
        by_scope[(op.scope or "(no scope)", op.direction)][op.category] += t["us"]
        rows.append((t["us"], name, op.opcode, op.category, op.scope, op.direction))
    ms = lambda us: us / 1e3 / max(steps, 1)  # noqa: E731
    scopes = sorted(by_scope.items(), key=lambda kv: -sum(kv[1].values()))
    return {
        "steps": steps,
        "op_ms_per_step": ms(total),
        "ops_seen": len(op_times),
        "ops_unmatched_in_hlo_ms": ms(unknown),
        "control_flow_ms": ms(sum(t["us"] for t in containers.values())),
        "by_category_ms": {c: ms(by_cat[c]) for c in CATEGORIES if by_cat.get(c)},
        "by_scope_ms": [{"scope": s, "direction": d, "ms": ms(sum(cats.values())),
                         "by_category_ms": {c: ms(v) for c, v in sorted(cats.items(), key=lambda kv: -kv[1])}}
                        for (s, d), cats in scopes[:top]],
        "top_ops": [{"op": n, "opcode": oc, "category": c, "scope": s, "direction": d, "ms": ms(us)}
                    for us, n, oc, c, s, d in sorted(rows, reverse=True)[:top]],
    }


def format_summary(summary: dict, title: str = "", step_ms: Optional[float] = None) -> str:
    """The summary as text; given the step's timed wall time, also the share of it that
    ops fill (on a GPU, the rest is the device waiting: launch gaps, host work)."""
    total = summary["op_ms_per_step"] or 1e-9
    lines = [f"{title}device op time {summary['op_ms_per_step']:.1f} ms/step over {summary['ops_seen']} ops"
             + (f" = {100 * total / step_ms:.0f} % of the {step_ms:.1f}-ms step" if step_ms else "")
             + (f" ({summary['ops_unmatched_in_hlo_ms']:.1f} ms not found in the HLO)"
                if summary["ops_unmatched_in_hlo_ms"] else "")
             + (f"; loops/branches around them {summary['control_flow_ms']:.1f} ms, not added"
                if summary.get("control_flow_ms") else "")]
    for c, v in sorted(summary["by_category_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {c:<32} {v:9.1f} ms  {100 * v / total:5.1f} %")
    lines.append("  by model scope:")
    for s in summary["by_scope_ms"]:
        cats = ", ".join(f"{c.split(' ')[0]} {v:.1f}" for c, v in list(s["by_category_ms"].items())[:3])
        lines.append(f"  {s['scope'][:56]:<56} {s['direction']:<3} {s['ms']:9.1f} ms  ({cats})")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Summarise a profiled step: python bench/op_profile.py TRACE_DIR")
    ap.add_argument("trace_dir", help="folder with the Chrome-trace JSON (searched recursively) and the module's *.hlo.txt")
    ap.add_argument("--steps", type=int, default=1, help="steps in the trace (times are per step)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    traces = sorted(glob.glob(os.path.join(args.trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True),
                    key=os.path.getmtime)
    hlo = sorted(glob.glob(os.path.join(args.trace_dir, "**", "*.hlo.txt"), recursive=True))
    if not traces or not hlo:
        raise SystemExit(f"{args.trace_dir}: needs a perfetto_trace.json.gz and a *.hlo.txt "
                         f"(found {len(traces)} and {len(hlo)})")
    with open(hlo[0]) as f:
        text = f.read()
    summary = summarise(load_op_times(traces[-1], module_name(text)), parse_hlo(text), args.steps, args.top)
    print(format_summary(summary, title=f"{traces[-1]}: "))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
