"""bf16 ONNX graphs: the casts an export adds where ONNX has no bf16, and the copy ONNX Runtime's CPU provider can run.

Export (`cast_ops_without_bf16`). A bf16 export is written at opset BF16_OPSET (22), where Conv,
ConvTranspose, MaxPool, Sin and Cos accept bf16 (at opset 18 they do not). Einsum accepts bf16
only from opset 28, which neither torch.onnx, ONNX Runtime nor TensorRT 10 reads, so every
operator whose schema at the file's opset has no bf16 runs in fp32 inside the bf16 graph: its
bf16 inputs are cast to float and its outputs back to bf16, as eager bf16 autocast runs such ops
in fp32. So does an operator that mixes a bf16 input with fp32 ones where its schema wants one
type (autocast's LayerNorm of a bf16 activation with fp32 weights, computed in fp32 by PyTorch).
A Cast from uint8 (the deployable graphs' image and mask inputs) straight to bf16 goes through
fp32 (exact: 0..255 are bf16 values), because TensorRT converts uint8 only to fp32 and fp16. The eager model is not changed; the manifest lists these operators per stage.

Gate (`fp32_arithmetic`). ONNX Runtime's CPU provider has no bf16 kernel for any arithmetic
operator (Add, MatMul, Conv, ReduceMean, ... all fail with NOT_IMPLEMENTED; only data movement,
Cast and LayerNormalization load), and unlike fp16 it inserts no casts by itself (its
InsertCastTransformer handles float16 only). The gate therefore runs a copy of each bf16 graph in
which every operator computes in fp32 and every bf16 tensor it produces is rounded to bf16 (Cast
to bf16 and back): bf16 storage after every operator, as the file prescribes, with fp32
arithmetic inside each operator (what ONNX Runtime does for fp16 on CPU). It checks the graph's
structure, its dtypes and the error bf16 rounding adds; it does not check the bf16 arithmetic of a
GPU's kernels, which the TensorRT gate (`fssam export --tensorrt`) runs natively. The copy takes
and returns float32 arrays holding bf16 values (numpy has no bfloat16).
"""

from __future__ import annotations

import collections

import numpy as np

from fssam.errors import FSSAMError

BF16_OPSET = 22  # the first opset where Conv, ConvTranspose, MaxPool, Sin, Cos accept bf16
EMULATION = ("bf16 values, fp32 arithmetic per operator (ONNX Runtime's CPU provider has no bf16 kernels): "
             "checks the graph and bf16 rounding, not a GPU's bf16 kernels")


def _onnx():
    import onnx

    return onnx


def _default_opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise FSSAMError("the ONNX model imports no default-domain opset")


def tensor_types(model) -> dict[str, int]:
    """{tensor name: ONNX element type} of the main graph (inputs, outputs, initializers, and
    every intermediate tensor ONNX shape inference can type)."""
    onnx = _onnx()
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {}
    for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for initializer in model.graph.initializer:
        types[initializer.name] = initializer.data_type
    return types


def _names(model) -> set:
    """Every tensor and node name of the main graph (new names must not collide with them)."""
    graph = model.graph
    names = {value.name for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]}
    for node in graph.node:
        names.update(node.input, node.output, [node.name])
    return names


def _unique(base: str, taken: set) -> str:
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name


def _accepts_bf16(schema, node, types) -> bool:
    """Whether every bf16 input of `node` is bound to a formal parameter whose type allows bf16."""
    bf16 = _onnx().TensorProto.BFLOAT16
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for index, name in enumerate(node.input):
        if not name or types.get(name) != bf16:
            continue
        formal = schema.inputs[min(index, len(schema.inputs) - 1)]  # a variadic last parameter takes the rest
        allowed = constraints.get(formal.type_str, {formal.type_str})
        if "tensor(bfloat16)" not in allowed:
            return False
    return True


def _mixes_float_types(schema, node, types) -> bool:
    """Whether inputs of `node` bound to one type parameter have different types (bf16 beside
    fp32: autocast's LayerNorm of a bf16 activation with fp32 weights, which PyTorch computes in
    fp32 and ONNX does not allow)."""
    bound = collections.defaultdict(set)
    params = {c.type_param_str for c in schema.type_constraints}
    for index, name in enumerate(node.input):
        formal = schema.inputs[min(index, len(schema.inputs) - 1)]
        if name and formal.type_str in params and name in types:
            bound[formal.type_str].add(types[name])
    return any(len(kinds) > 1 for kinds in bound.values())


def cast_ops_without_bf16(model) -> dict[str, int]:
    """In place on the main graph of `model`: every default-domain node with a bf16 input that its
    schema (at the model's opset) does not accept, or that mixes bf16 and fp32 where its schema
    wants one type, computes in fp32 between casts (its bf16 outputs cast back), and every Cast
    from uint8 to bf16 becomes uint8 -> fp32 -> bf16. Returns {op type: count} of the nodes so
    changed ("Cast from uint8" for the latter)."""
    onnx = _onnx()
    helper, bf16, fp32 = onnx.helper, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    opset = _default_opset(model)
    types = tensor_types(model)
    taken = _names(model)
    changed = collections.Counter()
    casts: dict[str, str] = {}  # bf16 tensor -> its fp32 copy (made once)
    nodes = []
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # the graph's own nodes are replaced below
        if _casts_uint8_to_bf16(node, types):
            through = _unique(f"{node.input[0]}__fp32", taken)
            nodes.append(helper.make_node("Cast", [node.input[0]], [through], to=fp32,
                                          name=_unique(f"{node.input[0]}__uint8_to_fp32", taken)))
            node.input[0] = through
            nodes.append(node)
            changed["Cast from uint8"] += 1
            continue
        if node.domain not in ("", "ai.onnx") or not any(types.get(name) == bf16 for name in node.input if name):
            nodes.append(node)
            continue
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        if _accepts_bf16(schema, node, types) and not _mixes_float_types(schema, node, types):
            nodes.append(node)
            continue
        changed[node.op_type] += 1
        for index, name in enumerate(node.input):
            if name and types.get(name) == bf16:
                if name not in casts:
                    casts[name] = _unique(f"{name}__fp32", taken)
                    nodes.append(helper.make_node("Cast", [name], [casts[name]], to=fp32,
                                                  name=_unique(f"{name}__to_fp32", taken)))
                node.input[index] = casts[name]
        after = []
        for index, name in enumerate(node.output):
            if types.get(name) == bf16:
                node.output[index] = _unique(f"{name}__fp32_out", taken)
                after.append(helper.make_node("Cast", [node.output[index]], [name], to=bf16,
                                              name=_unique(f"{name}__to_bf16", taken)))
        nodes += [node, *after]
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return dict(changed)


def _casts_uint8_to_bf16(node, types) -> bool:
    onnx = _onnx()
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or types.get(node.input[0]) != onnx.TensorProto.UINT8:
        return False
    return any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in node.attribute)


def _float_tensor(tensor):
    """A bf16 TensorProto as float32 (same name; exact)."""
    onnx = _onnx()
    array = onnx.numpy_helper.to_array(tensor).astype(np.float32)
    return onnx.numpy_helper.from_array(array, tensor.name)


DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")


def fp32_arithmetic(model):
    """A copy of a bf16 model that ONNX Runtime's CPU provider runs: every bf16 tensor becomes a
    float32 tensor holding bf16 values (each operator computes in fp32; each bf16 tensor it
    produces is rounded by a Cast to bf16 and back), bf16 graph inputs and outputs become float32."""
    onnx = _onnx()
    helper, bf16, fp32 = onnx.helper, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    if any(node.domain not in ("", "ai.onnx") for function in model.functions for node in function.node) or \
            any(node.domain not in ("", "ai.onnx") for node in model.graph.node):
        raise FSSAMError("the bf16 graph holds custom-domain nodes: ONNX Runtime cannot run it")
    if model.functions:
        raise FSSAMError("the bf16 graph holds ONNX functions: the fp32-arithmetic copy handles plain graphs only")
    types = tensor_types(model)
    taken = _names(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == bf16:
            graph.initializer[index].CopyFrom(_float_tensor(initializer))
    nodes = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # the graph's own nodes are replaced below
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == bf16:
                attribute.t.CopyFrom(_float_tensor(attribute.t))
            if attribute.name in DTYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT and \
                    attribute.i == bf16 and node.op_type != "Cast":
                raise FSSAMError(f"{node.op_type} node {node.name!r} makes bf16 by attribute: not emulated")
        after = []
        for index, name in enumerate(node.output):
            if types.get(name) != bf16:
                continue
            rounded = _unique(f"{name}__rounded_bf16", taken)
            if node.op_type == "Cast":  # Cast(to=bf16) rounds already: only widen it back
                node.output[index] = rounded
            else:
                node.output[index] = _unique(f"{name}__computed_fp32", taken)
                after.append(helper.make_node("Cast", [node.output[index]], [rounded], to=bf16))
            after.append(helper.make_node("Cast", [rounded], [name], to=fp32))
        nodes += [node, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = fp32
    keep = [value for value in graph.value_info if value.type.tensor_type.elem_type != bf16]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return copy


def is_bf16(model) -> bool:
    """True when any tensor of `model`'s main graph is bf16 (inputs, outputs, weights, or what its
    operators make: a bf16 export's interface is fp32, its arithmetic inside partly bf16)."""
    return _onnx().TensorProto.BFLOAT16 in tensor_types(model).values()
