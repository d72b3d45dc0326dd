"""Calling a running FSSAM server through tritonclient: the front of `fssam serve` (HTTP, KServe v2
binary tensors), or a tritonserver itself (gRPC, the default here, or HTTP)."""

from __future__ import annotations

import re

import numpy as np
import torch

from fssam.serving import ENSEMBLE_MODEL, WEIGHTS_PARAMETER, ServingError

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


def _address(url: str, protocol: str) -> str:
    if protocol not in DEFAULT_PORTS:
        raise ServingError(f"protocol {protocol!r}: expected grpc or http")
    address = url.split("://", 1)[1] if "://" in url else url
    address = address.rstrip("/")
    if not address:
        raise ServingError(f"server URL {url!r} has no host")
    if ":" not in address.rsplit("]", 1)[-1]:
        address = f"{address}:{DEFAULT_PORTS[protocol]}"
    return address


def _uint8(x, name: str, ndim: int) -> np.ndarray:
    """Pixels 0..255 or mask values as the UINT8 the server takes (floats are rounded)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim == ndim - 1:
        array = array[None]  # one episode without the batch dimension
    if array.ndim != ndim:
        raise ServingError(f"{name}: {array.ndim} dimensions (shape {list(array.shape)}), expected {ndim} with the batch")
    if array.dtype != np.uint8:
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 255):
            raise ServingError(f"{name}: values must be 0..255 (the server takes uint8), found "
                               f"{array.min()}..{array.max()}")
        array = np.rint(array).astype(np.uint8)
    return np.ascontiguousarray(array)


def _tls_context(ca_file: str | None):
    """The client's TLS context: the server's certificate checked against the system's CAs or the
    PEM certificates of `ca_file`, made now so that a bad file is one error line before any request."""
    import ssl

    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as error:  # a missing file, or one that holds no PEM certificate (ssl.SSLError)
        raise ServingError(f"CA file {ca_file!r} cannot be used: {' '.join(str(error).split())}") from None


class RemoteFSSAM:
    """A connection to the `fssam` ensemble; `infer` returns logits (B,1,S,S) float32.

    `api_key`: sent as 'Authorization: Bearer KEY' (the front of `fssam serve --api-key`); an
    https:// URL speaks TLS (HTTP only), verified against the system's CAs or `ca_file`."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = ENSEMBLE_MODEL, timeout: float | None = 120.0,
                 api_key: str | None = None, ca_file: str | None = None):
        self.protocol = protocol
        self.tls = url.startswith("https://")
        if self.tls and protocol != "http":
            raise ServingError(f"{url}: https is for the HTTP protocol (the front); use --protocol http")
        if ca_file is not None and not self.tls:
            raise ServingError(f"a CA file ({ca_file}) is for an https:// URL, not {url}")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.address = _address(url, protocol)
        self.model = model
        self.timeout = timeout
        try:
            if protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError as error:
            raise ServingError(f"tritonclient is not installed ({error}): pip install 'tritonclient[all]'") from None
        self.module = module
        if protocol == "grpc":
            self.client = module.InferenceServerClient(self.address)
        else:
            kwargs = {"connection_timeout": timeout, "network_timeout": timeout} if timeout else {}
            if self.tls:
                context = _tls_context(ca_file)
                kwargs.update(ssl=True, ssl_context_factory=lambda: context)
            self.client = module.InferenceServerClient(self.address, **kwargs)

    def _unreachable(self, error) -> ServingError:
        detail = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, ConnectionRefusedError):
            detail = "connection refused"
        return ServingError(
            f"cannot reach the Triton server at {self.address} ({self.protocol}): {detail}; "
            f"is it running and is {self.address} its {self.protocol} endpoint?"
        )

    def _raise(self, error) -> None:
        status = error.status() if hasattr(error, "status") and callable(error.status) else None
        message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
        if str(status).endswith("UNAVAILABLE") and re.search(r"connect|resolv|unreachable|socket", str(message), re.I):
            detail = "connection refused" if "refused" in str(message).lower() else \
                "unreachable (" + " ".join(str(message).split())[:160] + ")"
            raise self._unreachable(detail) from None  # gRPC: nothing listening there
        message = re.sub(r"^\[request id: [^\]]*\]\s*", "", str(message or error)).split(" NOTE: ", 1)[0]
        message = " ".join(message.split())  # one line for the CLI
        raise ServingError(f"server {self.address} ({self.protocol}): {message}") from None

    def infer(self, query, supports, masks, raw: bool = False):
        """Inputs: query (B,3,S,S), supports (B,K,3,S,S) RGB 0..255, masks (B,K,S,S) 0/1 with 255 =
        ignore (batch dim optional), sent as UINT8. `raw`: send the arrays as given (any dtype), for
        testing the server's checks."""
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        arrays = {"query": query, "support_images": supports, "support_masks": masks}
        if not raw:
            arrays = {"query": _uint8(query, "query", 4), "support_images": _uint8(supports, "supports", 5),
                      "support_masks": _uint8(masks, "masks", 4)}
        inputs = []
        for name, array in arrays.items():
            item = self.module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [self.module.InferRequestedOutput("logits")]
        try:
            if self.protocol == "grpc":
                result = self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout,
                                           headers=self.headers)
            else:
                result = self.client.infer(self.model, inputs, outputs=outputs, headers=self.headers)
        except InferenceServerException as error:
            self._raise(error)
        except Exception as error:  # connection refused, DNS, timeouts of the transport
            raise self._unreachable(error) from None
        logits = result.as_numpy("logits")
        if logits is None:
            raise ServingError(f"server {self.address} ({self.protocol}): the response has no logits")
        return torch.from_numpy(np.array(logits, copy=True))

    def _ask(self, method: str, model: str) -> dict:
        """The server's answer to the client's `method` about `model`, as JSON on either protocol; a
        refusal or an unreachable server as ServingError."""
        from tritonclient.utils import InferenceServerException

        try:
            call = getattr(self.client, method)
            if self.protocol == "grpc":
                return call(model, as_json=True, headers=self.headers)
            return call(model, headers=self.headers)
        except InferenceServerException as error:
            self._raise(error)
        except Exception as error:  # connection refused, DNS, timeouts of the transport
            raise self._unreachable(error) from None

    def cache_stats(self, model: str = "support_encoder") -> dict:
        """Triton's own response-cache counters of `model`: {"hits", "misses", "inferences"}. Through
        the front, which serves the ensemble only, its statistics carry support_encoder's counters."""
        try:
            stats = self._ask("get_inference_statistics", model)
        except ServingError as error:
            if "is not served here" not in str(error):
                raise
            stats = self._ask("get_inference_statistics", self.model)
        entry = stats["model_stats"][0]
        inference = entry.get("inference_stats", {})
        return {"hits": int(inference.get("cache_hit", {}).get("count", 0)),
                "misses": int(inference.get("cache_miss", {}).get("count", 0)),
                "inferences": int(entry.get("inference_count", 0))}

    def metadata(self) -> dict:
        """Input names, shapes and dtypes of the ensemble as the server reports them."""
        return self._ask("get_model_metadata", self.model)

    def served_weights(self) -> str | None:
        """The weights line the ensemble's config carries (`fssam repository` writes it: RANDOM-INIT ...
        for random weights), or None for a model without one."""
        config = self._ask("get_model_config", self.model)
        if self.protocol == "grpc":
            config = config.get("config", {})
        value = config.get("parameters", {}).get(WEIGHTS_PARAMETER, {})
        return value.get("string_value") or value.get("stringValue") or None

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready(headers=self.headers))
        except Exception:
            return False

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def predict_remote(url: str, query, supports, masks, protocol: str = "grpc", model: str = ENSEMBLE_MODEL,
                   timeout: float | None = 120.0, api_key: str | None = None,
                   ca_file: str | None = None) -> torch.Tensor:
    """Logits (B,1,S,S) float32 of one episode (B = 1 for `fssam predict`) from a running server.

    url: host:port of the gRPC (default port 8001) or HTTP (8000) endpoint; https:// speaks TLS
    (HTTP only; `ca_file`: PEM certificates to check the server's against), another scheme prefix
    is ignored. `api_key`: see RemoteFSSAM. query (B,3,S,S) or (3,S,S), supports (B,K,3,S,S),
    masks (B,K,S,S) with 0/1 (255 = ignore): torch tensors or numpy arrays, RGB 0..255. Raises
    ServingError (an FSSAMError) with the server's message for rejected inputs, or when the server
    cannot be reached.
    """
    with RemoteFSSAM(url, protocol=protocol, model=model, timeout=timeout, api_key=api_key, ca_file=ca_file) as remote:
        return remote.infer(query, supports, masks)
