"""SCMA kernels: the Triton kernel vs the reference, the fssam::scma custom op and the model on
it, the ONNX custom node, and the TensorRT plugin.

On a CPU-only machine the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set by
conftest before triton is imported); with a GPU it runs compiled on CUDA.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fssam.kernels as kernels
from fssam.kernels import tensorrt_plugin
from fssam.model.scma import scma_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton_device = pytest.mark.skipif(
    not CUDA and not INTERPRET, reason="the Triton kernel needs a CUDA GPU or TRITON_INTERPRET=1"
)
BF16_REASON = "bf16 tl.dot is wrong in the Triton CPU interpreter (triton#11584): bf16 runs on GPU only"


def make_inputs(batch=1, heads=2, tokens=16, head_dim=16, shots=1, pointers=4, dtype=torch.float32, seed=0,
                device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    length = (shots + 1) * tokens + pointers
    q = torch.randn(batch, heads, tokens, head_dim, generator=g)
    k = torch.randn(batch, heads, length, head_dim, generator=g)
    v = torch.randn(batch, heads, length, head_dim, generator=g)
    masks = (torch.rand(batch, shots, tokens, generator=g) > 0.6).float()
    masks[:, :, 0] = 1
    return tuple(t.to(device=device, dtype=dtype if t is not masks else torch.float32) for t in (q, k, v, masks))


def triton_scma(*args, **kwargs):
    from fssam.kernels.triton_scma import triton_scma as fn

    return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- kernel, fp32


@needs_triton_device
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("pointers", [0, 4, 24])
@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("tokens,head_dim", [(16, 16), (36, 32), (16, 64), (36, 64), (20, 128), (16, 256)])
def test_fp32_matches_reference(tokens, head_dim, shots, pointers, mode):
    q, k, v, masks = make_inputs(2, 2, tokens, head_dim, shots, pointers, seed=tokens + shots + pointers)
    got = triton_scma(q, k, v, masks, mode)
    expected = scma_reference(q, k, v, masks, mode)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_triton_device
@pytest.mark.parametrize("block", [16, 32])
def test_fp32_multi_tile_tails_and_strided_q(block):
    """Several query/key tiles with ragged tails (N = 36, P = 5), a transposed-view q as the
    model produces, and an odd head dim (24: zero-padded to 32)."""
    q, k, v, masks = make_inputs(1, 3, 36, 24, 2, 5, seed=7)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, c) with non-standard strides
    assert not q_view.is_contiguous()
    got = triton_scma(q_view, k, v, masks, "paper", block_m=block, block_n=block)
    torch.testing.assert_close(got, scma_reference(q, k, v, masks, "paper"), atol=1e-5, rtol=1e-5)


@needs_triton_device
def test_constant_rows_max_equals_min():
    """q = 0: every score is 0, max = min, a = 0 / 1e-7 = 0 (no NaN); bias = min(0, 10 (w - 1))."""
    q, k, v, masks = make_inputs(1, 2, 16, 32, 2, 4, seed=3)
    q = torch.zeros_like(q)
    got = triton_scma(q, k, v, masks, "paper")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, scma_reference(q, k, v, masks, "paper"), atol=1e-5, rtol=1e-5)


@needs_triton_device
def test_constant_pseudo_query_keys():
    """All pseudo-query keys equal: each row's pseudo block is constant (max = min) for any q."""
    q, k, v, masks = make_inputs(1, 1, 16, 16, 1, 4, seed=4)
    k[:, :, 16:32] = k[:, :, 16:17]
    got = triton_scma(q, k, v, masks, "paper")
    torch.testing.assert_close(got, scma_reference(q, k, v, masks, "paper"), atol=1e-5, rtol=1e-5)


@needs_triton_device
@pytest.mark.parametrize("shots", [1, 3])
def test_all_zero_support_mask(shots):
    q, k, v, masks = make_inputs(2, 1, 16, 16, shots, 4, seed=5)
    masks = torch.zeros_like(masks)
    got = triton_scma(q, k, v, masks, "paper")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, scma_reference(q, k, v, masks, "paper"), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- kernel, fp16 / bf16


def _low_precision_check(dtype, tokens, head_dim, shots, pointers, mode, seed):
    q, k, v, masks = make_inputs(1, 2, tokens, head_dim, shots, pointers, dtype=dtype, seed=seed)
    exact = scma_reference(q.float(), k.float(), v.float(), masks, mode)  # same (rounded) inputs, fp32
    torch_error = (scma_reference(q, k, v, masks, mode).float() - exact).abs().max().item()
    got = triton_scma(q, k, v, masks, mode)
    assert got.dtype == dtype
    kernel_error = (got.float() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error + 1e-4, (kernel_error, torch_error)


@needs_triton_device
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("shots,pointers", [(1, 0), (5, 24), (1, 4)])
@pytest.mark.parametrize("tokens,head_dim", [(36, 32), (16, 64), (20, 128), (16, 256)])
def test_fp16_within_twice_torch_fp16_error(tokens, head_dim, shots, pointers, mode):
    _low_precision_check(torch.float16, tokens, head_dim, shots, pointers, mode, seed=11 + shots)


@needs_triton_device
@pytest.mark.skipif(not CUDA, reason=BF16_REASON)
@pytest.mark.parametrize("shots,pointers", [(1, 4), (5, 24)])
@pytest.mark.parametrize("tokens,head_dim", [(36, 32), (64, 128)])
def test_bf16_within_twice_torch_bf16_error(tokens, head_dim, shots, pointers):
    _low_precision_check(torch.bfloat16, tokens, head_dim, shots, pointers, "paper", seed=13)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_production_shape(dtype):
    """N = 1024 (32 x 32), c = 256, K = 5, P = 24: the benchmark's shape, fp16/bf16 on GPU."""
    _low_precision_check(dtype, 1024, 256, 5, 24, "paper", seed=17)


def test_cpu_without_interpreter_is_refused():
    if INTERPRET or CUDA:
        pytest.skip("only meaningful on a CPU-only run without TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_scma(*make_inputs(device="cpu"))


# ----------------------------------------------------------------------------- custom op


def test_dispatcher_uses_custom_op_and_matches_reference():
    q, k, v, masks = make_inputs(1, 2, 16, 16, 2, 4, device="cpu")
    before = sum(kernels.CALLS.values())
    got = kernels.scma(q, k, v, masks, "official")
    assert sum(kernels.CALLS.values()) == before + 1
    assert torch.equal(got, scma_reference(q, k, v, masks, "official"))
    with pytest.raises(ValueError, match="mode"):
        kernels.scma(q, k, v, masks, "bogus")


def test_custom_op_registration_checks():
    q, k, v, masks = make_inputs(1, 1, 16, 16, 1, 4, device="cpu")
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.fssam.scma.default, (q, k, v, masks, "paper"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_custom_op_backward_matches_reference():
    q, k, v, masks = make_inputs(1, 2, 16, 16, 2, 4, device="cpu", seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    torch.ops.fssam.scma(*leaves, masks, "paper").backward(grad)
    scma_reference(*ref_leaves, masks, "paper").backward(grad)
    for got, expected in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-6, rtol=1e-5)


def test_model_forward_goes_through_custom_op(tiny_model, monkeypatch):
    from conftest import random_episode

    query, supports, masks = random_episode(1, 2, 64, seed=21)
    kernels.CALLS.clear()
    with torch.no_grad():
        through_op = tiny_model(query, supports, masks)
    calls = sum(kernels.CALLS.values())
    assert calls > 0, "the model did not call torch.ops.fssam.scma"

    if INTERPRET or CUDA:  # the same forward with the Triton kernel inside the op
        kernels.CALLS.clear()
        with torch.no_grad(), kernels.triton_on_cpu(not CUDA and INTERPRET):
            through_triton = tiny_model(query, supports, masks)
        assert kernels.CALLS["triton"] == calls
        torch.testing.assert_close(through_triton, through_op, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(kernels, "scma", scma_reference)  # the reference path, bypassing the op
    kernels.CALLS.clear()
    with torch.no_grad():
        through_reference = tiny_model(query, supports, masks)
    assert sum(kernels.CALLS.values()) == 0
    torch.testing.assert_close(through_op, through_reference, atol=0, rtol=0)


# ----------------------------------------------------------------------------- ONNX


class _ScmaModule(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v, masks):
        return kernels.scma(q, k, v, masks, self.mode) * 2.0


def _export(mode, inputs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_ScmaModule(mode).eval(), inputs, dynamo=True, verbose=False,
                                    input_names=["q", "k", "v", "support_masks"], output_names=["out"])
    return program.model_proto


def test_onnx_custom_node_export():
    import onnx

    inputs = make_inputs(1, 2, 16, 16, 2, 4, device="cpu")
    assert not kernels.onnx_custom_node_enabled()
    with kernels.onnx_custom_node(True):
        assert kernels.onnx_custom_node_enabled()
        model = _export("paper", inputs)
    assert not kernels.onnx_custom_node_enabled()
    onnx.checker.check_model(model, full_check=False)
    custom = [node for node in model.graph.node if node.domain == "fssam"]
    assert len(custom) == 1
    node = custom[0]
    assert node.op_type == "SCMA"
    assert {imp.domain: imp.version for imp in model.opset_import}.get("fssam") == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"plugin_namespace": b"fssam", "aot": 1}
    assert len(node.input) == 4 and len(node.output) == 1
    assert node.input[0] == "q"  # q goes straight in; keys, values, cal are computed by standard ops
    producers = {out: n for n in model.graph.node for out in n.output}
    assert all(name in producers for name in node.input[1:])
    # shapes and types of the node's inputs/outputs
    inferred = onnx.shape_inference.infer_shapes(model)
    info = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}

    def shape(name):
        return [d.dim_value for d in info[name].type.tensor_type.shape.dim]

    assert shape(node.input[0]) == [1, 2, 16, 16]
    assert shape(node.input[1]) == shape(node.input[2]) == [1, 2, 36, 16]
    assert shape(node.input[3]) == [1, 2, 16]
    assert info[node.input[3]].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert shape(node.output[0]) == [1, 2, 16, 16]
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    assert len(consumers) == 1 and consumers[0].op_type == "Mul"


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_onnx_default_export_is_standard_ops_and_matches_reference(mode):
    import onnxruntime as ort

    inputs = make_inputs(1, 2, 16, 16, 2, 4, device="cpu", seed=8)
    model = _export(mode, inputs)
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {name: t.numpy() for name, t in zip(["q", "k", "v", "support_masks"], inputs) if name in names}
    (out,) = session.run(None, feed)
    expected = 2.0 * scma_reference(*inputs, mode)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- TensorRT plugin


def test_tensorrt_plugin_imports_and_explains_requirement():
    if tensorrt_plugin.available():
        pytest.skip("tensorrt and a GPU are present: the real plugin test runs instead")
    with pytest.raises(RuntimeError, match="TensorRT plugin needs the tensorrt package and a CUDA device"):
        tensorrt_plugin.register()


def _run_compiled(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python without TRITON_INTERPRET (the real Triton compiler), in a temp dir."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=300)


def test_kernel_compiles_for_sm90_and_aot_ptx_drops_triton_hidden_params():
    """Compile for sm_90 (no GPU needed: Triton's bundled ptxas) in a process without
    TRITON_INTERPRET, for fp16/bf16/fp32 and head dims 64/128/256: the JIT launch config must fit
    an H100's shared memory with at most 256 B of register spills, and the fp16/bf16 AOT kernel
    must fit 48 KiB, have the hidden scratch parameters removed and still assemble."""
    script = textwrap.dedent(
        """
        import os, re, subprocess, torch, triton
        from triton.backends.compiler import GPUTarget
        from fssam.kernels.tensorrt_plugin import compile_aot_kernel, kernel_signature
        from fssam.kernels.triton_scma import _scma_fwd_kernel, constexprs, kernel_config
        target = GPUTarget("cuda", 90, 32)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        def spills(ptx):  # bytes of register spill stores reported by ptxas -v
            with open("s.ptx", "w") as f:
                f.write(ptx)
            info = subprocess.run([ptxas, "-v", "-arch=sm_90a", "s.ptx", "-o", "s.cubin"], capture_output=True,
                                  text=True, check=True).stderr
            return sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", info))

        for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for head_dim in (64, 128, 256):
                config = kernel_config(head_dim, 4096, dtype, interpret=False)
                consts = constexprs(head_dim, dtype, config)
                jit = triton.compile(triton.compiler.ASTSource(fn=_scma_fwd_kernel, signature=kernel_signature(dtype, consts),
                                                               constexprs=consts), target=target,
                                     options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))
                assert jit.metadata.shared <= 227 * 1024, (dtype, head_dim, jit.metadata.shared)
                if os.path.exists(ptxas):
                    assert spills(jit.asm["ptx"]) <= 256, (dtype, head_dim, "register spills")
                if dtype == torch.float32:
                    print("ok", ty, head_dim, jit.metadata.shared)
                    continue  # fp32 is not an AOT plugin type worth the compile time here
                kernel = compile_aot_kernel(dtype, head_dim, target=target)
                entry = re.search(r"\\.entry\\s+\\w+\\s*\\((.*?)\\)", kernel.ptx, re.S).group(1)
                params = [p for p in entry.split(",") if p.strip()]
                assert len(params) == kernel.num_params == 22, len(params)
                assert kernel.stripped and all(name not in kernel.ptx for name in kernel.stripped)
                assert kernel.shared <= 48 * 1024
                if os.path.exists(ptxas):
                    with open("k.ptx", "w") as f:
                        f.write(kernel.ptx)
                    subprocess.run([ptxas, "-arch=sm_90a", "k.ptx", "-o", "k.cubin"], check=True)
                print("ok", ty, head_dim, jit.metadata.shared, kernel.shared, kernel.stripped)
        """
    )
    result = _run_compiled(script)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("Triton's CUDA backend tools are not available")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 9, result.stdout


@pytest.mark.skipif(not tensorrt_plugin.available(), reason="the TensorRT plugin needs a CUDA GPU and tensorrt")
@pytest.mark.parametrize("aot", [True, False])
def test_tensorrt_plugin_matches_reference(aot):
    q, k, v, masks = make_inputs(1, 2, 64, 64, 2, 8, dtype=torch.float16, device="cpu", seed=9)
    with kernels.onnx_custom_node(True, aot=aot):
        model = _export("paper", (q, k, v, masks))
    engine = tensorrt_plugin.build_engine(model.SerializeToString(), fp16=True)
    feed = {"q": q, "k": k, "v": v, "support_masks": masks}
    (out,) = tensorrt_plugin.run_engine(engine, feed).values()
    exact = 2.0 * scma_reference(q.float(), k.float(), v.float(), masks, "paper")
    torch_error = (2.0 * scma_reference(q, k, v, masks, "paper").float() - exact).abs().max().item()
    assert (out.float().cpu() - exact).abs().max().item() <= 2 * torch_error + 1e-3


def test_bf16_custom_node_needs_the_aot_plugin():
    from fssam.kernels.op import scma_onnx_node

    q, k, v, masks = make_inputs(1, 1, 16, 16, 1, 4, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="bf16 needs the plugin's AOT kernel"):
        scma_onnx_node(q, k, v, masks, aot=False)


_FAKE_TENSORRT_PLUGIN = '''
import sys, types

class Expr:  # a constant shape expression (TensorRT's ShapeExpr: is_constant property, constant_value() method)
    def __init__(self, value):
        self.value = value
    is_constant = property(lambda self: True)
    def constant_value(self):
        return self.value
    def __mul__(self, other):
        return Expr(self.value * (other.value if isinstance(other, Expr) else other))
    __rmul__ = __mul__

class TensorDesc:
    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = [Expr(d) for d in shape], dtype
    def like(self):
        return self

class Tensor: pass
class KernelLaunchParams: pass
class SymIntExprs(list):
    @classmethod
    def from_tuple(cls, items):
        return cls(items)
class SymInt32:
    def __init__(self, expr):
        self.expr = expr
class AutoTuneCombination:
    def __init__(self, types, formats):
        self.types, self.formats = types, formats

trt = types.ModuleType("tensorrt")
trt.float32, trt.float16, trt.bfloat16 = "float32", "float16", "bfloat16"
trtp = types.ModuleType("tensorrt.plugin")
for cls in (TensorDesc, Tensor, KernelLaunchParams, SymIntExprs, SymInt32, AutoTuneCombination):
    setattr(trtp, cls.__name__, cls)
trtp.cdiv = lambda a, b: Expr(-(-a.value // b))
registered = {}
def _decorator(kind):
    return lambda plugin_id: (lambda fn: registered.setdefault(kind, (plugin_id, fn))[1])
for kind in ("register", "autotune", "aot_impl", "impl"):
    setattr(trtp, kind, _decorator(kind))
trt.plugin = trtp
import importlib.machinery
trt.__spec__, trtp.__spec__ = (importlib.machinery.ModuleSpec(n, None) for n in ("tensorrt", "tensorrt.plugin"))
sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp
'''


def test_tensorrt_plugin_definitions_and_aot_launch_contract():
    """register() against a stand-in for tensorrt.plugin (no GPU, no tensorrt): the decorated
    functions carry real (non-string) annotations, as tensorrt.plugin validates them with
    issubclass(); aot_impl declares its return type; and the AOT launch (grid, block, shared
    memory, the 17 int32 extra args) matches _scma_fwd_kernel on contiguous tensors."""
    script = _FAKE_TENSORRT_PLUGIN + textwrap.dedent(
        """
        import inspect, typing, torch
        from fssam.kernels import tensorrt_plugin as tp
        tp.available = lambda: True
        compile_for_sm90 = tp.compile_aot_kernel
        tp.compile_aot_kernel = lambda dtype, head_dim: compile_for_sm90(dtype, head_dim, target=("cuda", 90, 32))
        tp.register()
        assert {kind: pid for kind, (pid, _) in registered.items()} == dict.fromkeys(
            ("register", "autotune", "aot_impl", "impl"), "fssam::SCMA")
        for kind, (_, fn) in registered.items():
            sig = inspect.signature(fn)
            for p in list(sig.parameters.values()) + [sig]:
                note = p.annotation if p is not sig else sig.return_annotation
                assert not isinstance(note, str), (kind, note)
        returns = inspect.signature(registered["aot_impl"][1]).return_annotation
        assert typing.get_origin(returns) is tuple and len(typing.get_args(returns)) == 4
        assert typing.get_args(returns)[2:] == (KernelLaunchParams, SymIntExprs)

        B, H, N, C, P = 2, 3, 100, 64, 9
        L = 2 * N + P
        q, keys, cal = TensorDesc((B, H, N, C), "float16"), TensorDesc((B, H, L, C), "float16"), TensorDesc((B, H, N), "float32")
        name, ptx, launch, extra = registered["aot_impl"][1](q, keys, keys, cal, (q,), 0)
        kernel = compile_for_sm90(torch.float16, C, target=("cuda", 90, 32))
        assert name == kernel.name.encode() and ptx == kernel.ptx.encode()
        assert launch.grid_x.value == -(-N // kernel.block_m) and launch.grid_y.value == B * H
        assert launch.block_x == kernel.num_warps * 32 and launch.shared_mem == kernel.shared
        values = [e.expr.value if isinstance(e.expr, Expr) else e.expr for e in extra]
        strides = [*torch.empty(B, H, N, C).stride()[:3], *torch.empty(B, H, L, C).stride()[:3],
                   *torch.empty(B, H, L, C).stride()[:3], *torch.empty(B, H, N).stride()[:2],
                   *torch.empty(B, H, N, C).stride()[:3], H, N, L]
        assert values == strides, (values, strides)
        combo = registered["autotune"][1](q, keys, keys, cal, (q,))[0]
        assert len(combo.types.split(",")) == 5  # 4 inputs + 1 output
        print("ok")
        """
    )
    result = _run_compiled(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
