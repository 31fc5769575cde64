"""init: a new pipeline workspace from a first folder of labelled images.

The folder has the layout of a landing batch (``labels.csv`` with path,label, or one
sub-folder per class). The classes come from its labels; the image sizes and modes are looked
at (headers only) to choose ``prepare.image_size`` and ``train.image_size``; params.yaml is
this project's, with those dataset keys set and each choice commented. The workspace is a git +
DVC repository holding the pipeline code (the stages run it, and ``dvc status`` follows it) and
the folder as its first landing batch, which the first ``ctl run`` ingests.

CLI: ``ctl init FOLDER --workspace NEW_DIR [--name MODEL_NAME]``.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import yaml

from tasks.common.config import parse_params
from tasks.common.dvc import run_dvc
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace
from tasks.data.landing import BATCH_NAME, BatchRejected, read_batch, resolve_inside
from tasks.data.rows import RowProblem

#: Where the pipeline's code, dvc.yaml, gx/ and the reference params.yaml live.
PROJECT = Path(__file__).resolve().parents[1]
#: Copied into every workspace: the stages' code and definitions, and the flows with their
#: prefect.yaml (the cluster profile's workers run the workspace's own copy).
CODE = ("tasks", "flows", "gx", "dvc.yaml", "prefect.yaml", ".gitignore", ".dvcignore")
EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Headers looked at to choose sizes: enough for a stable median, quick on a big folder.
SAMPLE = 2000
#: The stored side never exceeds this (memory: N x side^2 x 3 bytes in data/prepared).
MAX_STORED_SIDE = 128
#: Below this the backbone (stride 32) sees too few pixels: small images are upscaled to it.
MIN_INPUT_SIDE = 64
#: A small dataset gets more epochs, so the head sees at least this many optimizer steps
#: (3 epochs of 1,200 images at batch 128 are 30 steps: too few to fit a new head).
MIN_STEPS = 150
MAX_EPOCHS = 30


@dataclass
class DatasetSurvey:
    classes: tuple[str, ...]
    counts: dict[str, int]
    median_side: int
    modes: dict[str, int]
    unreadable: int = 0
    notes: list[str] = field(default_factory=list)


def survey(folder: Path) -> DatasetSurvey:
    """Classes with their counts, and the sizes and modes of (a sample of) the images."""
    from PIL import Image

    try:
        rows, notes = read_batch(folder, EXTENSIONS)
    except (BatchRejected, RowProblem) as exc:
        raise PipelineError(f"{folder}: {exc}") from None
    counts = Counter(row.label for row in rows)
    if len(counts) < 2:
        raise PipelineError(f"{folder}: found {len(counts)} class(es) {sorted(counts)}; a classifier needs 2 or more")
    sides, modes, unreadable = [], Counter(), 0
    step = max(1, len(rows) // SAMPLE)
    for row in rows[::step]:
        try:
            with Image.open(resolve_inside(folder, row.path)) as img:
                sides.append(min(img.size))
                modes[img.mode] += 1
        except (OSError, RowProblem):
            unreadable += 1
    if not sides:
        raise PipelineError(f"{folder}: none of the {len(rows)} labelled files opens as an image")
    classes = tuple(sorted(counts))
    return DatasetSurvey(classes, {c: counts[c] for c in classes}, int(median(sides)), dict(modes), unreadable, notes)


def choose_sizes(median_side: int) -> tuple[int, int]:
    """(prepare.image_size, train.image_size) for images whose median short side is ``median_side``.

    Stored at their own size up to MAX_STORED_SIDE (never upscaled on disk); the model input is
    at least MIN_INPUT_SIDE (a pretrained backbone needs that much) and at most the stored side
    beyond it: more pixels cost training time on a CPU without adding detail.
    """
    stored = max(8, min(median_side, MAX_STORED_SIDE))
    return stored, max(MIN_INPUT_SIDE, stored)


def choose_epochs(images: int, batch_size: int, train_fraction: float, default: int) -> int:
    """The default epochs, or more for a small dataset (at least MIN_STEPS steps, at most MAX_EPOCHS)."""
    steps_per_epoch = max(1, math.ceil(images * train_fraction / batch_size))
    return max(default, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))


def model_name_for(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug or 'image'}-classifier"


def set_param(text: str, key: str, value: str, comment: str) -> str:
    """``text`` (params.yaml) with ``key`` (``section.key`` or top level) set to the YAML ``value``
    and its comment replaced, keeping every other line and comment."""
    *section, name = key.split(".")
    indent = "  " if section else ""
    lines, inside = text.splitlines(), not section
    for i, line in enumerate(lines):
        if section and re.match(rf"^{re.escape(section[0])}:\s*(#.*)?$", line):
            inside = True
        elif section and inside and line and not line.startswith((" ", "#")):
            break
        elif inside and re.match(rf"^{indent}{re.escape(name)}:", line):
            lines[i] = f"{indent}{name}: {value}".ljust(32) + f"# {comment}"
            return "\n".join(lines) + "\n"
    raise PipelineError(f"params template has no key {key!r}")


def workspace_params(found: DatasetSurvey, model_name: str) -> str:
    stored, model_input = choose_sizes(found.median_side)
    smallest = min(found.counts.values())
    text = (PROJECT / "params.yaml").read_text(encoding="utf-8")
    header = (
        f"# Written by `ctl init`: {len(found.classes)} classes, {sum(found.counts.values())} images, "
        f"median short side {found.median_side} px, modes {found.modes}.\n"
        "# The dataset keys below were chosen from that; every other value is the project default.\n"
    )
    text = set_param(text, "classes", "[" + ", ".join(found.classes) + "]", "from the folder's labels")
    text = set_param(
        text, "prepare.image_size", str(stored), f"median short side {found.median_side} px, at most {MAX_STORED_SIDE}"
    )
    text = set_param(
        text, "train.image_size", str(model_input), f"at least {MIN_INPUT_SIDE} (backbone stride 32); = stored above"
    )
    text = set_param(text, "register.model_name", model_name, "the MLflow registered model")
    defaults = parse_params(yaml.safe_load(text))
    train_fraction = 1 - defaults.prepare.val_fraction - defaults.prepare.test_fraction
    epochs = choose_epochs(sum(found.counts.values()), defaults.train.batch_size, train_fraction, defaults.train.epochs)
    if epochs != defaults.train.epochs:
        text = set_param(text, "train.epochs", str(epochs), f"small dataset: at least {MIN_STEPS} optimizer steps")
        share = defaults.train.warm_start_epochs / defaults.train.epochs
        warm = max(defaults.train.warm_start_epochs, round(epochs * share))
        text = set_param(
            text, "train.warm_start_epochs", str(warm), f"small dataset: epochs x {share:.2g}, as in the defaults"
        )
    if smallest < 20:
        text = set_param(
            text, "validate.min_images_per_class", str(smallest), "lowered to the smallest class of the first folder"
        )
    parse_params(yaml.safe_load(text))  # what we write must load
    return header + text


def _git(root: Path, *args: str) -> None:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")


def _has_git_identity(root: Path) -> bool:
    proc = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True, text=True, check=False)
    return bool(proc.stdout.strip())


def batch_name_for(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-.") or "batch-001"
    return name if BATCH_NAME.match(name) else "batch-001"


@dataclass(frozen=True)
class InitResult:
    root: Path
    survey: DatasetSurvey
    batch: str
    model_name: str
    image_sizes: tuple[int, int]
    epochs: int


def create_workspace(folder: Path, root: Path, model_name: str | None = None) -> InitResult:
    """A new workspace at ``root`` (absent or empty) whose first landing batch is ``folder``."""
    folder, root = folder.resolve(), root.resolve()
    if not folder.is_dir():
        raise PipelineError(f"{folder} is not a folder of labelled images")
    if root.exists() and any(root.iterdir()):
        raise PipelineError(f"{root} exists and is not empty; choose a new directory")
    if root.is_relative_to(folder):
        raise PipelineError(f"the workspace {root} must not be inside the image folder {folder}")
    found = survey(folder)
    name = model_name or model_name_for(folder.name)
    params = workspace_params(found, name)
    root.mkdir(parents=True, exist_ok=True)
    for item in CODE:
        source = PROJECT / item
        if source.is_dir():
            shutil.copytree(source, root / item, ignore=shutil.ignore_patterns("__pycache__", "uncommitted"))
        elif source.is_file():
            shutil.copy2(source, root / item)
    (root / "params.yaml").write_text(params, encoding="utf-8")
    ws = Workspace(root)
    ws.benchmark.mkdir(parents=True)
    batch = batch_name_for(folder)
    # Symlinks stay symlinks: ingest refuses them (a batch may not point outside itself).
    shutil.copytree(folder, ws.landing / batch, symlinks=True)
    _git(root, "init", "-q")
    if not _has_git_identity(root):
        _git(root, "config", "user.name", "ctl init")
        _git(root, "config", "user.email", "ctl@localhost")
    run_dvc(["init"], root)
    run_dvc(["config", "core.analytics", "false"], root)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", f"ctl init from {folder.name}")
    epochs = parse_params(yaml.safe_load(params)).train.epochs
    return InitResult(root, found, batch, name, choose_sizes(found.median_side), epochs)


def describe(result: InitResult) -> str:
    found = result.survey
    stored, model_input = result.image_sizes
    counts = ", ".join(f"{c} {n}" for c, n in found.counts.items())
    largest, smallest = max(found.counts.values()), min(found.counts.values())
    lines = [
        f"workspace {result.root} (git + DVC) created",
        f"  classes ({len(found.classes)}): {counts}",
        f"  imbalance: largest/smallest class = {largest / smallest:.1f}",
        f"  images: median short side {found.median_side} px, modes {found.modes}"
        + (f", {found.unreadable} unreadable (ingest will quarantine them)" if found.unreadable else ""),
        f"  params.yaml: prepare.image_size {stored}, train.image_size {model_input}, "
        f"train.epochs {result.epochs}, register.model_name {result.model_name}",
        f"  first landing batch: landing/{result.batch}",
        *(f"  note: {note}" for note in found.notes),
        "next:",
        f"  ctl benchmark FOLDER -w {result.root}   (optional: a fixed benchmark set the gate judges on)",
        f"  ctl run -w {result.root}               (ingest, validate, train, evaluate, register, gate)",
    ]
    return "\n".join(lines)
