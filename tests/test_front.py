"""The front of `fssam serve` (fssam/serving/front.py) against a real tritonserver, tiny export.

`fssam serve --port 0` runs as a user runs it (a subprocess; its ready line names the front's URL
and tritonserver's loopback port). One served front for most tests (module scope); servers of their
own for the stub kill + SIGTERM (one server, both in turn) and the API keys + TLS. Every refusal is
checked to be the 4xx it should be, naming the input, and to leave the server ready and answering a
good request bitwise as it did before. No mocks: the answers are compared with ONNX Runtime run in
process on the same UINT8 pixels.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import random_episode

SIZE = 64
MAX_BATCH = 8
PAIR = Path(__file__).parent / "data" / "cache_collision" / "pair.npz"
INPUTS = ("query", "support_images", "support_masks")
READY = re.compile(r"^ready: (\S+)  model fssam  \(the front; tritonserver on (\S+) behind it")


# ---------------------------------------------------------------- serving `fssam serve` in a subprocess

class Served:
    """`fssam serve --repository R --port 0 EXTRA...` until its ready line (both pipes drained by threads)."""

    def __init__(self, repository, *extra, env=None, timeout=300):
        self.process = subprocess.Popen([sys.executable, "-m", "fssam.cli", "serve", "--repository", str(repository),
                                         "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=None if env is None else {**os.environ, **env})
        self.stdout, self.stderr = [], []
        self._changed = threading.Condition()
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._drain, args=(stream, lines), daemon=True).start()
        line = self.wait_for(self.stdout, "ready:", timeout)
        if line is None:
            self.stop()
            raise AssertionError(f"fssam serve did not get ready: {''.join(self.stdout + self.stderr)[-3000:]}")
        match = READY.match(line)
        assert match, line
        self.url, self.triton = match.group(1), match.group(2)  # the front's URL, tritonserver's host:port
        self.port = int(self.url.rsplit(":", 1)[1])
        self.ready_line = line

    def _drain(self, stream, lines):
        for line in stream:
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            lines.append(None)  # end of stream
            self._changed.notify_all()

    def wait_for(self, lines, text, timeout):
        """The first line holding `text` (None at the end of the stream or after `timeout` s)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines:
                    if line is None:
                        return None
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _children(pid: int) -> list:
    from fssam.serving.server import child_processes

    return child_processes(pid)


def _tritonserver_pid(serve_pid: int) -> int:
    (pid,) = [pid for pid in _children(serve_pid)
              if b"tritonserver" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]]
    return pid


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


# ---------------------------------------------------------------- HTTP

class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def error(self) -> str:
        return json.loads(self.body)["error"]

    def __repr__(self):
        return f"Reply({self.status}, {self.body[:300]!r})"


def call(base, method, path, body=None, headers=None, timeout=60, context=None, chunked=False) -> Reply:
    """One request on a connection of its own (http.client: bodies and headers exactly as given)."""
    url = urllib.parse.urlsplit(base)
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        reply = conn.getresponse()
        return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


def logits_of(reply: Reply) -> np.ndarray:
    assert reply.status == 200, reply
    length = reply.headers.get("inference-header-content-length")
    if length is None:
        output = json.loads(reply.body)["outputs"][0]
        return np.asarray(output["data"], np.float32).reshape(output["shape"])
    output = json.loads(reply.body[:int(length)])["outputs"][0]
    assert output["name"] == "logits" and output["datatype"] == "FP32"
    return np.frombuffer(reply.body[int(length):], "<f4").reshape(output["shape"])


def _entry(name, array, datatype="UINT8", shape=None, size=None) -> dict:
    return {"name": name, "shape": list(array.shape) if shape is None else shape, "datatype": datatype,
            "parameters": {"binary_data_size": int(array.nbytes) if size is None else size}}


def binary(arrays: dict, entries=None, outputs=None, tail=b"", cut=0, length=None):
    """(body, headers) of a KServe v2 binary-tensor request of `arrays` (entries: its JSON inputs)."""
    header = {"inputs": entries if entries is not None else [_entry(n, a) for n, a in arrays.items()],
              "outputs": outputs if outputs is not None else [{"name": "logits", "parameters": {"binary_data": True}}]}
    text = json.dumps(header).encode()
    body = text + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values()) + tail
    body = body[:len(body) - cut]
    return body, {"Inference-Header-Content-Length": str(len(text)) if length is None else length,
                  "Content-Type": "application/octet-stream"}


def json_infer(arrays: dict, change=None, extra=None):
    """(body, headers) of a KServe v2 JSON request; `change`: {input: {field: value}} over the entries."""
    entries = [{"name": n, "shape": list(a.shape), "datatype": "UINT8", "data": a.ravel().tolist()}
               for n, a in arrays.items()]
    for entry in entries:
        entry.update((change or {}).get(entry["name"], {}))
    return json.dumps({"inputs": entries, **(extra or {})}).encode(), {"Content-Type": "application/json"}


def infer(base, arrays, **kwargs) -> Reply:
    body, headers = binary(arrays)
    return call(base, "POST", "/v2/models/fssam/infer", body, headers, **kwargs)


def episode_arrays(seed: int, batch: int = 1) -> dict:
    q, s, m = random_episode(batch=batch, seed=seed)
    return {"query": q.numpy().astype(np.uint8), "support_images": s.numpy().astype(np.uint8),
            "support_masks": m.numpy().astype(np.uint8)}


GOOD = episode_arrays(1)


def multipart(fields):
    """(body, headers) of a multipart/form-data upload; fields: (name, filename, bytes)."""
    boundary = "fssam-" + os.urandom(8).hex()
    body = b""
    for name, filename, data in fields:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_artifacts):
    from fssam.serving.repository import write_repository

    out = tmp_path_factory.mktemp("front") / "repository"
    write_repository(tiny_artifacts[0], str(out))  # python-ort, response cache on support_encoder
    return out


@pytest.fixture(scope="module")
def runner(tiny_artifacts):
    from fssam.runtime import open_runner

    return open_runner("onnxruntime", tiny_artifacts[0], verify=False)


def reference(runner, arrays) -> np.ndarray:
    return np.asarray(runner.run_graphs(arrays["query"], arrays["support_images"], arrays["support_masks"]))


@pytest.fixture(scope="module")
def front(repository):
    served = Served(repository)
    yield served
    code = served.stop()
    assert code == 0, "".join(line for line in served.stderr if line)[-2000:]


@pytest.fixture(scope="module")
def good(front, runner):
    """The good episode's logits through the front (tritonclient.http, as a client would), checked
    against ONNX Runtime in process on the same pixels."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{front.port}")
    inputs = []
    for name, array in GOOD.items():
        item = httpclient.InferInput(name, list(array.shape), "UINT8")
        item.set_data_from_numpy(array)
        inputs.append(item)
    logits = client.infer("fssam", inputs, outputs=[httpclient.InferRequestedOutput("logits")]).as_numpy("logits")
    client.close()
    assert logits.shape == (1, 1, SIZE, SIZE) and logits.dtype == np.float32
    assert np.abs(logits - reference(runner, GOOD)).max() <= 1e-6
    assert np.array_equal(logits_of(infer(front.url, GOOD)), logits)  # raw binary request: the same bytes
    return logits


def still_good(front, good):
    """The server stays ready and answers the good request bitwise as before."""
    assert call(front.url, "GET", "/v2/health/ready").status == 200
    assert np.array_equal(logits_of(infer(front.url, GOOD)), good)


# ---------------------------------------------------------------- 1, 2: malformed infer requests -> 400

def _bad_requests() -> dict:
    """name -> (body, headers, status, words the message must hold)."""
    g = GOOD
    q, s, m = g["query"], g["support_images"], g["support_masks"]
    huge = 2**40
    nine = {n: np.repeat(a, 9, 0) for n, a in g.items()}
    seven, zero = m.copy(), np.zeros_like(m)
    seven[0, 0, 1, 1] = 7
    body, headers = binary(g)
    cases = {
        "huge shape, JSON (query)": (*json_infer(g, {"query": {"shape": [huge, 3, SIZE, SIZE], "data": [1, 2, 3]}}),
                                     400, ["'query'", "shape"]),
        "huge shape, JSON (all three)": (*json_infer(g, {n: {"shape": [huge, *a.shape[1:]], "data": [1, 2, 3]}
                                                         for n, a in g.items()}), 400, ["'query'", "shape"]),
        "huge shape, binary": (*binary(g, [_entry("query", q, shape=[huge, 3, SIZE, SIZE]), _entry("support_images", s),
                                           _entry("support_masks", m)]), 400, ["'query'", "shape"]),
        "header length over the body": (body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1000)},
                                        400, ["Inference-Header-Content-Length"]),
        "header length not a number": (body, {**headers, "Inference-Header-Content-Length": "12abc"}, 400,
                                       ["Inference-Header-Content-Length"]),
        "header length negative": (body, {**headers, "Inference-Header-Content-Length": "-5"}, 400,
                                   ["Inference-Header-Content-Length"]),
        "header length 0": (body, {**headers, "Inference-Header-Content-Length": "0"}, 400,
                            ["Inference-Header-Content-Length"]),
        "truncated binary body": (*binary(g, cut=100), 400, ["'support_masks'", "short"]),
        "bytes after the binary data": (*binary(g, tail=bytes(10)), 400, ["10 bytes after"]),
        "not JSON": (b"\x00\x01 not json {", {"Content-Type": "application/json"}, 400, ["not a JSON"]),
        "not UTF-8": (b'{"inputs": "\xff\xfe"}', {"Content-Type": "application/json"}, 400, ["not a JSON"]),
        "JSON list": (b"[1, 2, 3]", {"Content-Type": "application/json"}, 400, ["a list"]),
        "JSON without inputs": (b"{}", {"Content-Type": "application/json"}, 400, ["'inputs'"]),
        "negative dimension": (*binary(g, [_entry("query", q, shape=[-1, 3, SIZE, SIZE]), _entry("support_images", s),
                                           _entry("support_masks", m)]), 400, ["'query'", "shape"]),
        "batch 0, one episode's bytes": (*binary(g, [_entry(n, a, shape=[0, *a.shape[1:]]) for n, a in g.items()]),
                                         400, ["'query'", "1 <= B <= 8"]),
        "batch 2**32, one episode's bytes": (*binary(g, [_entry(n, a, shape=[2**32, *a.shape[1:]])
                                                         for n, a in g.items()]), 400, ["'query'", "1 <= B <= 8"]),
        "batch 9 over max batch 8": (*binary(nine), 400, ["'query'", "1 <= B <= 8"]),
        "different batch sizes": (*binary({"query": np.repeat(q, 2, 0), "support_images": s, "support_masks": m}),
                                  400, ["different batch sizes"]),
        "datatype FP32": (*binary({"query": q.astype(np.float32), "support_images": s, "support_masks": m},
                                  [_entry("query", q.astype(np.float32), "FP32"), _entry("support_images", s),
                                   _entry("support_masks", m)]), 400, ["'query'", "datatype", "UINT8"]),
        "binary_data_size wrong": (*binary(g, [_entry("query", q, size=100), _entry("support_images", s),
                                               _entry("support_masks", m)]), 400, ["'query'", "binary_data_size"]),
        "JSON value count wrong": (*json_infer(g, {"query": {"data": [1, 2, 3]}}), 400, ["'query'", "3 values"]),
        "masks 0/255 (no 1)": (*binary({**g, "support_masks": m * 255}), 400, ["support_masks", "no foreground"]),
        "mask value 7": (*binary({**g, "support_masks": seven}), 400, ["support_masks", "0, 1, 7"]),
        "all-zero mask": (*binary({**g, "support_masks": zero}), 400, ["support_masks", "no foreground"]),
        "unknown input": (*binary({**g, "prior": q}), 400, ['"prior"', "unknown input"]),
        "missing input": (*binary({"query": q, "support_images": s}), 400, ["'support_masks' is missing"]),
        "input given twice": (*binary(g, [*(_entry(n, a) for n, a in g.items()), _entry("query", q)],
                                      tail=q.tobytes()), 400, ["'query' is given twice"]),
        "unknown output": (*binary(g, outputs=[{"name": "support_features"}]), 400, ['"support_features"', "output"]),
        "unknown request field": (*json_infer(g, extra={"model_name": "validate"}), 400, ["'model_name'"]),
        "unknown input parameter": (*binary(g, [{**_entry("query", q), "parameters": {"shared_memory_region": "x",
                                                                                        "binary_data_size": q.nbytes}},
                                                _entry("support_images", s), _entry("support_masks", m)]),
                                    400, ["'query'", "'shared_memory_region'"]),
    }
    cases["JSON nested 100000 deep"] = (b"[" * 100000 + b"]" * 100000, {"Content-Type": "application/json"}, 400,
                                        ["malformed request body"])
    deep = json.dumps({"inputs": [{"name": "query", "shape": list(q.shape), "datatype": "UINT8", "data": "DEEP"}]})
    cases["JSON data nested 5000 deep"] = (deep.replace('"DEEP"', "[" * 5000 + "]" * 5000).encode(),
                                           {"Content-Type": "application/json"}, 400, ["malformed request body"])
    cases["JSON FP32 with NaN"] = (*json_infer(g, {"query": {"datatype": "FP32", "data": [float("nan")] * q.size}}),
                                   400, ["'query'", "datatype", "UINT8"])
    for value in (-1, 1.5, 300, True, "x", None, float("nan"), float("-inf")):
        data = q.ravel().tolist()
        data[5] = value
        cases[f"JSON query value {json.dumps(value)}"] = (*json_infer(g, {"query": {"data": data}}), 400,
                                                          ["'query'", f"value {json.dumps(value)}"])
    for value in (256, 257):
        data = m.ravel().tolist()
        data[0] = value
        cases[f"JSON mask value {value}"] = (*json_infer(g, {"support_masks": {"data": data}}), 400,
                                             ["'support_masks'", f"value {value}"])
    return cases


BAD = list(_bad_requests())


@pytest.mark.parametrize("case", BAD)
def test_malformed_infer_request_is_a_400_naming_the_input(front, good, case):
    body, headers, status, words = _bad_requests()[case]
    reply = call(front.url, "POST", "/v2/models/fssam/infer", body, headers)
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json")
    message = reply.error
    assert all(word in message for word in words), (words, message)
    assert "\n" not in message and len(message) < 600
    still_good(front, good)


def test_good_requests_every_way_are_the_same_answer(front, good):
    """Binary or JSON, output binary or JSON, /versions/1, nested JSON data, the request id echoed."""
    body, headers = json_infer(GOOD, extra={"id": "r-1"})
    reply = call(front.url, "POST", "/v2/models/fssam/infer", body, headers)
    assert np.array_equal(logits_of(reply), good) and json.loads(reply.body)["id"] == "r-1"
    body, headers = json_infer(GOOD, {n: {"data": a.tolist()} for n, a in GOOD.items()},
                               extra={"parameters": {"binary_data_output": True}})
    reply = call(front.url, "POST", "/v2/models/fssam/versions/1/infer", body, headers)
    assert "inference-header-content-length" in reply.headers and np.array_equal(logits_of(reply), good)
    body, headers = binary(GOOD, outputs=[{"name": "logits", "parameters": {"binary_data": False}}])
    assert np.array_equal(logits_of(call(front.url, "POST", "/v2/models/fssam/infer", body, headers)), good)
    assert call(front.url, "POST", "/v2/models/fssam/versions/2/infer", body, headers).status == 404
    still_good(front, good)


def test_tritonclient_http_sees_the_400_message(front, good):
    from fssam.serving import ServingError
    from fssam.serving.client import RemoteFSSAM

    with RemoteFSSAM(f"127.0.0.1:{front.port}", protocol="http") as remote:
        with pytest.raises(ServingError, match=r"'query': datatype \"FP32\", expected UINT8"):
            remote.infer(GOOD["query"].astype(np.float32), GOOD["support_images"], GOOD["support_masks"], raw=True)
        assert remote.metadata()["inputs"][0]["shape"] == [-1, 3, SIZE, SIZE]
        assert remote.served_weights().startswith("RANDOM-INIT")
    still_good(front, good)


# ---------------------------------------------------------------- 3: compressed and oversized bodies

def _gzip_bomb() -> bytes:
    """1024 gzip members of 1 MiB of zeros each: about 1 MiB that inflates to 1 GiB (gzip readers
    concatenate members)."""
    member = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = member.compress(bytes(2**20)) + member.flush()
    assert len(zlib.decompressobj(31).decompress(member)) == 2**20
    return member * 1024


def test_compressed_body_is_415_and_never_inflated(front, good):
    bomb = _gzip_bomb()
    assert 0.9 * 2**20 < len(bomb) < 1.1 * 2**20
    before = _rss_mib(front.process.pid)
    for path, content_type in (("/v2/models/fssam/infer", "application/json"),
                               ("/v2/models/fssam/infer", "application/octet-stream"),
                               ("/v1/segment", "multipart/form-data; boundary=x")):
        for encoding in ("gzip", "deflate", "br, gzip"):
            reply = call(front.url, "POST", path, bomb, {"Content-Encoding": encoding, "Content-Type": content_type})
            assert reply.status == 415, reply
            assert "Content-Encoding" in reply.error
    assert _rss_mib(front.process.pid) - before < 64  # 1 GiB would show
    still_good(front, good)


def test_bodies_over_the_limit_are_413_with_or_without_content_length(front, good):
    limits = json.loads(call(front.url, "GET", "/openapi.json").body)["x-fssam-limits"]
    over = limits["binary_body_bytes"] + 1

    def chunks(total, size=2**16):
        for start in range(0, total, size):
            yield bytes(min(size, total - start))

    binary_header = {"Inference-Header-Content-Length": "100", "Content-Type": "application/octet-stream"}
    json_header = {"Content-Type": "application/json"}
    for headers, total in ((binary_header, over), (json_header, limits["json_body_bytes"] + 1)):
        reply = call(front.url, "POST", "/v2/models/fssam/infer", bytes(total), headers)  # Content-Length says so
        assert reply.status == 413 and "over the limit" in reply.error, reply
        reply = call(front.url, "POST", "/v2/models/fssam/infer", chunks(total), headers, chunked=True)
        assert reply.status == 413 and "over the limit" in reply.error, reply
    # /v1/segment: the whole upload by its Content-Length (nothing read), one file over 32 MiB while streaming
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    reply = call(front.url, "POST", "/v1/segment", b"--x\r\n", {**form, "Content-Length": str(200 * 2**20)})
    assert reply.status == 413 and "over the limit" in reply.error, reply

    def big_upload():
        yield b'--x\r\nContent-Disposition: form-data; name="query"; filename="big.png"\r\n\r\n'
        yield from chunks(limits["file_mib"] * 2**20 + 1, 2**20)
        yield b"\r\n--x--\r\n"

    reply = call(front.url, "POST", "/v1/segment", big_upload(), form, chunked=True)
    assert reply.status == 413 and f"over {limits['file_mib']} MiB" in reply.error, reply
    still_good(front, good)


# ---------------------------------------------------------------- 4: inner models 404, admin APIs 403

@pytest.mark.parametrize("method,path,status", [
    *(("POST", f"/v2/models/{model}/infer", 404) for model in ("validate", "support_encoder", "query_segmenter")),
    *(("GET", f"/v2/models/{model}{tail}", 404) for model in ("validate", "support_encoder", "query_segmenter")
      for tail in ("", "/config", "/stats", "/ready")),
    ("POST", "/v2/models/support_encoder/versions/1/infer", 404),
    ("POST", "/v2/models/no_such_model/infer", 404),
    ("GET", "/v2/models/fssam/trace/setting", 404),
    ("GET", "/v2/models/stats", 404),
    ("GET", "/no/such/path", 404),
    ("DELETE", "/v2/models/fssam/infer", 405),
    ("POST", "/v2/repository/index", 403),
    ("POST", "/v2/repository/models/fssam/unload", 403),
    ("POST", "/v2/repository/models/validate/load", 403),
    ("GET", "/v2/systemsharedmemory/status", 403),
    ("POST", "/v2/systemsharedmemory/region/x/register", 403),
    ("GET", "/v2/cudasharedmemory/status", 403),
    ("GET", "/v2/logging", 403),
    ("POST", "/v2/logging", 403),
    ("GET", "/v2/trace/setting", 403),
    ("POST", "/v2/trace/setting", 403),
])
def test_inner_models_and_admin_apis_are_not_reachable(front, good, method, path, status):
    body, headers = binary(GOOD) if method == "POST" else (None, {})
    reply = call(front.url, method, path, body, headers)
    assert reply.status == status, reply
    assert reply.error
    still_good(front, good)


# ---------------------------------------------------------------- 5: the planted cache-key collision

def test_colliding_support_sets_get_their_own_answers_and_the_pair_really_collides(front, good, runner):
    """Through the front, support b after support a gets b's own logits (the cache is keyed by
    validate's HMAC). Then the proof that (a, b) is a real collision in this Triton: support_encoder
    called directly (loopback port) with a, then b, and the same support_key bytes, answers b from
    a's cache entry; tests/triton_cache_key.py gives the two requests the same key."""
    import tritonclient.http as httpclient

    sys.path.insert(0, str(Path(__file__).parent))
    from triton_cache_key import request_key

    pair = np.load(PAIR)
    a, b, mask = pair["a"], pair["b"], pair["mask"]
    query = episode_arrays(2)["query"]
    answers = {}
    for name, support in (("a", a), ("b", b)):
        arrays = {"query": query, "support_images": support, "support_masks": mask}
        answers[name] = logits_of(infer(front.url, arrays))
        assert np.abs(answers[name] - reference(runner, arrays)).max() <= 1e-5, name
    expected_a = reference(runner, {"query": query, "support_images": a, "support_masks": mask})
    # b is not answered with a's support set: its answer is farther from a's than 10x the tolerance
    assert np.abs(answers["b"] - expected_a).max() > 1e-4

    key = np.zeros((1, 32), np.uint8)
    requests = {name: {"support_images": support, "support_masks": mask, "support_key": key}
                for name, support in (("a", a), ("b", b))}
    assert request_key("support_encoder", 1, requests["a"]) == request_key("support_encoder", 1, requests["b"])
    client = httpclient.InferenceServerClient(front.triton)
    try:
        def cache_hits():
            stats = client.get_inference_statistics("support_encoder")["model_stats"][0]["inference_stats"]
            return int(stats.get("cache_hit", {}).get("count", 0))

        outputs = {}
        for name, request in requests.items():
            inputs = []
            for input_name, array in request.items():
                item = httpclient.InferInput(input_name, list(array.shape), "UINT8")
                item.set_data_from_numpy(array)
                inputs.append(item)
            before = cache_hits()
            result = client.infer("support_encoder", inputs)
            outputs[name] = {n: result.as_numpy(n) for n in ("support_features", "support_memory", "support_pointers")}
            hits = cache_hits() - before
            assert hits == (0 if name == "a" else 1), (name, hits)
    finally:
        client.close()
    for output, value in outputs["a"].items():
        assert np.array_equal(outputs["b"][output], value), output  # b answered from a's entry
    own_b = runner.support_encoder(b, mask)
    assert np.abs(np.asarray(own_b[0]) - outputs["b"]["support_features"]).max() > 1e-4  # ... which is not b's
    still_good(front, good)


# ---------------------------------------------------------------- 6: /v1/segment with image files

@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A JPEG query 70x90, a PNG support 80x100 and its 0/255 mask PNG (not square, not 64 px)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:70, 0:90]
    query = np.stack([(x * 2.8) % 256, (y * 3.6) % 256, (x + y) % 256], -1) + rng.integers(0, 20, (70, 90, 3))
    Image.fromarray(query.clip(0, 255).astype(np.uint8)).save(folder / "query.jpg", quality=90)
    Image.fromarray((rng.random((80, 100, 3)) * 255).astype(np.uint8)).save(folder / "support.png")
    mask = np.zeros((80, 100), np.uint8)
    mask[20:55, 30:75] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return {name: folder / file for name, file in (("query", "query.jpg"), ("support", "support.png"),
                                                   ("support_mask", "mask.png"))}


def _segment(front, files, output=None, fields=None):
    fields = fields if fields is not None else [(name, path.name, path.read_bytes()) for name, path in files.items()]
    body, headers = multipart(fields)
    return call(front.url, "POST", "/v1/segment" + (f"?output={output}" if output else ""), body, headers)


def test_segment_files_equal_predict_url_and_the_logits_agree(front, good, runner, image_files, tmp_path):
    from PIL import Image

    from fssam.data.preprocess import decode_episode, logits_to_mask

    png = _segment(front, image_files)
    assert png.status == 200 and png.headers["content-type"] == "image/png", png
    assert png.headers["x-fssam-image-size"] == str(SIZE) and png.headers["x-fssam-weights"].startswith("RANDOM-INIT")
    mask = np.asarray(Image.open(io.BytesIO(png.body)))
    assert mask.shape == (70, 90) and set(np.unique(mask)) <= {0, 255}

    out = tmp_path / "predicted.png"
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "predict", "--url", f"127.0.0.1:{front.port}",
                             "--support", str(image_files["support"]), "--query", str(image_files["query"]),
                             "--support-mask", str(image_files["support_mask"]), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(out)), mask)

    npy = _segment(front, image_files, "npy")
    answer = _segment(front, image_files, "json")
    assert npy.status == answer.status == 200
    for reply in (npy, answer):
        assert reply.headers["x-fssam-image-size"] == str(SIZE) and "x-fssam-weights" in reply.headers
    logits = np.load(io.BytesIO(npy.body))
    data = json.loads(answer.body)
    assert logits.dtype == np.float32 and logits.shape == (1, 1, SIZE, SIZE) == tuple(data["shape"])
    assert np.array_equal(np.asarray(data["data"], np.float32).reshape(data["shape"]), logits)
    import torch

    assert np.array_equal(logits_to_mask(torch.from_numpy(logits), 70, 90) * 255, mask)
    # the same pixels in process: decode_episode as the front does, rounded to UINT8
    pairs = {name: (name, path.read_bytes()) for name, path in image_files.items()}
    query, supports, masks, _ = decode_episode([pairs["support"]], [pairs["support_mask"]], pairs["query"], SIZE)
    pixels = {"query": np.rint(query.numpy()).clip(0, 255).astype(np.uint8),
              "support_images": np.rint(supports.numpy()).clip(0, 255).astype(np.uint8),
              "support_masks": masks.numpy().astype(np.uint8)}
    assert np.abs(reference(runner, pixels) - logits).max() <= 1e-6
    still_good(front, good)


def _png_header_only(width, height) -> bytes:
    """A PNG whose IHDR says width x height (8-bit grey), with a few bytes of IDAT: nothing to decode."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_segment_refusals_are_400_naming_the_file(front, good, image_files):
    from PIL import Image

    files = {name: (name, path.name, path.read_bytes()) for name, path in image_files.items()}
    colour = io.BytesIO()
    rgb = np.zeros((80, 100, 3), np.uint8)
    rgb[20:55, 30:75] = (255, 0, 0)
    Image.fromarray(rgb).save(colour, format="PNG")
    giant = _png_header_only(10000, 10000)
    cases = {
        "corrupt query": ([("query", "broken.jpg", b"\xff\xd8\xff not a JPEG"), files["support"],
                           files["support_mask"]], None, 400, ["broken.jpg", "cannot be decoded"]),
        "empty support": ([files["query"], ("support", "empty.png", b""), files["support_mask"]], None, 400,
                          ["empty.png"]),
        "colour mask": ([files["query"], files["support"], ("support_mask", "colour.png", colour.getvalue())], None,
                        400, ["colour.png", "colour image"]),
        "10000x10000 query by its header": ([("query", "giant.png", giant), files["support"], files["support_mask"]],
                                            None, 400, ["giant.png", "10000x10000"]),
        "10000x10000 mask by its header": ([files["query"], files["support"], ("support_mask", "giant.png", giant)],
                                           None, 400, ["giant.png", "10000x10000"]),
        "missing support_mask": ([files["query"], files["support"]], None, 400, ["'support_mask'"]),
        "unknown field": ([*files.values(), ("prior", "p.png", b"x")], None, 400, ["unknown form field 'prior'"]),
        "two queries": ([files["query"], *files.values()], None, 400, ["too many 'query'"]),
        "mask of another size": ([files["query"], ("support", "q.jpg", files["query"][2]), files["support_mask"]],
                                 None, 400, ["mask.png", "100x80"]),
        "unknown output": (list(files.values()), "xml", 400, ["output 'xml'"]),
    }
    for case, (fields, output, status, words) in cases.items():
        start = time.monotonic()
        reply = _segment(front, None, output, fields)
        assert reply.status == status, (case, reply)
        assert all(word in reply.error for word in words), (case, words, reply.error)
        assert time.monotonic() - start < 10, case  # the giant PNG is refused by its header, not decoded
    body, _ = multipart(list(files.values()))
    reply = call(front.url, "POST", "/v1/segment", body, {"Content-Type": "application/json"})
    assert reply.status == 415, reply
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    for body, words in ((b"--x\r\nnot a multipart body", "malformed request body"),
                        (b"\0" * 1000, "malformed request body"),
                        (b"--x\r\nContent-Type: text/plain\r\n\r\nno name\r\n--x--\r\n", "unknown form field"),
                        (b'--x\r\nContent-Disposition: form-data; name="query"\r\nContent-Type: multipart/mixed; '
                         b"boundary=y\r\n\r\n--y\r\n\r\nnested\r\n--y--\r\n--x--\r\n", "unknown form field")):
        reply = call(front.url, "POST", "/v1/segment", body, form)
        assert reply.status == 400 and words in reply.error, (body[:40], reply)
    reply = call(front.url, "POST", "/v1/segment", b"--x\r\n", {"Content-Type": "multipart/form-data"})
    assert reply.status == 400 and "boundary" in reply.error, reply
    still_good(front, good)


# ---------------------------------------------------------------- metadata endpoints

def test_metadata_endpoints(front, good):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/fssam/ready", "/v2/models/fssam/versions/1/ready"):
        assert call(front.url, "GET", path).status == 200, path
    assert json.loads(call(front.url, "GET", "/v2").body)["name"] == "fssam"
    metadata = json.loads(call(front.url, "GET", "/v2/models/fssam").body)
    assert [(t["name"], t["shape"]) for t in metadata["inputs"]] == [("query", [-1, 3, SIZE, SIZE]),
                                                                      ("support_images", [-1, 1, 3, SIZE, SIZE]),
                                                                      ("support_masks", [-1, 1, SIZE, SIZE])]
    config = json.loads(call(front.url, "GET", "/v2/models/fssam/config").body)
    assert config["max_batch_size"] == MAX_BATCH
    stats = json.loads(call(front.url, "GET", "/v2/models/fssam/stats").body)["model_stats"][0]["inference_stats"]
    assert stats["cache_hit"]["count"] >= 1  # the good episode's support set, asked for more than once
    metrics = call(front.url, "GET", "/metrics")
    assert metrics.status == 200 and b"fssam_ready 1" in metrics.body
    assert b"fssam_support_cache_hits_total" in metrics.body
    still_good(front, good)


# ---------------------------------------------------------------- 7: schemathesis against /openapi.json

def _path_parameters_mismatch(doc) -> list:
    """Operations whose declared path parameters are not the {names} of their path template."""
    wrong = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            if declared != set(re.findall(r"{([^}]+)}", path)):
                wrong.append(f"{method.upper()} {path}: path parameters {sorted(declared)}")
    return wrong


def test_openapi_path_parameters_match_the_paths(front):
    doc = json.loads(call(front.url, "GET", "/openapi.json").body)
    assert not _path_parameters_mismatch(doc)


def test_schemathesis_finds_no_server_error(front, good, tmp_path, monkeypatch):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e .[test])")
    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(tmp_path / "hypothesis"))  # no .hypothesis/ in the repo
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup

    doc = json.loads(call(front.url, "GET", "/openapi.json").body)
    assert not _path_parameters_mismatch(doc)  # else the fuzz would never reach model fssam
    schema = schemathesis.openapi.from_dict(doc)
    failures, counts = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
               | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        def fuzz(case):
            response = case.call_and_validate(base_url=front.url, checks=[not_a_server_error], timeout=30)
            counts[response.status_code] = counts.get(response.status_code, 0) + 1

        try:
            fuzz()
        except (FailureGroup, AssertionError) as error:
            failures.append(f"{operation.label}: {error!r}"[:1000])
    assert not failures, "\n".join(failures)
    assert sum(counts.values()) >= 100 and not any(status >= 500 for status in counts), counts
    still_good(front, good)


# ---------------------------------------------------------------- 8: load, good and bad mixed

def test_load_8_clients_x_20_good_and_40_bad(front, good, runner):
    clients, goods, bads = 8, 20, 40
    episodes = [episode_arrays(100 + i) for i in range(clients)]
    references = [logits_of(infer(front.url, e)) for e in episodes]
    for arrays, logits in zip(episodes, references):
        assert np.abs(reference(runner, arrays) - logits).max() <= 1e-6
    cheap = ["mask value 7", "all-zero mask", "not JSON", "unknown input", "datatype FP32", "batch 9 over max batch 8",
             "truncated binary body", "header length not a number", "JSON list", "unknown output"]
    bad_requests = _bad_requests()
    extra = [("POST", "/v2/models/validate/infer", 404), ("GET", "/v2/logging", 403)]

    def work(i):
        problems, worst = [], 0.0
        plan = ["good"] * goods + ["bad"] * bads
        np.random.default_rng(i).shuffle(plan)
        for n, kind in enumerate(plan):
            try:
                if kind == "good":
                    reply = infer(front.url, episodes[i])
                    if reply.status != 200:
                        problems.append(("good", reply))
                        continue
                    worst = max(worst, float(np.abs(logits_of(reply) - references[i]).max()))
                elif n % 6 == 5:
                    method, path, status = extra[n % 2]
                    reply = call(front.url, method, path, *binary(GOOD))
                    if reply.status != status:
                        problems.append((path, reply))
                else:
                    name = cheap[(n + i) % len(cheap)]
                    body, headers, status, words = bad_requests[name]
                    reply = call(front.url, "POST", "/v2/models/fssam/infer", body, headers)
                    if reply.status != status or not all(word in reply.error for word in words):
                        problems.append((name, reply))
            except Exception as error:  # a connection error is a failure too
                problems.append((kind, repr(error)))
        return problems, worst

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(work, range(clients)))
    problems = [p for found, _ in outcomes for p in found]
    assert not problems, f"{len(problems)} failures, first {problems[:3]}"
    worst = max(w for _, w in outcomes)
    assert worst <= 1e-6, f"answers under load differ from single requests by {worst:.2e}"
    still_good(front, good)


# ---------------------------------------------------------------- 9: a stub killed, SIGTERM, under load

@pytest.fixture(scope="module")
def doomed(repository, tmp_path_factory):
    served = Served(repository, "--restarts", "1", "--log", str(tmp_path_factory.mktemp("doomed") / "serve.log"))
    yield served
    served.stop()


class Load:
    """Clients sending their episode in a loop to the front; every outcome recorded."""

    def __init__(self, url, episodes, references):
        self.url, self.episodes, self.references = url, episodes, references
        self.outcomes, self.stopping = [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(len(episodes))]
        for thread in self.threads:
            thread.start()

    def _client(self, i):
        while not self.stopping.is_set():
            try:
                reply = infer(self.url, self.episodes[i], timeout=60)
                self.outcomes.append((i, reply))
                if reply.status != 200:
                    time.sleep(0.05)  # as a client honouring Retry-After would, only sooner
            except (OSError, http.client.HTTPException) as error:
                self.outcomes.append((i, error))
                time.sleep(0.05)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)

    def check(self):
        """(answers 200, refusals 503, connection errors); asserts no wrong answer and no other status."""
        ok = refused = errors = 0
        for i, outcome in self.outcomes:
            if isinstance(outcome, Exception):
                errors += 1
            elif outcome.status == 200:
                logits = logits_of(outcome)
                assert np.abs(logits - self.references[i]).max() <= 1e-6 and np.abs(logits).max() > 0
                ok += 1
            else:
                assert outcome.status == 503, outcome
                assert outcome.headers.get("retry-after", "").isdigit(), outcome.headers
                refused += 1
        return ok, refused, errors


def _episodes_and_references(url, count=3):
    episodes = [episode_arrays(200 + i) for i in range(count)]
    return episodes, [logits_of(infer(url, e)) for e in episodes]


def test_stub_killed_under_load_then_restarted_answers_again(doomed, runner):
    from fssam.serving.server import stub_processes

    episodes, references = _episodes_and_references(doomed.url)
    for arrays, logits in zip(episodes, references):
        assert np.abs(reference(runner, arrays) - logits).max() <= 1e-6
    server = _tritonserver_pid(doomed.process.pid)
    load = Load(doomed.url, episodes, references)
    try:
        time.sleep(1.5)
        victim = next(pid for pid, model in stub_processes(server).items() if model == "query_segmenter")
        os.kill(victim, signal.SIGKILL)
        assert doomed.wait_for(doomed.stderr, "restarting tritonserver", 60), "".join(filter(None, doomed.stderr))
        assert doomed.wait_for(doomed.stderr, "tritonserver restarted", 240), "".join(filter(None, doomed.stderr))
        answered_after = len(load.outcomes)
        deadline = time.monotonic() + 60
        while not any(not isinstance(o, Exception) and o.status == 200 for _, o in load.outcomes[answered_after:]):
            assert time.monotonic() < deadline, "the front did not answer 200 after the restart"
            time.sleep(0.2)
    finally:
        load.stop()
    ok, refused, errors = load.check()
    assert ok and refused + errors, (ok, refused, errors)
    assert doomed.process.poll() is None and _tritonserver_pid(doomed.process.pid) != server
    assert call(doomed.url, "GET", "/v2/health/ready").status == 200
    # within 1e-6, not bitwise: the new server's cache may hold this support set as encoded in a batch under load
    assert np.abs(logits_of(infer(doomed.url, episodes[0])) - references[0]).max() <= 1e-6


def test_sigterm_under_load_gives_right_answers_or_503_then_stops(doomed):
    episodes, references = _episodes_and_references(doomed.url)
    children = _children(doomed.process.pid)
    load = Load(doomed.url, episodes, references)
    try:
        time.sleep(1.5)
        doomed.process.send_signal(signal.SIGTERM)
        assert doomed.process.wait(90) == 0, "".join(filter(None, doomed.stderr))
        time.sleep(0.5)
    finally:
        load.stop()
    ok, refused, errors = load.check()
    assert ok and refused + errors, (ok, refused, errors)
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "tritonserver outlived fssam serve"


# ---------------------------------------------------------------- 10: API keys and TLS

def _self_signed(folder: Path):
    """(cert, key) PEM files for 127.0.0.1, or (None, reason)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if shutil.which("openssl"):
        result = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                                 "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            return cert, key
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None, "neither the openssl CLI nor the cryptography package can make a certificate"
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_api_keys_and_tls(repository, runner, image_files, tmp_path):
    api_key = "k3y-" + "x" * 20
    cert, key = _self_signed(tmp_path)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)] if cert is not None else []
    served = Served(repository, "--api-key", api_key, *tls)
    try:
        assert "API keys 1" in served.ready_line and api_key not in served.ready_line
        context = None
        if tls:
            assert served.url.startswith("https://")
            context = ssl.create_default_context(cafile=str(cert))  # verified: hostname 127.0.0.1 and the chain
        expected = reference(runner, GOOD)
        body, headers = binary(GOOD)
        bearer = {"Authorization": f"Bearer {api_key}"}
        for auth in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": api_key},
                     {"Authorization": f"Basic {api_key}"}):
            for method, path, data in (("POST", "/v2/models/fssam/infer", body), ("GET", "/v2", None),
                                       ("GET", "/openapi.json", None), ("GET", "/v2/models/validate", None),
                                       ("GET", "/v2/logging", None)):
                reply = call(served.url, method, path, data, {**headers, **auth} if data else auth, context=context)
                assert reply.status == 401, (auth, path, reply)
                assert reply.headers["www-authenticate"].startswith("Bearer"), reply.headers
        for path in ("/v2/health/ready", "/v2/health/live"):
            assert call(served.url, "GET", path, context=context).status == 200, path
        reply = call(served.url, "POST", "/v2/models/fssam/infer", body, {**headers, **bearer}, context=context)
        assert np.abs(logits_of(reply) - expected).max() <= 1e-6
        assert call(served.url, "GET", "/v2/models/validate", headers=bearer, context=context).status == 404
        doc = json.loads(call(served.url, "GET", "/openapi.json", headers=bearer, context=context).body)
        assert doc["security"] == [{"apiKey": []}]
        if not tls:
            pytest.skip(f"TLS not checked: {key}")
        with pytest.raises(ssl.SSLCertVerificationError):  # the default trust store does not know this certificate
            call(served.url, "GET", "/v2/health/ready", context=ssl.create_default_context())
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP to the HTTPS port
            call(served.url.replace("https://", "http://"), "GET", "/v2/health/ready", timeout=10)
        assert call(served.url, "GET", "/v2/health/ready", context=context).status == 200
        _client_over_tls(served.url, api_key, cert, expected, image_files, tmp_path)
    finally:
        assert served.stop() == 0, "".join(filter(None, served.stderr))


def _client_over_tls(url, api_key, cert, expected, image_files, tmp_path):
    """fssam's client library and `fssam predict --url https://... --cacert` against the front's TLS."""
    from PIL import Image

    from fssam.serving import ServingError
    from fssam.serving.client import RemoteFSSAM

    episode = (GOOD["query"], GOOD["support_images"], GOOD["support_masks"])
    with RemoteFSSAM(url, protocol="http", api_key=api_key, ca_file=str(cert)) as remote:
        assert np.abs(np.asarray(remote.infer(*episode)) - expected).max() <= 1e-6
    with RemoteFSSAM(url, protocol="http", api_key=api_key) as remote:  # the system's CAs do not know it
        with pytest.raises(ServingError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            remote.infer(*episode)
    with pytest.raises(ServingError, match="cannot be used"):
        RemoteFSSAM(url, protocol="http", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ServingError, match=r"is for an https:// URL"):
        RemoteFSSAM(url.replace("https://", "http://"), protocol="http", ca_file=str(cert))
    out = tmp_path / "tls.png"
    predict = [sys.executable, "-m", "fssam.cli", "predict", "--url", url, "--support", str(image_files["support"]),
               "--support-mask", str(image_files["support_mask"]), "--query", str(image_files["query"]),
               "--out", str(out), "--api-key", api_key]
    refused = subprocess.run(predict, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "certificate verify failed" in refused.stderr.lower() and not out.exists(), refused.stderr
    result = subprocess.run(predict + ["--cacert", str(cert)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert set(np.unique(np.asarray(Image.open(out)))) <= {0, 255}


# ---------------------------------------------------------------- 11: CLI refusals

@pytest.mark.parametrize("extra,words", [
    (["--no-front", "--host", "0.0.0.0"], "--no-front would expose tritonserver"),
    (["--grpc-port", "8001"], "--grpc-port: only with --no-front"),
    (["--metrics-port", "8002"], "--metrics-port: only with --no-front"),
    (["--api-key", "short"], "at least 16"),
    (["--tls-cert", "cert.pem"], "both --tls-cert and --tls-key"),
    (["--no-front", "--api-key", "k" * 20], "drop --no-front"),
])
def test_serve_refusals_are_one_line_and_start_nothing(repository, extra, words):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fssam.cli", "serve", "--repository", str(repository),
                             "--port", "0", *extra], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("fssam serve: error:") and words in lines[0], lines[0]
    assert "starting tritonserver" not in result.stdout and "ready:" not in result.stdout
    assert time.monotonic() - start < 60
