"""`flexbench server`: a real MLflow server, driven through the CLI, with real cells and writers.

One server per backend (SQLite, PostgreSQL on 127.0.0.1) and one with --auth are started per
module (10-30 s each) and shared by the tests; every server and the PostgreSQL cluster are
stopped in teardown. Tests that need PostgreSQL or Chromium skip with the reason when the OS
packages are missing (scripts/install_system_deps.sh installs them); in CI they are present.
Screenshots of the browser check and the measured start times go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from mlflow_server import server as srv
from mlflow_server.postgres import LocalPostgres, find_bindir

ARTIFACTS = Path(__file__).parent / "artifacts"
ADMIN_PASSWORD = "Adm1n-Test-Passw0rd!"  # test-only secret; must never show up anywhere
PG_PASSWORD = "pg-Secret-Passw0rd"
# The smoke profile, made quicker on a shared CPU (same trick as conftest.FAST).
SMOKE_SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "runtime.latency_warmup=0",
    "runtime.latency_repeats=1",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: none of the user's MLflow settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_")) and k != "FLEXBENCH_SERVER_DIR"
    }
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.update(extra)
    return env


def flexbench(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
    )


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, **env_extra: str) -> Result:
    """`flexbench ARGS` in this process (the same `main` as the console script, without paying
    for a new interpreter), with the environment `_env` gives a subprocess."""
    from benchmark.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_env(**env_extra))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Result(rc, out.getvalue(), err.getvalue())


def _record_timing(name: str, seconds: float) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "server_start_times.txt", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {seconds:.1f} s\n")


@dataclass
class Server:
    kind: str
    data_dir: Path
    port: int
    uri: str
    start_out: str
    secrets: tuple[str, ...]
    env: dict[str, str]  # what a client needs (credentials for --auth)
    backend: str | None = None


def _start(kind: str, tmp: Path, *extra: str, env=None, secrets=(), backend=None) -> Server:
    port = _free_port()
    data_dir = tmp / f"data-{kind}"
    args = ["server", "start", "--data-dir", str(data_dir), "--port", str(port), "--workers", "1"]
    if backend:
        args += ["--backend-store", backend]
    t0 = time.monotonic()
    out = flexbench(*args, *extra, env=env, timeout=240)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((data_dir / "server" / "state.json").read_text())
    _record_timing(f"server start ({kind}): until /health 200", state["start_seconds"])
    _record_timing(f"server start ({kind}): `flexbench server start` wall", elapsed)
    uri = f"http://127.0.0.1:{port}"
    assert f"export MLFLOW_TRACKING_URI={uri}" in out.stdout
    assert f"UI:        {uri}/#/experiments" in out.stdout
    return Server(kind, data_dir, port, uri, out.stdout + out.stderr, tuple(secrets), {}, backend)


def _stop(s: Server) -> None:
    """Teardown: never leave a server behind (test_stop_* stops it through the CLI first)."""
    if srv.status(s.data_dir)[0] is not None:
        srv.stop(s.data_dir)


@pytest.fixture(scope="module")
def pg_cluster():
    if find_bindir() is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, pg_ctl) not found: run scripts/install_system_deps.sh "
            "as root (CI does)"
        )
    pg = LocalPostgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A server started with `flexbench server start`, stopped with `flexbench server stop`."""
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    backend, secrets = None, ()
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_cluster")
        backend = pg.create_database("mlflow", user="bench", password=PG_PASSWORD)
        secrets = (PG_PASSWORD,)
    s = _start(request.param, tmp, backend=backend, secrets=secrets)
    try:
        yield s
    finally:
        _stop(s)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server-auth")
    s = _start(
        "sqlite-auth",
        tmp,
        "--auth",
        "--auth-cache-seconds",
        "60",
        env=_env(MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD),
        secrets=(ADMIN_PASSWORD,),
    )
    s.env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    try:
        yield s
    finally:
        _stop(s)


def smoke_cell(s: Server, experiment: str, workdir: Path, method: str = "ipkd"):
    out = flexbench(
        "train", "--arch", "msdnet", "--dataset", "synthetic", "--method", method,
        "--profile", "smoke", "--tracking-uri", s.uri, "--experiment", experiment,
        "--set", f"runtime.workdir={workdir}", *[a for kv in SMOKE_SETS for a in ("--set", kv)],
        env=_env(**s.env),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _client(s: Server):
    from mlflow.tracking import MlflowClient

    for key, value in s.env.items():
        os.environ[key] = value  # MLflow's client reads credentials from the environment
    return MlflowClient(tracking_uri=s.uri)


@pytest.fixture
def client_env(monkeypatch):
    """Undo the credentials `_client` puts into os.environ."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    yield
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


def _check_cell(client, experiment: str, method: str) -> tuple[str, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`flexbench.method` = '{method}'"
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["flexbench.status"] == "finished"
    assert parent.info.status == "FINISHED"
    assert len(children) == 3  # msdnet smoke: exit1..exit3
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"top1", "mflops"} <= set(child.data.metrics)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "submodels.csv"} <= arts  # proxied through the server
    return exp.experiment_id, children


# ------------------------------------------------------------------ no server needed (fast)


def test_non_loopback_host_needs_expose_and_warns_without_auth():
    with pytest.raises(srv.ServerError, match="--expose"):
        srv.check_options(srv.ServerOptions(host="0.0.0.0"))
    warnings = srv.check_options(srv.ServerOptions(host="0.0.0.0", expose=True))
    assert warnings and "WITHOUT authentication" in warnings[0]
    assert srv.check_options(srv.ServerOptions(host="0.0.0.0", expose=True, auth=True)) == []
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert srv.check_options(srv.ServerOptions(host=host)) == []


def test_protections_cannot_be_switched_off():
    with pytest.raises(srv.ServerError, match="protections"):
        srv.check_options(srv.ServerOptions(allowed_hosts="mlflow.example.org,*"))
    with pytest.raises(srv.ServerError, match="protections"):
        srv.check_options(srv.ServerOptions(cors_allowed_origins="*"))


def test_cli_refuses_exposed_host(tmp_path):
    out = cli("server", "start", "--data-dir", str(tmp_path), "--host", "0.0.0.0")
    assert out.returncode == 2
    assert "--expose" in out.stderr and "Traceback" not in out.stderr


def test_port_in_use_is_a_clear_error_within_seconds(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        out = cli("server", "start", "--data-dir", str(tmp_path), "--port", str(port))
        elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr
    assert "Traceback" not in out.stderr
    assert elapsed < 15


def test_unreachable_postgres_is_a_clear_error_within_seconds(tmp_path):
    closed = _free_port()  # nothing listens there
    uri = f"postgresql://bench:{PG_PASSWORD}@127.0.0.1:{closed}/mlflow"
    t0 = time.monotonic()
    out = cli("server", "start", "--data-dir", str(tmp_path), "--backend-store", uri)
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert "cannot connect to the backend database" in out.stderr
    assert f"postgresql://bench:***@127.0.0.1:{closed}/mlflow" in out.stderr
    assert PG_PASSWORD not in out.stdout + out.stderr
    assert elapsed < 15


def test_unwritable_data_dir_is_a_clear_error_within_seconds(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.monotonic()
    out = cli("server", "start", "--data-dir", str(blocker / "data"))
    assert out.returncode == 2, out.stderr
    assert "is not writable" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 15
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = cli("server", "start", "--data-dir", str(locked))
        assert out.returncode == 2 and "is not writable" in out.stderr


def test_auth_needs_a_strong_password_from_the_environment(tmp_path):
    out = cli("server", "start", "--data-dir", str(tmp_path), "--auth")
    assert out.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in out.stderr
    out = cli(
        "server", "start", "--data-dir", str(tmp_path), "--auth",
        MLFLOW_AUTH_ADMIN_PASSWORD="short-pw",
    )  # fmt: skip
    assert out.returncode == 2 and "at least 12 characters" in out.stderr
    assert "short-pw" not in out.stdout + out.stderr


def test_file_store_backend_is_refused(tmp_path):
    out = cli("server", "start", "--data-dir", str(tmp_path), "--backend-store", "./mlruns")
    assert out.returncode == 2 and "file store" in out.stderr


def test_stop_and_status_without_a_server(tmp_path):
    out = cli("server", "status", "--data-dir", str(tmp_path))
    assert out.returncode == 3 and "no MLflow server running" in out.stdout
    out = cli("server", "stop", "--data-dir", str(tmp_path))
    assert out.returncode == 0 and "no MLflow server running" in out.stdout


def test_mask_uri():
    assert srv.mask_uri("postgresql://u:p%40ss@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert srv.mask_uri("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def _fake_state(data_dir: Path, pid: int, create_time: float, port: int) -> Path:
    """A state directory recording a server that `pid` is said to be (for stale-state tests)."""
    sdir = data_dir / "server"
    sdir.mkdir(parents=True)
    info = srv.ServerInfo(
        pid=pid, create_time=create_time, host="127.0.0.1", port=port,
        url=f"http://127.0.0.1:{port}", backend_store="sqlite:///x.db", artifacts="a",
        auth=False, admin_username=None, data_dir=str(data_dir), log=str(sdir / "server.log"),
        started_at=create_time + 5, start_seconds=5.0,
    )  # fmt: skip
    transient = ("already_running", "warnings", "orphans")
    record = {k: v for k, v in asdict(info).items() if k not in transient}
    (sdir / "state.json").write_text(json.dumps(record))
    (sdir / "server.pid").write_text(f"{pid}\n")
    return sdir


@pytest.mark.parametrize("recorded", ["earlier boot", "pid reused"])
def test_stale_state_is_cleaned_and_never_trusted(recorded, tmp_path):
    """A record whose pid (and process group) now belongs to another program: status and stop
    say no server runs, delete the record, and leave that program alone."""
    import psutil

    other = subprocess.Popen(["sleep", "120"], start_new_session=True)  # its own group
    try:
        born = psutil.Process(other.pid).create_time()
        create_time = psutil.boot_time() - 600 if recorded == "earlier boot" else born - 600
        sdir = _fake_state(tmp_path, other.pid, create_time, _free_port())
        out = cli("server", "status", "--data-dir", str(tmp_path))
        assert out.returncode == 3 and "no MLflow server running" in out.stdout
        assert not (sdir / "state.json").exists() and not (sdir / "server.pid").exists()
        _fake_state(tmp_path / "again", other.pid, create_time, _free_port())
        out = cli("server", "stop", "--data-dir", str(tmp_path / "again"))
        assert out.returncode == 0 and "no MLflow server running" in out.stdout
        assert other.poll() is None  # not ours: never signalled
    finally:
        other.kill()
        other.wait()


def test_killed_main_process_is_followed_to_its_workers(tmp_path):
    """`kill -9` of the pid in server.pid leaves uvicorn and its workers serving the port:
    status reports them, start replaces them, stop ends everything."""
    import psutil

    s = _start("orphans", tmp_path, "--workers", "2")
    sdir = s.data_dir / "server"
    started: list[psutil.Process] = []  # every process this test starts, for the teardown
    try:
        pid = int((sdir / "server.pid").read_text())
        started += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        old_tree = [p.pid for p in started[1:]]
        assert len(old_tree) >= 3  # uvicorn and two workers
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert srv._health(s.uri) == 200  # the workers still serve

        out = cli("server", "status", "--data-dir", str(s.data_dir))
        assert out.returncode == 1 and "BROKEN" in out.stdout, out.stdout + out.stderr
        assert f"main process (pid {pid}) is gone" in out.stderr
        assert str(old_tree[0]) in out.stderr

        out = flexbench("server", "start", "--data-dir", str(s.data_dir), "--port", str(s.port),
                        "--workers", "1", timeout=240)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "had died" in out.stdout and "server started" in out.stdout
        assert not any(_alive(p) for p in old_tree)
        new_pid = int((sdir / "server.pid").read_text())
        new_procs = [psutil.Process(new_pid), *psutil.Process(new_pid).children(recursive=True)]
        started += new_procs
        new_tree = [p.pid for p in new_procs]
        assert srv._health(s.uri) == 200

        os.kill(new_pid, signal.SIGKILL)  # broken again: now stop must end the rest
        out = flexbench("server", "stop", "--data-dir", str(s.data_dir), timeout=60)
        assert out.returncode == 0 and "had died" in out.stdout, out.stdout + out.stderr
        assert not any(_alive(p) for p in old_tree + new_tree)
        assert srv._port_in_use("127.0.0.1", s.port) is None
        assert not (sdir / "state.json").exists()
        assert cli("server", "status", "--data-dir", str(s.data_dir)).returncode == 3
    finally:
        for proc in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running():  # still the same process (pid and start time)
                    proc.kill()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------ one real server per backend (module)


def test_start_twice_reports_the_running_one_and_status(server):
    t0 = time.monotonic()
    out = cli("server", "start", "--data-dir", str(server.data_dir), "--port", "1")
    assert out.returncode == 0, out.stderr
    assert "already running" in out.stdout
    assert f"export MLFLOW_TRACKING_URI={server.uri}" in out.stdout
    assert "new settings were not applied" in out.stderr  # asked for port 1
    assert time.monotonic() - t0 < 15
    out = cli("server", "status", "--data-dir", str(server.data_dir))
    assert out.returncode == 0 and "/health answers 200" in out.stdout
    with urllib.request.urlopen(server.uri + "/health", timeout=5) as resp:
        assert resp.status == 200


def test_security_protections_stay_on(server):
    """MLflow 3's Host-header check (DNS rebinding) and CORS origin check are active."""
    api = server.uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api) == 200
    req = urllib.request.Request(api, headers={"Host": "evil.example.com"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 403
    body = json.dumps({"name": "cors-probe"}).encode()
    req = urllib.request.Request(
        server.uri + "/api/2.0/mlflow/experiments/create",
        data=body,
        headers={"Origin": "https://evil.example.com", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 403


def test_smoke_cell_through_the_server(server, tmp_path, client_env):
    smoke_cell(server, "smoke", tmp_path)
    _check_cell(_client(server), "smoke", "ipkd")
    if server.kind == "sqlite":  # the embedded default keeps artifacts under the data dir
        assert list((server.data_dir / "artifacts").rglob("submodels.csv"))
    for secret in server.secrets:  # e.g. the PostgreSQL password
        assert secret not in server.start_out
        assert secret not in (server.data_dir / "server" / "state.json").read_text()
        assert secret not in (server.data_dir / "server" / "server.log").read_text()


WRITER = r"""
import sys, tempfile, pathlib
from benchmark.record.tracking import CellRun
uri, exp, wid, n_cells, n_epochs = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
tmp = pathlib.Path(tempfile.mkdtemp())
for c in range(n_cells):
    key = f"w{wid}c{c}"
    cfg = {"arch": {"name": "fake"}, "method": {"name": f"w{wid}"}, "seed": c,
           "data": {"name": "synthetic"}, "profile": "smoke"}
    run = CellRun(uri, exp)
    run.start(cfg, key, params={f"p{i}": str(i) for i in range(20)}, tags={})
    for e in range(n_epochs):
        run.log_metrics({f"m{j}": e + j / 10 for j in range(5)}, step=e)
    rows = [{"name": f"s{k}", "index": k, "top1": 50.0 + k, "top5": 90.0, "mmacs": 1.0 + k,
             "mflops": 2.0 + 2 * k, "params_m": 0.1, "latency_ms": 1.0} for k in range(4)]
    art = tmp / f"{key}.txt"
    art.write_text(key)
    run.finish({"summary/a": 1.0, "summary/b": 2.0}, rows, [(art, None)], cfg, key, n_epochs)
print("writer done")
"""


def test_four_concurrent_writers_lose_nothing(server, tmp_path, client_env):
    writers, cells, epochs = 4, 4, 10
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), server.uri, "writers", str(w), str(cells), str(epochs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(**server.env),
        )
        for w in range(writers)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    client = _client(server)
    exp = client.get_experiment_by_name("writers")  # created once although 4 raced for it
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == writers * cells
    assert len(children) == writers * cells * 4
    assert {r.data.tags["flexbench.cell"] for r in parents} == {
        f"w{w}c{c}" for w in range(writers) for c in range(cells)
    }
    points = 0
    for parent in parents:
        assert parent.data.tags["flexbench.status"] == "finished"
        assert len(parent.data.params) == 20
        for j in range(5):
            history = client.get_metric_history(parent.info.run_id, f"m{j}")
            assert sorted(m.step for m in history) == list(range(epochs))
            points += len(history)
        assert {"summary/a", "summary/b"} <= set(parent.data.metrics)
        key = parent.data.tags["flexbench.cell"]
        assert [a.path for a in client.list_artifacts(parent.info.run_id)] == [f"{key}.txt"]
    assert points == writers * cells * 5 * epochs
    for child in children:
        assert len(child.data.metrics) == 6


def test_browser_lists_grid_runs_and_loads_child_comparison(server, tmp_path, client_env):
    """Headless Chromium (Debian's, driven by Playwright) on the experiment and compare pages."""
    if server.kind != "sqlite":
        pytest.skip("the browser check runs once, against the SQLite server")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium not found: run scripts/install_system_deps.sh as root (CI does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install 'flexbench[browser]'")

    # A small grid: the ipkd cell of test_smoke_cell_through_the_server plus a joint cell.
    client = _client(server)
    if client.get_experiment_by_name("smoke") is None:
        smoke_cell(server, "smoke", tmp_path / "ipkd", method="ipkd")
    smoke_cell(server, "smoke", tmp_path / "joint", method="joint")
    exp_id, kids_ipkd = _check_cell(client, "smoke", "ipkd")
    _, kids_joint = _check_cell(client, "smoke", "joint")
    children = kids_ipkd + kids_joint

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # Wait for texts, never for "networkidle": the UI keeps polling.
            page.goto(f"{server.uri}/#/experiments/{exp_id}/runs")
            for name in ("msdnet-ipkd-s0", "msdnet-joint-s0"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("8 matching runs").wait_for(timeout=30_000)  # 2 parents + 6 kids
            _close_assistant(page)
            # expand the ipkd cell: its sub-model runs appear under it
            row = page.locator("[role=row]").filter(has_text="msdnet-ipkd-s0")
            row.locator("button").first.click()
            page.get_by_text("msdnet-ipkd-s0-exit1", exact=True).wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_experiment_runs.png"))

            ids = urllib.parse.quote(json.dumps([r.info.run_id for r in children]))
            exps = urllib.parse.quote(json.dumps([exp_id]))
            page.goto(f"{server.uri}/#/compare-runs?runs={ids}&experiments={exps}")
            page.get_by_text(f"Comparing {len(children)} Runs").wait_for(timeout=60_000)
            _close_assistant(page)
            page.get_by_role("tab", name="Scatter Plot").click()
            page.locator("#x-axis-selector").click()
            page.get_by_role("option", name="mflops", exact=True).click()
            page.locator("#y-axis-selector").click()
            page.get_by_role("option", name="top1", exact=True).click()
            # the plot (WebGL, so read its data) shows one point per sub-model run
            want = sorted((r.data.metrics["mflops"], r.data.metrics["top1"]) for r in children)
            plot = page.locator(".js-plotly-plot").first
            got: list = []
            for _ in range(60):
                traces = plot.evaluate("el => (el.data || []).map(t => [t.x || [], t.y || []])")
                got = sorted((x, y) for xs, ys in traces for x, y in zip(xs, ys))
                if got == [pytest.approx(p, rel=1e-6) for p in want]:
                    break
                time.sleep(0.5)
            assert got == [pytest.approx(p, rel=1e-6) for p in want]
            page.get_by_text("msdnet-joint-s0-exit3").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_compare_children.png"), full_page=True)
        finally:
            browser.close()


def _close_assistant(page) -> None:
    """Hide the "MLflow Assistant" side panel, which covers a quarter of the screenshot."""
    panel_close = page.locator("button[aria-label='Close']")
    try:
        if panel_close.count():
            panel_close.first.click(timeout=2_000)
    except Exception:  # cosmetic only
        pass


def test_stop_stops_the_whole_server(server):
    import psutil

    info, _ = srv.status(server.data_dir)
    assert info is not None
    tree = [info.pid] + [c.pid for c in psutil.Process(info.pid).children(recursive=True)]
    t0 = time.monotonic()
    out = flexbench("server", "stop", "--data-dir", str(server.data_dir), timeout=60)
    assert out.returncode == 0 and f"pid {info.pid}" in out.stdout
    _record_timing(
        f"server stop ({server.kind}): `flexbench server stop` wall", time.monotonic() - t0
    )
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in tree)  # fmt: skip
    assert srv._port_in_use("127.0.0.1", server.port) is None  # the port is free again
    out = cli("server", "status", "--data-dir", str(server.data_dir))
    assert out.returncode == 3


# ---------------------------------------------------------------------------- --auth


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_auth_refuses_requests_without_credentials(auth_server):
    url = auth_server.uri + "/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(url) == 401
    assert _get(url, ("admin", "wrong-password-123")) == 401
    assert _get(url, ("admin", ADMIN_PASSWORD)) == 200
    assert _get(auth_server.uri + "/") == 401  # the UI too


def test_auth_train_fails_early_without_credentials(auth_server, tmp_path):
    out = flexbench(
        "train", "--arch", "msdnet", "--dataset", "synthetic", "--method", "ipkd",
        "--profile", "smoke", "--tracking-uri", auth_server.uri, "--experiment", "nologin",
        "--set", f"runtime.workdir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "requires a login" in out.stderr and "Traceback" not in out.stderr


def test_auth_smoke_cell_with_credentials(auth_server, tmp_path, client_env):
    smoke_cell(auth_server, "smoke-auth", tmp_path)
    client = _client(auth_server)
    _check_cell(client, "smoke-auth", "ipkd")
    # the admin password is nowhere: not in what was printed, the state, the log, the runs
    exp = client.get_experiment_by_name("smoke-auth")
    for run in client.search_runs([exp.experiment_id]):
        assert ADMIN_PASSWORD not in json.dumps([run.data.params, run.data.tags])
    sdir = auth_server.data_dir / "server"
    assert ADMIN_PASSWORD not in auth_server.start_out
    for name in ("state.json", "server.log", "auth.ini"):
        assert ADMIN_PASSWORD not in (sdir / name).read_text()
    assert "auth_cache_ttl_seconds = 60" in (sdir / "auth.ini").read_text()
    info, _ = srv.status(auth_server.data_dir)
    import psutil

    for proc in [psutil.Process(info.pid), *psutil.Process(info.pid).children(recursive=True)]:
        assert ADMIN_PASSWORD not in " ".join(proc.cmdline())
