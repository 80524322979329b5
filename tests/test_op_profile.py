"""bench/op_profile.py: a real jax.profiler trace of a jitted Flax step, summarised per
op, and the HLO / trace formats of a GPU run (custom calls, device streams) parsed."""
from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]


def _op_profile():
    if "op_profile" not in sys.modules:  # registered first: its dataclass resolves its module
        spec = importlib.util.spec_from_file_location("op_profile", REPO / "bench" / "op_profile.py")
        sys.modules["op_profile"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["op_profile"])
    return sys.modules["op_profile"]


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        h = nn.Dense(1024, name="fc1")(h)
        return x + nn.Dense(x.shape[-1], name="fc2")(jax.nn.gelu(h, approximate=False))


class _Tower(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Block(name=f"blocks_{i}")(x)
        return jnp.transpose(x, (1, 0, 2)).sum()


def test_trace_of_a_flax_training_step_is_placed_in_the_model(tmp_path):
    op = _op_profile()
    model = _Tower()
    x = jax.random.normal(jax.random.key(0), (8, 64, 256))
    params = model.init(jax.random.key(1), x)
    compiled = jax.jit(jax.grad(lambda p: model.apply(p, x))).lower(params).compile()
    jax.block_until_ready(compiled(params))
    trace = op.capture(lambda: compiled(params), steps=2, trace_dir=str(tmp_path / "trace"))
    assert pathlib.Path(trace).is_file() and trace.endswith(".json.gz")

    text = compiled.as_text()
    ops = op.parse_hlo(text)
    times = op.load_op_times(trace, op.module_name(text))
    assert times, "no op events of the module in the trace"
    assert set(times) <= set(ops), set(times) - set(ops)  # every traced op is an instruction of the HLO
    assert all(t["count"] == 2 for t in times.values())  # one event per op per step

    s = op.summarise(times, ops, steps=2)
    assert s["ops_unmatched_in_hlo_ms"] == 0 and s["op_ms_per_step"] > 0
    cats = s["by_category_ms"]
    # Two 256x1024 matmuls per block forward, four more backward: matmul time leads.
    assert max(cats, key=cats.get) == op.MATMUL, cats
    scopes = {(r["scope"], r["direction"]) for r in s["by_scope_ms"]}
    # Block indices folded, the Dense names folded into their block, both directions.
    assert ("blocks_*", "fwd") in scopes and ("blocks_*", "bwd") in scopes, scopes
    matmul_ops = [r for r in s["top_ops"] if r["category"] == op.MATMUL]
    assert matmul_ops and all(r["scope"] == "blocks_*" for r in matmul_ops)
    assert "device op time" in op.format_summary(s)


# The text of a GPU module as XLA prints it (abridged): cuBLAS and cuDNN custom calls with
# tuple results, a Triton GEMM fusion, a reduction, a transpose and a loop fusion.
_GPU_HLO = """HloModule jit_step, entry_computation_layout={(bf16[64,768]{1,0})->bf16[64,768]{1,0}}

%fused_transpose (param_0: bf16[8,12,64]) -> bf16[12,8,64] {
  %param_0 = bf16[8,12,64]{2,1,0} parameter(0)
  ROOT %transpose.1 = bf16[12,8,64]{2,1,0} transpose(%param_0), dimensions={1,0,2}, metadata={op_name="jit(step)/jvp(Synchformer)/vfeat_extractor/blocks_3/timeattn/transpose"}
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%a, %b)
}

%fused_reduce (param_0.1: f32[64,768]) -> f32[64] {
  %param_0.1 = f32[64,768]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.2 = f32[64]{0} reduce(%param_0.1, %c), dimensions={1}, to_apply=%region_add, metadata={op_name="jit(step)/transpose(jvp(Synchformer))/vfeat_extractor/blocks_11/norm1/reduce_sum"}
}

%fused_gelu (param_0.2: f32[64,3072]) -> bf16[64,3072] {
  %param_0.2 = f32[64,3072]{1,0} parameter(0)
  %e = f32[64,3072]{1,0} erf(%param_0.2)
  ROOT %convert.3 = bf16[64,3072]{1,0} convert(%e), metadata={op_name="jit(step)/jvp(Synchformer)/vfeat_extractor/blocks_0/mlp/erf"}
}

%triton_gemm_comp (p0: bf16[64,768], p1: bf16[768,3072]) -> bf16[64,3072] {
  %p0 = bf16[64,768]{1,0} parameter(0)
  %p1 = bf16[768,3072]{1,0} parameter(1)
  ROOT %dot.4 = bf16[64,3072]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(Synchformer)/vfeat_extractor/blocks_0/mlp/fc1/dot_general"}
}

ENTRY %main.9 (Arg_0.1: bf16[64,768]) -> bf16[64,768] {
  %Arg_0.1 = bf16[64,768]{1,0} parameter(0)
  %custom-call.5 = (bf16[64,768]{1,0}, s8[4194304]{0}) custom-call(%Arg_0.1, %Arg_0.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(Synchformer)/vfeat_extractor/blocks_2/attn/qkv/dot_general"}
  %custom-call.6 = (bf16[8,12,64]{2,1,0}, u8[0]{0}) custom-call(%Arg_0.1, %Arg_0.1, %Arg_0.1), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(Synchformer)/vfeat_extractor/blocks_2/attn/dot_product_attention"}
  %gemm_fusion.7 = bf16[64,3072]{1,0} fusion(%Arg_0.1, %Arg_0.1), kind=kCustom, calls=%triton_gemm_comp, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_convert_fusion = bf16[64,3072]{1,0} fusion(%gemm_fusion.7), kind=kLoop, calls=%fused_gelu
  %input_reduce_fusion = f32[64]{0} fusion(%Arg_0.1), kind=kInput, calls=%fused_reduce
  %transpose_fusion.8 = bf16[12,8,64]{2,1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_transpose
  ROOT %copy.9 = bf16[64,768]{1,0} copy(%Arg_0.1)
}
"""


def test_gpu_module_text_is_classified():
    op = _op_profile()
    ops = op.parse_hlo(_GPU_HLO)
    assert op.module_name(_GPU_HLO) == "jit_step"
    expect = {
        "custom-call.5": (op.MATMUL, "vfeat_extractor/blocks_*/attn", "fwd"),
        "custom-call.6": (op.ATTENTION, "vfeat_extractor/blocks_*/attn", "fwd"),
        "gemm_fusion.7": (op.MATMUL, "vfeat_extractor/blocks_*/mlp", "fwd"),  # root's metadata
        "loop_convert_fusion": (op.ELEMENTWISE, "vfeat_extractor/blocks_*/mlp", "fwd"),
        "input_reduce_fusion": (op.REDUCTION, "vfeat_extractor/blocks_*/norm1", "bwd"),
        "transpose_fusion.8": (op.LAYOUT, "vfeat_extractor/blocks_*/timeattn", "fwd"),
        "copy.9": (op.LAYOUT, "", "fwd"),
    }
    for name, (category, scope, direction) in expect.items():
        got = ops[name]
        assert (got.category, got.scope, got.direction) == (category, scope, direction), (name, got)


def test_device_kernels_are_counted_once(tmp_path):
    """A GPU trace has the op both as a host-side launch and as a device kernel (one op
    can also run as several kernels): only the device side counts, per module."""
    op = _op_profile()
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "gemm_fusion.7", "dur": 500.0,
         "args": {"hlo_op": "gemm_fusion.7", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "triton_gemm_kernel", "dur": 120.0,
         "args": {"hlo_op": "gemm_fusion.7", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "fmha_kernel_a", "dur": 30.0,
         "args": {"hlo_op": "custom-call.6", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "fmha_kernel_b", "dur": 10.0,
         "args": {"hlo_op": "custom-call.6", "hlo_module": "jit_step"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "other_module_kernel", "dur": 999.0,
         "args": {"hlo_op": "fusion.1", "hlo_module": "jit_init"}},
        {"ph": "X", "pid": 2, "tid": 8, "name": "MemcpyH2D", "dur": 50.0, "args": {}},
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    times = op.load_op_times(str(path), "jit_step")
    assert times == {"gemm_fusion.7": {"us": 120.0, "count": 1}, "custom-call.6": {"us": 40.0, "count": 2}}
    s = op.summarise(times, op.parse_hlo(_GPU_HLO), steps=1)
    assert s["by_category_ms"] == {op.MATMUL: 0.12, op.ATTENTION: 0.04}


def test_cpu_async_ops_span_to_their_end_event(tmp_path):
    """XLA:CPU: a multi-threaded op's event covers its launch; its `end:` event marks
    completion. The op's time is start -> end of its own k-th completion."""
    op = _op_profile()
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "dot.1", "ts": 100.0, "dur": 2.0,
         "args": {"hlo_op": "dot.1", "hlo_module": "jit_f"}},
        {"ph": "X", "pid": 1, "tid": 2, "name": "end: dot.1", "ts": 180.0, "dur": 1.0, "args": {}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "fusion.2", "ts": 190.0, "dur": 30.0,  # synchronous
         "args": {"hlo_op": "fusion.2", "hlo_module": "jit_f"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "dot.1", "ts": 300.0, "dur": 2.0,  # the next step
         "args": {"hlo_op": "dot.1", "hlo_module": "jit_f"}},
        {"ph": "X", "pid": 1, "tid": 2, "name": "end: dot.1", "ts": 350.0, "dur": 1.0, "args": {}},
    ]
    path = tmp_path / "cpu.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert op.load_op_times(str(path), "jit_f") == {"dot.1": {"us": 81.0 + 51.0, "count": 2},
                                                     "fusion.2": {"us": 30.0, "count": 1}}


def test_a_scan_loop_is_not_added_to_its_body(tmp_path):
    """XLA:CPU traces a while loop as one event spanning its iterations, and each body op
    as its own events: the loop's time is reported apart, not summed with the body's."""
    op = _op_profile()
    w = jax.random.normal(jax.random.key(0), (6, 256, 256)) / 16.0
    x = jax.random.normal(jax.random.key(1), (64, 256))

    def tower(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    compiled = jax.jit(jax.grad(tower)).lower(w, x).compile()
    jax.block_until_ready(compiled(w, x))
    trace = op.capture(lambda: compiled(w, x), steps=1, trace_dir=str(tmp_path / "trace"))
    text = compiled.as_text()
    ops = op.parse_hlo(text)
    times = op.load_op_times(trace, op.module_name(text))
    loops = {n for n in times if ops[n].opcode == "while"}
    assert loops, "no while-loop events in the trace"
    body = {n: t for n, t in times.items() if n not in loops}
    s = op.summarise(times, ops, steps=1)
    assert abs(s["op_ms_per_step"] - sum(t["us"] for t in body.values()) / 1e3) < 1e-9
    assert abs(s["control_flow_ms"] - sum(times[n]["us"] for n in loops) / 1e3) < 1e-9
    assert s["by_category_ms"][op.MATMUL] > 0
    assert "loops/branches around them" in op.format_summary(s)


def test_scope_names_drop_scan_and_remat_wrappers():
    op = _op_profile()
    name = ("jit(step)/transpose(jvp(SegmentAVCLIP))/v_encoder/v_encoder/blocks_3/eval_jaxpr/"
            "timeattn/qkv/dot_general")
    assert op._scope(name) == ("v_encoder/blocks_*/timeattn", "bwd", "dot_general")
    name = "jit(step)/jvp(SegmentAVCLIP)/a_encoder/ast/encoder/a_encoder/ast/encoder/layer_2/attention/mul"
    assert op._scope(name) == ("a_encoder/ast/encoder/layer_*/attention", "fwd", "mul")
    # A path that merely has a repeated name further in keeps it.
    assert op._scope("jit(f)/jvp(M)/blocks_0/mlp/blocks_1/add")[0] == "blocks_*/mlp/blocks_*"
