"""Test helpers: generated images and throwaway pipeline workspaces (git + DVC repos)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import yaml
from PIL import Image

if TYPE_CHECKING:
    from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY_CLASSES = ["red", "green", "blue"]


def make_images(n: int, seed: int = 0, size: int = 16) -> tuple[list[np.ndarray], list[str]]:
    """Images whose class is their dominant colour channel, plus noise: easy but not trivial."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        k = i % len(TINY_CLASSES)
        img = rng.integers(0, 90, size=(size, size, 3))
        img[..., k] += 120 + rng.integers(0, 40)
        images.append(img.clip(0, 255).astype(np.uint8))
        labels.append(TINY_CLASSES[k])
    return images, labels


def write_batch(batch_dir: Path, n: int, seed: int = 0, labels_override: dict[int, str] | None = None) -> Path:
    """A landing batch with labels.csv; ``labels_override`` replaces some rows' labels."""
    batch_dir.mkdir(parents=True)
    images, labels = make_images(n, seed)
    with (batch_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(img).save(batch_dir / f"img{i:04d}.png")
            writer.writerow([f"img{i:04d}.png", (labels_override or {}).get(i, label)])
    return batch_dir


def tiny_params() -> dict:
    """The repository's params.yaml, shrunk to run in seconds on tiny images."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["classes"] = TINY_CLASSES
    params["prepare"].update(image_size=16, val_fraction=0.15, test_fraction=0.2)
    params["train"].update(
        epochs=2, batch_size=32, image_size=32, strategy="partial", frozen_stages=2, lr=0.003, num_threads=2
    )
    params["validate"].update(min_images_per_class=5)
    params["register"].update(model_name="tiny-classifier")
    params["gate"].update(min_accuracy=0.6, min_macro_f1=0.6)
    return params


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=check)


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


def make_workspace(root: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC repository holding this project's code, dvc.yaml and tiny params."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "ci@example.invalid"], root)
    run(["git", "config", "user.name", "ci"], root)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    (root / "data" / "benchmark").mkdir(parents=True)
    (root / "landing").mkdir()
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "workspace"], root)
    return root


def copy_workspace(template: Path, root: Path, params: dict | None = None) -> Path:
    """A copy of a workspace made by ``make_workspace`` (much cheaper than a fresh git + DVC
    init), with ``params`` committed when given."""
    shutil.copytree(template, root, symlinks=True)
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "commit", "-qam", "params"], root)
    return root


def store_uri(ws: Path) -> str:
    """The workspace's default MLflow store."""
    return f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"


def registry_client(ws: Path) -> MlflowClient:
    """An MLflow client on the workspace's store, without setting MLflow's global tracking URI."""
    from mlflow import MlflowClient

    return MlflowClient(store_uri(ws), store_uri(ws))


#: Audit events that open a file or list a directory; the first argument is the path.
_OPEN_EVENTS = {"open", "os.listdir", "os.scandir"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_recording: list[list[Opened]] = []


class Opened(NamedTuple):
    path: Path  # symlinks resolved at the time of the call
    write: bool


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _recording or event not in _OPEN_EVENTS or not args or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = os.fsdecode(args[0])
    try:  # resolved now, while the symlinks are as the code under test followed them
        path = os.path.realpath(path)
    except (OSError, ValueError):  # the call itself fails on such a path; never change what it does
        path = os.path.abspath(path)
    mode, flags = (args[1], args[2]) if event == "open" and len(args) == 3 else (None, 0)
    write = bool(isinstance(mode, str) and set(mode) & set("wax+")) or bool((flags or 0) & _WRITE_FLAGS)
    _recording[-1].append(Opened(Path(path), write))


@contextmanager
def recorded_opens() -> Iterator[list[Opened]]:
    """Every path this process opens (to read or write) or lists while the block runs (an audit hook)."""
    if not getattr(sys, "_tests_open_audit", False):  # an audit hook cannot be removed: install it once
        sys.addaudithook(_audit)
        sys._tests_open_audit = True  # type: ignore[attr-defined]
    opened: list[Opened] = []
    _recording.append(opened)
    try:
        yield opened
    finally:
        _recording.remove(opened)
