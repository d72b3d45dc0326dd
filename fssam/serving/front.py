"""The front: the one HTTP server clients reach; tritonserver stays on loopback ports behind it.

aiohttp (already a dependency of tritonclient's HTTP client; asyncio, streaming body reads with
our own bounds, TLS from Python's ssl) serves only the product:

  POST /v1/segment                         multipart PNG/JPEG files -> mask PNG (or logits JSON / NPY)
  POST /v2/models/fssam[/versions/1]/infer KServe v2, JSON or binary tensors, parsed by fssam.serving.kserve
  GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/fssam[/versions/1][/ready|/config|/stats]
  GET  /metrics, /openapi.json

Every client mistake is a 4xx naming the problem, checked before anything reaches Triton: body
size (from the export's image size, shots and max batch), no compressed bodies, header-read image
dimensions, every shape and value. Triton unavailable (starting, restarting, stopping): 503 with
Retry-After. Admin APIs (repository, shared memory, logging, trace) are never forwarded: 403. Other
models (validate, support_encoder, query_segmenter): 404. Optional bearer API keys guard everything
but the health endpoints. The server runs in a thread of its own (its own event loop), so the
caller's thread can supervise tritonserver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import io
import json
import logging
import re
import ssl
import threading
import time

import numpy as np
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.http_exceptions import HttpProcessingError

from fssam.errors import InputError
from fssam.serving import ENSEMBLE_MODEL, ServingError
from fssam.serving.kserve import FILE_MIB, Contract, RequestError, infer_response, parse_infer, triton_logits, triton_request

RETRY_AFTER_S = 2
FILE_LIMIT = FILE_MIB * 2**20  # bytes of one uploaded image or mask file
DECODE_WORKERS = 2  # uploads decoded at once (a 8192 px image decodes to 200 MB)
MAX_BODIES = 16  # request bodies held at once (each at most the model's body limit); later ones wait
BODY_TIMEOUT_S = 120  # a body not received within this gets 408 (slow senders hold no slot for ever)
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
ADMIN = re.compile(r"^/v2/(repository|systemsharedmemory|cudasharedmemory|logging|trace)(/|$)")
OTHER_MODEL = re.compile(r"^/v2/models/([^/]+)(/.*)?$")
SEGMENT_FORMATS = {"png": "image/png", "json": "application/json", "npy": "application/x-npy"}


class Unavailable(Exception):
    """Triton cannot answer now (starting, restarting, stopping): 503 with Retry-After."""


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="fssam"'}
    return _json(status, {"error": message}, headers)


class Front:
    """The front of one served repository. `triton_url`: host:port of tritonserver's HTTP endpoint
    (loopback). `description`: the repository's fssam_repository.json. `api_keys`: bearer tokens
    (empty: no authentication). `available`: False while the caller restarts or stops Triton."""

    def __init__(self, triton_url: str, description: dict, host: str = "127.0.0.1", port: int = 8000,
                 api_keys=(), ssl_context: ssl.SSLContext | None = None, available=lambda: True):
        ensemble = description["ensemble"]
        self.contract = Contract(int(description["image_size"]), int(description["shots"]),
                                 int(description.get("episodes_per_request") or ensemble["max_batch_size"]
                                     or description.get("export_max_batch") or 1))
        self.description = description
        self.weights = description.get("weights_line") or description.get("weights", "unknown")
        self.triton = f"http://{triton_url}"
        self.host, self.port = host, port
        self.api_keys = [key.encode() for key in api_keys]
        self.ssl_context = ssl_context
        self.available = available
        self.draining = False
        self.counts: dict = {}
        self.seconds = {"sum": 0.0, "count": 0}
        self._thread = None
        self._loop = None
        self._runner = None
        self._session = None
        self._pool = concurrent.futures.ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="fssam-front")
        self._decodes = None
        self._error = None

    # ------------------------------------------------------------ life

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Front":
        """Bind and serve in a thread; ServingError when the address cannot be bound."""
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="fssam-front", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or self._error:
            self._thread.join(1)
            raise ServingError(f"the front cannot listen on {self.host}:{self.port}: {self._error or 'timed out'}")
        return self

    def _serve(self, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._open())
        except (OSError, ValueError) as error:
            self._error = getattr(error, "strerror", None) or str(error)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close())
            loop.close()

    async def _open(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=self.contract.json_body_limit)
        self._routes(app)
        # no keep-alive to Triton: an idle pooled connection would hold its graceful shutdown open
        self._session = ClientSession(timeout=ClientTimeout(total=600, sock_connect=5),
                                      connector=TCPConnector(force_close=True))
        self._decodes = asyncio.Semaphore(DECODE_WORKERS)
        self._bodies = asyncio.Semaphore(MAX_BODIES)
        # auto_decompress off: a compressed body is refused (415), never inflated; a malformed HTTP
        # message is answered 400 by aiohttp without a traceback in our log (anyone could flood it)
        quiet = logging.getLogger("fssam.front.http")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False, logger=quiet)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        """Stop listening (requests in flight finish); idempotent."""
        self.draining = True
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # ------------------------------------------------------------ routing

    def _routes(self, app: web.Application) -> None:
        model = f"/v2/models/{ENSEMBLE_MODEL}"
        for prefix in (model, f"{model}/versions/1"):
            app.router.add_post(f"{prefix}/infer", self.infer)
            app.router.add_get(prefix, self.metadata)
            app.router.add_get(f"{prefix}/ready", self.ready)
            app.router.add_get(f"{prefix}/config", self.config)
            app.router.add_get(f"{prefix}/stats", self.stats)
        app.router.add_post("/v1/segment", self.segment)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        start = time.perf_counter()
        response = await self._answer(request, handler)
        key = (request.path if request.match_info.route.resource is not None else "other", response.status)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.seconds["sum"] += time.perf_counter() - start
        self.seconds["count"] += 1
        return response

    async def _answer(self, request: web.Request, handler):
        path = request.path
        if self.api_keys and path not in OPEN_PATHS and not self._authorized(request):
            return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        if ADMIN.match(path):
            return _error(403, "the admin APIs (model repository, shared memory, logging, trace) are not exposed")
        other = OTHER_MODEL.match(path)
        if other and other.group(1) != ENSEMBLE_MODEL:
            return _error(404, f"model {other.group(1)[:64]!r} is not served here: the only model is "
                               f"{ENSEMBLE_MODEL!r}")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return _error(415, f"Content-Encoding {encoding[:32]!r}: compressed request bodies are not accepted; "
                               "send the body uncompressed")
        try:
            if request.method == "POST":
                async with self._bodies:
                    return await handler(request)
            return await handler(request)
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s")
        except web.HTTPException as error:  # 404 / 405 / 413 of aiohttp: as JSON
            if error.status >= 500:
                raise
            return _error(error.status, error.reason if error.status != 413 else error.text)
        except RequestError as error:
            return _error(error.status, str(error))
        except Unavailable as error:
            return _error(503, str(error))
        except (HttpProcessingError, ValueError, UnicodeError, RecursionError) as error:  # bad multipart; JSON too deep
            message = " ".join(str(getattr(error, "message", None) or error).split())[:200]
            return _error(400, f"malformed request body: {message}")

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token, key) for key in self.api_keys)

    # ------------------------------------------------------------ reading bodies

    async def _body(self, request: web.Request, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (413 beyond, before reading when Content-Length says so)."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise RequestError(f"the body is {declared} bytes, over the limit of {limit} for this model "
                               f"(image size {self.contract.image_size}, {self.contract.shots} shot"
                               f"{'s' if self.contract.shots != 1 else ''}, at most "
                               f"{self.contract.max_batch} episodes)", 413)
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
        while True:
            chunk = await asyncio.wait_for(request.content.read(2**20),
                                           max(0.0, deadline - asyncio.get_running_loop().time()))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the body is over the limit of {limit} bytes for this model", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _cpu(self, function, *args):
        async with self._decodes:
            return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    # ------------------------------------------------------------ Triton

    def _unavailable(self) -> Unavailable:
        return Unavailable("the model server is not available now (starting, restarting or stopping): retry "
                           f"after {RETRY_AFTER_S} s")

    async def _triton_ready(self) -> bool:
        if self.draining or not self.available():
            return False
        try:
            async with self._session.get(f"{self.triton}/v2/health/ready", timeout=ClientTimeout(total=2)) as reply:
                return reply.status == 200
        except (ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _run(self, arrays: dict) -> np.ndarray:
        """Logits of checked arrays from Triton's `fssam` ensemble."""
        if self.draining or not self.available():
            raise self._unavailable()
        body, length = triton_request(arrays)
        headers = {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}
        try:
            async with self._session.post(f"{self.triton}/v2/models/{ENSEMBLE_MODEL}/infer", data=body,
                                          headers=headers) as reply:
                answer = await reply.read()
                status, answer_length = reply.status, reply.headers.get("Inference-Header-Content-Length")
        except (ClientError, asyncio.TimeoutError, OSError):
            raise self._unavailable() from None
        if status == 200:
            batch = arrays["query"].shape[0]
            try:
                return triton_logits(answer, answer_length, batch, self.contract.image_size)
            except (ValueError, KeyError, StopIteration, TypeError) as error:
                raise web.HTTPInternalServerError(reason=f"the model server's answer is unusable: {error}") from None
        message = _triton_message(answer)
        if status == 400 and await self._triton_ready():  # checked here and refused by validate: still the client's
            raise RequestError(message)
        raise self._unavailable()

    async def _triton_json(self, path: str) -> dict:
        try:
            async with self._session.get(f"{self.triton}{path}", timeout=ClientTimeout(total=10)) as reply:
                if reply.status != 200:
                    raise self._unavailable()
                return await reply.json()
        except (ClientError, asyncio.TimeoutError, OSError, ValueError):
            raise self._unavailable() from None

    # ------------------------------------------------------------ handlers

    async def infer(self, request: web.Request) -> web.Response:
        length = request.headers.get("Inference-Header-Content-Length")
        limit = self.contract.binary_body_limit if length is not None else self.contract.json_body_limit
        body = await self._body(request, limit)
        parsed = await self._cpu(parse_infer, body, length, self.contract)
        logits = await self._run(parsed.arrays)
        data, headers = infer_response(logits, parsed.binary_output, parsed.request_id)
        return web.Response(body=data, headers=headers)

    async def segment(self, request: web.Request) -> web.Response:
        wanted = request.query.get("output", "png")
        if wanted not in SEGMENT_FORMATS:
            raise RequestError(f"output {wanted[:16]!r}: expected one of {', '.join(SEGMENT_FORMATS)}")
        if not request.content_type.startswith("multipart/form-data"):
            raise RequestError("expected a multipart/form-data body with the files query, support and support_mask",
                               415)
        files = await self._files(request)
        from fssam.data.preprocess import decode_episode

        def decode():
            query, supports, masks, query_rgb = decode_episode(files["support"], files["support_mask"],
                                                               files["query"][0], self.contract.image_size)
            arrays = {"query": _pixels(query), "support_images": _pixels(supports),
                      "support_masks": masks.numpy().astype(np.uint8)}
            return arrays, query_rgb

        try:
            arrays, query_rgb = await self._cpu(decode)
        except InputError as error:
            raise RequestError(str(error)) from None
        logits = await self._run(arrays)
        headers = {"X-FSSAM-Image-Size": str(self.contract.image_size),
                   "X-FSSAM-Weights": _header_text(self.weights)}
        if wanted == "json":
            body = json.dumps({"shape": list(logits.shape), "datatype": "FP32", "data": logits.ravel().tolist()})
            return web.Response(text=body, content_type="application/json", headers=headers)
        if wanted == "npy":
            buffer = io.BytesIO()
            np.save(buffer, logits.astype("<f4"))
            return web.Response(body=buffer.getvalue(), content_type="application/x-npy", headers=headers)
        png = await self._cpu(_mask_png, logits, query_rgb.shape[0], query_rgb.shape[1])
        return web.Response(body=png, content_type="image/png", headers=headers)

    async def _files(self, request: web.Request) -> dict:
        """{'query': [(name, bytes)], 'support': [...], 'support_mask': [...]} of a multipart upload."""
        shots = self.contract.shots
        counts = {"query": 1, "support": shots, "support_mask": shots}
        limit = FILE_LIMIT * (1 + 2 * shots) + 2**16
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(f"the body is {request.content_length} bytes, over the limit of {limit}", 413)
        files = {name: [] for name in counts}
        reader = await request.multipart()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUT_S

        def left() -> float:
            return max(0.0, deadline - loop.time())

        while True:
            part = await asyncio.wait_for(reader.next(), left())
            if part is None:
                break
            name = getattr(part, "name", None)  # a nested multipart part has none
            if name not in counts:
                raise RequestError(f"unknown form field {str(name)[:64]!r}: expected query, support, support_mask")
            if len(files[name]) >= counts[name]:
                raise RequestError(f"too many {name!r} files: this model takes {counts[name]}")
            data = bytearray()
            while True:
                chunk = await asyncio.wait_for(part.read_chunk(2**20), left())
                if not chunk:
                    break
                data += chunk
                if len(data) > FILE_LIMIT:
                    raise RequestError(f"file {name!r} is over {FILE_LIMIT // 2**20} MiB", 413)
            label = f"{name} {len(files[name]) + 1}" if counts[name] > 1 else name
            if part.filename:
                label += f" ({part.filename[:64]})"
            files[name].append((label, bytes(data)))
        for name, count in counts.items():
            if len(files[name]) != count:
                raise RequestError(f"{len(files[name])} {name!r} file(s): this model takes {count} "
                                   f"(query 1, support and support_mask {shots} each, in pairs)")
        return files

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if await self._triton_ready():
            return web.Response(status=200)
        return _error(503, str(self._unavailable()))

    async def server_metadata(self, request: web.Request) -> web.Response:
        from fssam import __version__

        return _json(200, {"name": "fssam", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def metadata(self, request: web.Request) -> web.Response:
        def tensor(name, shape, dtype):
            return {"name": name, "datatype": dtype, "shape": [-1, *shape[1:]]}

        shapes = self.contract.shapes(1)
        return _json(200, {"name": ENSEMBLE_MODEL, "versions": ["1"], "platform": "ensemble",
                           "inputs": [tensor(name, shape, "UINT8") for name, shape in shapes.items()],
                           "outputs": [tensor("logits", (1, 1, self.contract.image_size, self.contract.image_size),
                                              "FP32")]})

    async def config(self, request: web.Request) -> web.Response:
        return _json(200, {"name": ENSEMBLE_MODEL, "max_batch_size": self.contract.max_batch,
                           "parameters": {"fssam_weights": {"string_value": self.weights}}})

    async def _cache_counts(self) -> dict:
        stats = await self._triton_json("/v2/models/support_encoder/stats")
        entry = stats["model_stats"][0]
        inference = entry.get("inference_stats", {})
        return {"hits": int(inference.get("cache_hit", {}).get("count", 0)),
                "misses": int(inference.get("cache_miss", {}).get("count", 0))}

    async def stats(self, request: web.Request) -> web.Response:
        """The ensemble's statistics in Triton's form, its support-cache counters from support_encoder."""
        ensemble = (await self._triton_json(f"/v2/models/{ENSEMBLE_MODEL}/stats"))["model_stats"][0]
        cache = await self._cache_counts()
        ensemble.setdefault("inference_stats", {})
        ensemble["inference_stats"]["cache_hit"] = {"count": cache["hits"]}
        ensemble["inference_stats"]["cache_miss"] = {"count": cache["misses"]}
        return _json(200, {"model_stats": [ensemble]})

    async def metrics(self, request: web.Request) -> web.Response:
        lines = ["# HELP fssam_front_requests_total Requests answered by the front, by path and status.",
                 "# TYPE fssam_front_requests_total counter"]
        for (path, status), count in sorted(self.counts.items()):
            lines.append(f'fssam_front_requests_total{{path="{path}",status="{status}"}} {count}')
        lines += ["# HELP fssam_front_request_seconds Time the front took per request.",
                  "# TYPE fssam_front_request_seconds summary",
                  f"fssam_front_request_seconds_sum {self.seconds['sum']:.6f}",
                  f"fssam_front_request_seconds_count {self.seconds['count']}"]
        try:
            cache = await self._cache_counts()
            lines += ["# HELP fssam_support_cache_hits_total Support sets answered from Triton's response cache.",
                      "# TYPE fssam_support_cache_hits_total counter", f"fssam_support_cache_hits_total {cache['hits']}",
                      "# HELP fssam_support_cache_misses_total Support sets encoded.",
                      "# TYPE fssam_support_cache_misses_total counter",
                      f"fssam_support_cache_misses_total {cache['misses']}"]
        except Unavailable:
            pass
        lines += ["# HELP fssam_ready Whether the model server answers.", "# TYPE fssam_ready gauge",
                  f"fssam_ready {int(await self._triton_ready())}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.Response:
        from fssam.serving.openapi import document

        return _json(200, document(self.contract, bool(self.api_keys)))


def _pixels(tensor) -> np.ndarray:
    """Float pixels 0..255 as the UINT8 the served model takes (rounded, as fssam.serving.client sends them)."""
    return np.ascontiguousarray(np.rint(tensor.numpy()).clip(0, 255).astype(np.uint8))


def _mask_png(logits: np.ndarray, height: int, width: int) -> bytes:
    import torch

    from fssam.data.preprocess import logits_to_mask

    mask = logits_to_mask(torch.from_numpy(np.array(logits)), height, width)
    import cv2

    ok, data = cv2.imencode(".png", mask * 255)
    if not ok:
        raise ValueError("cannot encode the mask as PNG")
    return data.tobytes()


def _header_text(text: str) -> str:
    return " ".join(str(text).split()).encode("latin-1", "replace").decode("latin-1")[:512]


def _triton_message(answer: bytes) -> str:
    try:
        message = str(json.loads(answer).get("error", ""))
    except (ValueError, AttributeError):
        message = answer[:200].decode("utf-8", "replace")
    message = re.sub(r"^\[request id: [^\]]*\]\s*", "", message)
    return " ".join(message.split())[:500] or "rejected by the model server"
