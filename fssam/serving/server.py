"""Start, wait for and stop a real `tritonserver` on a model repository.

The binary: `tritonserver` on PATH (NGC containers), else the one the nvidia-pytriton wheel ships
(site-packages/pytriton/tritonserver). For the wheel's binary a backend folder is assembled in a
temporary directory (Python backend library + the stub built for this Python's minor version), and
the environment is set so the stub finds this interpreter's libpython (first on LD_LIBRARY_PATH),
the wheel's bundled libraries (nvidia_pytriton.libs) and fssam (PYTHONPATH).
"""

from __future__ import annotations

import importlib.util
import os
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
    stub = os.path.join(root, "python_backend_stubs", version, "triton_python_backend_stub")
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


def server_environment(wheel_root: str | None) -> dict:
    env = dict(os.environ)
    paths = []
    if wheel_root:
        libdir = sysconfig.get_config_var("LIBDIR")  # this interpreter's libpython, before the system one
        if libdir:
            paths.append(libdir)
        site = os.path.dirname(os.path.dirname(wheel_root))
        libs = os.path.join(site, "nvidia_pytriton.libs")
        if os.path.isdir(libs):
            paths.append(libs)
    if env.get("LD_LIBRARY_PATH"):
        paths.append(env["LD_LIBRARY_PATH"])
    if paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    import fssam

    root = os.path.dirname(os.path.dirname(os.path.abspath(fssam.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class TritonServer:
    """A tritonserver process; use as a context manager or call start() / stop().

    Binds `host` (127.0.0.1 by default); port 0 picks a free port. The server log goes to
    `log_path` (a temporary file by default).
    """

    def __init__(self, repository: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int | None = None, log_path: str | None = None, verbose: bool = False,
                 extra_args: list | None = None):
        if not os.path.isdir(repository):
            raise ServingError(f"model repository {repository!r} does not exist")
        self.repository = os.path.abspath(repository)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port(host)
        self.metrics_port = metrics_port
        self.verbose = verbose
        self.extra_args = list(extra_args or [])
        self.process = None
        self._tmp = None
        self._log_handle = None
        self.log_path = log_path

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list:
        found = find_tritonserver()
        cmd = [
            found["binary"],
            f"--model-repository={self.repository}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            "--strict-readiness=true", "--exit-on-error=true", "--disable-auto-complete-config",
            "--exit-timeout-secs=10", f"--log-verbose={1 if self.verbose else 0}",
        ]
        if self.metrics_port:
            cmd += ["--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        else:
            cmd += ["--allow-metrics=false"]
        if found["wheel_root"]:
            cmd.append(f"--backend-directory={_wheel_backends(found['wheel_root'], self._tmp)}")
        return cmd + self.extra_args, server_environment(found["wheel_root"])

    def start(self, timeout: float = 300.0) -> "TritonServer":
        self._tmp = tempfile.mkdtemp(prefix="fssam-triton-")
        cmd, env = self.command()
        if self.log_path is None:
            self.log_path = os.path.join(self._tmp, "tritonserver.log")
        self._log_handle = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(cmd, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        except OSError as error:
            self.stop()
            raise ServingError(f"cannot run {cmd[0]}: {error}") from None
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise ServingError(f"tritonserver not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL of the process group after `timeout`."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        if self._tmp and os.path.isdir(self._tmp):
            keep_log = self.log_path and self.log_path.startswith(self._tmp)
            for name in os.listdir(self._tmp):
                if name != "tritonserver.log" or not keep_log:
                    shutil.rmtree(os.path.join(self._tmp, name), ignore_errors=True)
        return code

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()
        return False
