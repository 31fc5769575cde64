"""What a registered version carries so anyone can go back from it to the exact data, code and params."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.common.config import PipelineConfig
from tasks.common.dvc import dvc_data_hash
from tasks.common.errors import PipelineError
from tasks.common.files import read_json
from tasks.common.workspace import Workspace
from tasks.model.warm_start import PARENT_TAG, START_TAG, WARM_STARTS_TAG


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested params as MLflow keys: ``train.augment.hflip``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    if isinstance(value, list | tuple):
        return {prefix: ",".join(str(v) for v in value)}
    return {prefix: value}


def params_hash(cfg: PipelineConfig) -> str:
    canonical = json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _git(ws: Workspace, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


#: The pipeline state a version is reproduced from, logged under ``pipeline/`` in its run: params,
#: dvc.lock and the data's .dvc files (the data itself is in DVC's cache or remote).
STATE_DIR = "pipeline"
#: The stages' outputs DVC does not cache (reports), logged under ``pipeline/outs/<path>``: with
#: them back in place, ``dvc status`` of a restored version has nothing to report.
OUTS_DIR = f"{STATE_DIR}/outs"


def state_files(ws: Workspace) -> list[Path]:
    """params.yaml, dvc.lock and every data/*.dvc file that exists."""
    return [p for p in (ws.params, ws.dvc_lock, *sorted((ws.root / "data").glob("*.dvc"))) if p.is_file()]


def uncached_outputs(ws: Workspace) -> list[Path]:
    """The outs and metrics that dvc.yaml marks ``cache: false``, relative to the workspace."""
    stages = (yaml.safe_load((ws.root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    found = []
    for stage in stages.values():
        for entry in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            if isinstance(entry, dict):
                ((path, options),) = entry.items()
                if options and options.get("cache") is False:
                    found.append(Path(path))
    return found


def collect_lineage(cfg: PipelineConfig, ws: Workspace) -> dict[str, str]:
    lock = ws.dvc_lock
    validation = read_json(ws.validate_report)
    dirty = _git(ws, "status", "--porcelain", "--untracked-files=no", "--", "tasks", "flows", "dvc.yaml")
    return {
        "git_commit": _git(ws, "rev-parse", "HEAD") or "none",
        "git_dirty": str(bool(dirty)).lower(),
        "dvc_data_hash": dvc_data_hash(ws.raw_dvc) or "none",
        "dvc_lock_hash": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none",
        "params_hash": params_hash(cfg),
        "batch_ids": ",".join(validation["batches"]),
        "n_images": str(validation["n_images"]),
        "classes": json.dumps(list(cfg.classes)),
        **start_tags(ws),
    }


def start_tags(ws: Workspace) -> dict[str, str]:
    """What the model started from (the train stage's report and the parent step's decision)."""
    start = read_json(ws.train_report).get("start", "full") if ws.train_report.is_file() else "full"
    decision = read_json(ws.parent_record) if ws.parent_record.is_file() else {}
    from_champion = start.startswith("warm v") and decision.get("mode") == "warm"
    return {
        START_TAG: start.split(" ", 1)[0],
        PARENT_TAG: str(decision["parent_version"]) if from_champion else "none",
        WARM_STARTS_TAG: str(decision.get("warm_starts_in_row", 0)) if from_champion else "0",
        "training_start_reason": decision.get("reason", "")[:500],
    }


def check_outputs_current(ws: Workspace) -> None:
    """Refuse to register a model that dvc.lock does not vouch for (stale or hand-edited)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=ws.root, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise PipelineError(f"dvc status failed: {proc.stderr.strip().splitlines()[-1:]}")
    stale = json.loads(proc.stdout or "{}")
    if stale:
        raise PipelineError(f"pipeline outputs are not current (dvc status: {sorted(stale)}); run `dvc repro` first")
