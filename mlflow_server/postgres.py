"""A throw-away PostgreSQL cluster on 127.0.0.1, for tests and for trying the team setup.

    with LocalPostgres() as pg:
        uri = pg.create_database("mlflow", user="bench", password="bench-pw-123")
        # flexbench server start --backend-store "$uri"

It runs the OS's PostgreSQL binaries (Debian: /usr/lib/postgresql/<version>/bin, from the
`postgresql` package; scripts/install_system_deps.sh installs it). `initdb` refuses to run as
root, so as root every server-side command runs as the `postgres` user. The cluster lives in a
fresh directory under /tmp, listens on 127.0.0.1 only (TCP needs a password, scram-sha-256;
the Unix socket in that directory is trusted for the cluster's own superuser), and `stop()`
shuts it down and deletes it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def find_bindir() -> Path | None:
    """Folder holding initdb and pg_ctl (newest PostgreSQL version first), or None."""
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "pg_ctl").exists():
        return Path(found).resolve().parent  # /usr/local/bin/initdb may be a lone symlink
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalPostgres:
    def __init__(self, port: int | None = None, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise RuntimeError(
                "PostgreSQL binaries (initdb, pg_ctl) not found; install the `postgresql` OS "
                "package (scripts/install_system_deps.sh)"
            )
        self.port = port or free_port()
        self.root: Path | None = None
        self._as_postgres = os.geteuid() == 0

    # -- helpers --------------------------------------------------------------------------
    def _run(self, argv: list[str], server_side: bool = True) -> str:
        if server_side and self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({out.returncode}): {out.stderr.strip()[-2000:]}"
            )
        return out.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(
            [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.root), "-p", str(self.port), "-U", "postgres",
             "-d", database, "-c", sql],
            server_side=False,
        )  # fmt: skip

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> LocalPostgres:
        self.root = Path(tempfile.mkdtemp(prefix="flexbench-pg-", dir="/tmp"))
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        self._run(
            [str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
             "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions"]
        )  # fmt: skip
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"),
             "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root}", "-w", "-t", "60", "start"]
        )  # fmt: skip
        return self

    def create_database(self, name: str, user: str, password: str) -> str:
        """Create a login role owning a new database; returns its postgresql:// URI."""
        if not (_NAME.match(name) and _NAME.match(user)):
            raise ValueError("database and user names: lower-case letters, digits, _")
        quoted = password.replace("'", "''")
        self.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{quoted}'")
        self.psql(f"CREATE DATABASE {name} OWNER {user}")
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        try:
            if (data / "postmaster.pid").exists():
                self._run([str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                           "stop"])  # fmt: skip
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
