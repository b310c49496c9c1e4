"""Run `mlflow server` in the background and keep track of it in a state directory.

Layout of a data directory (default `./mlflow_data`):

    mlflow_data/
      mlflow.db            SQLite backend (unless --backend-store names another database)
      artifacts/           artifacts, proxied by the server (`mlflow-artifacts:/`)
      basic_auth.db        users of the basic-auth app (only with --auth)
      server/              state directory: server.pid, server.log, state.json, auth.ini,
                           secret_key, lock

Safe by default: the server binds 127.0.0.1; any other interface needs `expose=True` and
warns unless auth is on. MLflow's own protections (Host-header allow-list against DNS
rebinding, CORS origins, X-Frame-Options) stay on: the environment variables that would turn
them off are not passed to the server and `*` allow-lists are refused. Secrets (the admin
password, a password in the backend URI) never appear on a command line, in the state file or
in what is printed.

This module imports neither mlflow nor SQLAlchemy at import time: the `flexbench` CLI imports
it on every invocation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmark.errors import ConfigError
from benchmark.record.store import absolute_sqlite, refuse_file_store, sqlite_path
from benchmark.record.store import (
    redact_uri as mask_uri,  # the URI with any password replaced by ***
)

DEFAULT_DATA_DIR = "mlflow_data"
DATA_DIR_ENV = "FLEXBENCH_SERVER_DIR"
PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
MIN_PASSWORD_LEN = 12  # MLflow's own password policy
STATE_SUBDIR = "server"

# Environment variables through which a shell could switch MLflow's protections off or widen
# them; the server gets only what the flags below say.
_SCRUBBED_ENV = (
    "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE",
    "MLFLOW_SERVER_ALLOWED_HOSTS",
    "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS",
    "MLFLOW_SERVER_X_FRAME_OPTIONS",
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_REGISTRY_STORE_URI",
    "MLFLOW_DEFAULT_ARTIFACT_ROOT",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_ARTIFACTS_ONLY",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


class ServerError(ConfigError):
    """The server cannot be started, stopped or reached; the message says what to fix."""


@dataclass
class ServerOptions:
    data_dir: Path | str | None = None  # default: $FLEXBENCH_SERVER_DIR, else ./mlflow_data
    host: str = "127.0.0.1"
    port: int = 5000
    backend_store: str | None = None  # default: sqlite:///<data_dir>/mlflow.db
    artifacts: Path | str | None = None  # default: <data_dir>/artifacts
    auth: bool = False
    expose: bool = False  # required for any non-loopback host
    workers: int = 2
    allowed_hosts: str | None = None  # passed to MLflow; "*" is refused
    cors_allowed_origins: str | None = None  # passed to MLflow; "*" is refused
    admin_username: str = "admin"
    password_env: str = PASSWORD_ENV
    auth_cache_seconds: int = 0  # MLflow's credential cache (0 = off, MLflow's default)
    timeout: float = 120.0  # seconds to wait for /health
    db_connect_timeout: int = 5


@dataclass
class ServerInfo:
    """What state.json records about a running server (no secrets)."""

    pid: int
    create_time: float
    host: str
    port: int
    url: str
    backend_store: str  # masked
    artifacts: str
    auth: bool
    admin_username: str | None
    data_dir: str
    log: str
    started_at: float
    start_seconds: float
    already_running: bool = field(default=False, compare=False)
    warnings: list[str] = field(default_factory=list, compare=False)
    # pids still alive in the server's process group after its main process died (see
    # `_running`); empty for a healthy server. Not stored in state.json.
    orphans: list[int] = field(default_factory=list, compare=False)

    @property
    def tracking_uri(self) -> str:
        return self.url

    @property
    def ui_url(self) -> str:
        return self.url + "/#/experiments"


# ---------------------------------------------------------------------------------- helpers


def resolve_data_dir(data_dir: Path | str | None) -> Path:
    raw = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(raw).expanduser().absolute()


def state_dir(data_dir: Path | str | None) -> Path:
    return resolve_data_dir(data_dir) / STATE_SUBDIR


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    """The address a local client uses to reach a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _probe_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ServerError(
            f"{what} {folder} is not writable ({exc.strerror or exc}); choose another with "
            f"--data-dir / --artifacts, or fix its permissions"
        ) from exc


def _psutil():
    try:
        import psutil
    except ModuleNotFoundError as exc:
        raise ServerError(
            "`flexbench server` needs psutil: pip install 'flexbench[server]'"
        ) from exc
    return psutil


def _process(pid: int, create_time: float | None):
    """The psutil.Process if `pid` is alive (not a zombie) and is the one recorded, else None."""
    psutil = _psutil()

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # our own child (in-process start): reap it
            return None
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return None  # the pid was reused by another process
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _health(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET /health, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _port_in_use(host: str, port: int) -> str | None:
    """None if (host, port) can be bound now, else a description of the problem."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use{_port_owner(port)}"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            if exc.errno == errno.EACCES:
                return f"no permission to bind port {port} (ports below 1024 need root)"
            return f"cannot bind {host}:{port} ({exc.strerror or exc})"
    return None


def _port_owner(port: int) -> str:
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN
            if conn.laddr and conn.laddr.port == port and listening and conn.pid:
                return f" (by pid {conn.pid}, {psutil.Process(conn.pid).name()})"
    except Exception:  # best effort only: needs privileges on some systems
        pass
    return ""


def _check_backend(uri: str, data_dir: Path, connect_timeout: int) -> None:
    """Fail fast, with a clear message, on a backend the server could not open."""
    refuse_file_store(
        uri,
        "backend store",
        f"sqlite:///path/mlflow.db (the default is {data_dir}/mlflow.db) or "
        f"postgresql://user:password@host:port/db",
        ServerError,
    )
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None:
            _probe_writable(path.parent, "the SQLite backend's directory")
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = mask_uri(uri)
    connect_args: dict[str, Any] = {}
    if scheme.startswith(("postgresql", "mysql")):
        connect_args["connect_timeout"] = connect_timeout
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
    except ModuleNotFoundError as exc:
        hint = (
            " (`postgresql://` needs psycopg 3: pip install 'flexbench[server]'; "
            "`postgresql+psycopg2://` needs psycopg2-binary)"
            if scheme.startswith("postgresql")
            else ""
        )
        raise ServerError(
            f"backend store {shown}: database driver missing: {exc.name}{hint}"
        ) from exc
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
        raise ServerError(f"backend store {shown} is not a usable database URI ({exc})") from exc
    try:
        with engine.connect():
            pass
    except Exception as exc:
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        raise ServerError(
            f"cannot connect to the backend database {shown}: {first}. Is the database server "
            f"running and reachable, and do the database and user exist?"
        ) from exc
    finally:
        engine.dispose()


def _admin_password(opts: ServerOptions) -> str:
    password = os.environ.get(opts.password_env, "")
    if not password:
        raise ServerError(
            f"--auth needs the admin password in the environment variable {opts.password_env} "
            f"(at least {MIN_PASSWORD_LEN} characters), e.g. read -rs {opts.password_env}; "
            f"export {opts.password_env}"
        )
    if len(password) < MIN_PASSWORD_LEN:
        raise ServerError(
            f"the admin password in {opts.password_env} is too short: MLflow requires at least "
            f"{MIN_PASSWORD_LEN} characters"
        )
    if password == "password1234":
        raise ServerError(f"{opts.password_env} holds MLflow's old public default; choose another")
    return password


def _secret_key(sdir: Path) -> str:
    """Flask secret key: $MLFLOW_FLASK_SERVER_SECRET_KEY, else one kept in the state dir."""
    if os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    path = sdir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def _write_auth_config(sdir: Path, data_dir: Path, admin_username: str, cache: int) -> Path:
    path = sdir / "auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{data_dir / 'basic_auth.db'}\n"
        f"admin_username = {admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        f"auth_cache_ttl_seconds = {int(cache)}\n"
    )
    return path


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [ln for ln in text if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in keep)


def _kill_group(pgid: int, pid: int, grace: float) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for _ in range(25):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not _group_alive(pgid):
            return
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    psutil = _psutil()

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    return False


@contextlib.contextmanager
def _locked(sdir: Path):
    """One start/stop at a time per state directory."""
    with open(sdir / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(sdir: Path) -> ServerInfo | None:
    try:
        data = json.loads((sdir / "state.json").read_text())
        for transient in ("already_running", "warnings", "orphans"):
            data.pop(transient, None)
        return ServerInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _clear_state(sdir: Path) -> None:
    for name in ("state.json", "server.pid"):
        with contextlib.suppress(FileNotFoundError):
            (sdir / name).unlink()


def _server_group(info: ServerInfo) -> list:
    """Live (non-zombie) processes of the recorded server's process group: the `mlflow server`
    process, uvicorn and its workers. [] when none of them is the server that was started.

    The server runs in its own process group, whose id is the recorded pid. The kernel never
    reuses a pid as long as a group of that id has members, so the group is ours if one member
    was born while the server started (between the main process's creation and the first
    /health answer); a server started before this machine booted is gone.
    """
    psutil = _psutil()
    if info.create_time < psutil.boot_time() - 1.0:
        return []
    members = []
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or os.getpgid(proc.pid) != info.pid:
                continue
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
        members.append(proc)
    born_at_start = [
        p
        for p in members
        if info.create_time - 1.0 <= (p.info["create_time"] or 0) <= info.started_at + 1.0
    ]
    return members if born_at_start else []


def _running(sdir: Path) -> ServerInfo | None:
    """The recorded server if any process of it is still alive; clears a stale record.

    When the main process died (e.g. `kill -9`) but uvicorn and its workers still serve,
    the server is returned with `orphans` listing their pids and a warning, so that `status`
    reports it and `stop` ends it.
    """
    info = _read_state(sdir)
    if info is None:
        return None
    if _process(info.pid, info.create_time) is not None:
        return info
    group = _server_group(info)
    if not group:
        _clear_state(sdir)
        return None
    info.orphans = sorted(p.pid for p in group)
    info.warnings.append(
        f"the server's main process (pid {info.pid}) is gone, but {len(group)} of its processes "
        f"(pids {', '.join(map(str, info.orphans))}) still run and may hold port {info.port}; "
        f"`flexbench server stop` ends them, `flexbench server start` replaces them"
    )
    return info


def _end(info: ServerInfo, grace: float) -> None:
    """SIGTERM (then SIGKILL) the server's whole process group; ServerError if any survives."""
    _kill_group(info.pid, info.pid, grace)
    alive = _server_group(info)
    if alive:
        raise ServerError(
            f"the MLflow server (process group {info.pid}) did not stop: pids "
            f"{', '.join(str(p.pid) for p in alive)} are still running"
        )


# ------------------------------------------------------------------------------------ API


def check_options(opts: ServerOptions) -> list[str]:
    """Refuse unsafe or invalid flags (ServerError); return the warnings to show."""
    warnings: list[str] = []
    host = opts.host.strip()
    if not 1 <= int(opts.port) <= 65535:
        raise ServerError(f"--port {opts.port}: not a TCP port number")
    if opts.workers < 1:
        raise ServerError(f"--workers must be at least 1, got {opts.workers!r}")
    if not 0 <= opts.auth_cache_seconds <= 3600:
        raise ServerError(
            f"--auth-cache-seconds must be between 0 and 3600, got {opts.auth_cache_seconds!r}"
        )
    if not is_loopback(host):
        if not opts.expose:
            raise ServerError(
                f"--host {host} would make the tracking server reachable from other machines; "
                f"pass --expose to confirm (and --auth to require passwords), or keep the "
                f"default --host 127.0.0.1"
            )
        if not opts.auth:
            warnings.append(
                f"the server listens on {host} WITHOUT authentication: anyone who can reach "
                f"port {opts.port} can read and change all runs; use --auth"
            )
    for flag, value in (
        ("--allowed-hosts", opts.allowed_hosts),
        ("--cors-allowed-origins", opts.cors_allowed_origins),
    ):
        if value is not None and "*" in [v.strip() for v in value.split(",")]:
            raise ServerError(
                f"{flag} '*' would switch off one of MLflow's protections; list the names instead"
            )
    return warnings


def start(opts: ServerOptions, echo=None) -> ServerInfo:
    """Start the server and wait until GET /health answers; report a running one instead.

    Raises ServerError (a ConfigError) with a message a user can act on; every check that
    can fail before the server process starts (flags, data directory, backend database,
    port) runs first and takes seconds at most.
    """
    echo = echo or (lambda msg: None)
    _psutil()
    warnings = check_options(opts)
    data_dir = resolve_data_dir(opts.data_dir)
    host = opts.host.strip()
    sdir = data_dir / STATE_SUBDIR
    _probe_writable(data_dir, "data directory")
    _probe_writable(sdir, "state directory")
    with _locked(sdir):
        running = _replace_broken(sdir, _running(sdir), echo)
        if running is not None:
            return _report_running(running, opts, host, data_dir)

        artifacts, backend, password = _preflight(opts, host, data_dir)
        argv, env = _server_command(opts, host, artifacts, backend)
        if opts.auth:
            argv += ["--app-name", "basic-auth"]
            env.update(_auth_env(opts, sdir, data_dir, password))
        else:
            env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)

        log = sdir / "server.log"
        url = f"http://{_url_host(host)}:{int(opts.port)}"
        echo(f"starting MLflow server on {host}:{opts.port} (log: {log})")
        t0 = time.monotonic()
        proc = _spawn_ready(argv, env, data_dir, log, url, opts.timeout)
        info = ServerInfo(
            pid=proc.pid,
            create_time=_psutil().Process(proc.pid).create_time(),
            host=host,
            port=int(opts.port),
            url=url,
            backend_store=mask_uri(backend),
            artifacts=str(artifacts),
            auth=opts.auth,
            admin_username=opts.admin_username if opts.auth else None,
            data_dir=str(data_dir),
            log=str(log),
            started_at=time.time(),
            start_seconds=round(time.monotonic() - t0, 2),
            warnings=warnings,
        )
        _write_state(sdir, info)
        return info


def _preflight(opts: ServerOptions, host: str, data_dir: Path) -> tuple[Path, str, str | None]:
    """The artifact directory, backend URI and admin password (None without --auth), after
    every check that can fail before a process starts (writable artifacts, the password, the
    backend database, a free port): a failure here leaves nothing running."""
    artifacts = (
        Path(opts.artifacts).expanduser().absolute() if opts.artifacts else data_dir / "artifacts"
    )
    _probe_writable(artifacts, "artifact directory")
    backend = absolute_sqlite(opts.backend_store or f"sqlite:///{data_dir / 'mlflow.db'}")
    password = _admin_password(opts) if opts.auth else None
    _check_backend(backend, data_dir, opts.db_connect_timeout)
    problem = _port_in_use(host, int(opts.port))
    if problem:
        raise ServerError(f"{problem}; choose another with --port")
    return artifacts, backend, password


def _report_running(
    running: ServerInfo, opts: ServerOptions, host: str, data_dir: Path
) -> ServerInfo:
    """A server already runs for this data directory: report it, and warn when the flags
    asked for different settings (they are not applied to a running server)."""
    running.already_running = True
    asked = (host, int(opts.port), opts.auth)
    if asked != (running.host, running.port, running.auth):
        running.warnings.append(
            f"a server is already running for {data_dir} (host {running.host}, port "
            f"{running.port}, auth {'on' if running.auth else 'off'}); the new settings "
            f"were not applied: `flexbench server stop` first to change them"
        )
    return running


def _server_command(
    opts: ServerOptions, host: str, artifacts: Path, backend: str
) -> tuple[list[str], dict[str, str]]:
    """`mlflow server`'s command line and environment; the backend URI (which may hold a
    password) goes in the environment, not on the command line where `ps` shows it."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["MLFLOW_BACKEND_STORE_URI"] = backend  # in the environment, not on the command line
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env["PYTHONUNBUFFERED"] = "1"
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host.strip("[]"),
        "--port", str(int(opts.port)),
        "--workers", str(int(opts.workers)),
        "--serve-artifacts",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    if opts.allowed_hosts:
        argv += ["--allowed-hosts", opts.allowed_hosts]
    if opts.cors_allowed_origins:
        argv += ["--cors-allowed-origins", opts.cors_allowed_origins]
    return argv, env


def _auth_env(
    opts: ServerOptions, sdir: Path, data_dir: Path, password: str | None
) -> dict[str, str]:
    """The basic-auth app's settings; the admin password only ever in the server's
    environment."""
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(
            _write_auth_config(sdir, data_dir, opts.admin_username, opts.auth_cache_seconds)
        ),
        "MLFLOW_AUTH_ADMIN_USERNAME": opts.admin_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,  # only the server's environment
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret_key(sdir),
    }


def _spawn_ready(
    argv: list[str], env: dict[str, str], data_dir: Path, log: Path, url: str, timeout: float
) -> subprocess.Popen:
    """Start the server in its own process group (so stop ends the whole tree), output to
    the log, and wait for /health; on any failure the group is killed before re-raising."""
    with open(log, "ab") as logfh:
        logfh.write(f"\n=== flexbench server start {time.ctime()} ===\n".encode())
        logfh.flush()
        proc = subprocess.Popen(
            argv,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop kills the whole tree
        )
    try:
        _wait_ready(proc, url, log, timeout)
    except BaseException:
        _kill_group(proc.pid, proc.pid, grace=5)
        with contextlib.suppress(Exception):
            proc.wait(timeout=1)
        raise
    return proc


def _write_state(sdir: Path, info: ServerInfo) -> None:
    """state.json (without the per-call fields) and server.pid, which status/stop read."""
    record = asdict(info)
    for transient in ("already_running", "warnings", "orphans"):
        record.pop(transient)
    (sdir / "state.json").write_text(json.dumps(record, indent=2) + "\n")
    (sdir / "server.pid").write_text(f"{info.pid}\n")


def _replace_broken(sdir: Path, running: ServerInfo | None, echo) -> ServerInfo | None:
    """End what is left of a server whose main process died (so a new one can start);
    returns `running` unchanged when it is healthy or None."""
    if running is None or not running.orphans:
        return running
    echo(
        f"the previous server's main process (pid {running.pid}) had died; stopping its "
        f"leftover processes (pids {', '.join(map(str, running.orphans))})"
    )
    _end(running, grace=20.0)
    _clear_state(sdir)
    return None


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerError(
                f"the MLflow server exited with status {code} while starting; the end of its "
                f"log {log}:\n{_log_tail(log)}"
            )
        status_code = _health(url, timeout=2.0)
        if status_code == 200:
            return
        if time.monotonic() > deadline:
            raise ServerError(
                f"the MLflow server did not answer {url}/health within {timeout:.0f} s "
                f"(last answer: {status_code}); the end of its log {log}:\n{_log_tail(log)}"
            )
        time.sleep(0.3)


def stop(data_dir: Path | str | None = None, grace: float = 20.0) -> ServerInfo | None:
    """Stop the recorded server (its whole process group, also when its main process has died
    and left uvicorn workers behind); None if none was running."""
    sdir = state_dir(data_dir)
    if not sdir.is_dir():
        return None
    with _locked(sdir):
        info = _running(sdir)
        if info is None:
            return None
        _end(info, grace)
        _clear_state(sdir)
        return info


def status(data_dir: Path | str | None = None) -> tuple[ServerInfo | None, int | None]:
    """(recorded running server or None, HTTP status of its /health or None).

    A server whose main process died but whose workers still run is returned with `orphans`
    set; a record of a server that is entirely gone is deleted.
    """
    sdir = state_dir(data_dir)
    if not sdir.is_dir():
        return None, None
    info = _running(sdir)
    if info is None:
        return None, None
    return info, _health(info.url)
