"""The label-noise screen: the decision on synthetic probabilities (tasks/data/noise.py), and what
it does to a real checked batch and its quarantine folder (tasks/label_noise.py), with a stand-in
champion that returns fixed probabilities. The real champion is in tests/flows/test_retrain.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.common.config import LabelNoiseConfig, PipelineConfig, parse_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, write_json
from tasks.common.workspace import Workspace
from tasks.data.landing import hash_batch, rejected_batches
from tasks.data.manifest import REJECTED_INFO
from tasks.data.noise import NoiseProfile, find_suspects, profile, screen
from tasks.data.screening import check_batch
from tasks.label_noise import LABEL_NOISE_SUSPECTED, SUSPECTS_FILE, SUSPECTS_PNG, release_batch, screen_labels
from tasks.registry.aliases import read_audit
from tests.helpers import TINY_CLASSES, write_batch

K = 3
ALPHA, TOLERANCE = LabelNoiseConfig().alpha, LabelNoiseConfig().tolerance  # the defaults


def probabilities(predicted: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Rows putting ``confidence`` on the predicted class and the rest evenly on the others."""
    out = np.full((len(predicted), K), (1 - confidence) / (K - 1))
    out[np.arange(len(predicted)), predicted] = confidence
    return out


def champion_with_errors(n: int, errors: int) -> NoiseProfile:
    """A champion wrong (and sure of it) on ``errors`` of ``n`` held-out images."""
    truth = np.arange(n) % K
    predicted = truth.copy()
    predicted[:errors] = (truth[:errors] + 1) % K
    return profile(truth, probabilities(predicted))


def batch(n: int, wrong: int, champion_errors: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Given labels and champion probabilities of a batch: ``wrong`` labels moved to the next
    class (the champion sees the true class), and ``champion_errors`` rows the champion gets wrong."""
    truth = np.arange(n) % K
    given = truth.copy()
    given[:wrong] = (truth[:wrong] + 1) % K
    predicted = truth.copy()
    predicted[n - champion_errors :] = (truth[n - champion_errors :] + 2) % K
    return given, probabilities(predicted)


def test_a_clean_batch_of_40_at_the_champions_own_error_rate_is_not_held() -> None:
    champion = champion_with_errors(1000, 50)
    assert champion.rate == 0.05
    labels, probs = batch(40, wrong=0, champion_errors=2)
    result = screen(labels, probs, champion, ALPHA, TOLERANCE)
    assert len(result.suspects) == 2 and result.rate == 0.05
    assert not result.noisy and result.p_value > 0.5


def test_a_batch_of_40_with_every_label_shifted_is_held() -> None:
    labels, probs = batch(40, wrong=40)
    result = screen(labels, probs, champion_with_errors(1000, 50), ALPHA, TOLERANCE)
    assert len(result.suspects) == 40
    assert result.noisy and result.p_value < 1e-20
    assert (result.predicted == (labels[result.suspects] + K - 1) % K).all()  # the true class, as the champion sees it


def test_a_batch_of_300_with_20_percent_flipped_labels_is_held() -> None:
    labels, probs = batch(300, wrong=60, champion_errors=15)
    result = screen(labels, probs, champion_with_errors(1000, 50), ALPHA, TOLERANCE)
    assert len(result.suspects) == 75
    assert result.noisy and result.p_value < 1e-6


@pytest.mark.parametrize("n", [5, 40])
def test_a_small_batch_with_one_suspect_is_not_held(n: int) -> None:
    labels, probs = batch(n, wrong=1)
    result = screen(labels, probs, champion_with_errors(1000, 0), ALPHA, TOLERANCE)
    assert len(result.suspects) == 1
    assert not result.noisy and result.p_value > ALPHA


def test_a_small_held_out_set_is_not_taken_for_a_perfect_champion() -> None:
    # 0 suspects in 30 held-out images says little: the rate tested against is its upper bound.
    tiny = champion_with_errors(30, 0)
    labels, probs = batch(3000, wrong=0, champion_errors=150)  # 5 %: an ordinary champion's mistakes
    assert not screen(labels, probs, tiny, ALPHA, TOLERANCE).noisy
    assert screen(labels, probs, champion_with_errors(10_000, 0), ALPHA, TOLERANCE).noisy


def test_confidence_is_per_class_as_in_confident_learning() -> None:
    # Class 0's held-out images get 0.95 on average, class 1's 0.6: 0.7 is confident for class 1 only.
    truth = np.array([0, 0, 1, 1, 2, 2])
    held_out = np.array([[0.95, 0.03, 0.02]] * 2 + [[0.2, 0.6, 0.2]] * 2 + [[0.1, 0.1, 0.8]] * 2)
    champion = profile(truth, held_out)
    np.testing.assert_allclose(champion.thresholds, [0.95, 0.6, 0.8])
    rows = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    assert find_suspects(np.array([2, 2]), rows, champion.thresholds).tolist() == [1]
    assert find_suspects(np.array([2, 2]), rows, np.full(K, 0.65)).tolist() == [0, 1]  # one number for all


# ---------------------------------------------------------------- on a checked batch


class StandIn:
    """A champion returning fixed probabilities: the true class of imgNNNN.png is NNNN % 3 (as
    tests.helpers.write_batch draws it), seen with 0.9."""

    version, split = "7", "test"

    def __init__(self) -> None:
        self.profile = champion_with_errors(1000, 20)

    def probabilities(self, files: list[Path], batch: str = "") -> np.ndarray:
        return probabilities(np.array([int(f.stem.removeprefix("img")) % K for f in files]))

    def pixels(self, file: Path) -> np.ndarray:
        return np.zeros((16, 16, 3), dtype=np.uint8)


def config(action: str, max_bad_fraction: float = 0.2) -> PipelineConfig:
    return parse_params({
        "classes": TINY_CLASSES,
        "ingest": {"max_bad_fraction": max_bad_fraction, "label_noise": {"action": action}},
    })  # fmt: skip


def checked(root: Path, n: int, wrong: int, cfg: PipelineConfig) -> tuple[Path, object]:
    """A landing batch of ``n`` images whose first ``wrong`` labels are moved to the next class, checked."""
    shifted = {i: TINY_CLASSES[(i + 1) % K] for i in range(wrong)}
    batch_dir = write_batch(root / "landing" / "b1", n, labels_override=shifted)
    rows, _, _ = hash_batch(batch_dir, cfg)
    return batch_dir, check_batch(rows, cfg, {})


def test_hold_mode_holds_the_whole_batch_and_lists_its_suspects(tmp_path: Path) -> None:
    cfg, ws = config("hold"), Workspace(tmp_path)
    batch_dir, check = checked(tmp_path, 30, 6, cfg)
    out = screen_labels(batch_dir, check, cfg, ws, StandIn())
    assert out is not None and out.held is not None
    assert out.held.reason == LABEL_NOISE_SUSPECTED and "ctl release b1 --reason" in out.held.detail
    assert len(check.accepted) == 30 and not check.quarantined  # nothing moved: the batch waits whole
    out.write(ws.quarantine / "b1")
    with (ws.quarantine / "b1" / SUSPECTS_FILE).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["source_path"] for r in rows) == [f"img{i:04d}.png" for i in range(6)]
    assert all(r["predicted"] == TINY_CLASSES[int(r["source_path"][3:7]) % K] for r in rows)
    assert (ws.quarantine / "b1" / SUSPECTS_PNG).read_bytes().startswith(b"\x89PNG")


def test_quarantine_rows_mode_quarantines_only_the_suspects(tmp_path: Path) -> None:
    cfg = config("quarantine_rows")
    batch_dir, check = checked(tmp_path, 60, 9, cfg)
    out = screen_labels(batch_dir, check, cfg, Workspace(tmp_path), StandIn())
    assert out is not None and out.result.noisy and out.held is None
    assert sorted(q.item.row.path for q in check.quarantined) == [f"img{i:04d}.png" for i in range(9)]
    assert {q.reason for q in check.quarantined} == {LABEL_NOISE_SUSPECTED}
    assert "champion v7 says" in check.quarantined[0].detail
    assert sorted(a.item.row.path for a in check.accepted) == [f"img{i:04d}.png" for i in range(9, 60)]


def test_quarantine_rows_mode_holds_a_batch_that_is_mostly_suspects(tmp_path: Path) -> None:
    cfg = config("quarantine_rows", max_bad_fraction=0.2)
    batch_dir, check = checked(tmp_path, 30, 30, cfg)
    out = screen_labels(batch_dir, check, cfg, Workspace(tmp_path), StandIn())
    assert out is not None and out.held is not None and len(check.accepted) == 30


def test_a_passing_batch_gets_a_note_and_no_quarantine(tmp_path: Path) -> None:
    cfg = config("hold")
    batch_dir, check = checked(tmp_path, 30, 0, cfg)
    out = screen_labels(batch_dir, check, cfg, Workspace(tmp_path), StandIn())
    assert out is not None and not out.result.noisy and out.held is None
    assert check.notes[-1].startswith("label-noise screen passed: 0 of 30 rows suspect")


def test_the_screen_is_skipped_without_champion_when_off_and_for_a_released_batch(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    batch_dir, check = checked(tmp_path, 9, 9, config("hold"))
    assert screen_labels(batch_dir, check, config("hold"), ws, None) is None
    assert screen_labels(batch_dir, check, config("off"), ws, StandIn()) is None
    write_json(ws.quarantine / "b1" / "released.json", {"actor": "cli:ops", "reason": "labels checked", "at": "t"})
    assert screen_labels(batch_dir, check, config("hold"), ws, StandIn()) is None
    assert check.notes[-1] == "label-noise screen skipped: released by cli:ops: labels checked"


def hold(ws: Workspace, name: str, reason: str = LABEL_NOISE_SUSPECTED) -> None:
    write_json(ws.quarantine / name / REJECTED_INFO, {"batch_id": name, "reason": reason, "detail": "d"})
    write_json(ws.quarantine / name / "label_noise.json", {"champion_version": "3", "n": 40, "suspects": 40,
                                                           "rate": 1.0, "p_value": 1e-30})  # fmt: skip


def test_release_lets_the_next_ingest_take_a_held_batch_and_is_audited(tmp_path: Path) -> None:
    ws, cfg = Workspace(tmp_path), config("hold")
    hold(ws, "b1")
    assert rejected_batches(ws.quarantine) == {"b1"}
    message = release_batch(cfg, ws, "b1", "labels checked by hand")
    assert message.startswith("released b1")
    assert rejected_batches(ws.quarantine) == set()
    record = read_json(ws.quarantine / "b1" / "released.json")
    assert record["reason"] == "labels checked by hand" and record["actor"].startswith("cli:")
    (entry,) = read_audit(ws)
    assert entry["action"] == "release" and entry["reason"] == "labels checked by hand"
    assert entry["numbers"] == {"batch": "b1", "n": 40, "suspects": 40, "rate": 1.0, "p_value": 1e-30}
    assert entry["from_version"] == entry["to_version"] == "3"


def test_release_refuses_with_one_line(tmp_path: Path) -> None:
    ws, cfg = Workspace(tmp_path), config("hold")
    hold(ws, "held")
    hold(ws, "broken", reason="too_many_bad_rows")
    for batch, reason, expected in [
        ("held", " ", "a release needs a reason (--reason)"),
        ("nope", "x", "batch 'nope' is not held; held batches: held"),
        ("broken", "x", "batch 'broken' was rejected (too_many_bad_rows), not held for label noise"),
    ]:
        with pytest.raises(PipelineError) as info:
            release_batch(cfg, ws, batch, reason)
        assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    release_batch(cfg, ws, "held", "fine")
    with pytest.raises(PipelineError, match="batch 'held' was already released by cli:"):
        release_batch(cfg, ws, "held", "again")
    assert [e["action"] for e in read_audit(ws)] == ["release"]


def test_suspects_csv_never_holds_a_live_spreadsheet_formula(tmp_path: Path) -> None:
    cfg = parse_params({"classes": ["=cmd()", "+b", "c"], "ingest": {"label_noise": {"action": "hold"}}})
    batch_dir = write_batch(tmp_path / "landing" / "b1", 6, labels_override={i: "+b" for i in range(6)})
    check = check_batch(hash_batch(batch_dir, cfg)[0], cfg, {})
    stand_in = StandIn()
    stand_in.probabilities = lambda files, batch="": probabilities(np.zeros(len(files), dtype=int))  # "=cmd()"
    out = screen_labels(batch_dir, check, cfg, Workspace(tmp_path), stand_in)
    assert out is not None and out.held is not None
    out.write(tmp_path / "q")
    text = (tmp_path / "q" / SUSPECTS_FILE).read_text()
    assert "'+b,'=cmd()," in text and ",+b" not in text and ",=cmd" not in text
    assert json.loads((tmp_path / "q" / "label_noise.json").read_text())["suspects"] == 6
