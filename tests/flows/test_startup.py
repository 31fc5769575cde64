"""What a served flow run imports before Prefect marks it Running: each watch tick and each
triggered retrain starts a fresh process, so a heavy import there delays every one of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration

HEAVY = ("torch", "timm", "mlflow")


@pytest.mark.parametrize("module", ["flows.watch", "flows.retrain"])
def test_a_flow_module_imports_no_training_or_registry_stack(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""
