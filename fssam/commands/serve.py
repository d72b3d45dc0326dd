"""`fssam serve`: run tritonserver on a model repository until Ctrl-C or SIGTERM, watching it."""

from __future__ import annotations

import os
import sys

from fssam.commands.common import at_least, install_sigterm, port, positive_seconds

from fssam.serving import DEFAULT_CACHE_MB


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run tritonserver on a model repository (Ctrl-C stops it)")
    serve.add_argument("--repository", required=True, help="folder written by fssam repository")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    serve.add_argument("--http-port", type=port, default=8000, help="0: a free port")
    serve.add_argument("--grpc-port", type=port, default=8001, help="0: a free port")
    serve.add_argument("--metrics-port", type=port, default=None, help="Prometheus metrics port (default: metrics off)")
    serve.add_argument("--cache-mb", type=at_least(0), default=DEFAULT_CACHE_MB,
                       help=f"Triton's local response cache, the support-set cache (default {DEFAULT_CACHE_MB}; 0: off)")
    serve.add_argument("--cache-redis", metavar="HOST:PORT", default=None,
                       help="use a Redis response cache shared by several servers instead of the local one")
    serve.add_argument("--admin-key", default=os.environ.get("FSSAM_ADMIN_KEY"),
                       help="open the shared-memory, model-repository, logging and trace APIs to requests with header "
                            "fssam-admin-key: KEY (default $FSSAM_ADMIN_KEY; without one they stay closed)")
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


def handle(args) -> int:
    from fssam.errors import ConfigError
    from fssam.serving.repository import read_repository
    from fssam.serving.server import TritonServer, supervise

    if args.cache_mb < 0 or args.restarts < 0:
        raise ConfigError("--cache-mb and --restarts must be >= 0")
    info = read_repository(args.repository)
    redis = _redis(args.cache_redis)
    server = TritonServer(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=args.log, verbose=args.verbose_server,
                          admin_key=args.admin_key, cache_mb=None if redis or not args.cache_mb else args.cache_mb,
                          extra_args=redis)
    install_sigterm()
    cache = args.cache_redis and f"Redis {args.cache_redis}" or (f"{args.cache_mb} MB" if args.cache_mb else "off")
    try:
        print(f"starting tritonserver on {args.repository} ({info['config']}, {info['backend']} {info['precision']}, "
              f"response cache {cache}) ...", flush=True)
        server.start(timeout=args.timeout)
    except KeyboardInterrupt:
        server.stop()
        return 0
    try:
        print(f"ready: gRPC {server.grpc_url}  HTTP http://{server.http_url}  model {info['ensemble']['model']}  "
              f"(log {server.log_path}); admin APIs {'open to the admin key' if args.admin_key else 'closed'}; "
              f"Ctrl-C to stop", flush=True)
        if info["support_cache"] and not (args.cache_mb or redis):
            print("note: --cache-mb 0: support sets are encoded on every request", file=sys.stderr)
        if info["weights"].startswith("random"):
            print(f"note: {info['weights']} weights: predictions are not a trained model's", file=sys.stderr)
        code = supervise(server, restarts=args.restarts,
                         on_event=lambda text: print(text, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM before supervise took over
        code = server.stop()
    print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
    return 0
