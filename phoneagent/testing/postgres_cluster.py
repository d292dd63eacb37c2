"""A throwaway PostgreSQL server for the tests and benchmarks: ``initdb`` into a temporary
directory, ``pg_ctl start`` on a free loopback port, stopped and removed at the end. A test that
needs the database to go away and come back under a running instance makes its own
:class:`PostgresCluster` and stops and starts it (the session's server stays up for the others).

PostgreSQL refuses to run as root (CI runs as root): then the cluster runs as the ``postgres``
system user that Debian's package creates, through ``runuser``, in a directory it owns. For the
tests durability is switched off (``fsync=off``): the cluster is discarded, and they are about
behaviour; the benchmarks keep PostgreSQL's defaults (``durable=True``), as a deployment would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SERVER_USER = "postgres"  # the Debian package's system user


class PostgresUnavailable(Exception):
    """No PostgreSQL to run here, or it would not start; the message says why."""


def in_ci(environ) -> bool:
    """``CI`` set to anything but a false value (CI services set ``CI=true``; .ci/run does)."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest
    ``/usr/lib/postgresql/N/bin`` (the package does not put them on PATH)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major_version)
    if not candidates:
        raise PostgresUnavailable(
            "initdb and pg_ctl not found (on PATH or in /usr/lib/postgresql/*/bin): "
            "install PostgreSQL (apt-get install postgresql; .ci/run does)"
        )
    return Path(candidates[-1]).parent


def _major_version(initdb: str) -> int:
    version = Path(initdb).parent.parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One throwaway server: :meth:`create` (initdb, then start on a free port), :meth:`stop`
    and :meth:`start` again on the same port (a database that goes away and comes back, for a
    running instance), :meth:`remove`. ``url`` is the ``postgresql://`` URL of its ``postgres``
    database (superuser ``postgres``, trust authentication on loopback only)."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable  # keep fsync, synchronous_commit and full_page_writes on
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        self.prefix: list[str] = []
        if self.as_root:
            try:
                self.server_user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL "
                    "as (the postgresql package creates it)"
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable("running as root and runuser (util-linux) is missing")
            self.prefix = [runuser, "-u", SERVER_USER, "--"]
        self.root: Path | None = None
        self.port = 0
        self.running = False
        self._paused: list[int] = []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create(self) -> str:
        """initdb and start; the URL."""
        # Directly under the system temp dir: pytest's own tmp dirs are private to root, and
        # the server user must reach its data directory.
        self.root = Path(tempfile.mkdtemp(prefix="phoneagent-pg-"))
        sockets = self.root / "sockets"
        sockets.mkdir()
        if self.as_root:
            for path in (self.root, sockets):
                os.chown(path, self.server_user.pw_uid, self.server_user.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-U", "postgres",
                  "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        for attempt in range(3):  # a port found free may be taken before the server binds it
            self.port = _free_port()
            try:
                self.start()
            except PostgresUnavailable:
                if attempt == 2:
                    raise
                continue
            break
        return self.url

    def start(self) -> None:
        """Start the server (again) on its port."""
        assert self.root is not None
        options = (
            f"-p {self.port} -k {self.root / 'sockets'} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"),
                  "-l", str(self.root / "server.log"), "-o", options, "-w", "-t", "60",
                  "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends the sessions and shuts down cleanly, ``immediate``
        as if it crashed."""
        assert self.root is not None
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode,
                  "-w", "stop")  # fmt: skip
        self.running = False

    def pause(self) -> None:
        """Freeze the server and its sessions (SIGSTOP): a database host that vanished, which
        answers nothing (connections hang) rather than refusing. :meth:`resume` thaws it."""
        self._paused = self._processes()
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused = []

    def _processes(self) -> list[int]:
        """The postmaster (first line of postmaster.pid) and the processes it forked."""
        assert self.root is not None
        postmaster = int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]

    def remove(self) -> None:
        self.resume()
        if self.running:
            with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
                self.stop("immediate")
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.root / "server.log" if self.root is not None else None
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise PostgresUnavailable(
                f"{Path(args[0]).name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}\n{tail}"
            )


@contextlib.contextmanager
def postgres_cluster(*, durable: bool = False) -> Iterator[str]:
    """Run a server for the duration of the block; yields a ``postgresql://`` URL of its
    ``postgres`` database (superuser ``postgres``, trust authentication on loopback only).
    ``durable``: keep PostgreSQL's default ``fsync``, ``synchronous_commit`` and
    ``full_page_writes`` (each commit waits for its WAL to reach the disk)."""
    cluster = PostgresCluster(durable=durable)
    try:
        yield cluster.create()
    finally:
        cluster.remove()
