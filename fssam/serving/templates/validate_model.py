"""Triton Python-backend model `validate`: the one Python step in the request path of the `fssam` ensemble.

Written by `fssam repository`. It checks what Triton's own input checks (dtype, shape, batch size)
cannot: every support mask holds only 0 (background), 1 (foreground) and 255 (ignore), and has at
least one foreground pixel. A bad request gets INVALID_ARGUMENT (HTTP 400) with a message naming
the input, shot and values found; the others of the same batch are answered normally. Output:
`binary_masks`, the masks with 255 set to 0 (as the official code treats ignored pixels), which
the two graphs take. Imports numpy and triton_python_backend_utils only.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

KDL_CPU = 1
ALLOWED = (0, 1, 255)
IGNORE = 255


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

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "support_masks")
            if tensor is None:
                responses.append(_invalid("missing input 'support_masks'"))
                continue
            masks = np.from_dlpack(_DLPack(tensor))
            problem = check_masks(masks)
            if problem:
                responses.append(_invalid(problem))
                continue
            binary = np.ascontiguousarray(np.where(masks == IGNORE, 0, masks).astype(np.uint8))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack("binary_masks", binary)]))
        return responses
