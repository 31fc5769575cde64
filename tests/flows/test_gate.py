"""Integration: the promotion gate against a real MLflow registry (SQLite in tmp_path).

One workspace goes through the story in order: a weak first champion; a challenger that
improves overall but destroys one class (rejected by the per-class guard); a clearly better
challenger (promoted, the old champion becomes ``previous``); a clearly worse one (rejected,
the champion does not move); a rollback. The audit log must hold the decisions in order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.common.config import load_params
from tasks.common.workspace import Workspace
from tests.helpers import TINY_CLASSES, registry_client, tiny_params, write_batch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

MODEL = "tiny-classifier"
#: A first champion that is mediocre but not degenerate: a linear head on frozen features,
#: trained briefly. (A constant predictor would have 100% recall on one class, which no
#: real challenger keeps.)
MODERATE = {"strategy": "feature_extraction", "epochs": 1, "lr": 0.002}
#: Settings that barely move a randomly initialised network: a clearly worse model.
BROKEN = {"weights": "none", "epochs": 1, "lr": 1e-6, "strategy": "fine_tune"}
#: Recall can move one image (about 5 points) per class on this small test split.
CLASS_GUARD = 0.1


def set_train(ws: Path, **train: object) -> None:
    params = tiny_params()
    params["gate"].update(min_accuracy=0.0, min_macro_f1=0.0, max_class_recall_drop=CLASS_GUARD)  # relative rules
    params["train"].update(train)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def aliases(ws: Path) -> dict[str, str]:
    return {alias: str(version) for alias, version in registry_client(ws).get_registered_model(MODEL).aliases.items()}


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, new_workspace: Callable[..., Path]) -> dict:
    from flows.retrain import retrain

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ws = new_workspace(tmp_path_factory.mktemp("gate") / "ws")
        write_batch(ws / "landing" / "batch-001", 300, seed=3)
        steps: dict = {}
        set_train(ws, **MODERATE)
        steps["first"] = retrain(workspace=str(ws))
        steps["per_class"] = destroy_one_class(ws)
        set_train(ws)  # the normal tiny settings: pretrained, two epochs
        steps["better"] = retrain(workspace=str(ws))
        set_train(ws, **BROKEN)
        steps["worse"] = retrain(workspace=str(ws))
        from tasks.registry.aliases import read_audit, rollback

        steps["rollback"] = rollback(load_params(ws / "params.yaml"), Workspace(ws), "worse on customer data")
        steps["audit"] = read_audit(Workspace(ws))
    return {"ws": ws, **steps}


def destroy_one_class(ws: Path) -> dict:
    """Gate a challenger whose test predictions are perfect except for the class the
    champion recalls best, whose recall it cuts by 30 points: better overall, one class
    destroyed. It keeps only images the champion also gets right, so every image it loses
    there is one the champion recalled: one-way evidence that the per-class test, on this
    split's ~20 images per class, can call significant."""
    from tasks.gate import run_gate

    evaluation = ws / "reports" / "evaluation" / "predictions_test.csv"
    original = evaluation.read_text()
    with evaluation.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    champion_recall = {
        c: np.mean([r["predicted"] == c for r in rows if r["actual"] == c]) for c in TINY_CLASSES
    }  # fmt: skip
    victim = max(champion_recall, key=champion_recall.get)
    other = next(c for c in TINY_CLASSES if c != victim)
    victims = [i for i, r in enumerate(rows) if r["actual"] == victim and r["predicted"] == victim]
    victims += [i for i, r in enumerate(rows) if r["actual"] == victim and r["predicted"] != victim]
    keep = set(victims[: int(len(victims) * max(0.0, champion_recall[victim] - 0.3))])
    for i, r in enumerate(rows):
        r["predicted"] = other if r["actual"] == victim and i not in keep else r["actual"]
    with evaluation.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    cfg = load_params(ws / "params.yaml")
    report = run_gate(cfg, Workspace(ws), "challenger-under-test")
    evaluation.write_text(original)
    return {"report": report, "victim": victim, "champion_recall": champion_recall[victim]}


def test_first_model_is_judged_on_floors_and_becomes_champion(story: dict) -> None:
    first = story["first"]
    assert first["decision"]["action"] == "promote"
    assert first["decision"]["from_version"] is None and first["decision"]["to_version"] == "1"


def test_per_class_guard_rejects_a_challenger_that_destroys_one_class(story: dict) -> None:
    report, victim = story["per_class"]["report"], story["per_class"]["victim"]
    assert story["per_class"]["champion_recall"] > 0.3 + CLASS_GUARD  # the champion did recall that class
    assert report.verdict == "reject"
    failed = [r.name for r in report.failures()]
    assert failed == [f"class_recall:{victim}"]  # better overall: only the class guard objects
    assert report.challenger["accuracy"] > report.champion["accuracy"]
    assert "challenger-only 0, one-sided p=" in report.failures()[0].detail
    # This workspace has no benchmark set: auto judges the test split, and says so.
    assert report.splits == ("test",) and report.selection.startswith("auto: no benchmark set was scored")


def test_better_challenger_is_promoted_and_old_champion_becomes_previous(story: dict) -> None:
    better = story["better"]
    assert better["decision"]["action"] == "promote"
    assert better["decision"]["from_version"] == "1" and better["decision"]["to_version"] == "2"
    version = registry_client(story["ws"]).get_model_version(MODEL, "2")
    assert version.tags["gate.verdict"] == "promote"
    run = registry_client(story["ws"]).get_run(version.run_id)
    assert run.data.tags["gate.verdict"] == "promote"
    artifacts = [a.path for a in registry_client(story["ws"]).list_artifacts(version.run_id, "gate")]
    assert artifacts == ["gate/gate_report.json"]


def test_worse_challenger_is_rejected_and_champion_does_not_move(story: dict) -> None:
    worse = story["worse"]
    assert worse["decision"]["action"] == "reject"
    assert worse["decision"]["from_version"] == worse["decision"]["to_version"] == "2"
    version = registry_client(story["ws"]).get_model_version(MODEL, "3")
    assert version.tags["gate.verdict"] == "reject"
    assert "max_accuracy_drop" in version.tags["rejected_reason"]
    gate = json.loads((story["ws"] / "reports" / "gate.json").read_text())
    assert gate["promoted"] is False
    assert gate["champion"]["accuracy"] > gate["challenger"]["accuracy"]
    assert gate["mcnemar"]["champion_only"] > gate["mcnemar"]["challenger_only"]


def test_rollback_restores_previous_champion_and_audit_is_in_order(story: dict) -> None:
    assert story["rollback"].from_version == "2" and story["rollback"].to_version == "1"
    assert aliases(story["ws"]) == {"champion": "1", "previous": "2", "challenger": "3"}
    actions = [(e["action"], e["candidate"], e["from_version"], e["to_version"]) for e in story["audit"]]
    assert actions == [
        ("promote", "1", None, "1"),
        ("promote", "2", "1", "2"),
        ("reject", "3", "2", "2"),
        ("rollback", "1", "2", "1"),
    ]
    assert story["audit"][-1]["reason"] == "worse on customer data"
    assert story["audit"][1]["actor"].startswith("prefect flow run ")
    assert all(e["at"] for e in story["audit"])


def test_registry_never_left_without_champion(story: dict) -> None:
    assert "champion" in aliases(story["ws"])


def test_status_and_history_cli(story: dict) -> None:
    import subprocess
    import sys

    ws = story["ws"]
    status = subprocess.run(
        [sys.executable, "-m", "tasks.promote", "status"], cwd=ws, capture_output=True, text=True, check=True
    ).stdout
    assert "v1" in status and "champion" in status and "gate=reject" in status
    history = subprocess.run(
        [sys.executable, "-m", "tasks.promote", "history"], cwd=ws, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [line.split()[1] for line in history] == ["promote", "promote", "reject", "rollback"]
    # The console script says the same, from any directory.
    ctl = str(Path(sys.executable).with_name("ctl"))
    for command, expected in (("status", status), ("history", "\n".join(history) + "\n")):
        out = subprocess.run([ctl, command, "-w", str(ws)], capture_output=True, text=True, check=True).stdout
        assert out == expected
