"""TensorRT defects of issue #26 (item 6), checked without TensorRT and without a GPU.

* the fssam::SCMA plugin's version gate (TensorRT >= 10.9: tensorrt.plugin.aot_impl /
  KernelLaunchParams) and its all-or-nothing registration;
* the onnxruntime + TensorRT-accelerator configs: an engine cache of their own and the TF32 note;
* the network flag that makes an fssam::SCMA node without `aot` take the AOT implementation;
* a clear error for engine tensors whose dtype has no torch counterpart.

Only real objects: a module object carrying a `__version__` for the version gate, enums standing
for TensorRT's enums, plain callables for the registration steps; no stand-in TensorRT runtime.
"""

import enum
import os
import types

import pytest
import torch

from fssam.errors import FSSAMError
from fssam.ops.scma import tensorrt_plugin

# the TensorRT accelerator parameters Triton's onnxruntime backend accepts (src/onnxruntime.cc: any
# other key fails the model load with "unknown parameter ... for TensorRT Execution Accelerator")
BACKEND_TRT_PARAMETERS = {
    "precision_mode", "max_workspace_size_bytes", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "int8_calibration_table_name", "int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
    "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams",
    "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes",
    "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path",
    "trt_ep_context_embed_mode",
}


def _tensorrt_module(version):
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    return module


# ---------------------------------------------------------------- 1. version gate, registration


@pytest.mark.parametrize("version", ["10.8.0.43", "10.7.0.23", "10.6.0.26", "10.0.1.6", "8.6.1"])
def test_tensorrt_below_10_9_is_refused_in_one_line(version):
    with pytest.raises(tensorrt_plugin.PluginUnavailable) as caught:
        tensorrt_plugin.check_tensorrt_version(_tensorrt_module(version))
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError) and "\n" not in message
    assert f"TensorRT {version} is too old for the fssam::SCMA plugin" in message
    assert "TensorRT >= 10.9" in message and "aot_impl" in message and "KernelLaunchParams" in message


@pytest.mark.parametrize("version", ["10.9.0.34", "10.10.0.31", "10.13.3.9", "11.0.0.114", "11.1.0.106"])
def test_tensorrt_10_9_and_later_pass_the_gate(version):
    assert tensorrt_plugin.check_tensorrt_version(_tensorrt_module(version)) is None  # 10.10 > 10.9 as numbers


def test_registration_that_fails_half_way_is_not_done(monkeypatch):
    """What register() runs (`_complete_registration`) with the steps of a plugin whose aot_impl
    definition fails: nothing is marked done, the next call defines only what is missing (the
    registry keeps what went in and would refuse a second definition) and fails the same way while
    the cause remains, and once it is gone the registration completes with every part defined once."""
    monkeypatch.setitem(tensorrt_plugin._registered, "done", False)
    defined, calls, cause = set(), [], ["aot_impl fails"]

    def define(kind):
        def run():
            if kind in defined:
                raise ValueError(f"fssam::SCMA already has a definition of {kind}")
            calls.append(kind)
            if kind == "aot_impl" and cause:
                raise RuntimeError(cause[0])
            defined.add(kind)
        return run

    steps = [(kind, lambda kind=kind: kind in defined, define(kind)) for kind in ("register", "autotune", "aot_impl",
                                                                                   "impl")]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="aot_impl fails"):
            tensorrt_plugin._complete_registration(steps)
        assert tensorrt_plugin._registered["done"] is False
    assert defined == {"register", "autotune"} and calls == ["register", "autotune", "aot_impl", "aot_impl"]
    cause.clear()
    tensorrt_plugin._complete_registration(steps)
    assert tensorrt_plugin._registered["done"] is True
    assert defined == {"register", "autotune", "aot_impl", "impl"}
    assert calls == ["register", "autotune", "aot_impl", "aot_impl", "aot_impl", "impl"]


def test_plugin_unavailable_reaches_the_cli_as_one_fssam_error():
    """The runner / exporter turn the plugin's refusal (here: no GPU or no tensorrt) into
    TensorRTUnavailable, an FSSAMError the CLI prints on one line."""
    from fssam.runtime.runners.tensorrt import TensorRTUnavailable, _register_plugin_if_needed

    if tensorrt_plugin.available():
        pytest.skip("tensorrt and a GPU are present")
    with pytest.raises(TensorRTUnavailable, match=tensorrt_plugin.REQUIREMENT) as caught:
        _register_plugin_if_needed({"scma_node": "custom"})
    assert "\n" not in str(caught.value)
    _register_plugin_if_needed({"scma_node": "decomposed"})  # no plugin node: nothing to register


# ---------------------------------------------------------------- 2. onnxruntime + TensorRT accelerator configs


def _parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())


def test_tensorrt_accelerator_configs_cache_engines_and_say_how_tf32_goes_off(tmp_path, tiny_artifacts):
    from fssam.serving.repository import write_repository

    artifacts, manifest = tiny_artifacts
    assert manifest["precision"] == "fp32"
    paths = {}
    for repo in ("first", "second"):
        write_repository(artifacts, str(tmp_path / repo), backend="onnxruntime", accelerator="tensorrt")
        for name in ("support_encoder", "query_segmenter"):
            config_file = tmp_path / repo / name / "config.pbtxt"
            config = _parse(config_file)  # Triton's model-config protobuf takes it, comments included
            (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            params = dict(accelerator.parameters)
            assert accelerator.name == "tensorrt" and params["precision_mode"] == "FP32"
            assert set(params) <= BACKEND_TRT_PARAMETERS, set(params) - BACKEND_TRT_PARAMETERS
            assert params["trt_engine_cache_enable"] == "1"
            cache = params["trt_engine_cache_path"]
            # a fixed path of the server, one level under /tmp (ONNX Runtime creates only that level),
            # not a path of the machine that wrote the repository
            assert os.path.dirname(cache) == "/tmp" and os.path.basename(cache).startswith("fssam-ort-trt-")
            text = config_file.read_text()
            assert str(tmp_path) not in text and os.path.abspath(artifacts) not in text
            assert f"# {cache}, " in text  # the config names its cache folder in its comment
            # fp32: the TF32 switch, documented where the backend has none
            assert "NVIDIA_TF32_OVERRIDE=0" in text and text.count("NVIDIA_TF32_OVERRIDE") == 2
            assert params["trt_profile_max_shapes"]  # the explicit profile is still there
            paths[repo, name] = cache
    # engines are named after file and tensor names, not weights: no folder is shared between
    # graphs nor between two writes (which may hold other weights)
    assert len(set(paths.values())) == len(paths) == 4


def test_fp16_accelerator_config_has_the_cache_and_no_tf32_note():
    from fssam.serving.repository import _backend_config

    header, params, kind = _backend_config("onnxruntime", "fp16", "model.onnx", 0, "gpu", "tensorrt",
                                           {"trt_profile_min_shapes": "q:1x3"})
    assert kind == "KIND_GPU" and params == {}
    assert 'key: "precision_mode" value: "FP16"' in header and 'key: "trt_engine_cache_enable" value: "1"' in header
    assert 'key: "trt_engine_cache_path" value: "/tmp/fssam-ort-trt-' in header
    assert "NVIDIA_TF32_OVERRIDE" not in header
    plain, _, _ = _backend_config("onnxruntime", "fp32", "model.onnx", 0, "gpu", None)
    assert "trt_engine_cache" not in plain and "NVIDIA_TF32_OVERRIDE" not in plain


# ---------------------------------------------------------------- 3. PREFER_AOT_PYTHON_PLUGINS


class _Flags1010(enum.IntEnum):  # NvInfer.h, TensorRT >= 10.9
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1
    PREFER_JIT_PYTHON_PLUGINS = 2
    PREFER_AOT_PYTHON_PLUGINS = 3


class _Flags108(enum.IntEnum):  # before the AOT Python plugins
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


def test_networks_prefer_the_aot_python_plugin():
    from fssam.export.tensorrt import network_flags

    assert network_flags(_Flags1010) == (1 << 1) | (1 << 3)  # strongly typed + prefer AOT, never prefer JIT
    assert network_flags(_Flags108) == 1 << 1


# ---------------------------------------------------------------- 4. engine dtypes without a torch dtype


class _DataType(enum.Enum):  # the shape of TensorRT's DataType members
    FLOAT = 0
    FP8 = 6

    def __str__(self):
        return f"DataType.{self.name}"


def test_engine_dtype_without_torch_mapping_names_tensor_and_dtype():
    from fssam.runtime.runners.tensorrt import torch_dtype

    table = {_DataType.FLOAT: torch.float32}
    assert torch_dtype(table, _DataType.FLOAT, "query") is torch.float32
    with pytest.raises(FSSAMError) as caught:
        torch_dtype(table, _DataType.FP8, "support_memory")
    message = str(caught.value)
    assert "'support_memory'" in message and "DataType.FP8" in message and "float32" in message
    assert "\n" not in message and not isinstance(caught.value, KeyError)
