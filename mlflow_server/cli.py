"""`flexbench server start|stop|status`: a real MLflow tracking server in the background.

`start` prints shell lines: comments (`# ...`) for people and `export` lines for the shell, so
`eval "$(flexbench server start)"` both starts the server and points this shell at it.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmark.cli import add_command_group
from mlflow_server import server

# `flexbench server`: its line in `flexbench --help`, and the description of its own --help
HELP = "start, stop or check a local MLflow tracking server"
DESCRIPTION = (
    "A real MLflow tracking server in the background (SQLite + local artifacts "
    "by default, PostgreSQL for teams). See docs/server.md."
)


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"data directory holding the SQLite backend, artifacts and the state directory "
        f"(default: ${server.DATA_DIR_ENV}, else ./{server.DEFAULT_DATA_DIR})",
    )


def cmd_start(args: argparse.Namespace) -> int:
    opts = server.ServerOptions(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        backend_store=args.backend_store,
        artifacts=args.artifacts,
        auth=args.auth,
        expose=args.expose,
        workers=args.workers,
        allowed_hosts=args.allowed_hosts,
        cors_allowed_origins=args.cors_allowed_origins,
        admin_username=args.admin_username,
        password_env=args.password_env,
        auth_cache_seconds=args.auth_cache_seconds,
        timeout=args.timeout,
    )
    info = server.start(opts, echo=lambda msg: print(f"# {msg}", flush=True))
    for warning in info.warnings:
        print(f"flexbench: WARNING: {warning}", file=sys.stderr)
    if info.already_running:
        print(f"# MLflow server already running (pid {info.pid}) for {info.data_dir}")
    else:
        print(f"# MLflow server started (pid {info.pid}) in {info.start_seconds:.1f} s")
    _print_info(info)
    return 0


def _print_info(info: server.ServerInfo) -> None:
    print(f"#   UI:        {info.ui_url}")
    print(f"#   backend:   {info.backend_store}")
    print(f"#   artifacts: {info.artifacts}")
    print(f"#   log:       {info.log}")
    auth = f"basic-auth, admin user {info.admin_username}" if info.auth else "off"
    print(f"#   auth:      {auth}")
    print(f"export MLFLOW_TRACKING_URI={info.tracking_uri}")
    if info.auth:
        print(f"export MLFLOW_TRACKING_USERNAME={info.admin_username}")
        print(
            "# and MLFLOW_TRACKING_PASSWORD: the admin password (or another user's); "
            "it is not printed"
        )


def cmd_stop(args: argparse.Namespace) -> int:
    info = server.stop(args.data_dir)
    if info is None:
        print(f"no MLflow server running for {server.resolve_data_dir(args.data_dir)}")
    elif info.orphans:
        pids = ", ".join(map(str, info.orphans))
        print(
            f"stopped what was left of the MLflow server at {info.url}: its main process "
            f"(pid {info.pid}) had died; ended pids {pids}"
        )
    else:
        print(f"stopped the MLflow server at {info.url} (pid {info.pid})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    info, health = server.status(args.data_dir)
    if info is None:
        print(f"no MLflow server running for {server.resolve_data_dir(args.data_dir)}")
        return 3
    up = time.time() - info.started_at
    answer = "not answering" if health is None else f"answers {health}"
    if info.orphans:
        print(f"MLflow server BROKEN (main pid {info.pid} gone, up {up:.0f} s); /health {answer}")
        for warning in info.warnings:
            print(f"flexbench: WARNING: {warning}", file=sys.stderr)
        _print_info(info)
        return 1
    print(f"MLflow server running (pid {info.pid}, up {up:.0f} s); /health {answer}")
    _print_info(info)
    return 0 if health in (200, 401) else 1


def _add_start(sub: argparse._SubParsersAction) -> None:
    """`server start`: where the server listens and stores, and who may use it."""
    s = sub.add_parser("start", help="start the server (or report the running one)")
    _add_data_dir(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    s.add_argument(
        "--backend-store",
        metavar="URI",
        help="database for runs: sqlite:///path.db or postgresql://user:pw@host:port/db "
        "(default: sqlite:///<data-dir>/mlflow.db)",
    )
    s.add_argument(
        "--artifacts", metavar="DIR", help="artifact directory (default: <data-dir>/artifacts)"
    )
    s.add_argument(
        "--auth",
        action="store_true",
        help=f"require a login (MLflow basic-auth); the admin password is read from "
        f"${server.PASSWORD_ENV} (or --password-env)",
    )
    s.add_argument(
        "--expose",
        action="store_true",
        help="allow a --host other than loopback (warns unless --auth)",
    )
    s.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    s.add_argument(
        "--allowed-hosts",
        help="Host headers MLflow accepts (default: localhost and private IPs); set it when "
        "clients use a DNS name",
    )
    s.add_argument(
        "--cors-allowed-origins",
        help="origins allowed by CORS (default: localhost origins)",
    )
    s.add_argument("--admin-username", default="admin", help="admin user of --auth")
    s.add_argument(
        "--password-env",
        default=server.PASSWORD_ENV,
        metavar="VAR",
        help=f"environment variable holding the admin password (default {server.PASSWORD_ENV})",
    )
    s.add_argument(
        "--auth-cache-seconds",
        type=int,
        default=0,
        metavar="S",
        help="with --auth: cache verified logins for S seconds in each worker (default 0: "
        "check the password hash on every request, ~0.2-0.5 s of server CPU each)",
    )
    s.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the server (120)"
    )
    s.set_defaults(func=cmd_start)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sub = add_command_group(subparsers, "server", HELP, DESCRIPTION)
    _add_start(sub)

    s = sub.add_parser("stop", help="stop the server")
    _add_data_dir(s)
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser(
        "status", help="is the server running? (exit 0 yes, 3 no, 1 not answering or broken)"
    )
    _add_data_dir(s)
    s.set_defaults(func=cmd_status)
