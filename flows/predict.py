"""The predict flow: score a folder of images with a registered version, as ``ctl predict`` does,
on demand (the ``predict`` deployment's Run button, or ``prefect deployment run predict/predict
-p folder=...``) or on ``predict.cron``. The CSV goes to ``predictions/`` in the workspace and a
summary (counts per class, undecodable files) to the run's artifacts.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.common.config import load_params
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace


@flow(name="predict", log_prints=True)
def predict_folder(workspace: str = ".", folder: str = "", model: str = "", top_k: int = 3) -> dict[str, Any]:
    """``folder`` (relative to the workspace, or absolute) defaults to ``predict.folder``;
    ``model`` (an alias or a version) to ``predict.model``."""
    import csv

    from tasks.predict import run_predict

    ws = Workspace(Path(workspace).resolve())
    cfg = load_params(ws.params)
    folder = folder or cfg.predict.folder or ""
    if not folder:
        raise PipelineError("no folder to score: pass folder=... or set predict.folder in params.yaml")
    source = (ws.root / folder).resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ws.root / "predictions" / f"{source.name}-{stamp}.csv"
    result = run_predict(cfg, ws, [source], out, model or cfg.predict.model, top_k)
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    counts = Counter(row["class"] for row in rows if not row["error"])
    lines = [
        f"# Predictions: {result.scored} image(s) from `{source}`",
        "",
        f"Model `{result.model_uri}` · CSV `{out}` · {result.failed} file(s) not decodable",
        "",
        "| class | images |",
        "|---|---|",
        *(f"| {c} | {n} |" for c, n in counts.most_common()),
    ]
    create_markdown_artifact(
        "\n".join(lines),
        key="predictions",
        description="Predict run",
    )
    get_run_logger().info("%d scored, %d not decodable -> %s", result.scored, result.failed, out)
    return {"out": str(out), "model_uri": result.model_uri, "scored": result.scored, "failed": result.failed}
