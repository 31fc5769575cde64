"""Fetch the data a ``dataset.updated`` event names, on a machine that did not ingest it.

The event carries the DVC hashes of ``data/raw`` and ``data/benchmark`` as the landing machine
recorded them, and the sha256 of its params.yaml. Here they become this checkout's
``data/raw.dvc`` and ``data/benchmark.dvc`` (what ``dvc add`` wrote there), and ``dvc pull`` brings
exactly those versions from the remote into this machine's own cache and workspace. Nothing is
shared with the landing machine but the remote.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.common.dvc import default_remote, dvc_data_hash, run_dvc
from tasks.common.errors import PipelineError, RemoteUnavailable
from tasks.common.files import sha256_file
from tasks.common.workspace import Workspace


@dataclass
class Fetched:
    data_hash: str
    benchmark_hash: str
    changed: list[str]  # the .dvc files this fetch rewrote (empty: the checkout had that data already)
    seconds: float

    def record(self) -> dict[str, Any]:
        return asdict(self)


def params_sha256(ws: Workspace) -> str:
    return sha256_file(ws.params)


def track(dvc_file: Path, md5: str) -> bool:
    """Make ``dvc_file`` name the directory version ``md5`` (a DVC 3 ``.dir`` hash); True when it changed."""
    if dvc_data_hash(dvc_file) == md5:
        return False
    out = {"md5": md5, "hash": "md5", "path": dvc_file.with_suffix("").name}
    dvc_file.write_text(yaml.safe_dump({"outs": [out]}, sort_keys=False), encoding="utf-8")
    return True


def run_fetch(ws: Workspace, data_hash: str, benchmark_hash: str = "", params: str = "") -> Fetched:
    """Check out ``data/raw`` at ``data_hash`` and ``data/benchmark`` at ``benchmark_hash`` (empty:
    the landing machine has no benchmark) from the default DVC remote. ``params`` is the landing
    machine's params.yaml sha256: a different one here would train on other settings than the
    data was validated with, so it is refused."""
    started = time.monotonic()
    if not data_hash or not data_hash.endswith(".dir"):
        raise PipelineError(f"no data version to fetch (data_hash={data_hash!r}): a dataset.updated event names one")
    if params and params != params_sha256(ws):
        raise PipelineError(
            f"params.yaml here ({ws.params}) differs from the one the data was ingested with: commit the landing "
            "workspace's params.yaml and deploy again (`ctl up --stack cluster`), so that every machine trains on it"
        )
    if not default_remote(ws.root):
        raise PipelineError(f"{ws.root} has no DVC remote to fetch from: start its worker with `ctl worker`")
    benchmark_dvc = ws.benchmark.with_suffix(".dvc")
    ws.raw_dvc.parent.mkdir(exist_ok=True)  # a fresh clone has no data/ (git keeps no empty folders)
    changed = [str(f.relative_to(ws.root)) for f, md5 in ((ws.raw_dvc, data_hash), (benchmark_dvc, benchmark_hash))
               if md5 and track(f, md5)]  # fmt: skip
    if not benchmark_hash:  # none on the landing machine: an empty directory, as its ingest leaves it
        if benchmark_dvc.is_file():
            benchmark_dvc.unlink()
            changed.append(str(benchmark_dvc.relative_to(ws.root)))
        shutil.rmtree(ws.benchmark, ignore_errors=True)
        ws.benchmark.mkdir(parents=True)
    targets = [str(f.relative_to(ws.root)) for f in (ws.raw_dvc, benchmark_dvc) if f.is_file()]
    try:
        run_dvc(["pull", "--force", *targets], ws.root)  # data/ here is never edited by hand
    except PipelineError as exc:
        raise RemoteUnavailable(f"could not pull {', '.join(targets)} from the DVC remote: {exc}") from exc
    return Fetched(data_hash, benchmark_hash, changed, round(time.monotonic() - started, 1))
