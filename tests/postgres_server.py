"""A throwaway PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` package, ``initdb`` and
``pg_ctl`` on a free loopback port, in a temporary folder, ended by its pid.

As root (CI containers), the server runs as the ``postgres`` user the Debian package creates, since
PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from engine.triton_server import free_port


class PostgresUnavailableError(RuntimeError):
    """Debian's postgresql is not installed (``scripts/setup.sh`` installs it)."""


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise PostgresUnavailableError(f"{name} not found: install Debian's postgresql package (scripts/setup.sh does)")
    return path


class ThrowawayPostgres:
    """``with ThrowawayPostgres() as pg: pg.create_database() -> 'postgresql://...'``; everything goes at exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="hybridcn-pg-"))
        self.data = self.root / "data"
        self.user = "hybridcn"
        self.pid: int | None = None
        self._run_as: list[str] = []
        self._uid: int | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailableError("running as root and there is no postgres user (install Debian's "
                                          "postgresql package)") from None
            self._uid = entry.pw_uid
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str, timeout: float = 120) -> None:
        result = subprocess.run([*self._run_as, *command], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")

    def start(self) -> ThrowawayPostgres:
        self._run(_binary("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C.UTF-8")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"queue_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server by its pid (fast shutdown, then SIGKILL), and remove its folder."""
        if self.pid is not None:
            for sig, wait_s in ((signal.SIGINT, 20.0), (signal.SIGKILL, 10.0)):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and _alive(self.pid):
                    time.sleep(0.1)
                if not _alive(self.pid):
                    break
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
