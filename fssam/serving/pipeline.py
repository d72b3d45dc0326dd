"""The episode pipeline that runs inside Triton's Python backend (BLS).

The composition of the six stages is fssam.runtime.contract (encode_support / segment), the same
code the eager model and the ONNX Runtime runner use; `BLSStages` supplies the six stage methods
by calling the stage models of the repository with pb_utils.InferenceRequest.

Support sets are cached: the key is a sha256 of the support images and (binarised) masks, the
value the encoded support (DINO features, memories, pointers, masks) of one episode; LRU with
`support_cache_size` entries (config parameter, 0 disables it).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import torch

from fssam.errors import InputError
from fssam.runtime.contract import STAGE_ORDER, binary_masks, encode_support, segment

_NUMPY = {"float32": np.float32, "float16": np.float16}


def tensor_to_numpy(tensor) -> np.ndarray:
    """A pb_utils.Tensor (CPU) as numpy, through DLPack.

    Tensor.as_numpy() goes through the stub's pybind11 numpy bindings, which read garbage (zeros)
    under numpy 2 with the 2.51 stub of the nvidia-pytriton wheel; DLPack is ABI-stable.
    """
    if not tensor.is_cpu():
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu().numpy()
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy()


def numpy_to_tensor(pb_utils, name: str, array: np.ndarray):
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(array))))


class StageError(RuntimeError):
    """A stage model answered a BLS request with an error."""


class ServerNotReady(StageError):
    """BLS refused because the server is still loading models: only Triton's own model_warmup
    requests of this pipeline arrive then (clients cannot reach a model that is still loading)."""


class BLSStages:
    """The six stage methods of fssam.runtime.contract, each one BLS request to a stage model.

    Batches larger than a stage's max_batch_size are split into chunks.
    """

    def __init__(self, pb_utils, stages: dict, model_names: dict, max_batch: dict):
        self.pb_utils = pb_utils
        self.specs = stages
        self.model_names = model_names
        self.max_batch = max_batch
        self.calls = collections.Counter()
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):  # outputs of GPU stage models come back in CPU memory
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        self._request_kwargs = kwargs
        for name in STAGE_ORDER:
            setattr(self, name, self._method(name))

    def _method(self, name):
        def call(*args):
            return self.run_stage(name, *args)

        call.__name__ = name
        return call

    def _exec(self, name: str, arrays: list):
        pb = self.pb_utils
        spec = self.specs[name]
        inputs = [numpy_to_tensor(pb, entry["name"], array) for entry, array in zip(spec["inputs"], arrays)]
        request = pb.InferenceRequest(
            model_name=self.model_names[name],
            requested_output_names=[entry["name"] for entry in spec["outputs"]],
            inputs=inputs,
            **self._request_kwargs,
        )
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            error = ServerNotReady if "server not ready" in message.lower() else StageError
            raise error(f"stage {name} (model {self.model_names[name]}): {message}")
        self.calls[name] += 1
        outputs = []
        for entry in spec["outputs"]:
            tensor = pb.get_output_tensor_by_name(response, entry["name"])
            outputs.append(torch.from_numpy(np.array(tensor_to_numpy(tensor), copy=True)))
        return outputs

    def run_stage(self, name: str, *args: torch.Tensor):
        spec = self.specs[name]
        dtype = _NUMPY[spec["inputs"][0]["dtype"]]
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False)) for t in args]
        batch, limit = arrays[0].shape[0], self.max_batch[name]
        if batch <= limit:
            outputs = self._exec(name, arrays)
        else:
            chunks = [self._exec(name, [a[i : i + limit] for a in arrays]) for i in range(0, batch, limit)]
            outputs = [torch.cat(parts, 0) for parts in zip(*chunks)]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


class SupportCache:
    """LRU of encoded support sets keyed by a content hash."""

    def __init__(self, size: int):
        self.size = max(0, int(size))
        self.entries: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(images: np.ndarray, masks: np.ndarray) -> str:
        digest = hashlib.sha256()
        for array in (images, masks):
            array = np.ascontiguousarray(array, dtype=np.float32)
            digest.update(repr(array.shape).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def get(self, key: str):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return entry

    def put(self, key: str, value: dict) -> None:
        if self.size == 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def validate_episode(query: np.ndarray, supports: np.ndarray, masks: np.ndarray, image_size: int, shots: int) -> None:
    """InputError naming the problem; shapes are also checked by Triton against the config."""
    s, k = image_size, shots
    expected = {"query": (3, s, s), "support_images": (k, 3, s, s), "support_masks": (k, s, s)}
    for name, array in (("query", query), ("support_images", supports), ("support_masks", masks)):
        if array.dtype != np.float32:
            raise InputError(f"input {name!r}: dtype {array.dtype}, expected float32 (FP32)")
        if tuple(array.shape[1:]) != expected[name]:
            raise InputError(
                f"input {name!r}: shape {list(array.shape)}, expected [batch, {', '.join(map(str, expected[name]))}]"
            )
        if not np.isfinite(array).all():
            raise InputError(f"input {name!r} contains NaN or infinite values")
    batches = {query.shape[0], supports.shape[0], masks.shape[0]}
    if len(batches) != 1:
        raise InputError(
            f"inputs have different batch sizes: query {query.shape[0]}, support_images {supports.shape[0]}, "
            f"support_masks {masks.shape[0]}"
        )
    bad = np.setdiff1d(np.unique(masks), np.array([0, 1, 255], dtype=np.float32))
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:6])
        raise InputError(
            f"input 'support_masks' is not a binary mask: values {shown} (expected 0 = background, 1 = foreground, 255 = ignore)"
        )
    foreground = (masks == 1).reshape(masks.shape[0], masks.shape[1], -1).any(-1)
    if not foreground.all():
        b, shot = [int(i) for i in np.argwhere(~foreground)[0]]
        raise InputError(
            f"input 'support_masks': mask of support {shot} (episode {b}) is empty: no foreground pixel (value 1)"
        )


class TritonPythonModel:
    """The `fssam_pipeline` model: inputs query, support_images, support_masks; outputs logits and
    support_cached (whether the support set came from the cache)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        torch.set_num_threads(1)
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, "manifest.json")) as handle:
            self.manifest = json.load(handle)
        self.image_size = int(self.manifest["config"]["image_size"])
        self.shots = int(self.manifest["shots"])
        model_names = json.loads(params.get("stage_models", "{}")) or {name: name for name in STAGE_ORDER}
        max_batch = json.loads(params.get("stage_max_batch", "{}")) or {name: 8 for name in STAGE_ORDER}
        self.stages = BLSStages(pb_utils, self.manifest["stages"], model_names, max_batch)
        self.cache = SupportCache(int(params.get("support_cache_size", "64")))
        self.logger = pb_utils.Logger
        self.served = 0

    def _error(self, message: str):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message))

    def execute(self, requests):
        pb = self.pb
        responses = [None] * len(requests)
        episodes = []  # (request index, query, supports, masks)
        for index, request in enumerate(requests):
            try:
                arrays = []
                for name in ("query", "support_images", "support_masks"):
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise InputError(f"missing input {name!r}")
                    arrays.append(np.array(tensor_to_numpy(tensor), copy=True))
                validate_episode(*arrays, self.image_size, self.shots)
                episodes.append((index, *arrays))
            except InputError as error:
                responses[index] = self._error(str(error))
        if episodes:
            try:
                self._run(episodes, responses)
            except ServerNotReady:
                # Triton's model_warmup runs while the server loads its models, when BLS cannot reach
                # the stage models (they have model_warmup of their own): this warm-up exercises the
                # Python side only (imports, input checks, hashing) and answers zeros.
                for index, query, *_ in episodes:
                    zeros = np.zeros((query.shape[0], 1, *query.shape[2:]), np.float32)
                    responses[index] = pb.InferenceResponse(output_tensors=[
                        numpy_to_tensor(pb, "logits", zeros),
                        numpy_to_tensor(pb, "support_cached", np.zeros((query.shape[0], 1), bool)),
                    ])
                self.logger.log_info("fssam_pipeline: warm-up before the server is ready (stage models not reachable yet)")
                return responses
            except Exception as error:  # a stage failed: every pending request gets the message
                for index, *_ in episodes:
                    if responses[index] is None:
                        responses[index] = self._error(f"fssam_pipeline: {error}")
        self.served += len(episodes)
        return responses

    def _run(self, episodes, responses):
        pb = self.pb
        keys, cached_flags, encoded, todo = [], [], {}, collections.OrderedDict()
        for _, _, supports, masks in episodes:
            for b in range(supports.shape[0]):
                masks_b = binary_masks(torch.from_numpy(masks[b : b + 1]))
                key = SupportCache.key(supports[b : b + 1], masks_b.numpy())
                keys.append(key)
                hit = encoded.get(key) or self.cache.get(key)
                cached_flags.append(hit is not None and key not in todo)
                if hit is not None:
                    encoded[key] = hit
                elif key not in todo:
                    todo[key] = (torch.from_numpy(np.array(supports[b : b + 1])), masks_b)
        if todo:  # every new support set of this batch in one encode_support call
            images = torch.cat([images for images, _ in todo.values()], 0)
            masks = torch.cat([masks for _, masks in todo.values()], 0)
            with torch.inference_mode():
                support = encode_support(self.stages, images, masks)
            for i, key in enumerate(todo):
                entry = {name: value[i : i + 1].clone() for name, value in support.items()}
                encoded[key] = entry
                self.cache.put(key, entry)
        query = torch.from_numpy(np.concatenate([episode[1] for episode in episodes], 0))
        support = {name: torch.cat([encoded[key][name] for key in keys], 0) for name in encoded[keys[0]]}
        with torch.inference_mode():
            logits = segment(self.stages, query, support).float().numpy()
        start = 0
        for index, q, _, _ in episodes:
            size = q.shape[0]
            flags = np.array(cached_flags[start : start + size], dtype=bool).reshape(size, 1)
            responses[index] = pb.InferenceResponse(
                output_tensors=[
                    numpy_to_tensor(pb, "logits", logits[start : start + size]),
                    numpy_to_tensor(pb, "support_cached", flags),
                ]
            )
            start += size

    def finalize(self):
        self.logger.log_info(
            f"fssam_pipeline: {self.served} episodes, support cache {self.cache.hits} hits / {self.cache.misses} misses"
        )
