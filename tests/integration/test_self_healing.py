"""Crashes: a killed Triton or stub is restarted by the gateway; a killed parent leaves no process or
shared memory behind. Real processes, real signals, loopback only, bounded waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.triton_server import free_port, wait_until
from gateway.app import create_app
from gateway.settings import GatewaySettings
from hybridcn.synth import synth_field
from tests.conftest import REPOSITORY, ROOT, LiveGateway, encode

pytestmark = pytest.mark.integration


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command name) of every live process (zombies, which a container's
    init may never reap, are dead and left out)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), name)
    return found


def _group(pgid: int) -> list[int]:
    return [pid for pid, (_, group, _) in _processes().items() if group == pgid]


def _stubs(server_pid: int) -> list[int]:
    return [pid for pid, (parent, _, name) in _processes().items()
            if parent == server_pid and name.startswith("triton_python")]


def _classify(url: str) -> int:
    return httpx.post(f"{url}/v1/classify", content=encode(synth_field(2, seed=5).image), timeout=60).status_code


@pytest.fixture
def supervised(tmp_path):
    settings = GatewaySettings(repository=REPOSITORY, supervise_interval_s=0.5, batch_jobs_dir=tmp_path / "jobs")
    live = LiveGateway(create_app(settings), free_port()).start(timeout=180)
    yield live, live.server.config.app.state.triton_server
    live.stop()


def _recovered(url: str, server, timeout_s: float = 30.0) -> None:
    """The supervisor noticed and restarted the server, and the gateway serves again, within ``timeout_s``."""
    started = time.monotonic()
    wait_until(lambda: server.restarts >= 1, timeout_s=timeout_s, interval_s=0.25)
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
               timeout_s=max(1.0, timeout_s - (time.monotonic() - started)), interval_s=0.5)
    assert _classify(url) == 200


def test_a_killed_tritonserver_is_restarted_and_leaves_nothing_behind(supervised):
    live, server = supervised
    assert _classify(live.url) == 200
    old_pid, old_prefix = server.process.pid, server.shm_prefix
    os.kill(old_pid, signal.SIGKILL)
    _recovered(live.url, server)
    assert server.process.pid != old_pid and server.restarts >= 1
    assert _group(old_pid) == []  # the old server's stubs went with it
    assert not list(Path("/dev/shm").glob(f"{old_prefix}*"))
    health = httpx.get(f"{live.url}/healthz", timeout=5)
    assert health.status_code == 200
    ready = httpx.get(f"{live.url}/readyz", timeout=5).json()
    assert ready["triton_state"] == "ready" and all(ready["models"].values()) and "interpret" in ready["models"]


def test_a_killed_python_stub_is_noticed_and_the_server_restarted(supervised):
    live, server = supervised
    assert _classify(live.url) == 200
    stubs = _stubs(server.process.pid)
    assert len(stubs) >= 6  # one per Python model
    os.kill(stubs[0], signal.SIGKILL)
    _recovered(live.url, server)
    assert server.restarts >= 1


def test_a_killed_serve_process_leaves_no_process_or_shared_memory(tmp_path):
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "hybridcn.cli", "serve", "--port", str(port)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _ready(port), timeout_s=180, interval_s=0.5)
        servers = [pid for pid, (parent, _, name) in _processes().items()
                   if parent == serve.pid and name == "tritonserver"]
        assert len(servers) == 1
        command = Path(f"/proc/{servers[0]}/cmdline").read_bytes().split(b"\0")
        prefix = next(a for a in command if b"shm-region-prefix-name=" in a).decode().split("=")[-1]
        assert list(Path("/dev/shm").glob(f"{prefix}*"))  # the stubs' shared memory, while it runs
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait()
        wait_until(lambda: not _group(servers[0]) and not list(Path("/dev/shm").glob(f"{prefix}*")),
                   timeout_s=10, interval_s=0.25)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("command", ["batch", "classify"])
def test_a_killed_batch_or_classify_leaves_no_process_or_shared_memory(command, tmp_path):
    queue = tmp_path / "queue" / "S1"
    queue.mkdir(parents=True)
    for i in range(40):
        (queue / f"f{i}.png").write_bytes(encode(synth_field(i % 4, seed=900 + i).image))
    args = ["batch", str(queue.parent), "--out", str(tmp_path / "out"), "--progress", "none"] \
        if command == "batch" else ["classify", str(queue)]
    child = subprocess.Popen([sys.executable, "-m", "hybridcn.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        def server_up() -> list[int]:
            return [pid for pid, (parent, _, name) in _processes().items()
                    if parent == child.pid and name == "tritonserver" and _stubs(pid)]

        def descendants() -> list[int]:
            table, found = _processes(), [child.pid]
            for pid in found:
                found += [other for other, (parent, _, _) in table.items() if parent == pid]
            return found[1:]

        def working() -> bool:  # batch: its preprocessing pool is running too
            names = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                             for pid in descendants() if Path(f"/proc/{pid}/cmdline").exists())
            return bool(server_up()) and (command != "batch" or "batch.worker" in names)

        semaphores = set(Path("/dev/shm").glob("sem.*"))
        wait_until(lambda: working() or child.poll() is not None, timeout_s=180, interval_s=0.25)
        servers = server_up()
        assert servers, "the command ended before its Triton was up"
        command_line = Path(f"/proc/{servers[0]}/cmdline").read_bytes().split(b"\0")
        prefix = next(a for a in command_line if b"shm-region-prefix-name=" in a).decode().split("=")[-1]
        descendants = descendants()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

        def gone() -> bool:
            alive = _processes()
            return (not _group(servers[0]) and not list(Path("/dev/shm").glob(f"{prefix}*"))
                    and not [pid for pid in descendants if pid in alive]
                    and not set(Path("/dev/shm").glob("sem.*")) - semaphores)

        wait_until(gone, timeout_s=10, interval_s=0.25)
    finally:
        if child.poll() is None:
            child.kill()


def test_with_an_external_triton_readiness_follows_it_and_recovers_when_it_returns(tmp_path):
    """``HYBRIDCN_TRITON_URL``: the gateway does not own the server; it reports it gone (503 on /readyz and
    on requests, /healthz still 200: restarting the gateway would not help) and serves again once it is back."""
    from engine.triton_server import EmbeddedTriton

    with EmbeddedTriton(REPOSITORY, ready_timeout=180) as external:
        settings = GatewaySettings(repository=REPOSITORY, triton_url=external.grpc_url, supervise_interval_s=0.5,
                                   batch_jobs_dir=tmp_path / "jobs")
        live = LiveGateway(create_app(settings), free_port()).start(timeout=120)
        try:
            assert _classify(live.url) == 200
            external.stop(timeout=5.0)  # the other team's server goes away
            wait_until(lambda: httpx.get(f"{live.url}/readyz", timeout=5).status_code == 503, timeout_s=30,
                       interval_s=0.25)
            assert _classify(live.url) == 503
            assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200
            external.restart()  # and comes back on the same ports
            wait_until(lambda: httpx.get(f"{live.url}/readyz", timeout=5).status_code == 200, timeout_s=30,
                       interval_s=0.5)
            assert _classify(live.url) == 200
        finally:
            live.stop()
