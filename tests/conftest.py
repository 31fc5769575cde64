"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import copy_workspace, make_workspace


@pytest.fixture(scope="session")
def template_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One git + DVC workspace with this project's code, made once and copied by the tests."""
    return make_workspace(tmp_path_factory.mktemp("template") / "ws")


@pytest.fixture(scope="session")
def new_workspace(template_workspace: Path) -> Callable[..., Path]:
    """``new_workspace(root, params=None)``: a fresh copy of the template workspace at ``root``."""

    def make(root: Path, params: dict | None = None) -> Path:
        return copy_workspace(template_workspace, root, params)

    return make
