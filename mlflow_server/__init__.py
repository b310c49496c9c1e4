"""Start, stop and check a real MLflow tracking server for flexbench (`flexbench server ...`).

The server is `mlflow server` run in the background with its pid, log and state files in a
state directory; see `mlflow_server.server` for the API and docs/server.md for the workflow.
"""

from mlflow_server.server import (
    ServerError,
    ServerInfo,
    ServerOptions,
    mask_uri,
    start,
    status,
    stop,
)

__all__ = [
    "ServerError",
    "ServerInfo",
    "ServerOptions",
    "mask_uri",
    "start",
    "status",
    "stop",
]
