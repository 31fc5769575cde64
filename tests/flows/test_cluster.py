"""Integration: the cluster profile (flows/cluster.py) on loopback.

Brings up PostgreSQL, SeaweedFS's S3 API, the MLflow server (basic-auth) and the Prefect server
(auth string) once for the module, then checks that each refuses a request without credentials,
that the credentials stay in their 0600 file, that ingested data goes to the DVC remote and a
second workspace with its own cache pulls it from there, and that a retrain registers on the MLflow
server, whose champion a third, empty directory loads with only the tracking URI and credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows import cluster
from tasks.common.dvc import CLUSTER_REMOTE_URL, set_default_remote
from tasks.common.workspace import Workspace
from tests.helpers import REPO, run, write_batch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")),
        reason="PostgreSQL's server is not installed (`make cluster-deps`, which `make test` runs, installs it)",
    ),
]


#: Enough of the tiny classes for a first model that passes the gate's floors.
N_IMAGES = 300


#: How often the landing worker's watch ticks, and how long a run without heartbeats stays Running
#: (twice Prefect's shortest heartbeat period, 30 s).
WATCH_S = 5
CRASH_AFTER_S = 60


@pytest.fixture(scope="module")
def stack(template_workspace: Path) -> Iterator[dict]:
    # Not under pytest's private temporary root: as root, PostgreSQL runs as the user 'postgres',
    # which must reach its data directory in the workspace.
    base = Path(tempfile.mkdtemp(prefix="ctl-cluster-"))
    base.chmod(0o755)
    root = base / "ingest-machine"
    shutil.copytree(template_workspace, root, symlinks=True)
    # The ingest machine's repository holds the whole project: the flows and prefect.yaml too.
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "flows and prefect.yaml"], root)
    ws = Workspace(root)
    workers: list[subprocess.Popen] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTL_CRASH_AFTER_S", str(CRASH_AFTER_S))
        endpoints = cluster.up(ws, cluster.Ports.free(), interval=WATCH_S, train_worker=False)
    try:
        env = {**os.environ, **cluster.client_env(ws)}
        yield {"ws": ws, "endpoints": endpoints, "env": env, "base": base, "workers": workers}
    finally:
        for proc in workers:
            kill_tree(proc.pid)
        stopped = cluster.down(ws)
        shutil.rmtree(base, ignore_errors=True)
        assert {name.split()[0] for name in stopped} == {"worker-landing", "postgres", "seaweedfs", "mlflow", "server"}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it (a flow run leaves its worker's process group)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for proc in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(psutil.NoSuchProcess, ChildProcessError):
        parent.wait(10)


def train_machine(stack: dict, name: str) -> Path:
    """Another machine: a clone of the code with its own DVC cache; it shares nothing with the
    ingest machine but git and the services."""
    checkout = stack["base"] / name
    if not checkout.is_dir():
        run(["git", "clone", "-q", str(stack["ws"].root), str(checkout)], stack["base"])
    return checkout


def start_worker(stack: dict, checkout: Path, name: str) -> subprocess.Popen:
    """``ctl worker --pool gpu`` in ``checkout``, with only the client environment."""
    log = (stack["base"] / f"{name}.log").open("ab")
    cmd = [sys.executable, "-m", "flows.cli", "worker", "--pool", "gpu", "-w", str(checkout), "--name", name]
    proc = subprocess.Popen(cmd, cwd=checkout, env=stack["env"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    stack["workers"].append(proc)
    return proc


@contextlib.contextmanager
def prefect_client(stack: dict) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {
        PREFECT_API_URL: stack["endpoints"].prefect_api,
        PREFECT_API_AUTH_STRING: stack["env"]["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


def runs_of(stack: dict, deployment: str) -> list[Any]:
    """The deployment's latest 200 flow runs, oldest first, leaving out the cron schedule's future ones."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(stack) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
            sort=FlowRunSort.START_TIME_DESC,
            limit=200,  # the watch ticks every few seconds: the server's page would hold only the oldest
        )
    return list(reversed(runs))


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return result


def running_interval(stack: dict, run_id: Any) -> tuple[float, float]:
    """When a flow run entered Running and when it reached its terminal state (from its state history)."""
    with prefect_client(stack) as client:
        states = client.read_flow_run_states(run_id)
    running = [s.timestamp.timestamp() for s in states if s.type.value == "RUNNING"]
    final = [s.timestamp.timestamp() for s in states if s.is_final()]
    return min(running), max(final)


def test_every_service_refuses_a_request_without_credentials(stack: dict) -> None:
    import psycopg2
    from botocore.exceptions import ClientError

    ep: cluster.Endpoints = stack["endpoints"]
    creds = cluster.load_credentials(stack["ws"])
    search = f"{ep.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert cluster.http_status(search) == 401
    assert cluster.http_status(search, (creds.MLFLOW_TRACKING_USERNAME, "wrong")) == 401
    assert cluster.http_status(search, (creds.MLFLOW_TRACKING_USERNAME, creds.MLFLOW_TRACKING_PASSWORD)) == 200

    flows = f"{ep.prefect_api}/flows/filter"
    assert httpx.post(flows, json={}, timeout=10).status_code == 401
    assert httpx.post(flows, json={}, auth=("ctl", "wrong"), timeout=10).status_code == 401
    user, password = creds.PREFECT_API_AUTH_STRING.split(":", 1)
    assert httpx.post(flows, json={}, auth=(user, password), timeout=10).status_code == 200

    with pytest.raises(ClientError, match="AccessDenied"):
        cluster.s3_client(ep, None).list_objects_v2(Bucket="dvc")
    wrong = cluster.Credentials(**{**creds.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    with pytest.raises(ClientError):
        cluster.s3_client(ep, wrong).list_objects_v2(Bucket="dvc")
    assert cluster.s3_client(ep, creds).list_objects_v2(Bucket="dvc")["ResponseMetadata"]["HTTPStatusCode"] == 200

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=ep.host, port=ep.ports.postgres, user="ctl", password="wrong", dbname="prefect")


def test_a_second_start_keeps_the_credentials(stack: dict) -> None:
    ws: Workspace = stack["ws"]
    assert cluster.load_credentials(ws) == cluster.load_credentials(ws)
    path = cluster.credentials_file(ws)
    path.chmod(0o644)
    try:
        with pytest.raises(cluster.PipelineError, match="readable by other users"):
            cluster.load_credentials(ws)
    finally:
        path.chmod(0o600)


def announced_hash(ws: Workspace) -> str | None:
    """The data hash the watch last announced (written once the event was handed to Prefect)."""
    path = ws.cache / "announced.json"
    return json.loads(path.read_text())["data_hash"] if path.is_file() else None


def registered(stack: dict, data_hash: str) -> list[dict]:
    """The model versions on the MLflow server tagged with this data hash: version, aliases, tags."""
    code = (
        "import json, sys, mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "vs = c.search_model_versions(\"name='tiny-classifier'\")\n"  # search leaves the aliases out
        "vs = [c.get_model_version(v.name, v.version) for v in vs if v.tags.get('dvc_data_hash') == sys.argv[1]]\n"
        "print(json.dumps([{'version': v.version, 'aliases': list(v.aliases), 'tags': v.tags} for v in vs]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, data_hash], env=stack["env"], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_batch_landing_on_one_machine_is_trained_by_a_worker_on_another(stack: dict) -> None:
    """The issue's path: a batch lands; the landing worker's watch ingests it, pushes it to the
    DVC remote and announces it; a gpu worker in another checkout, with its own DVC cache, picks up
    the triggered retrain, fetches exactly that data from the remote, trains, pushes, registers."""
    from tasks.common.dvc import dvc_data_hash

    ws: Workspace = stack["ws"]
    checkout = train_machine(stack, "train-machine")
    start_worker(stack, checkout, "gpu-a")
    landed = time.monotonic()
    write_batch(ws.root / "landing" / "b001", N_IMAGES, seed=1)
    data_hash = wait_for("the watch announces b001", lambda: announced_hash(ws), 300)
    assert data_hash == dvc_data_hash(ws.raw_dvc)
    assert not (ws.cache / "dvc-push.pending").exists()  # pushed before it was announced

    first = wait_for("the triggered retrain starts", lambda: runs_of(stack, "retrain"), 300)[0]
    started = time.monotonic() - landed
    done = wait_for("the retrain ends", lambda: [r for r in runs_of(stack, "retrain") if r.state.is_final()], 900, 5)
    assert len(done) == 1 and done[0].id == first.id
    assert done[0].state.type.value == "COMPLETED", done[0].state.message
    assert done[0].parameters["data_hash"] == data_hash and done[0].parameters["fetch"] is True
    print(f"landing to retrain start: {started:.0f} s")

    # The worker's checkout holds that data version, from its own cache, byte for byte.
    assert dvc_data_hash(checkout / "data" / "raw.dvc") == data_hash
    theirs = sorted(p.relative_to(ws.raw) for p in ws.raw.rglob("*") if p.is_file())
    ours = sorted(
        p.relative_to(checkout / "data" / "raw") for p in (checkout / "data" / "raw").rglob("*") if p.is_file()
    )
    assert ours == theirs and len(ours) == N_IMAGES + 2  # the images, manifest.csv and batch.json
    for rel in ours[:5]:
        assert (checkout / "data" / "raw" / rel).read_bytes() == (ws.raw / rel).read_bytes()
    assert str(ws.root) not in (checkout / ".dvc" / "config.local").read_text()  # no shared cache
    assert (checkout / "reports" / "metrics.json").is_file()

    [version] = registered(stack, data_hash)
    assert version["version"] == "1" and "champion" in version["aliases"]
    assert version["tags"]["git_commit"] == run(["git", "rev-parse", "HEAD"], ws.root).stdout.strip()
    assert version["tags"]["git_dirty"] == "false"

    # Without the keys, the remote refuses the worker's pull.
    anonymous = {k: v for k, v in stack["env"].items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    elsewhere = train_machine(stack, "no-keys")
    set_default_remote(elsewhere, CLUSTER_REMOTE_URL, stack["endpoints"].s3_url)
    (elsewhere / "data").mkdir(exist_ok=True)
    shutil.copy(checkout / "data" / "raw.dvc", elsewhere / "data" / "raw.dvc")
    refused = subprocess.run([sys.executable, "-m", "dvc", "pull", "data/raw.dvc"], cwd=elsewhere,
                             env={**anonymous, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"},
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0


def test_an_empty_directory_loads_the_champion_with_only_the_tracking_uri(stack: dict, tmp_path: Path) -> None:
    ws: Workspace = stack["ws"]
    if not ws.raw_dvc.is_file():
        pytest.skip("needs the retrain of the test before")
    empty = tmp_path / "somewhere-else"
    empty.mkdir()
    image = next(ws.raw.glob("*/images/*.png"))
    load = (
        "import base64, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/tiny-classifier@champion')\n"
        "data = base64.b64encode(open(sys.argv[1], 'rb').read()).decode()\n"
        "print(model.predict(pd.DataFrame({'image': [data]})).iloc[0]['class'])\n"
    )
    env = {k: v for k, v in stack["env"].items() if k.startswith(("MLFLOW_TRACKING_", "PATH", "HOME"))}
    loaded = subprocess.run([sys.executable, "-c", load, str(image)], cwd=empty, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip().splitlines()[-1] in ("red", "green", "blue")
    assert list(empty.iterdir()) == []  # nothing needed, nothing left behind

    no_password = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_PASSWORD"}
    refused = subprocess.run([sys.executable, "-c", load, str(image)], cwd=empty, env=no_password,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0


def test_a_registered_version_is_restored_elsewhere_and_dvc_has_nothing_to_do(stack: dict, tmp_path: Path) -> None:
    ws: Workspace = stack["ws"]
    trained = Workspace(stack["base"] / "train-machine")
    if not trained.metrics.is_file():
        pytest.skip("needs the retrain of the test before")
    into = tmp_path / "restored"
    cmd = [sys.executable, "-m", "flows.cli", "reproduce", "1", "--into", str(into), "-w", str(ws.root), "--repro"]
    proc = subprocess.run(cmd, cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "dvc status: Data and pipelines are up to date." in proc.stdout
    assert "data from s3://dvc" in proc.stdout
    # Its own DVC cache, filled from the remote; the model and the prepared arrays are the ones the worker made.
    assert str(trained.root) not in (into / ".dvc" / "config.local").read_text()
    for rel in ("models/model.safetensors", "data/prepared/train_images.npy", "dvc.lock", "reports/metrics.json"):
        assert (into / rel).read_bytes() == (trained.root / rel).read_bytes(), rel


def test_a_worker_killed_mid_retrain_leaves_a_crashed_run_and_two_workers_never_train_the_same_data(
    stack: dict,
) -> None:
    """The machine training a batch dies: its run is marked Crashed (no heartbeats), and the next
    trigger runs cleanly. Then two workers serve the pool and the same data is announced twice:
    one retrain at a time, and the data is trained once."""
    ws: Workspace = stack["ws"]
    if not ws.raw_dvc.is_file():
        pytest.skip("needs the retrain of the test before")
    before = {r.id for r in runs_of(stack, "retrain")}
    for proc in stack["workers"]:
        kill_tree(proc.pid)
    worker = start_worker(stack, train_machine(stack, "train-machine"), "gpu-a")
    write_batch(ws.root / "landing" / "b002", 60, seed=2)

    def running_now() -> list[Any]:
        return [r for r in runs_of(stack, "retrain") if r.id not in before and r.state.is_running()]

    doomed = wait_for("a retrain of b002 runs", running_now, 300)[0]
    time.sleep(5)  # into its stages
    kill_tree(worker.pid)  # the worker, its flow run and the run's DVC stage: the machine is gone

    def crashed() -> bool:
        with prefect_client(stack) as client:
            return client.read_flow_run(doomed.id).state.is_crashed()

    wait_for("the orphaned run is marked Crashed", crashed, CRASH_AFTER_S + 90)

    # Two machines serve the pool now; the crashed one is back.
    start_worker(stack, train_machine(stack, "train-machine"), "gpu-a")
    start_worker(stack, train_machine(stack, "train-machine-2"), "gpu-b")
    seen = {r.id for r in runs_of(stack, "retrain")}
    write_batch(ws.root / "landing" / "b003", 60, seed=3)
    data_hash = wait_for("b003 is announced", lambda: (h := announced_hash(ws)) != doomed.parameters["data_hash"] and h,
                         300)  # fmt: skip
    announced = json.loads((ws.cache / "announced.json").read_text())
    # The same announcement again, as a second event delivery would bring it.
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    parameters = {"data_hash": data_hash, "benchmark_hash": announced["benchmark_hash"],
                  "params_sha256": announced["params_sha256"]}  # fmt: skip
    with prefect_client(stack):
        run_deployment("retrain/retrain", parameters=parameters, timeout=0)

    def both_done() -> list[Any]:
        new = [r for r in runs_of(stack, "retrain") if r.id not in seen and r.parameters.get("data_hash") == data_hash]
        return new if len(new) == 2 and all(r.state.is_final() for r in new) else []

    runs = wait_for("both retrains of b003 end", both_done, 900, 5)
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"], [r.state.message for r in runs]
    (start_a, end_a), (start_b, end_b) = (running_interval(stack, r.id) for r in runs)
    assert end_a <= start_b or end_b <= start_a, "two retrains ran at once"
    [version] = registered(stack, data_hash)  # trained once; the later run found it registered
    assert int(version["version"]) >= 2

    # A scheduled retrain (no event) takes the newest announcement, which is trained already.
    with prefect_client(stack):
        scheduled = run_deployment("retrain/retrain", parameters={}, timeout=600)
    assert scheduled.state.is_completed(), scheduled.state.message
    said = f"data {data_hash} already has model version {version['version']}"

    def logged() -> list[str]:  # a run's last log lines reach the server after its final state
        with prefect_client(stack) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[scheduled.id])))
        return [log.message for log in logs if said in log.message]

    wait_for(f"the scheduled run logs {said!r}", logged, 60)


def test_the_servers_and_the_watch_recover_when_postgresql_restarts(stack: dict) -> None:
    """PostgreSQL restarted under the Prefect and MLflow servers while the watch ticks every few
    seconds: their next requests succeed, and a later tick completes."""
    from flows import server

    ws: Workspace = stack["ws"]
    ep: cluster.Endpoints = stack["endpoints"]
    creds = cluster.load_credentials(ws)
    assert server.stop(ws, ("postgres",), server.STOP_SIGNALS)
    time.sleep(WATCH_S)  # a tick comes due while the database is down
    cluster.start_postgres(ws, ep, creds)
    restarted = time.time()

    user, password = creds.PREFECT_API_AUTH_STRING.split(":", 1)
    search = f"{ep.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    mlflow_auth = (creds.MLFLOW_TRACKING_USERNAME, creds.MLFLOW_TRACKING_PASSWORD)

    def answered() -> tuple[int, int | None]:
        prefect = httpx.post(f"{ep.prefect_api}/flows/filter", json={}, auth=(user, password), timeout=10).status_code
        return prefect, cluster.http_status(search, mlflow_auth)

    # A pooled connection that died with the old server may fail one request; the next must not.
    answered()
    assert answered() == (200, 200)

    def ticked() -> bool:
        return any(
            r.state.is_completed() and r.start_time.timestamp() > restarted for r in runs_of(stack, "watch-landing")
        )

    wait_for("a watch tick completes after the restart", ticked, 120)


def test_credentials_live_only_in_their_private_file(stack: dict) -> None:
    """Last: by now every service and worker has written its log."""
    ws: Workspace = stack["ws"]
    path = cluster.credentials_file(ws)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets = [v for k, v in cluster.load_credentials(ws).env().items() if k != "MLFLOW_TRACKING_USERNAME"]
    looked_at = [ws.params, ws.root / ".dvc" / "config", ws.root / ".dvc" / "config.local", cluster.endpoints_file(ws)]
    looked_at += sorted(ws.services.glob("*.log")) + sorted(stack["base"].glob("*.log"))  # services, workers
    for file in looked_at:
        text = file.read_text(encoding="utf-8", errors="replace")
        leaked = [s[:4] + "..." for s in secrets if s in text]
        assert not leaked, f"{file} holds a secret: {leaked}"
