"""predict: score image files or folders with a registered version and write a CSV.

The model is the registered pyfunc (tasks/model/serving.py), so files are decoded exactly as
in training, whatever their size or mode. Not a DVC stage: it reads the live registry.

CLI: ``ctl predict PATH... [--model champion|<alias>|<version>] [--out predictions.csv]``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.files import spreadsheet_safe
from tasks.common.workspace import Workspace
from tasks.registry.tracking import CHAMPION, mlflow_tracking, tracking_uri

COLUMNS = ("path", "class", "confidence", "top_k", "error")
BATCH = 64


@dataclass(frozen=True)
class PredictResult:
    out: Path
    model_uri: str
    scored: int
    failed: int


def model_uri(name: str, ref: str) -> str:
    """``champion`` or any alias -> ``models:/name@alias``; a number -> that version."""
    ref = ref.strip()
    if not ref:
        raise PipelineError("empty model reference; use an alias such as champion, or a version number")
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"


def image_files(inputs: Iterable[Path], extensions: tuple[str, ...]) -> list[Path]:
    """The files named, plus every file with an image extension under the folders named, sorted."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif item.is_file():
            found.append(item)
        else:
            raise PipelineError(f"{item}: no such file or folder")
    if not found:
        raise PipelineError(f"no image files ({', '.join(extensions)}) in {', '.join(map(str, inputs))}")
    return found


def format_top_k(classes: list[str], probabilities: list[float]) -> str:
    return " ".join(f"{c}:{p:.4f}" for c, p in zip(classes, probabilities, strict=True))


def run_predict(
    cfg: PipelineConfig,
    ws: Workspace,
    inputs: list[Path],
    out: Path,
    ref: str = CHAMPION,
    top_k: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> PredictResult:
    """Score every image under ``inputs`` with version/alias ``ref``; one CSV row per file.

    A file that cannot be decoded gets a row with its reason in ``error``; the rest are scored.
    ``progress`` is called after each batch with the files just done and the total.
    """
    from mlflow.exceptions import MlflowException

    from tasks.model.serving import load_registered

    files = image_files(inputs, cfg.ingest.image_extensions)
    uri = model_uri(cfg.register_.model_name, ref)
    try:
        with mlflow_tracking(tracking_uri(ws)):
            model = load_registered(uri)
    except MlflowException as exc:
        raise PipelineError(f"cannot load {uri}: {exc.message}; `ctl status` lists versions and aliases") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    scored = failed = 0
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for start in range(0, len(files), BATCH):
            chunk = files[start : start + BATCH]
            for path, row in zip(chunk, model.score([p.read_bytes() for p in chunk], top_k), strict=True):
                ok = not row["error"]
                scored, failed = scored + ok, failed + (not ok)
                writer.writerow([
                    spreadsheet_safe(str(path)),
                    spreadsheet_safe(row["class"] or ""),
                    f"{row['confidence']:.6f}" if ok else "",
                    spreadsheet_safe(format_top_k(row["top_classes"], row["top_probabilities"])) if ok else "",
                    spreadsheet_safe(row["error"]),
                ])  # fmt: skip
            if progress:
                progress(len(chunk), len(files))
    return PredictResult(out, uri, scored, failed)
