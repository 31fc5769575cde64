"""Integration: a user's own images, not Fashion-MNIST (scikit-learn's digits as PNG files in
class folders, RGB and palette mode), from a folder to a champion, a prediction CSV and an HTTP
prediction, through ``ctl`` as the README's "Your own data" walks it. Also the manual approval
policy through the Prefect API."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.data.digits import CLASSES, write_digits
from tests.helpers import registry_client, run, store_uri

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

MODEL = "digits-classifier"
cli = CliRunner()


def ctl(*args: str) -> object:
    return cli.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`ctl init` from 400 digits, a benchmark with a duplicate and a training image in it, one run."""
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("own")
    write_digits(root / "digits", size=32, per_class=40)
    write_digits(root / "bench", size=32, per_class=10, offset=40)
    shutil.copy(
        root / "bench" / "digit_3" / sorted(os.listdir(root / "bench" / "digit_3"))[0],
        root / "bench" / "digit_3" / "copy.png",
    )
    shutil.copy(
        root / "digits" / "digit_1" / sorted(os.listdir(root / "digits" / "digit_1"))[0],
        root / "bench" / "digit_1" / "seen.png",
    )
    ws = root / "ws"
    init = ctl("init", str(root / "digits"), "-w", str(ws))
    # Explicit floors: 400 images make a weak model; the derived floors are tested elsewhere.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    initial = {k: params[k] for k in ("classes", "prepare", "train")}
    text = (
        (ws / "params.yaml")
        .read_text()
        .replace("  min_accuracy: null", "  min_accuracy: 0.3")
        .replace("  min_macro_f1: null", "  min_macro_f1: 0.3")
    )
    (ws / "params.yaml").write_text(text)
    run(["git", "commit", "-qam", "test settings"], ws)
    bench = ctl("benchmark", str(root / "bench"), "-w", str(ws))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = retrain(workspace=str(ws))
    return {"root": root, "ws": ws, "init": init, "initial": initial, "bench": bench, "result": result}


def test_init_infers_classes_and_image_sizes_and_versions_the_workspace(own: dict) -> None:
    ws, init = own["ws"], own["init"]
    assert init.exit_code == 0, init.output
    assert "classes (10)" in init.output and "digit_0 40" in init.output
    assert own["initial"]["classes"] == list(CLASSES)
    assert own["initial"]["prepare"]["image_size"] == 32  # the images' own side
    assert own["initial"]["train"]["image_size"] == 64  # upscaled to what the backbone needs
    # 400 images: 30 epochs for 150 optimizer steps, and a warm start keeps the defaults' share (1 of 3)
    assert (own["initial"]["train"]["epochs"], own["initial"]["train"]["warm_start_epochs"]) == (30, 10)
    assert "ctl init from digits" in run(["git", "log", "--format=%s"], ws).stdout
    assert (ws / ".dvc" / "config").is_file() and (ws / "dvc.yaml").is_file() and (ws / "tasks").is_dir()
    assert sum(1 for _ in (ws / "landing" / "digits").rglob("*.png")) == 400
    again = ctl("init", str(own["root"] / "digits"), "-w", str(ws))
    assert again.exit_code == 2 and "not empty" in again.output and len(again.output.strip().splitlines()) == 1


def test_benchmark_drops_duplicates_and_training_images_with_a_report(own: dict) -> None:
    ws, bench = own["ws"], own["bench"]
    assert bench.exit_code == 0, bench.output
    assert "digit_3/copy.png: duplicate of digit_3/" in bench.output
    assert "digit_1/seen.png: also in the training data (landing/digits/digit_1/" in bench.output
    assert sum(1 for _ in (ws / "data" / "benchmark").rglob("*.png")) == 100
    assert (ws / "data" / "benchmark.dvc").is_file()
    report = json.loads((ws / "reports" / "gate_report.json").read_text())
    assert report["judged_on"] == ["benchmark"]  # the fixed set, not the small test split


def test_first_run_gives_a_champion_that_answers_with_class_names(own: dict) -> None:
    import mlflow

    from tasks.registry.tracking import mlflow_tracking

    ws = own["ws"]
    assert own["result"]["decision"]["action"] == "promote"
    assert str(registry_client(ws).get_model_version_by_alias(MODEL, "champion").version) == "1"
    png = io.BytesIO()
    Image.new("RGB", (200, 90), "white").save(png, format="PNG")
    with mlflow_tracking(store_uri(ws)):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [png.getvalue()]}), params={"top_k": 2})
    assert out.loc[0, "class"] in CLASSES and len(out.loc[0, "top_classes"]) == 2
    assert 0 < out.loc[0, "confidence"] <= 1


def odd_images(folder: Path) -> None:
    """Sizes and modes the training data never had, plus two files that are not images."""
    (folder / "nested").mkdir(parents=True)
    Image.new("RGBA", (300, 120), (0, 0, 0, 128)).save(folder / "wide_rgba.png")
    Image.new("L", (9, 9), 200).save(folder / "tiny_grey.png")
    Image.new("LA", (50, 70), (30, 255)).save(folder / "nested" / "grey_alpha.png")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("CMYK", (64, 64), (0, 0, 0, 255)).save(folder / "nested" / "cmyk.jpg")
    (folder / "not_an_image.png").write_bytes(b"hello")
    (folder / "empty.png").write_bytes(b"")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_scores_any_size_and_mode_and_reports_undecodable_files(own: dict, tmp_path: Path) -> None:
    odd_images(tmp_path / "odd")
    out = tmp_path / "odd.csv"
    result = ctl("predict", str(tmp_path / "odd"), "-w", str(own["ws"]), "--out", str(out), "--top-k", "3")
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert len(rows) == 7
    for name in ("wide_rgba.png", "tiny_grey.png", "grey_alpha.png", "sixteen_bit.png", "cmyk.jpg"):
        assert rows[name]["class"] in CLASSES and rows[name]["error"] == "", rows[name]
        assert len(rows[name]["top_k"].split()) == 3
    assert rows["not_an_image.png"]["class"] == "" and "not an image" in rows["not_an_image.png"]["error"]
    assert rows["empty.png"]["error"] == "empty file"


def test_predict_decodes_exactly_as_training_did(own: dict, tmp_path: Path) -> None:
    """The champion's classes for the benchmark files equal what evaluate predicted for them."""
    ws = own["ws"]
    out = tmp_path / "bench.csv"
    assert ctl("predict", str(ws / "data" / "benchmark"), "-w", str(ws), "--out", str(out)).exit_code == 0
    predicted = {Path(r["path"]).relative_to(ws / "data" / "benchmark").as_posix(): r["class"] for r in read_csv(out)}
    evaluated = {
        r["path"]: r["predicted"] for r in read_csv(ws / "reports" / "evaluation" / "predictions_benchmark.csv")
    }
    assert len(predicted) == 100 and predicted == evaluated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(own: dict) -> Iterator[str]:
    """`mlflow models serve -m models:/<name>@champion` on loopback, as the README runs it."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store_uri(own["ws"]),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
            else:
                pytest.fail(
                    f"mlflow models serve did not answer: {proc.stdout.read() if proc.poll() is not None else ''}"
                )
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_served_champion_answers_an_http_request_with_class_names(own: dict, served: str, tmp_path: Path) -> None:
    ws = own["ws"]
    files = sorted((ws / "data" / "benchmark").rglob("*.png"))[::25]
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]},
        "params": {"top_k": 2},
    }
    response = httpx.post(f"{served}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    out = tmp_path / "same.csv"
    assert ctl("predict", *map(str, files), "-w", str(ws), "--out", str(out)).exit_code == 0
    assert [a["class"] for a in answers] == [r["class"] for r in read_csv(out)]
    assert all(a["class"] in CLASSES and len(a["top_classes"]) == 2 for a in answers)


def test_decisions_are_refused_with_one_line_when_they_cannot_apply(own: dict) -> None:
    ws = str(own["ws"])
    on_champion = ctl("reject", "1", "--reason", "looks off", "-w", ws)
    assert on_champion.exit_code == 2 and "is the champion" in on_champion.output
    missing = ctl("approve", "7", "--reason", "sure", "-w", ws)
    assert missing.exit_code == 2 and "does not exist" in missing.output


# ---------------------------------------------------------------- manual approval


def manual_workspace(own: dict, root: Path, timeout_s: int) -> Path:
    """A copy of the trained workspace with an empty registry and ``gate.approval: manual``:
    the run re-registers the unchanged pipeline state (no stage runs) and reaches the gate."""
    ws = root / "ws"
    shutil.copytree(own["ws"], ws, symlinks=True, ignore=shutil.ignore_patterns("mlflow"))
    text = (ws / "params.yaml").read_text().replace("  approval: auto", "  approval: manual")
    text = text.replace("  approval_timeout_s: 86400", f"  approval_timeout_s: {timeout_s}")
    (ws / "params.yaml").write_text(text)
    run(["git", "commit", "-qam", "manual approval"], ws)
    return ws


def start_retrain(ws: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "flows.retrain", "--workspace", str(ws), "--skip-ingest"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_manual_policy_pauses_in_prefect_and_resumes_with_the_operators_decision(own: dict, tmp_path: Path) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from flows.approval import awaiting_path, resume_waiting_run
    from tasks.common.workspace import Workspace

    ws = manual_workspace(own, tmp_path, timeout_s=600)
    with start_retrain(ws) as proc:
        waiting = awaiting_path(Workspace(ws))
        deadline = time.monotonic() + 240
        while not waiting.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert waiting.is_file(), proc.stdout.read() if proc.poll() is not None else "no pause within 240 s"
        flow_run_id = UUID(json.loads(waiting.read_text())["flow_run_id"])
        time.sleep(2)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(flow_run_id).state.type.value == "PAUSED"
        assert (
            registry_client(ws).get_registered_model(MODEL).aliases.get("champion") is None
        )  # not before the decision
        assert resume_waiting_run(Workspace(ws), "1", True, "checked the confusion matrix") is not None
        output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    assert str(registry_client(ws).get_model_version_by_alias(MODEL, "champion").version) == "1"
    audit = [json.loads(line) for line in (ws / "mlflow" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "approve" and "checked the confusion matrix" in audit[-1]["reason"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.type.value == "COMPLETED"


def test_manual_policy_rejects_when_nobody_decides_in_time(own: dict, tmp_path: Path) -> None:
    ws = manual_workspace(own, tmp_path, timeout_s=3)
    with start_retrain(ws) as proc:
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert registry_client(ws).get_registered_model(MODEL).aliases.get("champion") is None
    audit = [json.loads(line) for line in (ws / "mlflow" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "reject" and "no decision within 3 s" in audit[-1]["reason"]


def test_predict_flow_scores_a_folder_and_is_a_deployment(own: dict, tmp_path: Path) -> None:
    from flows.deploy import build_deployments
    from flows.predict import predict_folder
    from tasks.common.config import load_params
    from tasks.common.workspace import Workspace

    ws = own["ws"]
    odd_images(tmp_path / "odd")
    result = predict_folder(workspace=str(ws), folder=str(tmp_path / "odd"))
    assert (result["scored"], result["failed"]) == (5, 2)
    assert Path(result["out"]).parent == ws / "predictions" and len(read_csv(Path(result["out"]))) == 7
    names = [d.name for d in build_deployments(Workspace(ws), load_params(ws / "params.yaml"))]
    assert names == ["watch-landing", "retrain", "predict"]
