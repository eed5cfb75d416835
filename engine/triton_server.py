"""Start and stop the embedded ``tritonserver`` that the ``nvidia-pytriton`` wheel ships (CPU, Python backend).

What it needs: the Python backend stub built for this interpreter,
copied beside ``libtriton_python.so`` in a backend directory of our own (only when it changed, never
under a live server); ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH`` (without it the server hangs in
"loading"); this environment's ``bin`` first on ``PATH`` (the stub finds Python there); a unique
shared-memory prefix per server; a readiness deadline; SIGINT to stop.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytriton
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from engine.reaper import kill_group, remove_segments, remove_stale_segments


class TritonStartError(RuntimeError):
    """The server exited or did not become ready before the deadline; carries the log tail."""


def wait_until(probe, *, timeout_s: float, interval_s: float = 0.25) -> None:
    """Call ``probe()`` until it returns true; :class:`tenacity.RetryError` after ``timeout_s``.

    An exception from ``probe`` ends the wait at once (a server that exited will not become ready).
    """
    Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(interval_s),
             retry=retry_if_result(lambda ok: not ok))(probe)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pytriton_root() -> Path:
    return Path(pytriton.__file__).resolve().parent


def triton_binary() -> Path:
    return _pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def prepare_backend_dir(cache: Path | None = None) -> Path:
    """A backend directory with ``python/`` holding the shipped backend and this interpreter's stub."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    cache = cache or Path(os.environ.get("HYBRIDCN_CACHE", Path.home() / ".cache" / "hybridcn"))
    target = cache / f"triton-backends-py{version}" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [stub, *(root / "backends" / "python").glob("*.*")]
    for source in sources:
        destination = target / source.name
        if destination.exists() and filecmp.cmp(source, destination, shallow=False):
            continue
        staging = destination.with_suffix(destination.suffix + f".{uuid.uuid4().hex}.tmp")
        shutil.copy2(source, staging)
        staging.replace(destination)  # atomic: a running server keeps its mapped old inode
    return target.parent


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


@dataclass
class EmbeddedTriton:
    """A running embedded server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    ready_timeout: float = 120.0
    log_path: Path | None = None
    #: ONNX Runtime threads per model instance. ``None`` keeps the repository's setting (ORT's default: every
    #: core inside each stage, the lowest latency for one request at a time); ``1`` runs each stage on one
    #: thread so the stages work side by side on the cores, the highest throughput for a full queue.
    ort_threads: int | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    reaper: subprocess.Popen | None = field(default=None, init=False)
    shm_prefix: str = field(default="", init=False)
    restarts: int = field(default=0, init=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def start(self) -> EmbeddedTriton:
        """Start the server; ports left at 0 are picked free, and picked again if another process takes one
        between the pick and the bind (three tries)."""
        chosen = {name: getattr(self, name) for name in ("http_port", "grpc_port", "metrics_port")}
        for attempt in range(3):
            for name, fixed in chosen.items():
                setattr(self, name, fixed or free_port(self.host))
            try:
                return self._start_once()
            except TritonStartError as error:
                if attempt == 2 or all(chosen.values()) or "already in use" not in str(error).lower():
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> EmbeddedTriton:
        remove_stale_segments()  # what servers killed before this watcher existed (or with it) left behind
        backends = prepare_backend_dir()
        self.shm_prefix = f"hybridcn_{uuid.uuid4().hex[:12]}"
        if self.log_path is None:
            self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"hybridcn-triton-{uuid.uuid4().hex[:8]}.log"
        command = [
            str(triton_binary()),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
        ]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                        start_new_session=True)
        log.close()
        # the server has its own process group; this watcher ends it if this process is killed outright
        self.reaper = subprocess.Popen([sys.executable, "-m", "engine.reaper", str(os.getpid()),
                                        str(self.process.pid), self.shm_prefix], stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def environment(self) -> dict[str, str]:
        env = server_environment()
        if self.ort_threads is not None:
            env["HYBRIDCN_ORT_THREADS"] = str(self.ort_threads)  # read by export.triton_models.OnnxRuntimeModel
        return env

    def ready(self) -> bool:
        """One probe of ``/v2/health/ready``; raises :class:`TritonStartError` if the process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise TritonStartError(f"tritonserver exited with {code}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _wait_ready(self) -> None:
        try:
            wait_until(self.ready, timeout_s=self.ready_timeout)
        except RetryError as error:
            raise TritonStartError(f"tritonserver not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}"
                                   ) from error

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT, then SIGKILL of the whole group after ``timeout``; stubs and shared memory go with it."""
        if self.reaper is not None:
            self.reaper.terminate()
            self.reaper.wait()
            self.reaper = None
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.process.pid)  # stubs left by a server that died or hung
        self.process.wait()
        remove_segments(self.shm_prefix)

    def restart(self) -> EmbeddedTriton:
        """Stop whatever is left of the server and start it again on the same ports."""
        self.stop(timeout=5.0)
        self.restarts += 1
        return self._start_once()

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def triton_endpoint(repository: Path, triton: str | None, *, ort_threads: int | None = None) -> Iterator[str]:
    """Yield a gRPC URL: the given one, or an embedded server started for the duration."""
    if triton:
        yield triton
        return
    with EmbeddedTriton(repository, ort_threads=ort_threads) as server:
        yield server.grpc_url
