"""A throwaway PostgreSQL server for the tests and benchmarks: ``initdb`` into a temporary
directory, ``pg_ctl start`` on a free loopback port, stopped and removed at the end of the block.

PostgreSQL refuses to run as root (CI runs as root): then the cluster runs as the ``postgres``
system user that Debian's package creates, through ``runuser``, in a directory it owns. For the
tests durability is switched off (``fsync=off``): the cluster is discarded, and the tests are
about behaviour. Benchmarks ask for ``durable=True``: PostgreSQL's defaults, an fsync of the WAL
per commit, as a production server does.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
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


@contextlib.contextmanager
def postgres_cluster(*, durable: bool = False) -> Iterator[str]:
    """Run a server for the duration of the block; yields a ``postgresql://`` URL of its
    ``postgres`` database (superuser ``postgres``, trust authentication on loopback only).
    ``durable``: keep PostgreSQL's default ``fsync``, ``synchronous_commit`` and
    ``full_page_writes`` (each commit waits for its WAL to reach the disk) rather than turn them
    off."""
    bindir = find_bindir()
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        try:
            server_user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresUnavailable(
                f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as "
                "(the postgresql package creates it)"
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise PostgresUnavailable("running as root and runuser (util-linux) is missing")
        prefix = [runuser, "-u", SERVER_USER, "--"]
    # Directly under the system temp dir: pytest's own tmp dirs are private to root, and the
    # server user must reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="phoneagent-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if as_root:
        for path in (root, sockets):
            os.chown(path, server_user.pw_uid, server_user.pw_gid)

    def run(*args: str) -> None:
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(
                f"{Path(args[0]).name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}\n{tail}"
            )

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        for attempt in range(3):  # a port found free may be taken before the server binds it
            port = _free_port()
            options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
            options += "-c max_connections=200"
            if not durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                    "-w", "-t", "60", "start")  # fmt: skip
            except PostgresUnavailable:
                if attempt == 2:
                    raise
                continue
            started = True
            break
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
