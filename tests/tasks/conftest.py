"""Shared fixtures for the tasks/ unit tests: tiny images, configs and a git + DVC workspace."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.common.config import PipelineConfig, parse_params
from tasks.common.workspace import Workspace


@pytest.fixture
def write_png() -> Callable[..., Path]:
    """Write a small PNG; ``seed`` makes the pixels (and so the file's hash) distinct."""

    def write(path: Path, size: tuple[int, int] = (8, 8), seed: int = 0, mode: str = "RGB") -> Path:
        rng = np.random.default_rng(seed)
        width, height = size
        shape = (height, width) if mode == "L" else (height, width, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
        return path

    return write


@pytest.fixture
def make_cfg() -> Callable[..., PipelineConfig]:
    """A validated config with classes ``a`` and ``b`` unless told otherwise."""

    def make(classes: tuple[str, ...] = ("a", "b"), **sections: dict) -> PipelineConfig:
        return parse_params({"classes": list(classes), **sections})

    return make


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args} failed: {proc.stderr or proc.stdout}"


@pytest.fixture
def dvc_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A fresh git + DVC repository with analytics and update checks off (no network)."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path / "ws"
    root.mkdir()
    _run(["git", "init", "--quiet"], root)
    _run([sys.executable, "-m", "dvc", "init", "--quiet"], root)
    (root / ".dvc" / "config.local").write_text("[core]\n    analytics = false\n    check_update = false\n")
    return Workspace(root)
