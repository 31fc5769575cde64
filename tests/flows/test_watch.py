"""Integration: watch-landing ticks (Prefect's test harness, a real git + DVC workspace) with a
misnamed folder in the landing zone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.common.files import read_json
from tasks.common.workspace import Workspace
from tests.helpers import write_batch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def artifact_text(flow_run_id: object) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["ingest-problems"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return [str(a.data) for a in found]


def test_a_misnamed_folder_fails_the_first_tick_only_and_never_blocks_good_batches(
    tmp_path: Path, new_workspace: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.watch import watch_landing

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    ws = Workspace(new_workspace(tmp_path / "ws"))
    write_batch(ws.landing / "b1", 12, seed=1)
    write_batch(ws.landing / "bad name", 12, seed=2)

    first = watch_landing(workspace=str(ws.root), return_state=True)

    assert first.is_failed() and "invalid batch name(s) skipped: ['bad name']" in first.message
    assert (ws.raw / "b1" / "manifest.csv").is_file()
    assert read_json(ws.cache / "announced.json")["batch_ids"] == ["b1"]  # announced before failing
    [text] = artifact_text(first.state_details.flow_run_id)
    assert "| `bad name` | **skipped**: not a valid batch name |" in text

    second = watch_landing(workspace=str(ws.root), return_state=True)

    assert second.is_completed()  # the same folder again: a warning, not a failed tick every interval
    assert artifact_text(second.state_details.flow_run_id) == []

    write_batch(ws.landing / "also bad", 12, seed=3)
    third = watch_landing(workspace=str(ws.root), return_state=True)

    assert third.is_failed() and "['also bad']" in third.message and "'bad name'" not in third.message
