"""TensorRT 10 quickly-deployable plugin (`tensorrt.plugin`) for the ONNX node fssam::SCMA.

The node (emitted by `fssam.ops.scma.scma` while `torch.onnx.export` runs inside the exporter's
`fssam.ops.scma.onnx_custom_node()` block, see `fssam.ops.scma.onnx_node`) is exactly the fused
Triton kernel of `fssam.ops.scma.triton_kernel`:
    inputs  q (B, H, N, c), keys (B, H, L, c), values (B, H, L, c), cal (B, H, N) float32
    output  (B, H, N, c) in q's dtype;  L = 2N + P'
so the plugin is one Triton launch (the one-pass kernel: TensorRT's AOT launch is a single
kernel with a fixed config, no autotuning and no split over the keys), with two implementations:
  * AOT (`@trtp.aot_impl`, the default: node attribute aot=1): the kernel is compiled to PTX
    when the engine is built; TensorRT launches it itself, no Python at inference time; the
    engine can be serialized and run from C++ (trtexec) given the plugin library of TRT.
  * JIT (`@trtp.impl`, node attribute aot=0): Python callback launching the Triton kernel with
    PyTorch tensors on TensorRT's stream (needs Python + torch at inference time).

Hidden scratch parameters (Triton >= 3.3). Triton appends hidden pointer parameters to every
compiled kernel after the user parameters: `global_scratch` (Triton 3.3) and, in later
releases, `profile_scratch` (the Triton 3.8 used here emits both). Triton's own launcher
allocates them and passes them behind the scenes; TensorRT's AOT launcher does not know of them
and passes exactly [inputs..., extra_args..., outputs...]. Left alone, the driver would read
the kernel-parameter array past its end (undefined behaviour: garbage pointers, crashes). So
`compile_aot_kernel`
  1. requires metadata.global_scratch_size == profile_scratch_size == 0 (the kernel never
     dereferences them; this kernel needs no scratch), else it refuses the AOT path;
  2. checks that the PTX body never references those parameters;
  3. deletes their declarations from the PTX `.entry` signature, so the parameter list is
     exactly what TensorRT passes.
(Passing them as extra SymInt32(0) args instead is wrong: the extra args are 32-bit scalars and
the hidden parameters are 64-bit pointers.)

AOT kernels also need dynamic shared memory <= 48 KiB (above that CUDA needs an opt-in that the
AOT launch path does not make): `compile_aot_kernel` shrinks stages / tiles until the kernel
fits, and reports the choice.

This module imports without tensorrt and without a GPU, and imports nothing of fssam outside
this package (engines are built and run by `fssam.export.tensorrt` and
`fssam.runtime.runners.tensorrt`, which call `register()` first). `register()` raises
PluginUnavailable (a RuntimeError, one line) when tensorrt or the GPU is missing, or when
TensorRT is older than 10.9 (`check_tensorrt_version`): `tensorrt.plugin.aot_impl` and
`KernelLaunchParams`, the AOT quickly-deployable plugin API, came with 10.9 (TensorRT 10.9.0
release notes). There is no JIT-only fallback for 10.6-10.8: `fssam export` records an engine's
plugin kind from the ONNX node (aot=1 by default) and the serving configs trust it, so an engine
silently built with the JIT callback instead would be refused only when Triton loads it.
Registration is all or nothing: `_registered["done"]` is set only once every definition is in
TensorRT's (global) registry; a call that fails half-way leaves it unset, and the next call
defines only what is missing (a second `trtp.register` of the same id would be refused) or raises
the same error again.

`compile_aot_kernel` only needs Triton (it compiles for an explicit target, e.g.
GPUTarget("cuda", 90, 32), on a CPU-only machine too, provided TRITON_INTERPRET is not set in
that process).
"""

# No `from __future__ import annotations` here: tensorrt.plugin checks the annotations of the
# decorated functions with issubclass(), which fails on string annotations.
import dataclasses
import functools
import importlib.util
import re

import torch

PLUGIN_NAMESPACE = "fssam"
PLUGIN_NAME = "SCMA"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
REQUIREMENT = "TensorRT plugin needs the tensorrt package and a CUDA device"
MIN_TENSORRT = (10, 9)  # tensorrt.plugin.aot_impl / KernelLaunchParams: AOT quickly-deployable plugins
# what register() uses of tensorrt.plugin beyond register / autotune / impl (TensorRT >= 10.9)
_AOT_API = ("aot_impl", "KernelLaunchParams", "SymIntExprs", "SymInt32", "cdiv")
MAX_STATIC_LAUNCH_SHARED = 48 * 1024

# kernel parameter positions (see _scma_fwd_kernel): pointers and the multiples-of-c strides
_POINTER_ARGS = ("Q", "K", "V", "CAL", "O")
_HEAD_DIM_MULTIPLE_ARGS = (
    "stride_qb", "stride_qh", "stride_qn",
    "stride_kb", "stride_kh", "stride_kn",
    "stride_vb", "stride_vh", "stride_vn",
    "stride_ob", "stride_oh", "stride_on",
)
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

_registered = {"done": False}


def available() -> bool:
    """True when tensorrt is importable and a CUDA device is present."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


class PluginUnavailable(RuntimeError):
    """The plugin cannot be registered here: no tensorrt, no GPU, or a TensorRT older than 10.9."""


def require() -> None:
    if not available():
        raise PluginUnavailable(REQUIREMENT)


def _too_old(version, lacks: str = "") -> str:
    found = f"TensorRT {version}" if version else "this TensorRT"
    lacks = f" ({lacks})" if lacks else ""
    low = ".".join(map(str, MIN_TENSORRT))
    return (f"{found} is too old for the fssam::SCMA plugin{lacks}: its AOT kernel needs TensorRT >= {low} "
            f"(tensorrt.plugin.aot_impl, KernelLaunchParams); pip install 'tensorrt>={low},<12', or export with "
            "--scma-node decomposed")


def check_tensorrt_version(trt) -> None:
    """The version gate: PluginUnavailable (one line) when the `tensorrt` module `trt` says it is
    older than MIN_TENSORRT. Only its `__version__` is read ("10.8.0.43", "11.1.0.106"; compared as
    numbers: 10.10 > 10.9); a missing or unreadable version passes here and `plugin_api` checks
    the API itself."""
    version = getattr(trt, "__version__", None)
    match = re.match(r"\s*(\d+)\.(\d+)", str(version)) if version is not None else None
    if match is not None and (int(match[1]), int(match[2])) < MIN_TENSORRT:
        raise PluginUnavailable(_too_old(version))


def plugin_api():
    """(tensorrt, tensorrt.plugin), checked before anything is registered: the version gate, then
    the AOT API register() uses (so a TensorRT that lacks it fails here, cleanly, not half-way
    through the definitions)."""
    import tensorrt as trt

    check_tensorrt_version(trt)
    version = getattr(trt, "__version__", None)
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise PluginUnavailable(_too_old(version, "no tensorrt.plugin module")) from None
    missing = [name for name in _AOT_API if not hasattr(trtp, name)]
    if missing:
        raise PluginUnavailable(_too_old(version, f"its tensorrt.plugin has no {', '.join(missing)}"))
    return trt, trtp


@dataclasses.dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    shared: int  # bytes of dynamic shared memory
    num_warps: int
    block_m: int
    block_n: int
    num_stages: int
    num_params: int  # parameters in the PTX entry after stripping the hidden ones
    stripped: tuple  # names of the hidden parameters removed


def strip_hidden_params(ptx: str, kernel_name: str, num_user_params: int) -> tuple[str, tuple]:
    """Remove Triton's hidden trailing parameters (global/profile scratch) from a PTX entry.

    Raises if any of them is referenced in the body (then the kernel really needs them)."""
    entry = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise RuntimeError(f"no .entry {kernel_name} in the PTX")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    if len(params) < num_user_params:
        raise RuntimeError(f"PTX entry has {len(params)} parameters, expected at least {num_user_params}")
    hidden = params[num_user_params:]
    names = tuple(p.split()[-1] for p in hidden)
    body = ptx[entry.end():]
    for name in names:
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            raise RuntimeError(f"hidden Triton parameter {name} is used by the kernel: cannot drop it for TensorRT AOT")
    kept = ",\n\t".join(params[:num_user_params])
    new_ptx = ptx[: entry.start(1)] + "\n\t" + kept + "\n" + ptx[entry.end(1):]
    return new_ptx, names


def _candidate_configs(head_dim: int, dtype: torch.dtype):
    """The one-pass kernel's autotune candidates in table order, then fewer stages / smaller tiles
    (the AOT launch needs <= 48 KiB of shared memory)."""
    from fssam.ops.scma.triton_kernel import autotune_configs, block_d_for

    seen = set()
    for base in autotune_configs("fwd", head_dim, dtype):
        for block_m, block_n, stages in (
            (base["BLOCK_M"], base["BLOCK_N"], base["num_stages"]),
            (base["BLOCK_M"], base["BLOCK_N"], 1),
            (base["BLOCK_M"], max(16, base["BLOCK_N"] // 2), 1),
            (max(16, base["BLOCK_M"] // 2), max(16, base["BLOCK_N"] // 2), 1),
            (16, 16, 1),
        ):
            key = (block_m, block_n, base["num_warps"], stages)
            if key not in seen:
                seen.add(key)
                yield dict(base, BLOCK_M=block_m, BLOCK_N=block_n, num_stages=stages, BLOCK_D=block_d_for(head_dim))


def compile_aot_kernel(dtype: torch.dtype, head_dim: int, target=None) -> AotKernel:
    """PTX of `_scma_fwd_kernel` for TensorRT's AOT launch: fixed dtype and head dim, int32
    shapes/strides, 16-byte aligned pointers (TensorRT allocations are), hidden params removed.
    Cached per (dtype, head dim, target): TensorRT asks once per format/tactic while building."""
    import triton

    from fssam.ops.scma.triton_kernel import interpreting

    if interpreting():
        raise RuntimeError("AOT compilation needs the real Triton compiler: unset TRITON_INTERPRET")
    if dtype not in _SUPPORTED:
        raise TypeError(f"unsupported dtype {dtype}")
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    if not isinstance(target, tuple):
        target = (target.backend, target.arch, target.warp_size)
    return _compile_aot_kernel(dtype, int(head_dim), tuple(target))


def kernel_signature(dtype: torch.dtype, consts: dict) -> dict:
    """Triton compile signature of `_scma_fwd_kernel`: tensors of `dtype` (CAL fp32), int32 scalars."""
    from fssam.ops.scma.triton_kernel import _scma_fwd_kernel
    from fssam.ops.scma.triton_kernel import kernel_signature as signature

    return signature(_scma_fwd_kernel, dtype, consts)


@functools.lru_cache(maxsize=None)
def _compile_aot_kernel(dtype: torch.dtype, head_dim: int, target: tuple) -> AotKernel:
    from triton.backends.compiler import GPUTarget

    from fssam.ops.scma.triton_kernel import _scma_fwd_kernel, compile_for_target, constexprs

    target = GPUTarget(*target)
    fn = _scma_fwd_kernel
    tried = []
    aligned = list(_POINTER_ARGS) + (list(_HEAD_DIM_MULTIPLE_ARGS) if head_dim % 16 == 0 else [])
    for config in _candidate_configs(head_dim, dtype):
        compiled = compile_for_target(fn, dtype, head_dim, config, target, aligned=aligned)
        meta = compiled.metadata
        if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
            raise RuntimeError("the SCMA kernel needs Triton scratch memory: TensorRT AOT cannot provide it; use aot=0")
        tried.append((config["BLOCK_M"], config["BLOCK_N"], config["num_stages"], meta.shared))
        if meta.shared > MAX_STATIC_LAUNCH_SHARED:
            continue
        consts = constexprs(head_dim, dtype, config, fn)
        num_user = sum(1 for name in fn.arg_names if name not in consts)
        ptx, stripped = strip_hidden_params(compiled.asm["ptx"], meta.name, num_user)
        return AotKernel(meta.name, ptx, meta.shared, meta.num_warps, config["BLOCK_M"], config["BLOCK_N"],
                         config["num_stages"], num_user, stripped)
    raise RuntimeError(f"no SCMA kernel config fits {MAX_STATIC_LAUNCH_SHARED} B of shared memory "
                       f"(tried BLOCK_M, BLOCK_N, stages, shared = {tried}); use aot=0")


def _definition(trtp):
    """TensorRT's definition of fssam::SCMA in this process (`tensorrt.plugin.op.fssam.SCMA`), or None."""
    return getattr(getattr(getattr(trtp, "op", None), PLUGIN_NAMESPACE, None), PLUGIN_NAME, None)


# the definitions after trtp.register, in order, and the PluginDef field each one fills
# (tensorrt/plugin/_lib.py: PluginDef.autotune_func / aot_impl_func / impl_func, None until defined)
_DEFINITIONS = (("autotune", "autotune_func"), ("aot_impl", "aot_impl_func"), ("impl", "impl_func"))


def _complete_registration(steps) -> None:
    """Run the (name, present, define) `steps` in order, skipping those whose present() is true;
    the registration is marked done only after the last one. A step that raises leaves it not
    done: the next register() defines what is still missing (TensorRT keeps what went in and would
    refuse a second trtp.register of the id) or raises the same error."""
    for _name, present, define in steps:
        if not present():
            define()
    _registered["done"] = True


def register() -> None:
    """Register the fssam::SCMA plugin with TensorRT (idempotent). Then the ONNX parser maps
    nodes op "SCMA" with attribute plugin_namespace="fssam" to it."""
    require()
    if _registered["done"]:
        return
    trt, trtp = plugin_api()  # before anything is registered: a too old TensorRT registers nothing
    functions = _plugin_functions(trt, trtp)

    def defined(field):
        # a definition already in TensorRT's registry (an earlier call that failed half-way): its
        # fields say what is missing; one that does not expose them is taken as complete
        plugin = _definition(trtp)
        return plugin is not None and getattr(plugin, field, True) is not None

    steps = [("register", lambda: _definition(trtp) is not None,
              lambda: trtp.register(PLUGIN_ID)(functions["register"]))]
    steps += [(kind, lambda field=field: defined(field),
               lambda kind=kind: getattr(trtp, kind)(PLUGIN_ID)(functions[kind])) for kind, field in _DEFINITIONS]
    _complete_registration(steps)


def _plugin_functions(trt, trtp) -> dict:
    """The functions of the plugin (not yet registered): {"register", "autotune", "aot_impl", "impl"}."""
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    def _describe(q: trtp.TensorDesc, keys: trtp.TensorDesc, values: trtp.TensorDesc, cal: trtp.TensorDesc) -> trtp.TensorDesc:
        return q.like()

    def _autotune(q, keys, values, cal, outputs):
        # q, keys, values, out share one of fp32/fp16/bf16 (paired index-wise); cal is always fp32
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32, FP32|FP16|BF16", "LINEAR")]

    def _aot(q: trtp.TensorDesc, keys: trtp.TensorDesc, values: trtp.TensorDesc, cal: trtp.TensorDesc,
             outputs: tuple[trtp.TensorDesc], tactic: int
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        head_dim = q.shape_expr[3]
        if not head_dim.is_constant:
            raise RuntimeError("fssam::SCMA AOT needs a static head dim")
        kernel = compile_aot_kernel(torch_dtype[q.dtype], int(head_dim.constant_value()))
        b, h, n, c = (q.shape_expr[i] for i in range(4))
        length = keys.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n, kernel.block_m)
        launch.grid_y = b * h
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        # the int32 scalars of _scma_fwd_kernel, in order (contiguous tensors)
        scalars = [
            h * n * c, n * c, c,  # q strides b, h, n
            h * length * c, length * c, c,  # keys
            h * length * c, length * c, c,  # values
            h * n, n,  # cal
            h * n * c, n * c, c,  # out
            h, n, length,
        ]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return kernel.name.encode(), kernel.ptx.encode(), launch, extra

    def _jit(q: trtp.Tensor, keys: trtp.Tensor, values: trtp.Tensor, cal: trtp.Tensor, outputs, stream: int):
        from fssam.ops.scma.triton_kernel import kernel_config, scma_fused

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            # __cuda_array_interface__ has no bfloat16: bf16 engines should use the AOT path
            tq, tk, tv, tc = (torch.as_tensor(t, device="cuda") for t in (q, keys, values, cal))
            out = torch.as_tensor(outputs[0], device="cuda")
            # a fixed config and no split: no autotuning (it would benchmark) inside TensorRT's enqueue
            config = kernel_config(tq.shape[-1], tq.shape[2], tq.dtype, interpret=False)
            scma_fused(tq, tk, tv, tc, out=out, block_m=config["BLOCK_M"], block_n=config["BLOCK_N"], num_splits=1)

    return {"register": _describe, "autotune": _autotune, "aot_impl": _aot, "impl": _jit}
