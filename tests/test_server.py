"""fssam.serving.server against the real tritonserver, on a tiny self-contained repository.

The repository (written per module): `double` (OUTPUT0 = 2 * INPUT0, FP32, dims [4],
max_batch_size 8), `slow` (the same after 2 s) and `probe` (its initialize() reports what its stub
can import), Python models from tests/server_fixtures that import numpy and
triton_python_backend_utils only. Servers started: one shared (no admin key, response cache,
PYTHONPATH given), one for the stub-death lifecycle (+ one restart by supervise), one for SIGTERM
during supervise, one that fails to load, one in a child process killed with SIGKILL: ~17 s.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fssam.serving import ServingError
from fssam.serving.server import (ADMIN_HEADER, GRPC_ADMIN_HEADER, TritonServer, check_port, find_tritonserver,
                                  server_environment, supervise)
from fssam.serving.server import _sweep_leftovers as sweep_leftovers

http_client = pytest.importorskip("tritonclient.http")
grpc_client = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

find_tritonserver()  # a required test dependency (bash scripts/install.sh test): without it this file fails

FIXTURES = Path(__file__).parent / "server_fixtures"
SOURCE_ROOT = Path(__file__).resolve().parents[1]
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{parameters}
"""


def parameter(key: str, value) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def write_repository(folder: Path, report: Path | None) -> str:
    """double, slow (double after 2 s) and probe (writes `report`); only a probe without a
    report, which fails to load, when `report` is None."""
    if report is None:
        models = {"probe": ("probe_model.py", "")}
    else:
        models = {"double": ("double_model.py", ""), "slow": ("double_model.py", parameter("delay_s", 2)),
                  "probe": ("probe_model.py", parameter("report", report))}
    for name, (source, parameters) in models.items():
        (folder / name / "1").mkdir(parents=True)
        shutil.copy(FIXTURES / source, folder / name / "1" / "model.py")
        (folder / name / "config.pbtxt").write_text(CONFIG.format(name=name, parameters=parameters))
    return str(folder)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    return write_repository(tmp / "repository", tmp / "probe.json"), tmp / "probe.json"


@pytest.fixture(scope="module")
def server(repository):
    """No admin key; an 8 MiB response cache; PYTHONPATH given with the checkout, '.' and /opt/elsewhere."""
    pythonpath = os.pathsep.join([str(SOURCE_ROOT), ".", "/opt/elsewhere"])
    triton = TritonServer(repository[0], http_port=0, grpc_port=0, cache_mb=8, env={"PYTHONPATH": pythonpath})
    triton.start(timeout=120)
    yield triton
    triton.stop()


def double(server, batch: int = 2, model: str = "double") -> np.ndarray:
    x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)  # (B, 4)
    client = http_client.InferenceServerClient(server.http_url, network_timeout=30)
    try:  # closed at once: an open keep-alive connection holds a graceful stop for --exit-timeout-secs
        tensor = http_client.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        y = client.infer(model, [tensor]).as_numpy("OUTPUT0")
    finally:
        client.close()
    np.testing.assert_array_equal(y, 2 * x)
    return y


def post_repository_index(server, headers=None) -> int:
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def grpc_admin_calls(server, headers=None) -> dict:
    """{call: None if it succeeded, else the error} of the restricted gRPC calls."""
    client = grpc_client.InferenceServerClient(server.grpc_url)
    results = {}
    try:
        for name in ("get_model_repository_index", "get_system_shared_memory_status", "get_log_settings"):
            try:
                getattr(client, name)(headers=headers)
                results[name] = None
            except InferenceServerException as error:
                results[name] = str(error)
    finally:
        client.close()
    return results


def live_group(pgid: int) -> list:
    """Pids of the live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(entry))
    return members


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def shm_regions(prefix: str) -> list:
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def kill_stub(server, model: str = "double") -> int:
    pid = next(pid for pid, name in server.stubs.items() if name == model)
    os.kill(pid, signal.SIGKILL)
    return pid


def editable_location() -> str | None:
    """The project folder of an editable install of fssam-deploy, None for any other install."""
    for distribution in importlib.metadata.distributions(name="fssam-deploy"):  # a checkout's egg-info may come first
        info = json.loads(distribution.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable"):
            return urllib.parse.urlparse(info["url"]).path
    return None


def test_server_environment_has_no_path_to_fssam(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SOURCE_ROOT), "", ".", "relative", "/opt/extra"]))
    assert server_environment(None)["PYTHONPATH"] == "/opt/extra"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SOURCE_ROOT), "."]))
    assert "PYTHONPATH" not in server_environment(None)


def test_stub_cannot_import_fssam_through_our_environment(server, repository):
    """The stub's cwd is the server's private folder and neither PYTHONPATH nor sys.path leads to
    the checkout. fssam stays importable by the stubs only through an editable install in the
    interpreter's site-packages (then find_spec points at that install), never here via our env."""
    assert importlib.util.find_spec("fssam") is not None  # this process can import it
    report = json.loads(repository[1].read_text())
    cwd = Path(report["cwd"])
    assert cwd != Path.cwd() and cwd.name.startswith("fssam-triton-") and os.listdir(cwd) == ["backends"]
    assert report["path_finder"] is None, report  # not on sys.path (cwd included: '' is on the stub's)
    assert str(SOURCE_ROOT) not in [os.path.realpath(entry) for entry in report["sys_path"] if entry]
    assert report["pythonpath"] == "/opt/elsewhere"  # the checkout and '.' dropped from what the caller gave
    editable = editable_location()
    if report["find_spec"] is not None:
        assert editable and report["find_spec"].startswith(editable), report
    for model in ("double", "slow", "probe"):  # the repository's models import no fssam
        source = (Path(repository[0]) / model / "1" / "model.py").read_text()
        assert not re.search(r"^\s*(import|from)\s+fssam\b", source, re.MULTILINE)


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_port_in_use_is_an_error_before_start(repository, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"http_port": port, "grpc_port": 0} if flag == "--http-port" else {"http_port": 0, "grpc_port": port}
        triton = TritonServer(repository[0], **ports)
        with pytest.raises(ServingError, match=rf"port {port} .*{flag}"):
            triton.start(timeout=60)
        assert triton.process is None and not triton.ready()
    check_port("127.0.0.1", port, flag)  # free again once our socket is closed


BAD_HOSTS = [("no such host!", r"--host 'no such host!' cannot be resolved \(.+\): expected an IPv4 address"),
             ("", r"--host '' cannot be resolved"),
             ("::1", r"--host '::1' is IPv6 only, which fssam serve does not support")]


@pytest.mark.parametrize("host,message", BAD_HOSTS, ids=["unresolvable", "empty", "ipv6"])
def test_an_unresolvable_or_ipv6_host_is_one_error_before_anything_starts(repository, host, message):
    with pytest.raises(ServingError, match=message):
        TritonServer(repository[0], host=host, http_port=0, grpc_port=0)  # port 0: a free port is drawn on host


def _serve(tmp_path, *argv):
    """`fssam serve` on a folder holding only an fssam repository marker: enough for the option checks,
    which all come before tritonserver is started (nothing here could be served)."""
    from fssam.serving.repository import MARKER, REPOSITORY_FORMAT

    folder = tmp_path / "fssam-repository"
    folder.mkdir(exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"format": REPOSITORY_FORMAT}))
    return subprocess.run([sys.executable, "-m", "fssam.cli", "serve", "--repository", str(folder), *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv,message", [
    *((["--host", host], message) for host, message in BAD_HOSTS),
    (["--no-front", "--http-port", "8123", "--grpc-port", "8123"], r"--http-port 8123 and --grpc-port 8123 must differ$"),
    (["--no-front", "--http-port", "0", "--grpc-port", "8124", "--metrics-port", "8124"],
     r"--grpc-port 8124 and --metrics-port 8124 must differ$"),
    (["--no-front", "--host", "0.0.0.0"], r"--host 0.0.0.0 with --no-front would expose tritonserver"),
    (["--grpc-port", "8001"], r"--grpc-port: only with --no-front"),
    (["--api-key", "short"], r"an API key must be at least 16 printable"),
    (["--tls-cert", "/nonexistent.pem"], r"HTTPS needs both --tls-cert and --tls-key"),
], ids=["unresolvable", "empty", "ipv6", "http-grpc", "grpc-metrics", "no-front-exposed", "grpc-without-no-front",
        "short-api-key", "tls-half"])
def test_serve_option_errors_are_one_line(tmp_path, argv, message):
    result = _serve(tmp_path, *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert re.match(r"fssam serve: error: " + message, lines[0]) and "None" not in lines[0], lines[0]
    assert "starting tritonserver" not in result.stdout


def test_restricted_apis_closed_without_admin_key(server):
    assert post_repository_index(server) == 403
    assert post_repository_index(server, {ADMIN_HEADER: "guess"}) == 403
    refused = grpc_admin_calls(server)
    assert all(error and "restricted" in error for error in refused.values()), refused
    refused = grpc_admin_calls(server, {GRPC_ADMIN_HEADER: "guess"})
    assert all(error and "restricted" in error for error in refused.values()), refused
    double(server)  # inference and health stay open
    assert server.ready()


def test_response_cache_configured(server):
    assert re.search(r"cache_enabled\s*\|\s*1\b", Path(server.log_path).read_text())


def test_stub_death_restart_and_give_up(repository):
    """A killed stub: Triton 2.51 keeps /v2/health/ready at 200 (its requests fail with 'Stub process
    ... is not healthy'); ours turns False, supervise restarts once, then gives up with the log."""
    triton = TritonServer(repository[0], http_port=0, grpc_port=0, admin_key="test-admin-key")
    triton.start(timeout=120)
    try:
        assert post_repository_index(triton, {ADMIN_HEADER: "test-admin-key"}) == 200
        assert post_repository_index(triton) == 403
        assert grpc_admin_calls(triton, {GRPC_ADMIN_HEADER: "test-admin-key"}) == dict.fromkeys(
            ["get_model_repository_index", "get_system_shared_memory_status", "get_log_settings"])
        assert sorted(triton.stubs.values()) == ["double", "probe", "slow"]
        ports = (triton.http_port, triton.grpc_port)

        kill_stub(triton)
        assert wait_for(lambda: not triton.ready(), 5)
        assert triton.dead_stub()[1] == "double" and not triton.ready()  # sticky

        events = []

        class Restarted(Exception):
            pass

        def on_event(message):
            events.append(message)
            if message.startswith("tritonserver restarted"):
                raise Restarted

        with pytest.raises(Restarted):
            supervise(triton, restarts=1, poll=0.2, on_event=on_event)
        assert "stub of model double died" in events[0] and "(1/1)" in events[0], events
        assert (triton.http_port, triton.grpc_port) == ports and triton.ready()
        double(triton)

        kill_stub(triton)
        tmp, prefix, pgid, log = triton._tmp, triton._shm_prefix, triton.process.pid, triton.log_path
        with pytest.raises(ServingError, match=r"stub of model double died .*; log " + log):
            supervise(triton, restarts=0, poll=0.2, on_event=events.append)
        assert os.path.isfile(log)  # kept: the error names it
        assert triton.process.poll() is not None and live_group(pgid) == []
        assert shm_regions(prefix) == [] and not os.path.exists(tmp)
    finally:
        triton.stop()
        if triton.log_path and os.path.isfile(triton.log_path):
            os.unlink(triton.log_path)


def test_sigterm_stops_gracefully_and_cleans_up(repository):
    """SIGTERM (as `fssam serve` turns it into KeyboardInterrupt) during supervise: the request in
    flight gets its full answer, one sent during shutdown an error (never zeros), the exit code is
    0, and the temporary folder, /dev/shm regions, process group and default log are gone."""
    triton = TritonServer(repository[0], http_port=0, grpc_port=0)
    triton.start(timeout=120)
    tmp, prefix, pgid, log = triton._tmp, triton._shm_prefix, triton.process.pid, triton.log_path
    assert os.path.isdir(tmp) and shm_regions(prefix) and os.path.isfile(log)
    results = {}

    def request(name, model, delay):
        time.sleep(delay)
        try:
            results[name] = double(triton, model=model)
        except Exception as error:  # refused, or the connection closed: any error, never zeros
            results[name] = error

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    threads = [threading.Thread(target=request, args=("in_flight", "slow", 0.0)),
               threading.Thread(target=request, args=("late", "double", 1.6))]
    previous = signal.signal(signal.SIGTERM, interrupt)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        for thread in threads + [timer]:
            thread.start()
        code = supervise(triton, restarts=1, poll=0.2, on_event=pytest.fail)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        for thread in threads:
            thread.join(30)
    assert isinstance(results["in_flight"], np.ndarray), results  # 2 * x, checked by double()
    assert isinstance(results["late"], Exception) and not isinstance(results["late"], AssertionError), results
    assert code == 0, triton.log_tail()
    assert not os.path.exists(tmp) and shm_regions(prefix) == [] and live_group(pgid) == []
    assert not os.path.exists(log)  # the default log goes with a clean stop


def test_exit_during_start_names_the_kept_log(tmp_path):
    triton = TritonServer(write_repository(tmp_path / "broken", None), http_port=0, grpc_port=0)
    with pytest.raises(ServingError, match=r"exited with code \d+ before it was ready; log (\S+):\n") as error:
        triton.start(timeout=120)
    try:
        assert os.path.isfile(triton.log_path) and triton.log_path in str(error.value)
        assert "failed to load" in str(error.value) and "KeyError: 'report'" in Path(triton.log_path).read_text()
        assert triton._tmp is None and live_group(triton.process.pid) == []
    finally:
        os.unlink(triton.log_path)


PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from fssam.serving.server import TritonServer
    triton = TritonServer({repository!r}, http_port=0, grpc_port=0).start(timeout=120)
    print(triton.process.pid, triton.http_port, triton.grpc_port, triton._tmp, triton._shm_prefix, triton.log_path,
          " ".join(map(str, triton.stubs)), flush=True)
    time.sleep(600)
""")


def test_tritonserver_dies_with_its_parent(repository, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(SOURCE_ROOT), repository=repository[0]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline().split()
        assert line, "the parent process did not start tritonserver"
        pid, http_port, grpc_port = int(line[0]), int(line[1]), int(line[2])
        tmp, prefix, log, stubs = line[3], line[4], line[5], [int(p) for p in line[6:]]
        assert alive(pid) and stubs
    finally:
        parent.kill()
        parent.wait()
    try:
        assert wait_for(lambda: not alive(pid), 10), f"tritonserver {pid} outlived its parent"
        assert wait_for(lambda: not any(map(alive, stubs)), 10), "Python backend stubs outlived tritonserver"
        check_port("127.0.0.1", http_port, "--http-port")
        check_port("127.0.0.1", grpc_port, "--grpc-port")
        assert os.path.isdir(tmp) and os.path.isfile(log)  # left by the killed parent (its stubs unlink the shm)
        sweep_leftovers()  # what the next start() does: the pid in the names is gone
        assert not os.path.exists(tmp) and shm_regions(prefix) == [] and os.path.isfile(log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for name in shm_regions(prefix):
            os.unlink(os.path.join("/dev/shm", name))
        if os.path.isfile(log):
            os.unlink(log)


def test_stubs_of_a_virtualenv_embed_its_interpreter(tmp_path):
    """Started from a real venv (the lent GPU images run /opt/torch/.venv), the wheel's stubs run that
    venv's interpreter: their sys.prefix is the venv and its site-packages is on their sys.path. (The
    stub embeds libpython in isolated mode and finds `python3` on PATH, so PYTHONPATH could not do it.)"""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_server import write_repository; "
              "from fssam.serving.server import TritonServer; "
              "from pathlib import Path; "
              "t = TritonServer(write_repository(Path(sys.argv[1]), Path(sys.argv[2])), http_port=0, grpc_port=0); "
              "t.start(timeout=120); t.stop()")
    report = tmp_path / "probe.json"
    subprocess.run([str(venv / "bin" / "python"), "-c", script, str(tmp_path / "repository"), str(report)],
                   env={**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}, check=True, timeout=300)
    seen = json.loads(report.read_text())
    assert Path(seen["prefix"]).resolve() == venv.resolve(), seen
    site_packages = [entry for entry in seen["sys_path"] if entry.endswith("site-packages")]
    assert site_packages and Path(site_packages[0]).resolve().is_relative_to(venv.resolve()), seen["sys_path"]
