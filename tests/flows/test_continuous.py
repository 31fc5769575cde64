"""Integration: continuous training on a real Prefect server.

Starts ``prefect server`` on a free loopback port (temporary PREFECT_HOME), serves the
deployments from flows/deploy.py, drops a generated batch into the landing zone and checks
that the dataset.updated trigger starts a retrain that registers a model; then that the
same content delivered again starts nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import REPO, registry_client, tiny_params, write_batch

pytestmark = pytest.mark.integration

WATCH_INTERVAL_S = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    port = url.split(":")[-1].split("/")[0]
    _SERVER_LOG[:] = [home / "server.log", home / "serve.log"]
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: _healthy(url), 120, "the Prefect server")
        yield {"url": url, "env": env, "home": home}
    finally:
        stop(proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


#: How long one API call may keep failing (5xx answers, or no answer) before the test gives up.
API_PATIENCE_S = 90.0


def api(method: str, url: str, **kwargs: Any) -> Any:
    """One Prefect API call. The SQLite-backed test server can answer 5xx, or not within the
    request timeout, while a retrain writes to it on a loaded machine: such calls are retried
    for up to ``API_PATIENCE_S``; anything else fails with the body, and a server that stays
    silent fails with the tail of its log."""
    deadline = time.monotonic() + API_PATIENCE_S
    while True:
        try:
            resp = httpx.request(method, url, timeout=15, **kwargs)
            if resp.status_code < 500:
                break
            problem = f"{resp.status_code} {resp.text[:300]}"
        except httpx.TimeoutException as exc:
            problem = f"no answer ({exc!r})"
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} {url}: {problem} for {API_PATIENCE_S:.0f} s\n{_server_log_tail()}")
        time.sleep(2)
    assert resp.is_success, f"{method} {url}: {resp.status_code} {resp.text[:500]}"
    return resp.json() if resp.content else {}


#: Set by the server fixture, for failure messages.
_SERVER_LOG: list[Path] = []


def _server_log_tail(chars: int = 3000) -> str:
    return "".join(f"--- {p}:\n{p.read_text(errors='replace')[-chars:]}\n" for p in _SERVER_LOG if p.is_file())


def flow_runs(url: str, deployment: str) -> list[dict]:
    body = {"deployments": {"name": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return [r for r in api("POST", f"{url}/flow_runs/filter", json=body) if r["state_type"] != "SCHEDULED"]


@pytest.fixture(scope="module")
def served(
    server: dict, tmp_path_factory: pytest.TempPathFactory, new_workspace: Callable[..., Path]
) -> Iterator[dict]:
    params = tiny_params()
    params["retrain"] = {"cron": None}
    ws = new_workspace(tmp_path_factory.mktemp("continuous") / "ws", params)
    log_path = server["home"] / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy", "--workspace", str(ws), "--interval", str(WATCH_INTERVAL_S)],
            cwd=REPO, env=server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: flow_runs(server["url"], "watch-landing"), 90, "a first watch-landing tick")
        yield {"ws": ws, "url": server["url"], "log": log_path}
    finally:
        stop(proc)


def test_new_batch_triggers_a_retrain_that_registers_a_model(served: dict) -> None:
    ws, url = served["ws"], served["url"]
    assert flow_runs(url, "retrain") == []  # nothing landed yet, nothing trained
    write_batch(ws / "landing" / "batch-001", 240, seed=5)
    landed = time.time()

    run = wait_for(lambda: next(iter(flow_runs(url, "retrain")), None), 120, "a triggered retrain run")
    finished = ("COMPLETED", "FAILED", "CRASHED")
    final = wait_for(
        lambda: next((r for r in flow_runs(url, "retrain") if r["state_type"] in finished), None),
        600, "the retrain run to finish", every=3,
    )  # fmt: skip
    assert final["state_type"] == "COMPLETED", served["log"].read_text()[-3000:]
    data_hash = yaml.safe_load((ws / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert run["parameters"]["data_hash"] == data_hash  # templated from the event payload
    assert run["parameters"]["workspace"] == str(ws)
    versions = registry_client(ws).search_model_versions("name='tiny-classifier'")
    assert [v.tags["dvc_data_hash"] for v in versions] == [data_hash]
    started = _epoch(final["start_time"])
    print(f"latency from landing to retrain start: {started - landed:.1f} s (watch interval {WATCH_INTERVAL_S} s)")


def test_watch_ticks_do_not_start_while_a_retrain_holds_the_workspace(served: dict) -> None:
    """The retrain holds the watch deployment's concurrency slot, so each tick due meanwhile is
    cancelled by the server before any process starts (it could only find the workspace busy)."""
    url = served["url"]
    retrain = wait_for(lambda: next((r for r in flow_runs(url, "retrain") if r["end_time"]), None), 600,
                       "a finished retrain (the first test's)")  # fmt: skip
    start, end = _epoch(retrain["start_time"]), _epoch(retrain["end_time"])
    # The runner proposes a tick up to 10 s before it is due, and the retrain takes the slot just
    # after it starts (at most once a running tick ended): ticks due in between may still run.
    settled = start + 10 + 2 * WATCH_INTERVAL_S
    during = [r for r in flow_runs(url, "watch-landing") if settled < _epoch(r["expected_start_time"]) < end]
    assert during, f"no tick fell due during the retrain ({end - start:.0f} s long)"
    assert {r["state_type"] for r in during} == {"CANCELLED"}, [(r["name"], r["state_name"]) for r in during]
    assert all("concurrency limit" in (r["state"]["message"] or "") for r in during)
    body = {"logs": {"flow_run_id": {"any_": [retrain["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    assert any("watch ticks paused" in entry["message"] for entry in api("POST", f"{url}/logs/filter", json=body))
    # After the retrain, ticks run again.
    wait_for(lambda: [r for r in flow_runs(url, "watch-landing")
                      if r["state_type"] == "COMPLETED" and _epoch(r["expected_start_time"]) > end + WATCH_INTERVAL_S],
             60, "a completed tick after the retrain")  # fmt: skip


def test_same_content_again_starts_no_retrain(served: dict) -> None:
    ws, url = served["ws"], served["url"]
    before = len(flow_runs(url, "retrain"))
    write_batch(ws / "landing" / "batch-001-again", 240, seed=5)  # identical images and labels
    dropped = time.time()

    def ticks_after_drop() -> bool:
        runs = [r for r in flow_runs(url, "watch-landing") if r["state_type"] == "COMPLETED"]
        late = [r for r in runs if r["end_time"] and _epoch(r["end_time"]) > dropped + 1]
        return len(late) >= 2

    wait_for(ticks_after_drop, 120, "two watch ticks after the second delivery")
    assert len(flow_runs(url, "retrain")) == before
    assert not (ws / "data" / "raw" / "batch-001-again").exists()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_serve_restart_marks_orphaned_runs_crashed(served: dict) -> None:
    """A retrain left "Running" by a killed serve process is marked Crashed when serving
    starts again, so it no longer holds the retrain concurrency slot."""
    url = served["url"]
    deployment = api("GET", f"{url}/deployments/name/retrain/retrain")
    run = api("POST", f"{url}/deployments/{deployment['id']}/create_flow_run", json={})
    state = {"type": "RUNNING", "name": "Running", "message": "pretend its serve process was killed"}
    api("POST", f"{url}/flow_runs/{run['id']}/set_state", json={"state": state, "force": True})

    proc = subprocess.run(
        [sys.executable, "-c", "from flows.deploy import crash_orphaned_runs; print(crash_orphaned_runs(['retrain']))"],
        cwd=REPO, env={**os.environ, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run["name"] in proc.stdout, proc.stderr
    after = api("GET", f"{url}/flow_runs/{run['id']}")
    assert after["state_type"] == "CRASHED"
    assert "orphaned" in after["state"]["message"]


def test_serve_start_frees_the_watch_ticks_slot_left_taken(served: dict) -> None:
    """The embedded server keeps concurrency leases in memory: stopped while a retrain held the
    watch's slot, it comes back with the slot taken and no lease to expire, and every tick would be
    cancelled. Serve start-up sets it free."""
    url = served["url"]
    watch = api("GET", f"{url}/deployments/name/watch-landing/watch-landing")
    # A deployment of the watch flow that no process serves, so no tick takes or frees the slot meanwhile.
    unserved = api("POST", f"{url}/deployments/", json={"name": "watch-stale-slot", "flow_id": watch["flow_id"],
                                                          "concurrency_limit": 1})  # fmt: skip
    limit = api("GET", f"{url}/deployments/{unserved['id']}")["global_concurrency_limit"]
    api("PATCH", f"{url}/v2/concurrency_limits/{limit['id']}", json={"active_slots": 1})
    code = "from flows.deploy import free_stale_tick_slot; print(free_stale_tick_slot('watch-stale-slot'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PREFECT_API_URL": url},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "1"
    assert api("GET", f"{url}/v2/concurrency_limits/{limit['id']}")["active_slots"] == 0
    api("DELETE", f"{url}/deployments/{unserved['id']}")


def test_serve_start_drops_the_watch_ticks_missed_while_nothing_served(served: dict) -> None:
    """Ticks that fell due while the services were down are deleted at serve start-up instead
    of being submitted all at once; a tick still ahead is kept. The ticks belong to a deployment
    of the watch flow that no process serves, so no runner can pick a due one up first."""
    from datetime import UTC, datetime, timedelta

    url = served["url"]
    watch = api("GET", f"{url}/deployments/name/watch-landing/watch-landing")
    unserved = api("POST", f"{url}/deployments/", json={"name": "watch-unserved", "flow_id": watch["flow_id"]})
    now = datetime.now(UTC)
    runs = {}
    for label, offset in (("missed-1", -3600), ("missed-2", -60), ("ahead", 3600)):
        when = (now + timedelta(seconds=offset)).isoformat()
        state = {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": when}}
        runs[label] = api("POST", f"{url}/deployments/{unserved['id']}/create_flow_run",
                          json={"name": label, "state": state})["id"]  # fmt: skip

    code = "from flows.deploy import drop_missed_ticks; print(drop_missed_ticks('watch-unserved'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PREFECT_API_URL": url},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == 2
    assert httpx.get(f"{url}/flow_runs/{runs['missed-1']}", timeout=15).status_code == 404
    assert httpx.get(f"{url}/flow_runs/{runs['missed-2']}", timeout=15).status_code == 404
    assert api("GET", f"{url}/flow_runs/{runs['ahead']}")["state_type"] == "SCHEDULED"
    api("DELETE", f"{url}/deployments/{unserved['id']}")
