"""The CLIs fail with a message naming the Prefect API URL when the server is down, and
the service commands stop only what they started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# Each case starts a Python process that imports Prefect: real processes, not a pure core.
pytestmark = pytest.mark.integration


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"  # nothing listens once the socket is closed


@pytest.mark.parametrize("module", ["flows.watch", "flows.deploy", "flows.retrain"])
def test_cli_names_the_api_url_when_the_server_is_down(module: str, tmp_path: Path) -> None:
    url = closed_port_url()
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--workspace", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"the Prefect API at {url} does not answer" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was ingested


def test_down_with_nothing_running_stops_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.server", "down", "--workspace", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "nothing was running" in proc.stdout
