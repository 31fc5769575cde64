"""One command: the tutorial loop and our training core on the same images, side by side.

Each side runs in a fresh process (so each has its own memory high-water marks) for the
same number of epochs on the same images: the reference (bench/reference.py) reads them
as PNG files, ours (bench/ours.py, tasks.train.Trainer) as uint8 arrays. Both score the
test set after every epoch, outside the training time. Prints a markdown table and writes
JSON + markdown to bench/results/ (CUDA) or .cache/bench/ (CPU), or to --out.

    uv run python -m bench.run --train-images 4000 --epochs 2
    python -m bench.run --train-images 60000 --epochs 3 --set strategy=fine_tune image_size=96

Needs only torch, torchvision, timm, numpy, PIL and pydantic; ``--pipeline-run`` also
needs the orchestration stack (httpx and a Prefect server that ran ``make demo``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/run.py` as well as `-m bench.run`

from pydantic import ValidationError

from bench.data import BenchData, prepare_fmnist
from bench.reference import WEIGHTS_NOTE, default_workers
from tasks.common.config import TrainConfig, load_params
from tasks.common.errors import PipelineError

log = logging.getLogger("bench.run")

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("reference", "ours")
DEFAULT_API = "http://127.0.0.1:4200/api"
#: The promotion gate's accuracy floor in params.yaml: a model below it never ships.
DEFAULT_TARGET = 0.85


class BenchError(RuntimeError):
    """A side failed or the options cannot work; the message says which."""


@dataclass(frozen=True)
class BenchOptions:
    epochs: int = 2
    target: float = DEFAULT_TARGET
    device: str = "auto"
    threads: int | None = None
    num_workers: int = field(default_factory=default_workers)
    ref_batch_size: int | None = None
    ref_lr: float = 0.001
    ref_image_size: int = 224
    weights: str | None = None
    #: Our side's starting point (a params.yaml ``train`` section); TrainConfig defaults when empty.
    base: dict = field(default_factory=dict)
    #: TrainConfig fields for our side, e.g. {"strategy": "fine_tune", "image_size": 96}.
    overrides: dict = field(default_factory=dict)

    def train_config(self) -> TrainConfig:
        """Our side's config: the base, the overrides, then the shared epochs/device/threads."""
        shared = {"epochs": self.epochs, "device": self.device}
        if self.threads:
            shared["num_threads"] = self.threads
        return TrainConfig(**merge(merge(self.base, self.overrides), shared))


# ---------------------------------------------------------------- options


def merge(base: dict, changes: dict) -> dict:
    """``base`` updated by ``changes``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs to a dict; values are JSON when they parse; ``a.b=1`` nests."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise BenchError(f"invalid --set item {pair!r}; expected key=value, e.g. strategy=fine_tune")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# ---------------------------------------------------------------- running the sides


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def side_command(side: str, data: BenchData, opts: BenchOptions, cfg: TrainConfig, json_out: Path) -> list[str]:
    common = ["--train-dir", str(data.train), "--test-dir", str(data.test), "--test-images", str(data.test_images)]
    common += ["--json-out", str(json_out)]
    if side == "ours":
        return [sys.executable, "-m", "bench.ours", *common, "--config", json.dumps(cfg.model_dump())]
    command = [sys.executable, "-m", "bench.reference", *common, "--epochs", str(opts.epochs)]
    command += ["--batch-size", str(opts.ref_batch_size or cfg.batch_size), "--lr", str(opts.ref_lr)]
    command += ["--image-size", str(opts.ref_image_size), "--num-workers", str(opts.num_workers)]
    command += ["--device", opts.device, "--seed", str(cfg.seed)]
    command += ["--threads", str(opts.threads)] if opts.threads else []
    return command + (["--weights", opts.weights] if opts.weights else [])


def run_side(side: str, command: list[str], json_out: Path) -> dict:
    """Run one side in a fresh process; its log goes to our console, its result to ``json_out``."""
    log.info("running the %s side: %s", side, " ".join(command[1:4]))
    proc = subprocess.run(command, cwd=ROOT, env=child_env(), check=False)
    if proc.returncode != 0 or not json_out.is_file():
        raise BenchError(f"the {side} side failed (exit code {proc.returncode}); its output is above")
    return json.loads(json_out.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- figures


def summarize(result: dict, target: float) -> dict:
    """Steady-state rates (first epoch left out when there are more), final accuracy, time to target."""
    epochs = result["epochs"]
    steady = epochs[1:] or epochs
    elapsed, reached = 0.0, None
    for e in epochs:
        elapsed += e["train_seconds"]
        if reached is None and e["test_accuracy"] >= target:
            reached = {"epoch": e["epoch"], "train_seconds": round(elapsed, 2)}
    return {
        "images_per_s": round(statistics.mean(e["images_per_s"] for e in steady), 2),
        "epoch_seconds": round(statistics.mean(e["train_seconds"] for e in steady), 2),
        "first_epoch_excluded": len(epochs) > 1,
        "final_test_accuracy": epochs[-1]["test_accuracy"],
        "train_seconds_total": round(elapsed, 2),
        "time_to_target": reached,
    }


def ratio(ours: float | None, ref: float | None) -> float | None:
    return round(ours / ref, 3) if ours is not None and ref else None


def compare(ref: dict, ours: dict) -> dict:
    """ours / reference for rates, times and memory; ours - reference for accuracy."""
    ref_s, our_s = ref["summary"], ours["summary"]
    to_target = [(s["time_to_target"] or {}).get("train_seconds") for s in (our_s, ref_s)]
    return {
        "images_per_s": ratio(our_s["images_per_s"], ref_s["images_per_s"]),
        "epoch_seconds": ratio(our_s["epoch_seconds"], ref_s["epoch_seconds"]),
        "final_test_accuracy_diff": round(our_s["final_test_accuracy"] - ref_s["final_test_accuracy"], 4),
        "time_to_target": ratio(*to_target),
        "peak_rss_mb": ratio(ours["peak_rss_mb"], ref["peak_rss_mb"]),
        "peak_gpu_allocated_mb": ratio(ours["peak_gpu_allocated_mb"], ref["peak_gpu_allocated_mb"]),
    }


def environment(sides: dict[str, dict]) -> dict:
    versions = {**sides["reference"]["versions"], **sides["ours"]["versions"]}
    return {
        "date": date.today().isoformat(),
        "device": sides["ours"]["device"],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run_benchmark(data: BenchData, opts: BenchOptions) -> dict:
    """Both sides on ``data``, each in its own process, then the comparison."""
    cfg = opts.train_config()
    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for side in SIDES:
            json_out = Path(tmp) / f"{side}.json"
            sides[side] = run_side(side, side_command(side, data, opts, cfg, json_out), json_out)
            sides[side]["summary"] = summarize(sides[side], opts.target)
    return {
        **environment(sides),
        "train_images": data.train_images,
        "test_images": data.test_images,
        "epochs": opts.epochs,
        "target_accuracy": opts.target,
        "options": asdict(opts),
        **sides,
        "ours_vs_reference": compare(sides["reference"], sides["ours"]),
    }


def pipeline_figures(api: str) -> dict:
    """Per-stage wall time and orchestration overhead of finished retrain runs (bench/orchestration.py)."""
    try:
        import httpx

        from bench.orchestration import retrain_figures
    except ImportError as exc:
        return {"api": api, "error": f"needs the orchestration stack: {exc}"}
    try:
        runs = retrain_figures(api)
    except httpx.HTTPError as exc:
        return {"api": api, "error": f"Prefect API not reachable ({exc}); start it with `make up` after `make demo`"}
    shares = [r["overhead_share"] for r in runs]
    return {"api": api, "retrain": runs, "mean_overhead_share": round(statistics.mean(shares), 3) if shares else None}


def incremental_figures(extra_args: list[str]) -> dict:
    """bench/incremental.py's result: the last line of its stdout, as JSON."""
    if not (ROOT / "bench" / "incremental.py").is_file():
        return {"error": "bench/incremental.py not found"}
    command = [sys.executable, "-m", "bench.incremental", *extra_args]
    log.info("running %s", " ".join(command[1:]))
    proc = subprocess.run(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True, check=False)
    sys.stdout.write(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"bench/incremental.py failed (exit code {proc.returncode})"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "the last line bench/incremental.py printed is not JSON", "last_line": lines[-1][:500]}


# ---------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _per_epoch(result: dict, key: str, digits: int) -> str:
    return ", ".join(_fmt(e[key], digits) for e in result["epochs"])


def _to_target(summary: dict) -> str:
    hit = summary["time_to_target"]
    return "not reached" if hit is None else f"{hit['train_seconds']:,.1f} s (epoch {hit['epoch']})"


def comparison_rows(results: dict) -> list[tuple[str, str, str, str]]:
    ref, ours, vs = results["reference"], results["ours"], results["ours_vs_reference"]
    ref_s, our_s = ref["summary"], ours["summary"]
    which = "epochs 2+" if our_s["first_epoch_excluded"] else "epoch 1, warm-up included"
    diff = vs["final_test_accuracy_diff"]
    return [
        ("what", ref["description"], ours["description"], ""),
        ("weights", ref["weights"], ours["weights"], ""),
        (f"training images/s ({which})", _fmt(ref_s["images_per_s"]), _fmt(our_s["images_per_s"]),
         _times(vs["images_per_s"])),
        ("training images/s per epoch", _per_epoch(ref, "images_per_s", 1), _per_epoch(ours, "images_per_s", 1), ""),
        (f"epoch time s ({which})", _fmt(ref_s["epoch_seconds"]), _fmt(our_s["epoch_seconds"]),
         _times(vs["epoch_seconds"])),
        ("test accuracy per epoch", _per_epoch(ref, "test_accuracy", 4), _per_epoch(ours, "test_accuracy", 4), ""),
        ("final test accuracy", _fmt(ref_s["final_test_accuracy"], 4), _fmt(our_s["final_test_accuracy"], 4),
         f"{diff * 100:+.1f} points"),
        (f"time to {results['target_accuracy']:.2f} test accuracy", _to_target(ref_s), _to_target(our_s),
         _times(vs["time_to_target"])),
        ("test-set scoring s per epoch (not in training time)", _per_epoch(ref, "eval_seconds", 1),
         _per_epoch(ours, "eval_seconds", 1), ""),
        ("peak host RSS MB, main process", _fmt(ref["peak_rss_mb"]), _fmt(ours["peak_rss_mb"]),
         _times(vs["peak_rss_mb"])),
        ("peak host RSS MB, largest DataLoader worker (shared pages included)",
         _fmt(ref["peak_rss_worker_mb"]), _fmt(ours["peak_rss_worker_mb"]), ""),
        ("peak GPU MB (max_memory_allocated)", _fmt(ref["peak_gpu_allocated_mb"]),
         _fmt(ours["peak_gpu_allocated_mb"]), _times(vs["peak_gpu_allocated_mb"])),
    ]  # fmt: skip


def pipeline_markdown(pipeline: dict) -> list[str]:
    if "error" in pipeline:
        return ["", f"Pipeline run figures: not available ({pipeline['error']})."]
    lines = ["", "### Pipeline runs (Prefect records)", ""]
    lines += ["| retrain run | wall s | stages' own s | overhead s | overhead share |", "|---|---|---|---|---|"]
    for r in pipeline["retrain"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in {**r["stages_own_s"], **r["in_process_tasks_s"]}.items())
        lines.append(f"| {r['run']} | {r['wall_s']} | {r['own_s']} ({stages}) | {r['overhead_s']} | "
                     f"{r['overhead_share']:.1%} |")  # fmt: skip
    share = pipeline["mean_overhead_share"]
    lines += ["", "No finished retrain run found." if share is None else f"Mean orchestration overhead: {share:.1%}."]
    return lines


def render_markdown(results: dict) -> str:
    v = results["versions"]
    lines = [
        "## Training benchmark: the tutorial loop vs our training core",
        "",
        f"{results['date']} · device **{results['device']}** · {results['cpu_count']} CPUs · "
        f"torch {v.get('torch')}, torchvision {v.get('torchvision')}, timm {v.get('timm')} · "
        f"{results['train_images']:,} train images, {results['test_images']:,} test images, "
        f"{results['epochs']} epoch(s) each side",
        "",
        "| | reference | ours | ours / reference |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in comparison_rows(results)),
        "",
        f"Reference weights: {results['reference']['weights']}; {WEIGHTS_NOTE}.",
    ]
    if "pipeline" in results:
        lines += pipeline_markdown(results["pipeline"])
    if "incremental" in results:
        lines += ["", "### Incremental (bench/incremental.py)", "", "```json"]
        lines += [json.dumps(results["incremental"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(results: dict, out: Path | None) -> tuple[Path, Path]:
    """``<device-slug>-<date>.{json,md}`` in ``out``, bench/results/ (CUDA) or .cache/bench/ (CPU)."""
    on_cpu = results["device"] == "cpu"
    directory = out or (ROOT / ".cache" / "bench" if on_cpu else ROOT / "bench" / "results")
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{slug(results['device'])}-{results['date']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(results), encoding="utf-8")
    return json_path, md_path


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=4000, help="first N Fashion-MNIST train images")
    parser.add_argument("--test-images", type=int, default=10000, help="first N of the 10,000 test images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs, the same for both sides")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="test accuracy for time-to-target")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads on both sides")
    parser.add_argument("--num-workers", type=int, default=default_workers(), help="reference DataLoader workers")
    parser.add_argument("--ref-batch-size", type=int, default=None, help="reference batch (default: ours)")
    parser.add_argument("--ref-lr", type=float, default=0.001)
    parser.add_argument("--ref-image-size", type=int, default=224, help="reference Resize() side")
    parser.add_argument("--weights", default=None, help="resnet18 state_dict for the reference (default: none)")
    parser.add_argument("--params", type=Path, default=None, help="start ours from this params.yaml's train section")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides, ours")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench", help="where the PNG files go")
    parser.add_argument("--fmnist-cache", type=Path, default=ROOT / ".cache" / "fashion-mnist")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument(
        "--pipeline-run",
        nargs="?",
        const=DEFAULT_API,
        default=None,
        metavar="API",
        help=f"add per-stage times and orchestration overhead from a Prefect API ({DEFAULT_API})",
    )
    parser.add_argument("--incremental", action="store_true", help="add bench/incremental.py's result")
    parser.add_argument("--incremental-args", default="", help="arguments for bench/incremental.py, one string")
    return parser.parse_args(argv)  # fmt: skip


def options_from(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        epochs=args.epochs, target=args.target, device=args.device, threads=args.threads,
        num_workers=args.num_workers, ref_batch_size=args.ref_batch_size, ref_lr=args.ref_lr,
        ref_image_size=args.ref_image_size, weights=args.weights, overrides=parse_overrides(args.set),
        base=load_train_section(args.params) if args.params else {},
    )  # fmt: skip


def load_train_section(path: Path) -> dict:
    return load_params(path).train.model_dump()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        opts = options_from(args)
        opts.train_config()  # a bad --set fails here, before minutes of the reference loop
    except (BenchError, PipelineError, ValidationError) as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        data = prepare_fmnist(args.cache, args.fmnist_cache, args.train_images, args.test_images)
        results = run_benchmark(data, opts)
    except (BenchError, PipelineError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.pipeline_run:
        results["pipeline"] = pipeline_figures(args.pipeline_run)
    if args.incremental:
        results["incremental"] = incremental_figures(shlex.split(args.incremental_args))
    json_path, md_path = write_results(results, args.out)
    print(render_markdown(results))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
