"""Start, wait for, supervise and stop a real `tritonserver` on a model repository.

The binary: `tritonserver` on PATH (NGC containers), else the one the nvidia-pytriton wheel ships
(site-packages/pytriton/tritonserver). For the wheel's binary a backend folder is assembled in a
private temporary folder (Python backend library + the stub built for this Python's minor version),
and the environment is set so the stub finds this interpreter's libpython (first on
LD_LIBRARY_PATH) and the wheel's bundled libraries (nvidia_pytriton.libs).

Isolation: the repositories served are self-contained (their Python models import numpy, the
runtime and triton_python_backend_utils only), so the server gets no path to fssam: fssam's source
root, '' and '.' are removed from PYTHONPATH, and tritonserver (and so every stub) runs in the
private temporary folder, not in the caller's working directory (the stub's embedded interpreter
puts '' first on sys.path whatever PYTHONSAFEPATH says). An editable install of fssam in the
interpreter's site-packages stays visible to the stubs, which embed that interpreter; nothing
served relies on it. The stubs find their interpreter as `python3` on PATH: this interpreter's
folder comes first there (`stub_interpreter_dir`), so from a virtual environment they import the
venv's torch and numpy, as this process does.

Lifetime: tritonserver runs in its own process group and, on Linux, is SIGKILLed by the kernel
when the thread that started it exits (PR_SET_PDEATHSIG; its stubs exit when it does), so
`kill -9` of `fssam serve` leaves no server holding the ports; start() from a thread that lives as
long as the server (the main thread). `stop()` sends SIGTERM (in-flight requests finish, new ones
are refused with an error) and SIGKILLs the process group after a timeout, then removes the
temporary folder and the Python backend's /dev/shm regions (their names carry this process's pid
and a prefix unique to each start). What a killed process could not remove, the next start()
removes (folders and regions whose pid is gone); its log stays.

Access: the shared-memory, model-repository, logging and trace APIs are restricted to requests
carrying the header `fssam-admin-key: <admin_key>` (HTTP) or the metadata
`triton-grpc-protocol-fssam-admin-key: <admin_key>` (gRPC: Triton prefixes the key it expects);
without an admin key the key is a random secret that is never printed, so these APIs are closed to
every client. Health, metadata, model-config, statistics and inference stay open. Triton reads the
key from its command line only, so local users who can list processes can read it: the
restriction is against network clients. Metrics are off unless a port is given.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request

from fssam.serving import ServingError

ADMIN_HEADER = "fssam-admin-key"  # HTTP header of the restricted APIs
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER  # the gRPC metadata key Triton checks for it
RESTRICTED = "shared-memory,model-repository,logging,trace"
CACHE_SECRET_ENV = "FSSAM_CACHE_SECRET"  # read by the validate step of the repository
STUB = "triton_python_backend_stub"
NOT_READY = "tritonserver does not answer /v2/health/ready with 200"
_ADMIN_KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")
_PR_SET_PDEATHSIG = 1


def check_host(host: str) -> None:
    """ServingError (one line) unless `host` is an IPv4 address or a name resolving to one: the
    addresses tritonserver is given and the URLs fssam builds (host:port) are IPv4 here."""
    try:
        socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        return
    except (socket.gaierror, UnicodeError, ValueError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
    try:
        socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise ServingError(f"--host {host!r} cannot be resolved ({reason}): expected an IPv4 address or a host "
                           "name, e.g. 127.0.0.1 or 0.0.0.0") from None
    raise ServingError(f"--host {host!r} is IPv6 only, which fssam serve does not support: give an IPv4 address "
                       "or a host name that resolves to one, e.g. 127.0.0.1 or 0.0.0.0")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port(host: str, port: int, flag: str) -> None:
    """ServingError naming `port` and `flag` when `host:port` cannot be bound (in use, or not ours).

    SO_REUSEADDR as servers set it: a port left in TIME_WAIT by a stopped server is free, one
    with a listener is not."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)  # what free_port and Triton bind
    except socket.gaierror as error:
        raise ServingError(f"cannot resolve the bind address {host!r} ({error}); "
                           "expected an IP address or host name") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            raise ServingError(
                f"port {port} on {host} is not available ({error.strerror or error}): another process holds it; "
                f"choose another with {flag} (0 picks a free port)"
            ) from None


def _check_distinct(ports: dict) -> None:
    """ServingError naming the flags whose ports clash ({flag: port}; None, a port not given, is left out)."""
    given = [(flag, number) for flag, number in ports.items() if number]
    clashing = [f"{flag} {number}" for flag, number in given if [n for _, n in given].count(number) > 1]
    if clashing:
        raise ServingError(f"{', '.join(clashing[:-1])} and {clashing[-1]} must differ")


def _wheel_root() -> str | None:
    spec = importlib.util.find_spec("pytriton")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "tritonserver")
    return root if os.path.isfile(os.path.join(root, "bin", "tritonserver")) else None


def find_tritonserver() -> dict:
    """{'binary', 'wheel_root' (None for a system install)}; ServingError when there is none."""
    system = shutil.which("tritonserver")
    if system:
        return {"binary": system, "wheel_root": None}
    root = _wheel_root()
    if root:
        return {"binary": os.path.join(root, "bin", "tritonserver"), "wheel_root": root}
    raise ServingError(
        "no tritonserver binary: install the serving extras (pip install nvidia-pytriton 'tritonclient[all]') "
        "or run inside an NGC tritonserver container"
    )


def _wheel_backends(root: str, folder: str) -> str:
    """backends/python with libtriton_python.so, its utils and the stub for this Python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(root, "python_backend_stubs", version, STUB)
    if not os.path.isfile(stub):
        raise ServingError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} ({stub})")
    backends = os.path.join(folder, "backends")
    target = os.path.join(backends, "python")
    os.makedirs(target)
    source = os.path.join(root, "backends", "python")
    for name in os.listdir(source):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), target)
    shutil.copy2(stub, target)
    return backends


def _source_root() -> str:
    """The folder holding the fssam package (the checkout for a source or editable install)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stub_interpreter_dir() -> str | None:
    """The folder to put first on the server's PATH so that the wheel's stubs embed this interpreter's
    environment; None when its `python3` is not this interpreter. The stub embeds libpython in
    isolated mode (PYTHONPATH and PYTHONHOME are ignored) with the program name "python3", found on
    PATH: its prefix, and a venv's pyvenv.cfg beside it, decide the stub's sys.path. Without this,
    from a virtual environment (the lent GPU images run /opt/torch/.venv) the stubs would import the
    base installation's numpy and torch, or none."""
    folder = os.path.dirname(os.path.abspath(sys.executable))
    python3 = os.path.join(folder, "python3")
    if os.path.isfile(python3) and os.path.realpath(python3) == os.path.realpath(sys.executable):
        return folder
    return None


def server_environment(wheel_root: str | None, extra: dict | None = None) -> dict:
    """os.environ updated with `extra`, for tritonserver: libraries for the wheel's stub, and no
    path to fssam or the working directory on PYTHONPATH."""
    env = dict(os.environ)
    env.update(extra or {})
    paths = []
    if wheel_root:
        libdir = sysconfig.get_config_var("LIBDIR")  # this interpreter's libpython, before the system one
        if libdir:
            paths.append(libdir)
        site = os.path.dirname(os.path.dirname(wheel_root))
        libs = os.path.join(site, "nvidia_pytriton.libs")
        if os.path.isdir(libs):
            paths.append(libs)
        interpreter = stub_interpreter_dir()
        if interpreter:
            env["PATH"] = os.pathsep.join([interpreter] + [p for p in env.get("PATH", "").split(os.pathsep)
                                                           if p and p != interpreter])
    if env.get("LD_LIBRARY_PATH"):
        paths.append(env["LD_LIBRARY_PATH"])
    if paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    root = os.path.realpath(_source_root())
    kept = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep)
            if entry not in ("", ".") and os.path.isabs(entry) and os.path.realpath(entry) != root]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent():
    """preexec_fn: SIGKILL this child when the thread that forked it dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    parent = os.getpid()

    def arm():
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return arm


def _remove_shm(prefix: str) -> None:
    if os.path.isdir("/dev/shm"):
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass


def _pid_gone(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError, OverflowError):
        return False
    return False


def _sweep_leftovers() -> None:
    """Remove the temporary folders and /dev/shm regions of earlier fssam processes that were
    killed (their pid, part of the names, is gone); their logs are left alone."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        match = re.fullmatch(r"fssam-triton-(\d+)-\w+", name)
        if match and _pid_gone(match.group(1)):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    if os.path.isdir("/dev/shm"):
        for name in os.listdir("/dev/shm"):
            match = re.match(r"fssam(\d+)_[0-9a-f]{8}_", name)
            if match and _pid_gone(match.group(1)):
                _remove_shm(match.group(0))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def child_processes(pid: int) -> list:
    """The pids of the live processes whose parent is `pid`."""
    children = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] not in "ZX":
                children.append(int(entry))
    return children


def stub_processes(server_pid: int) -> dict:
    """{pid: model name} of the Python backend stubs that are children of `server_pid` and alive (not zombies).

    A stub's command line is `triton_python_backend_stub <repository>/<model>/<version>/model.py
    <shm region> ... <instance name> ...`; the model is the folder above the version."""
    stubs = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is None or stat[1] != server_pid or stat[0] in "ZX":
            continue
        argv = _cmdline(int(entry))
        if argv and os.path.basename(argv[0]) == STUB and len(argv) > 1:
            stubs[int(entry)] = os.path.basename(os.path.dirname(os.path.dirname(argv[1])))
    return stubs


LOG_HEADER = "# fssam serve: tritonserver log"  # first line of the logs fssam writes: a later run may replace them


def written_log(path: str) -> bool:
    """True for a server log fssam wrote (its first line is LOG_HEADER), which `--log` may replace."""
    try:
        with open(path, "rb") as handle:
            return handle.readline().rstrip(b"\n") == LOG_HEADER.encode()
    except OSError:
        return False


class TritonServer:
    """A tritonserver process; use as a context manager or call start() / stop().

    Binds `host` (127.0.0.1 by default); port 0 picks a free port, kept across restarts. Metrics
    are off unless `metrics_port` is given. `cache_mb`: Triton's local response cache of that
    many MiB (for models whose config enables response_cache; None or 0: no cache). `env`:
    variables set for tritonserver and its stubs over os.environ (PYTHONPATH still loses fssam's
    source root, '' and '.'). `admin_key` opens the shared-memory, model-repository,
    logging and trace APIs to requests with the header ADMIN_HEADER (HTTP) or GRPC_ADMIN_HEADER
    (gRPC) set to `admin_key`; None keeps them closed (a random key nobody knows). `cache_secret`:
    the key of the HMAC that the validate step puts into every support_encoder request, so that
    Triton's response-cache key covers a value no client can compute (None: a random one, made
    once for this object; replicas sharing a Redis cache need the same one).

    Log: `log_path` when given (kept; truncated on the first start, appended to on restarts).
    Otherwise `<tempdir>/fssam-tritonserver-<pid>-<random>.log`, outside the temporary folder and
    fixed for this object's lifetime, so every error message can name it: stop() deletes it after
    a clean shutdown and keeps it when anything failed (start, an unexpected exit, a dead stub,
    a non-zero exit code). The temporary folder (`<tempdir>/fssam-triton-*`, the backends copy;
    tritonserver's working directory) and the /dev/shm regions are removed by every stop().
    """

    def __init__(self, repository: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int | None = None, log_path: str | None = None, verbose: bool = False,
                 extra_args: list | None = None, admin_key: str | None = None, cache_mb: int | None = None,
                 env: dict | None = None, cache_secret: str | None = None):
        if not os.path.isdir(repository):
            raise ServingError(f"model repository {repository!r} does not exist")
        if admin_key is not None and not _ADMIN_KEY.fullmatch(admin_key):
            raise ServingError("admin key: expected a non-empty string of letters, digits and . _ ~ + / = - "
                               "(it is sent as an HTTP header and a gRPC metadata value)")
        check_host(host)  # before a port is drawn or anything started
        self.repository = os.path.abspath(repository)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        while not grpc_port and self.grpc_port == self.http_port:  # a free port drawn twice
            self.grpc_port = free_port(host)
        self.metrics_port = metrics_port
        _check_distinct({"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": metrics_port})
        if cache_mb is not None and cache_mb < 0:
            raise ServingError(f"response cache {cache_mb} MB: expected a size >= 0 (0: no cache)")
        self.cache_mb = cache_mb or None
        self.env = dict(env or {})
        if cache_secret is not None and len(cache_secret) < 16:
            raise ServingError("cache secret: expected at least 16 characters (it keys the support cache; replicas "
                               "sharing a Redis cache share it)")
        # validate's HMAC key of support sets (templates/validate_model.py): made here unless shared
        self.env[CACHE_SECRET_ENV] = cache_secret or secrets.token_hex(32)
        self.verbose = verbose
        self.extra_args = list(extra_args or [])
        self.admin_key = admin_key
        self._secret = admin_key or secrets.token_urlsafe(32)  # never printed: the restricted APIs stay closed
        self.process = None
        self.log_path = None
        if log_path:
            from fssam.files import check_output_file

            self.log_path = check_output_file(log_path, written_log, "--log")
        self._default_log = log_path is None
        self._log_handle = None
        self._tmp = None
        self._shm_prefix = None
        self._stubs = {}
        self._stub_models: dict = {}  # {model: stubs} of the first start: a restart must bring them all back
        self._dead_stub = None
        self._failed = False
        self._started = False  # a log was opened (later starts append to it)
        self._running = False  # this object owns a tritonserver process that stop() has not reaped
        self._start_timeout = 300.0

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def stubs(self) -> dict:
        """{pid: model} of the Python backend stubs found when the server became ready."""
        return dict(self._stubs)

    def command(self) -> tuple[list, dict]:
        """(argv, environment) of tritonserver; start() calls it once its temporary folder exists."""
        found = find_tritonserver()
        restricted = f"{RESTRICTED}:{ADMIN_HEADER}={self._secret}"
        cmd = [
            found["binary"],
            f"--model-repository={self.repository}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            "--strict-readiness=true", "--exit-on-error=true", "--disable-auto-complete-config",
            "--exit-timeout-secs=10", f"--log-verbose={1 if self.verbose else 0}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        if self.metrics_port:
            cmd += ["--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        else:
            cmd += ["--allow-metrics=false"]
        if self.cache_mb:
            cmd.append(f"--cache-config=local,size={self.cache_mb * 2**20}")
            if found["wheel_root"]:
                cmd.append(f"--cache-directory={os.path.join(found['wheel_root'], 'caches')}")
        if found["wheel_root"]:
            cmd.append(f"--backend-directory={_wheel_backends(found['wheel_root'], self._tmp)}")
        return cmd + self.extra_args, server_environment(found["wheel_root"], self.env)

    def start(self, timeout: float = 300.0) -> "TritonServer":
        """Check the ports, start tritonserver and wait until it and every model are ready.

        ServingError (after stop(); naming the log, kept) when a port is taken, the binary cannot
        run, tritonserver exits, or it is not ready within `timeout` seconds."""
        if self._running:
            raise ServingError(f"tritonserver was started already (pid {self.process.pid}); stop() it first")
        self._start_timeout = timeout
        check_port(self.host, self.http_port, "--http-port")
        check_port(self.host, self.grpc_port, "--grpc-port")
        if self.metrics_port:
            check_port(self.host, self.metrics_port, "--metrics-port")
        _sweep_leftovers()
        self._tmp = tempfile.mkdtemp(prefix=f"fssam-triton-{os.getpid()}-")
        self._shm_prefix = f"fssam{os.getpid()}_{secrets.token_hex(4)}_"
        self._stubs, self._dead_stub, self.process = {}, None, None
        if self.log_path is None:
            self.log_path = os.path.join(tempfile.gettempdir(),
                                         f"fssam-tritonserver-{os.getpid()}-{secrets.token_hex(4)}.log")
        try:
            cmd, env = self.command()
            self._log_handle = open(self.log_path, "ab" if self._started else "wb")
            if not self._started:
                self._log_handle.write(LOG_HEADER.encode() + b"\n")
                self._log_handle.flush()
            self._started = True
            self.process = subprocess.Popen(cmd, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env,
                                            cwd=self._tmp, start_new_session=True, preexec_fn=_die_with_parent())
            self._running = True
        except (OSError, ServingError) as error:
            self._failed = True
            self.stop()
            if isinstance(error, ServingError):
                raise
            raise ServingError(f"cannot run tritonserver: {error}") from None
        try:
            self.wait_ready(timeout)
            self._stubs = stub_processes(self.process.pid)
            if not self._stub_models:
                for model in self._stubs.values():
                    self._stub_models[model] = self._stub_models.get(model, 0) + 1
        except BaseException as error:
            self._failed = self._failed or not isinstance(error, KeyboardInterrupt)
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def dead_stub(self) -> tuple[int, str] | None:
        """(pid, model) of a Python backend stub found at startup that has died since; sticky until the next start().
        After a restart, a model with fewer live stubs than at the first start counts too (a stub that
        died before start() listed them; pid 0 when it was never seen)."""
        if self._dead_stub is None and self._stubs and self.process is not None:  # listed: start() is done
            alive = stub_processes(self.process.pid)
            dead = [(pid, model) for pid, model in sorted(self._stubs.items()) if pid not in alive]
            counts = {}
            for model in alive.values():
                counts[model] = counts.get(model, 0) + 1
            dead += [(0, model) for model, count in sorted(self._stub_models.items()) if counts.get(model, 0) < count]
            if dead:
                self._dead_stub = dead[0]
                self._failed = True
        return self._dead_stub

    def ready(self) -> bool:
        """tritonserver runs, answers /v2/health/ready with 200, and no stub found at startup has died.

        Triton 2.51 itself keeps reporting ready after a stub dies (its requests then fail), hence
        the stub check; once a stub is found dead this is False until the next start()."""
        if self.process is None or self.process.poll() is not None or self.dead_stub() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._failed = True
                raise ServingError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        self._failed = True
        raise ServingError(f"tritonserver not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def problem(self) -> str | None:
        """What is wrong with a started server (exited, stub dead, not ready), None when it is well."""
        if not self._running:
            return "tritonserver is not running"
        if self.process.poll() is not None:
            self._failed = True
            return f"tritonserver exited with code {self.process.returncode}"
        dead = self.dead_stub()
        if dead is not None:
            return f"the Python backend stub of model {dead[1]} died (pid {dead[0]})"
        return None if self.ready() else NOT_READY

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish, new ones get an error), SIGKILL of the
        process group after `timeout` seconds.

        Returns tritonserver's exit code (None when this start never ran it). Removes the
        temporary folder and the /dev/shm regions of this start, and the default log unless
        something failed. A second call does nothing."""
        code = None
        if self._running:  # cleared only once reaped: a stop() interrupted by Ctrl-C can be called again
            if self.process.poll() is None:
                self.dead_stub()  # a stub that died unseen still keeps the log
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._failed = True
            else:
                self._failed = True  # it exited on its own: keep the log the caller's error names
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # stubs, or all of it after the timeout
            except (ProcessLookupError, PermissionError):
                pass
            code = self.process.wait()
            self._running = False
            self._failed = self._failed or code != 0
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        if self._shm_prefix:
            _remove_shm(self._shm_prefix)
            self._shm_prefix = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._default_log and not self._failed and self.log_path and os.path.isfile(self.log_path):
            os.unlink(self.log_path)
        return code

    def __enter__(self):
        return self if self._running else self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def supervise(server: TritonServer, restarts: int = 1, poll: float = 1.0, on_event=print,
              before_stop=None) -> int | None:
    """Watch a started server until it is interrupted; restart it when it fails.

    Every `poll` seconds: tritonserver must run, every Python backend stub found at startup must
    be alive, and /v2/health/ready must answer 200 (three misses in a row count as a failure). On
    a failure the server is restarted (stop() + start(), same ports), each restart reported
    through `on_event(message)`, at most `restarts` times. Returns stop()'s exit code when a
    KeyboardInterrupt arrives (Ctrl-C, or SIGTERM turned into one by `fssam serve`), after
    `before_stop()` (when given) and server.stop(). Raises ServingError naming the failure and the kept log once the restarts are
    spent, after server.stop(); also when a restart does not come up."""
    used, misses = 0, 0
    try:
        while True:
            problem = server.problem()
            if problem == NOT_READY:
                misses += 1
                problem = None if misses < 3 else problem
            else:
                misses = 0
            if problem is None:
                time.sleep(poll)
                continue
            server._failed = True  # keep the default log: it records the failure
            if used >= restarts:
                server.stop()
                spent = f" after {used} restart{'s' if used != 1 else ''}" if used else ""
                raise ServingError(f"{problem}{spent}; log {server.log_path}:\n{server.log_tail()}")
            used += 1
            on_event(f"{problem}; restarting tritonserver ({used}/{restarts}), log {server.log_path}")
            server.stop()
            server.start(timeout=server._start_timeout)
            misses = 0
            on_event(f"tritonserver restarted: gRPC {server.grpc_url}  HTTP http://{server.http_url}")
    except KeyboardInterrupt:
        if before_stop is not None:
            before_stop()  # e.g. the front answers 503 from now on
        return server.stop()
