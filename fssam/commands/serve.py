"""`fssam serve`: tritonserver on loopback behind the front (the only listener clients reach),
until Ctrl-C or SIGTERM, watching both."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from fssam.commands.common import at_least, install_sigterm, port, positive_seconds

from fssam.serving import DEFAULT_CACHE_MB

LOOPBACK = "127.0.0.1"


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve a model repository: the front (HTTP API) before tritonserver")
    serve.add_argument("--repository", required=True, help="folder written by fssam repository")
    serve.add_argument("--host", default=LOOPBACK, help="address the front binds (default 127.0.0.1; 0.0.0.0 exposes "
                       "it); tritonserver always stays on 127.0.0.1")
    serve.add_argument("--port", "--http-port", dest="port", type=port, default=8000,
                       help="the front's port (default 8000; 0: a free port)")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every call but health (repeat for several keys; "
                            "default $FSSAM_API_KEY)")
    serve.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="API keys, one a line ('#' starts a comment)")
    serve.add_argument("--tls-cert", default=None, help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--tls-key", default=None, help="the certificate's PEM private key")
    serve.add_argument("--cache-mb", type=at_least(0), default=DEFAULT_CACHE_MB,
                       help=f"Triton's local response cache, the support-set cache (default {DEFAULT_CACHE_MB}; 0: off)")
    serve.add_argument("--cache-redis", metavar="HOST:PORT", default=None,
                       help="a Redis response cache shared by several servers instead of the local one (official "
                            "containers: the nvidia-pytriton wheel's tritonserver has the local cache only)")
    serve.add_argument("--cache-secret", default=os.environ.get("FSSAM_CACHE_SECRET"),
                       help="the key of the HMAC that keys the support cache (default $FSSAM_CACHE_SECRET, else random "
                            "per start); replicas sharing a Redis cache must share it")
    serve.add_argument("--no-front", action="store_true",
                       help="debugging: tritonserver itself on --host (loopback only) --port (HTTP) and --grpc-port")
    serve.add_argument("--grpc-port", type=port, default=None, help="with --no-front: tritonserver's gRPC port (8001)")
    serve.add_argument("--metrics-port", type=port, default=None,
                       help="with --no-front: tritonserver's metrics port (the front serves /metrics itself)")
    serve.add_argument("--admin-key", default=os.environ.get("FSSAM_ADMIN_KEY"),
                       help="with --no-front: open tritonserver's shared-memory, model-repository, logging and trace "
                            "APIs to requests with header fssam-admin-key: KEY (the front never forwards them)")
    serve.add_argument("--restarts", type=at_least(0), default=1,
                       help="restarts when tritonserver or a Python stub dies, then exit non-zero (default 1)")
    serve.add_argument("--log", default=None, help="server log file (default: a temporary file, named at start)")
    serve.add_argument("--timeout", type=positive_seconds, default=300.0, help="seconds to wait for the server to be ready")
    serve.add_argument("--verbose-server", action="store_true", help="tritonserver --log-verbose=1")
    serve.set_defaults(func=handle)


def _redis(value: str | None) -> list:
    from fssam.errors import ConfigError

    if value is None:
        return []
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--cache-redis {value!r}: expected HOST:PORT")
    return [f"--cache-config=redis,host={host}", f"--cache-config=redis,port={port}"]


def is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError, ValueError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(address).is_loopback for address in addresses)


def api_keys(args) -> list:
    """The bearer keys of --api-key, --api-key-file and $FSSAM_API_KEY; ConfigError for an unusable one."""
    from fssam.errors import ConfigError

    keys = list(args.api_key or [])
    if not keys and os.environ.get("FSSAM_API_KEY"):
        keys.append(os.environ["FSSAM_API_KEY"])
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as handle:
                keys += [line.split("#", 1)[0].strip() for line in handle]
        except (OSError, UnicodeError) as error:
            raise ConfigError(f"--api-key-file {args.api_key_file!r} cannot be read: {error}") from None
        keys = [key for key in keys if key]
        if not keys:
            raise ConfigError(f"--api-key-file {args.api_key_file!r} holds no key")
    for key in keys:
        if len(key) < 16 or not key.isascii() or not key.isprintable() or " " in key:
            raise ConfigError("an API key must be at least 16 printable ASCII characters without spaces")
    return keys


def tls_context(cert: str | None, key: str | None):
    from fssam.errors import ConfigError

    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"--tls-cert {cert!r} / --tls-key {key!r} cannot be loaded: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    return context


def _check_front_options(args) -> None:
    from fssam.errors import ConfigError

    if args.no_front:
        if not is_loopback(args.host):
            raise ConfigError(f"--host {args.host} with --no-front would expose tritonserver, which must not face "
                              "clients (one malformed request can abort it): drop --no-front to serve the front there")
        if args.api_key or args.api_key_file or args.tls_cert or args.tls_key:
            raise ConfigError("--api-key, --api-key-file and --tls-* are the front's: drop --no-front")
        return
    given = [flag for flag, value in (("--grpc-port", args.grpc_port), ("--metrics-port", args.metrics_port),
                                      ("--admin-key", args.admin_key if "FSSAM_ADMIN_KEY" not in os.environ else None))
             if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --no-front (the front serves HTTP only, /metrics itself, "
                          "and never forwards the admin APIs)")


def handle(args) -> int:
    from fssam.errors import ConfigError
    from fssam.serving.repository import read_repository
    from fssam.serving.server import TritonServer, check_host, check_port, supervise

    if args.cache_mb < 0 or args.restarts < 0:
        raise ConfigError("--cache-mb and --restarts must be >= 0")
    _check_front_options(args)
    info = read_repository(args.repository)
    redis = _redis(args.cache_redis)
    cache_mb = None if redis or not args.cache_mb else args.cache_mb
    # an fp32 export is served in IEEE fp32 on a GPU too: TensorRT and cuBLAS/cuDNN use TF32 for fp32
    # unless told not to, and the onnxruntime backend has no option for it (the user's own setting wins)
    tf32 = {"NVIDIA_TF32_OVERRIDE": "0"} if info.get("export_precision") == "fp32" and \
        "NVIDIA_TF32_OVERRIDE" not in os.environ else {}
    common = dict(log_path=args.log, verbose=args.verbose_server, cache_mb=cache_mb, extra_args=redis,
                  cache_secret=args.cache_secret, env=tf32)
    if args.no_front:
        grpc_port = 8001 if args.grpc_port is None else args.grpc_port  # 0: a free port
        server = TritonServer(args.repository, host=args.host, http_port=args.port, grpc_port=grpc_port,
                              metrics_port=args.metrics_port, admin_key=args.admin_key, **common)
        front = None
    else:
        keys = api_keys(args)
        context = tls_context(args.tls_cert, args.tls_key)
        check_host(args.host)
        if args.port:
            check_port(args.host, args.port, "--port")
        server = TritonServer(args.repository, host=LOOPBACK, http_port=0, grpc_port=0, **common)
    install_sigterm()
    cache = args.cache_redis and f"Redis {args.cache_redis}" or (f"{args.cache_mb} MB" if args.cache_mb else "off")
    try:
        print(f"starting tritonserver on {args.repository} ({info['config']}, {info['backend']} {info['precision']}, "
              f"response cache {cache}) ...", flush=True)
        server.start(timeout=args.timeout)
        if not args.no_front:
            from fssam.serving.front import Front

            front = Front(server.http_url, info, host=args.host, port=args.port, api_keys=keys, ssl_context=context)
            try:
                front.start()
            except BaseException:
                server.stop()
                raise
    except KeyboardInterrupt:
        server.stop()
        return 0
    try:
        if front is None:
            print(f"ready: gRPC {server.grpc_url}  HTTP http://{server.http_url}  model {info['ensemble']['model']}  "
                  f"(no front: tritonserver itself, loopback only; log {server.log_path}); admin APIs "
                  f"{'open to the admin key' if args.admin_key else 'closed'}; Ctrl-C to stop", flush=True)
        else:
            print(f"ready: {front.url}  model {info['ensemble']['model']}  (the front; tritonserver on "
                  f"{server.http_url} behind it, log {server.log_path}); API keys "
                  f"{len(keys) if keys else 'off'}; Ctrl-C to stop", flush=True)
        if info.get("support_cache_note"):
            print(f"note: {info['support_cache_note']}", file=sys.stderr)
        elif info["support_cache"] and not (args.cache_mb or redis):
            print("note: --cache-mb 0: support sets are encoded on every request", file=sys.stderr)
        if info["weights"].startswith("random"):
            print(f"note: {info['weights']} weights: predictions are not a trained model's", file=sys.stderr)
        code = supervise(server, restarts=args.restarts, on_event=lambda text: print(text, file=sys.stderr, flush=True),
                         before_stop=front and (lambda: setattr(front, "draining", True)))
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM before supervise took over
        code = server.stop()
    finally:
        if front is not None:
            front.stop()
    print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
    return 0
