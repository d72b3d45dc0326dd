"""The front's strict reading of KServe v2 infer requests for the `fssam` model, and its answers.

Everything a client sends is checked here, before anything reaches Triton: the JSON header (its
length, its fields, nothing unknown), every input's name, datatype and shape against the export
(image size S, shot count K, 1 <= batch <= max batch), binary sizes against the declared shapes
(and the body against their sum: no byte missing, none left over), JSON values (integers 0..255,
no bool, float or string), and the support masks' values (0, 1, 255, and some foreground per
mask). A mistake is a `RequestError` (an HTTP 4xx) whose message names the input. The request
contract itself is in docs/serving.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

INPUTS = ("query", "support_images", "support_masks")
OUTPUT = "logits"
DATATYPE = "UINT8"
HEADER_LIMIT = 64 * 1024  # bytes of the JSON header of a binary request
JSON_CHARS_PER_VALUE = 5  # "255, ": the longest a UINT8 value takes in a JSON body (besides whitespace)
MASK_VALUES = (0, 1, 255)
FILE_MIB = 32  # the largest image or mask file POST /v1/segment takes


class RequestError(Exception):
    """A client's mistake: `status` (4xx) and a one-line message naming the input."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Contract:
    """What the served export takes: image size, shots, the most episodes per request."""

    image_size: int
    shots: int
    max_batch: int

    def shapes(self, batch: int) -> dict:
        s, k = self.image_size, self.shots
        return {"query": (batch, 3, s, s), "support_images": (batch, k, 3, s, s), "support_masks": (batch, k, s, s)}

    def shown(self, name: str) -> str:
        return "[B, " + ", ".join(str(d) for d in self.shapes(1)[name][1:]) + "]"

    @property
    def episode_bytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes(1).values())

    @property
    def binary_body_limit(self) -> int:
        return self.max_batch * self.episode_bytes + HEADER_LIMIT

    @property
    def json_body_limit(self) -> int:
        return self.max_batch * self.episode_bytes * JSON_CHARS_PER_VALUE + HEADER_LIMIT


@dataclass
class InferRequest:
    arrays: dict  # name -> uint8 array of the contract's shape
    binary_output: bool
    request_id: str | None


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _only(obj: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise RequestError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _header(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON header, the binary part) of a request body."""
    if header_length is None:
        text, binary = body, memoryview(b"")
    else:
        if not header_length.isdigit() or len(header_length) > 12:
            raise RequestError(f"Inference-Header-Content-Length {header_length[:32]!r}: expected a byte count")
        length = int(header_length)
        if length == 0 or length > len(body):
            raise RequestError(f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes")
        if length > HEADER_LIMIT:
            raise RequestError(f"Inference-Header-Content-Length {length}: the JSON header may take at most "
                               f"{HEADER_LIMIT} bytes (send tensors as binary data)", 413)
        text, binary = body[:length], memoryview(body)[length:]
    try:
        header = json.loads(bytes(text).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        reason = str(error).split(":")[0] if isinstance(error, ValueError) else "not UTF-8"
        raise RequestError(f"the request body is not a JSON infer request ({reason})") from None
    if not isinstance(header, dict):
        raise RequestError(f"the request's JSON is {_kind(header)}, expected an object with 'inputs'")
    return header, binary


def _shape(entry: dict, name: str, contract: Contract) -> tuple:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise RequestError(f"input {name!r}: shape must be a list of integers, got {json.dumps(shape)[:80]}")
    expected = contract.shapes(1)[name]
    if len(shape) != len(expected) or tuple(shape[1:]) != expected[1:] or not 1 <= shape[0] <= contract.max_batch:
        raise RequestError(f"input {name!r}: shape {json.dumps(shape)[:80]}, expected {contract.shown(name)} with "
                           f"1 <= B <= {contract.max_batch} (image size {contract.image_size}, {contract.shots} shot"
                           f"{'s' if contract.shots != 1 else ''})")
    return tuple(shape)


def _flat(data, shape: tuple, name: str) -> list:
    """The values of a JSON `data` field: flat (row-major) or nested as the shape; checked as UINT8."""
    count = int(np.prod(shape))
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: data is {_kind(data)}, expected a list of {count} integers 0..255")
    values = data
    for depth in range(len(shape) - 1):  # nested: unnest level by level, each level its declared length
        if len(values) == count or not values or not isinstance(values[0], list):
            break
        if len(values) != np.prod(shape[:depth + 1]) or not all(isinstance(v, list) and len(v) == len(values[0]) for v in values):
            raise RequestError(f"input {name!r}: nested data does not match the shape {list(shape)}")
        values = [item for row in values for item in row]
    if len(values) != count:
        raise RequestError(f"input {name!r}: {len(values)} values for shape {list(shape)}, expected {count}")
    bad = next((i for i, v in enumerate(values) if type(v) is not int or not 0 <= v <= 255), None)
    if bad is not None:
        bad = values[bad]
        raise RequestError(f"input {name!r}: value {json.dumps(bad)[:40]} is not an integer 0..255 ({DATATYPE})")
    return values


def check_masks(masks: np.ndarray) -> None:
    """RequestError unless every support mask holds only 0, 1, 255 and some 1 (the validate rule)."""
    for b, episode in enumerate(masks):
        for k, mask in enumerate(episode):
            counts = np.bincount(mask.ravel(), minlength=256)
            values = np.flatnonzero(counts)
            where = f"support_masks (episode {b}, shot {k})"
            bad = [int(v) for v in values if int(v) not in MASK_VALUES]
            if bad:
                shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
                raise RequestError(f"{where}: values {shown} found; expected 0 = background, 1 = foreground, "
                                   f"255 = ignore (a 0/255 mask: send 255 -> 1)")
            if counts[1] == 0:
                raise RequestError(f"{where}: no foreground pixel (value 1): a support mask must mark the object")


def parse_infer(body: bytes, header_length: str | None, contract: Contract) -> InferRequest:
    """The checked arrays of a KServe v2 infer request for `fssam` (JSON or binary tensors)."""
    header, binary = _header(body, header_length)
    _only(header, ("id", "parameters", "inputs", "outputs"), "the request")
    request_id = header.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
        raise RequestError("the request's id must be a string of at most 256 characters")
    parameters = header.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestError("the request's parameters must be an object")
    _only(parameters, ("binary_data_output",), "the request's parameters")
    binary_output = parameters.get("binary_data_output", False)
    if type(binary_output) is not bool:
        raise RequestError("parameters.binary_data_output must be true or false")
    entries = header.get("inputs")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RequestError(f"the request needs 'inputs': a list of the {len(INPUTS)} tensors {', '.join(INPUTS)}")
    names = [e.get("name") for e in entries]
    for name in names:
        if name not in INPUTS:
            raise RequestError(f"unknown input {json.dumps(name)[:64]}: model 'fssam' takes {', '.join(INPUTS)}")
        if names.count(name) > 1:
            raise RequestError(f"input {name!r} is given twice")
    missing = [name for name in INPUTS if name not in names]
    if missing:
        raise RequestError(f"input {missing[0]!r} is missing: model 'fssam' takes {', '.join(INPUTS)}")
    arrays, offset, batches = {}, 0, {}
    for entry in entries:
        name = entry["name"]
        _only(entry, ("name", "shape", "datatype", "parameters", "data"), f"input {name!r}")
        if entry.get("datatype") != DATATYPE:
            raise RequestError(f"input {name!r}: datatype {json.dumps(entry.get('datatype'))[:32]}, expected {DATATYPE}")
        shape = _shape(entry, name, contract)
        batches[name] = shape[0]
        count = int(np.prod(shape))
        params = entry.get("parameters", {})
        if not isinstance(params, dict):
            raise RequestError(f"input {name!r}: parameters must be an object")
        _only(params, ("binary_data_size",), f"input {name!r} parameters")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if "data" in entry:
                raise RequestError(f"input {name!r}: give either data or binary_data_size, not both")
            if type(size) is not int or size != count:
                raise RequestError(f"input {name!r}: binary_data_size {json.dumps(size)[:24]}, but shape "
                                   f"{list(shape)} of {DATATYPE} takes {count} bytes")
            if offset + size > len(binary):
                raise RequestError(f"input {name!r}: the body ends {offset + size - len(binary)} bytes short of its "
                                   f"binary data")
            arrays[name] = np.frombuffer(binary[offset:offset + size], np.uint8).reshape(shape)
            offset += size
        elif "data" in entry:
            arrays[name] = np.asarray(_flat(entry["data"], shape, name), np.uint8).reshape(shape)
        else:
            raise RequestError(f"input {name!r}: no data (give data, or binary_data_size and the bytes after the header)")
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary) - offset} bytes after the declared binary data")
    if len(set(batches.values())) != 1:
        raise RequestError("inputs have different batch sizes: " + ", ".join(f"{n} {b}" for n, b in batches.items()))
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(e, dict) for e in outputs):
        raise RequestError("outputs must be a list of objects")
    for entry in outputs:
        _only(entry, ("name", "parameters"), "an output")
        if entry.get("name") != OUTPUT:
            raise RequestError(f"unknown output {json.dumps(entry.get('name'))[:64]}: model 'fssam' gives {OUTPUT}")
        params = entry.get("parameters", {})
        if not isinstance(params, dict):
            raise RequestError(f"output {OUTPUT!r}: parameters must be an object")
        _only(params, ("binary_data",), f"output {OUTPUT!r} parameters")
        if "binary_data" in params:
            if type(params["binary_data"]) is not bool:
                raise RequestError(f"output {OUTPUT!r}: binary_data must be true or false")
            binary_output = params["binary_data"]
    check_masks(arrays["support_masks"])
    return InferRequest(arrays, binary_output, request_id)


def triton_request(arrays: dict) -> tuple[bytes, int]:
    """(body, header length) of the binary request the front sends Triton."""
    header = {"inputs": [{"name": name, "shape": list(arrays[name].shape), "datatype": DATATYPE,
                          "parameters": {"binary_data_size": int(arrays[name].nbytes)}} for name in INPUTS],
              "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}]}
    text = json.dumps(header).encode()
    return b"".join([text, *(np.ascontiguousarray(arrays[name]).data for name in INPUTS)]), len(text)


def triton_logits(body: bytes, header_length: str | None, batch: int, size: int) -> np.ndarray:
    """The logits of Triton's binary answer; ValueError when it is not one (a server fault)."""
    length = int(header_length) if header_length and header_length.isdigit() else len(body)
    header = json.loads(body[:length])
    entry = next(e for e in header["outputs"] if e["name"] == OUTPUT)
    shape = (batch, 1, size, size)
    if tuple(entry["shape"]) != shape or entry["datatype"] != "FP32":
        raise ValueError(f"Triton answered logits {entry['datatype']} {entry['shape']}, expected FP32 {list(shape)}")
    logits = np.frombuffer(body[length:], "<f4")
    if logits.size != int(np.prod(shape)):
        raise ValueError(f"Triton answered {logits.size} logits, expected {int(np.prod(shape))}")
    if not np.isfinite(logits).all():
        raise ValueError("the model gave non-finite logits")
    return logits.reshape(shape)


def infer_response(logits: np.ndarray, binary: bool, request_id: str | None) -> tuple[bytes, dict]:
    """(body, extra headers) of the KServe v2 answer."""
    output = {"name": OUTPUT, "datatype": "FP32", "shape": list(logits.shape)}
    header = {"model_name": "fssam", "model_version": "1", **({"id": request_id} if request_id is not None else {}),
              "outputs": [output]}
    if not binary:
        output["data"] = logits.ravel().tolist()
        return json.dumps(header).encode(), {"Content-Type": "application/json"}
    output["parameters"] = {"binary_data_size": int(logits.nbytes)}
    text = json.dumps(header).encode()
    return text + logits.astype("<f4").tobytes(), {"Content-Type": "application/octet-stream",
                                                    "Inference-Header-Content-Length": str(len(text))}
