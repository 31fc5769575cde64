"""The paths of a pipeline workspace and the lock that serialises work on it."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.common.errors import WorkspaceBusy


@dataclass(frozen=True)
class Workspace:
    """Every path of a pipeline workspace (a git + DVC repository), named once. dvc.yaml names
    the same paths for the stages' outputs."""

    root: Path

    # ------------------------------------------------------------ config and DVC
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    # ------------------------------------------------------------ data
    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_dvc(self) -> Path:
        return self.root / "data" / "raw.dvc"

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def benchmark(self) -> Path:
        return self.root / "data" / "benchmark"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def parent(self) -> Path:
        """What the train stage starts from: the parent step's decision and, for a warm start,
        the champion's weights (DVC-tracked, a dep of train)."""
        return self.root / "data" / "parent"

    @property
    def parent_record(self) -> Path:
        return self.parent / "parent.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    # ------------------------------------------------------------ reports (dvc metrics / plots)
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validate_report(self) -> Path:
        return self.reports / "validate.json"

    @property
    def validate_summary(self) -> Path:
        return self.reports / "validate.md"

    @property
    def manifest_table(self) -> Path:
        return self.reports / "manifest.csv"

    @property
    def train_report(self) -> Path:
        return self.reports / "train.json"

    @property
    def train_history(self) -> Path:
        return self.reports / "train_history.csv"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def evaluation(self) -> Path:
        return self.reports / "evaluation"

    def predictions(self, split: str) -> Path:
        """Per-image predictions of the evaluated model (tasks/model/predictions.py)."""
        return self.evaluation / f"predictions_{split}.csv"

    @property
    def baseline(self) -> Path:
        """The cheap baseline's scores per split (tasks/model/baseline.py): the gate's default floors."""
        return self.evaluation / "baseline.json"

    @property
    def gate_metrics(self) -> Path:
        """Flat numbers for `dvc metrics show` (challenger and champion side by side)."""
        return self.reports / "gate.json"

    @property
    def gate_report(self) -> Path:
        """The full gate report: every rule, per-class metrics."""
        return self.reports / "gate_report.json"

    # ------------------------------------------------------------ registry
    @property
    def mlflow(self) -> Path:
        """The default MLflow store (SQLite + artifacts) when no tracking server is configured."""
        return self.root / "mlflow"

    @property
    def audit_log(self) -> Path:
        return self.mlflow / "audit.jsonl"

    # ------------------------------------------------------------ scratch (not DVC outputs)
    @property
    def cache(self) -> Path:
        """Scratch space outside DVC outputs (DVC deletes outputs before a stage runs)."""
        return self.root / ".cache"

    @property
    def features(self) -> Path:
        return self.cache / "features"

    @property
    def checkpoints(self) -> Path:
        return self.cache / "train"

    @property
    def landing_hashes(self) -> Path:
        return self.cache / "landing-hashes.json"

    @property
    def benchmark_checks(self) -> Path:
        """check_image results for the benchmark's files, by content (tasks/data/image_cache.py)."""
        return self.cache / "benchmark-images.json"

    @property
    def stage_results(self) -> Path:
        return self.cache / "stage-results"

    @property
    def stage_process(self) -> Path:
        """The process group of the DVC stage running now, and the run that owns it (tasks/common/processes.py)."""
        return self.cache / "stage-process.json"

    @property
    def services(self) -> Path:
        return self.cache / "services"

    @property
    def local_prefect_home(self) -> Path:
        """PREFECT_HOME of a run without services (no PREFECT_API_URL): its temporary API's
        database stays in the workspace instead of sharing ~/.prefect with a running server."""
        return self.cache / "prefect-local"


@contextmanager
def workspace_lock(ws: Workspace, name: str, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on the workspace (``.cache/<name>.lock``), so two ingests,
    or a retrain and a watch tick, never touch the data at the same time."""
    ws.cache.mkdir(parents=True, exist_ok=True)
    with (ws.cache / f"{name}.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"workspace {ws.root} is busy ({name} lock held by another process)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
