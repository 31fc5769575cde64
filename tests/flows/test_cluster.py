"""Integration: the cluster profile (flows/cluster.py) on loopback.

Brings up PostgreSQL, SeaweedFS's S3 API, the MLflow server (basic-auth) and the Prefect server
(auth string) once for the module, then checks that each refuses a request without credentials,
that the credentials stay in their 0600 file, that ingested data goes to the DVC remote and a
second workspace with its own cache pulls it from there, and that a retrain registers on the MLflow
server, whose champion a third, empty directory loads with only the tracking URI and credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows import cluster
from tasks.common.dvc import CLUSTER_REMOTE
from tasks.common.workspace import Workspace
from tests.helpers import REPO, dvc, run, write_batch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")),
        reason="PostgreSQL's server is not installed (`make cluster-deps`, which `make test` runs, installs it)",
    ),
]


#: Enough of the tiny classes for a first model that passes the gate's floors.
N_IMAGES = 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, template_workspace: Path) -> Iterator[dict]:
    # Not under pytest's private temporary root: as root, PostgreSQL runs as the user 'postgres',
    # which must reach its data directory in the workspace.
    base = Path(tempfile.mkdtemp(prefix="ctl-cluster-"))
    base.chmod(0o755)
    root = base / "ingest-machine"
    shutil.copytree(template_workspace, root, symlinks=True)
    ws = Workspace(root)
    endpoints = cluster.up(ws, cluster.Ports.free(), deployments=False)
    try:
        yield {"ws": ws, "endpoints": endpoints, "env": {**os.environ, **cluster.client_env(ws)}}
    finally:
        stopped = cluster.down(ws)
        shutil.rmtree(base, ignore_errors=True)
        assert {name.split()[0] for name in stopped} == {"postgres", "seaweedfs", "mlflow", "server"}


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


def test_credentials_live_only_in_their_private_file(stack: dict) -> None:
    ws: Workspace = stack["ws"]
    path = cluster.credentials_file(ws)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets = [v for k, v in cluster.load_credentials(ws).env().items() if k != "MLFLOW_TRACKING_USERNAME"]
    looked_at = [ws.params, ws.root / ".dvc" / "config", ws.root / ".dvc" / "config.local", cluster.endpoints_file(ws)]
    looked_at += sorted(ws.services.glob("*.log"))
    for file in looked_at:
        text = file.read_text(encoding="utf-8", errors="replace")
        leaked = [s[:4] + "..." for s in secrets if s in text]
        assert not leaked, f"{file} holds a secret: {leaked}"


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


def test_ingest_pushes_the_data_and_another_workspace_pulls_it(stack: dict, tmp_path: Path) -> None:
    ws: Workspace = stack["ws"]
    write_batch(ws.root / "landing" / "b001", N_IMAGES, seed=1)
    proc = subprocess.run([sys.executable, "-m", "tasks.ingest"], cwd=ws.root, env=stack["env"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (ws.cache / "dvc-push.pending").exists()
    run(["git", "add", "data"], ws.root)  # data/raw.dvc and data/.gitignore; DVC ignores the rest
    run(["git", "commit", "-qm", "data"], ws.root)

    # Another machine: its own clone and its own DVC cache; only git and the remote in common.
    other = tmp_path / "train-machine"
    run(["git", "clone", "-q", str(ws.root), str(other)], tmp_path)
    ep: cluster.Endpoints = stack["endpoints"]
    dvc(other, "remote", "add", "--local", "--default", CLUSTER_REMOTE, "s3://dvc")
    dvc(other, "remote", "modify", "--local", CLUSTER_REMOTE, "endpointurl", ep.s3_url)
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull", "data/raw.dvc"], cwd=other, env=stack["env"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    theirs = sorted(p.relative_to(ws.raw) for p in ws.raw.rglob("*") if p.is_file())
    ours = sorted(p.relative_to(other / "data" / "raw") for p in (other / "data" / "raw").rglob("*") if p.is_file())
    assert ours == theirs and len(ours) == N_IMAGES + 2  # the images, manifest.csv and batch.json
    for rel in ours[:5]:
        assert (other / "data" / "raw" / rel).read_bytes() == (ws.raw / rel).read_bytes()

    anonymous = {k: v for k, v in stack["env"].items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    shutil.rmtree(other / ".dvc" / "cache")
    shutil.rmtree(other / "data" / "raw")
    refused = subprocess.run([sys.executable, "-m", "dvc", "pull", "data/raw.dvc"], cwd=other,
                             env={**anonymous, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"},
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0


def test_a_retrain_registers_on_the_server_and_an_empty_directory_loads_the_champion(
    stack: dict, tmp_path: Path
) -> None:
    ws: Workspace = stack["ws"]
    if not ws.raw_dvc.is_file():
        write_batch(ws.root / "landing" / "b001", N_IMAGES, seed=1)
    proc = subprocess.run([sys.executable, "-m", "flows.retrain", "--workspace", str(ws.root)], cwd=REPO,
                          env=stack["env"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert result["decision"]["action"] == "promote", result["decision"]
    assert result["register"]["tracking_uri"] == stack["endpoints"].mlflow_url

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
    if not ws.metrics.is_file():
        pytest.skip("needs the retrain of the test before")
    into = tmp_path / "restored"
    cmd = [sys.executable, "-m", "flows.cli", "reproduce", "1", "--into", str(into), "-w", str(ws.root), "--repro"]
    proc = subprocess.run(cmd, cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "dvc status: Data and pipelines are up to date." in proc.stdout
    assert "data from s3://dvc" in proc.stdout
    # Its own DVC cache, filled from the remote; the model and the prepared arrays are the workspace's.
    assert str(ws.root) not in (into / ".dvc" / "config.local").read_text()
    for rel in ("models/model.safetensors", "data/prepared/train_images.npy", "dvc.lock", "reports/metrics.json"):
        assert (into / rel).read_bytes() == (ws.root / rel).read_bytes(), rel


def test_the_servers_recover_when_postgresql_restarts(stack: dict) -> None:
    """PostgreSQL restarted under the Prefect and MLflow servers: their next requests succeed."""
    from flows import server

    ws: Workspace = stack["ws"]
    ep: cluster.Endpoints = stack["endpoints"]
    creds = cluster.load_credentials(ws)
    assert server.stop(ws, ("postgres",), server.STOP_SIGNALS)
    cluster.start_postgres(ws, ep, creds)

    user, password = creds.PREFECT_API_AUTH_STRING.split(":", 1)
    search = f"{ep.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    mlflow_auth = (creds.MLFLOW_TRACKING_USERNAME, creds.MLFLOW_TRACKING_PASSWORD)

    def answered() -> tuple[int, int | None]:
        prefect = httpx.post(f"{ep.prefect_api}/flows/filter", json={}, auth=(user, password), timeout=10).status_code
        return prefect, cluster.http_status(search, mlflow_auth)

    # A pooled connection that died with the old server may fail one request; the next must not.
    answered()
    assert answered() == (200, 200)
