"""Start and stop the local services: a Prefect server on 127.0.0.1 and the process that
serves the deployments. ``make up`` / ``make down`` call this; ``down`` stops exactly the
processes ``up`` started (their pids are kept in ``.cache/services/``).

The server uses SQLite under PREFECT_HOME unless PREFECT_API_DATABASE_CONNECTION_URL names
another database (PostgreSQL, for instance).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace

DEFAULT_PORT = 4200
#: Every service either profile starts, in the order ``down`` stops them: the deployments first
#: (so they can report their runs' end), PostgreSQL last.
STOP_ORDER = ("serve", "worker-landing", "worker-gpu", "server", "mlflow", "seaweedfs", "postgres")
#: PostgreSQL stops at once on SIGINT ("fast" shutdown); the others on SIGTERM.
STOP_SIGNALS = {"postgres": signal.SIGINT}


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or ""


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def require_api() -> str:
    """The configured Prefect API, or a one-line error naming the URL that did not answer."""
    url = api_url()
    if not url:
        raise SystemExit("error: PREFECT_API_URL is not set; start the services with `make up` and export it")
    if not healthy(url):
        raise SystemExit(f"error: the Prefect API at {url} does not answer; is the server running (`make up`)?")
    return url


def _pidfile(ws: Workspace, name: str) -> Path:
    return ws.services / f"{name}.pid"


def start(ws: Workspace, name: str, cmd: list[str], env: dict[str, str], **popen: Any) -> int:
    """Start service ``name`` in a session of its own (``down`` stops its whole process group),
    its output in ``.cache/services/<name>.log``, its pid in ``<name>.pid``."""
    log_dir = ws.services
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=ws.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    _pidfile(ws, name).write_text(str(proc.pid))
    return proc.pid


def alive(pid: int) -> bool:
    try:  # a child of this process that exited stays a zombie (and "alive") until it is reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: its parent reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running(ws: Workspace, name: str) -> bool:
    pidfile = _pidfile(ws, name)
    return pidfile.is_file() and alive(int(pidfile.read_text()))


def serving(ws: Workspace) -> bool:
    return running(ws, "serve")


def start_serve(ws: Workspace, url: str, interval: int | None, env: dict[str, str] | None = None) -> int:
    """The process serving the deployments; ``env`` replaces this process's environment."""
    env = dict(env if env is not None else os.environ, PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    serve_cmd = [sys.executable, "-m", "flows.deploy", "--workspace", str(ws.root)]
    if interval:
        serve_cmd += ["--interval", str(interval)]
    return start(ws, "serve", serve_cmd, env)


def up(ws: Workspace, port: int, interval: int | None) -> str:
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    for name in ("server", "serve"):
        if running(ws, name):
            raise PipelineError(f"{name} already running (pid {_pidfile(ws, name).read_text()}); `make down` first")
    if healthy(url):
        raise PipelineError(f"something already answers at {url}; stop it or set PREFECT_PORT")
    prefect = [sys.executable, "-m", "prefect"]
    start(ws, "server", [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
    deadline = time.monotonic() + 120
    while not healthy(url):
        if time.monotonic() > deadline:
            log = ws.services / "server.log"
            raise PipelineError(f"the Prefect server did not answer at {url} within 120 s; see {log}")
        time.sleep(1)
    start_serve(ws, url, interval)
    return url


def down(ws: Workspace) -> list[str]:
    """Stop what ``up`` started, of either profile (flows/cluster.py's services have pid files too)."""
    return stop(ws, STOP_ORDER, STOP_SIGNALS)


def stop(ws: Workspace, names: tuple[str, ...], signals: dict[str, int] | None = None) -> list[str]:
    """Stop the named services in this order (SIGTERM unless ``signals`` says otherwise; SIGKILL
    after 30 s), each with its process group; a pid file whose process is gone is just removed."""
    stopped = []
    for name in names:
        pidfile = _pidfile(ws, name)
        if not pidfile.is_file():
            continue
        pid = int(pidfile.read_text())
        if alive(pid):
            os.killpg(pid, (signals or {}).get(name, signal.SIGTERM))
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(f"{name} (pid {pid})")
        pidfile.unlink()
    return stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "check"])
    parser.add_argument("--workspace", default=".")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", DEFAULT_PORT)))
    parser.add_argument("--interval", type=int, default=None, help="override watch.interval_s")
    args = parser.parse_args()
    ws = Workspace(Path(args.workspace).resolve())
    try:
        if args.command == "up":
            url = up(ws, args.port, args.interval)
            print(f"Prefect server and deployments running. UI: {url.removesuffix('/api')}")
            print(f"export PREFECT_API_URL={url}   # to run flows against it")
        elif args.command == "down":
            print("stopped: " + (", ".join(down(ws)) or "nothing was running"))
        else:
            print(f"Prefect API answers at {require_api()}")
    except PipelineError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
