"""Triton Python-backend model `validate`: the one Python step in the request path of the `fssam` ensemble.

Written by `fssam repository`. It checks what Triton's own input checks (dtype, shape, batch size)
cannot: every support mask holds only 0 (background), 1 (foreground) and 255 (ignore), and has at
least one foreground pixel. A bad request gets INVALID_ARGUMENT (HTTP 400) with a message naming
the input, shot and values found; the others of the same batch are answered normally. Outputs:
`binary_masks`, the masks with 255 set to 0 (as the official code treats ignored pixels), which
the two graphs take; `support_key`, per episode the HMAC-SHA256 of its support images and binary
masks under a secret (the environment's FSSAM_CACHE_SECRET, which `fssam serve` sets, made at
random per start unless `--cache-secret` shares one between replicas; without it, a random secret
of this process). support_encoder takes `support_key` as an input it does not compute with, so
Triton's response-cache key (a 64-bit non-cryptographic hash of the request's bytes, which a client
can make collide) covers a value no client can compute: two different support sets never share a
cache entry. Imports numpy, the standard library and triton_python_backend_utils only.
"""

import hashlib
import hmac
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

KDL_CPU = 1
ALLOWED = (0, 1, 255)
IGNORE = 255
SECRET_ENV = "FSSAM_CACHE_SECRET"
KEY_DOMAIN = b"fssam support set v1"


def support_keys(secret, images, binary):
    """(B, 32) uint8: HMAC-SHA256 of each episode's shape, support images and binary masks."""
    keys = np.empty((images.shape[0], 32), np.uint8)
    for b in range(images.shape[0]):
        digest = hmac.new(secret, KEY_DOMAIN, hashlib.sha256)
        digest.update(np.asarray(images.shape[1:] + binary.shape[1:], np.int64).tobytes())
        digest.update(np.ascontiguousarray(images[b]).data)
        digest.update(np.ascontiguousarray(binary[b]).data)
        keys[b] = np.frombuffer(digest.digest(), np.uint8)
    return keys


class _DLPack:
    """A CPU pb_utils.Tensor as a DLPack producer that numpy accepts (the 2.51 stub's numpy bridge
    reads zeros under numpy 2)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, *args, **kwargs):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return (KDL_CPU, 0)


def _invalid(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


def check_masks(masks):
    """The problem with a request's support masks (B, K, S, S), or None."""
    for b, episode in enumerate(masks):
        for k, mask in enumerate(episode):
            values = np.unique(mask)
            bad = [int(v) for v in values if int(v) not in ALLOWED]
            where = f"support_masks (episode {b}, shot {k})"
            if bad:
                shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
                return (f"{where}: values {shown} found; expected 0 = background, 1 = foreground, "
                        f"255 = ignore (a 0/255 mask: send 255 -> 1)")
            if 1 not in values:
                return f"{where}: no foreground pixel (value 1): a support mask must mark the object"
    return None


class TritonPythonModel:
    def initialize(self, args):
        self.name = json.loads(args["model_config"])["name"]
        secret = os.environ.get(SECRET_ENV, "")
        self.secret = secret.encode() if secret else os.urandom(32)

    def execute(self, requests):
        responses = []
        for request in requests:
            arrays = {}
            for name in ("support_images", "support_masks"):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                arrays[name] = None if tensor is None else np.from_dlpack(_DLPack(tensor))
            missing = [name for name, array in arrays.items() if array is None]
            if missing:
                responses.append(_invalid(f"missing input {missing[0]!r}"))
                continue
            masks = arrays["support_masks"]
            problem = check_masks(masks)
            if problem:
                responses.append(_invalid(problem))
                continue
            binary = np.ascontiguousarray(np.where(masks == IGNORE, 0, masks).astype(np.uint8))
            keys = support_keys(self.secret, arrays["support_images"], binary)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack("binary_masks", binary), pb_utils.Tensor.from_dlpack("support_key", keys)]))
        return responses
