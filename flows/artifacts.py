"""Pictures in the Prefect UI: a PNG the pipeline wrote, shown as an artifact of the current run.

The Prefect server does not serve workspace files, so the PNG travels inlined (a ``data:`` URI)
inside a markdown artifact, with a line saying where the file itself is (checked in the UI's
artifact page with a headless browser; an image artifact with the same URI also renders but
prints the whole URI under the picture).
"""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common.files import read_json
from tasks.common.gallery import png_data_uri
from tasks.common.workspace import Workspace
from tasks.model.errors import mistakes_png, mistakes_table


def publish_png(path: Path, key: str, description: str, caption: str = "") -> None:
    """A markdown artifact showing the PNG at ``path``; nothing when the file is missing."""
    if not path.is_file():
        return
    text = f"![{description}]({png_data_uri(path)})\n\n{caption or f'File: `{path.name}`'}\n"
    create_markdown_artifact(text, key=key, description=description)


def publish_evaluation(ws: Workspace) -> None:
    """The evaluate stage's error analysis per scored split: confusion matrix, the most confident
    mistakes as thumbnails and as a table. Per-class precision/recall/F1 on the judged split is
    the gate's ``gate-per-class`` table."""
    where = "in `reports/evaluation/` and in the version's MLflow run (`evaluation/`)"
    for split in read_json(ws.metrics) if ws.metrics.is_file() else {}:
        publish_png(
            ws.evaluation / f"confusion_{split}.png",
            f"confusion-{split}",
            f"Confusion matrix ({split})",
            f"Rows: true class; columns: predicted class. `confusion_{split}.png` {where}.",
        )
        publish_png(
            mistakes_png(ws.evaluation, split),
            f"mistakes-{split}",
            f"Most confident mistakes ({split})",
            f"Each mistake's sha256, batch and path: `mistakes_{split}.csv` {where}.",
        )
        if rows := mistakes_table(ws.evaluation, split):
            create_table_artifact(rows, key=f"mistakes-{split}-table", description=f"Most confident mistakes ({split})")
