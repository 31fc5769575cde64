"""Whether a retrain starts from the champion, and which rows a warm start uses (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.model.warm_start import COMPATIBILITY_KEYS, ChampionFacts, StartDecision, decide_start, warm_rows

CURRENT = {
    "classes": "a,b",
    "prepare.image_size": "28",
    "train.backbone": "tf_efficientnet_lite0",
    "train.strategy": "partial",
    "train.frozen_stages": "3",
    "train.image_size": "64",
}
assert set(CURRENT) == set(COMPATIBILITY_KEYS)


def champion(**changes: object) -> ChampionFacts:
    facts = {
        "version": "4",
        "params": {**CURRENT, "train.lr": "0.003"},
        "batches": ("b1", "b2"),
        "warm_starts_in_row": 0,
    }
    return ChampionFacts(**{**facts, **changes})


def test_a_compatible_champion_with_new_batches_is_warm_started_from() -> None:
    decision = decide_start(CURRENT, champion(), ["b1", "b2", "b3"], enabled=True, full_every=5)

    assert decision == StartDecision("warm", "champion v4 + new batch(es) b3", "4", ("b1", "b2"), 1, ("b3",))
    assert StartDecision.from_record(decision.record()) == decision


def test_warm_starts_count_up_the_lineage_until_full_every_forces_a_full_retrain() -> None:
    assert decide_start(CURRENT, champion(warm_starts_in_row=2), ["b1", "b2", "b3"], True, 3).warm_starts_in_row == 3

    full = decide_start(CURRENT, champion(warm_starts_in_row=3), ["b1", "b2", "b3"], True, 3)

    assert full.mode == "full" and full.parent_version is None and full.warm_starts_in_row == 0
    assert "already warm start 3 in a row (train.warm_start_full_every 3)" in full.reason


@pytest.mark.parametrize(
    ("facts", "batches", "enabled", "reason"),
    [
        (champion(), ["b1", "b2", "b3"], False, "train.warm_start is null"),
        (None, ["b1"], True, "no champion yet"),
        (champion(unusable="predates the image-file model"), ["b1", "b2", "b3"], True, "v4 predates the image-file"),
        (champion(params={**CURRENT, "classes": "a,b,c"}), ["b1", "b2", "b3"], True, "v4 differs in classes"),
        (
            champion(params={**CURRENT, "train.image_size": "96", "train.backbone": "resnet18"}),
            ["b1", "b2", "b3"], True, "v4 differs in train.backbone, train.image_size",
        ),
        (champion(params={}), ["b1", "b2", "b3"], True, "differs in classes, prepare.image_size, train.backbone"),
        (champion(), ["b2", "b3"], True, "trained on batches no longer in the data: b1"),
        (champion(), ["b1", "b2"], True, "no new batches since champion v4: params or code changed"),
    ],
)  # fmt: skip
def test_anything_else_is_a_full_retrain_with_its_reason(
    facts: ChampionFacts | None, batches: list[str], enabled: bool, reason: str
) -> None:
    decision = decide_start(CURRENT, facts, batches, enabled, full_every=5)

    assert decision.mode == "full" and decision.parent_version is None
    assert reason in decision.reason


def test_params_outside_the_compatibility_keys_do_not_prevent_a_warm_start() -> None:
    facts = champion(params={**CURRENT, "train.lr": "0.1", "train.epochs": "9"})

    assert decide_start(CURRENT, facts, ["b1", "b2", "b3"], True, 5).mode == "warm"


def test_warm_rows_are_every_new_row_and_a_seeded_replay_sample() -> None:
    batch_ids = ["old"] * 100 + ["new"] * 20 + ["old"] * 50
    rows, new = warm_rows(batch_ids, {"old"}, replay=1.5, seed=7)

    assert new == 20 and len(rows) == 50
    assert set(range(100, 120)) <= set(rows)
    assert list(rows) == sorted(set(rows))  # ascending, no repeats
    again, _ = warm_rows(batch_ids, {"old"}, replay=1.5, seed=7)
    other, _ = warm_rows(batch_ids, {"old"}, replay=1.5, seed=8)
    np.testing.assert_array_equal(rows, again)
    assert set(rows) != set(other)


@pytest.mark.parametrize(("replay", "expected"), [(0.0, 20), (1.0, 40), (100.0, 170)])
def test_replay_is_capped_by_the_old_rows_there_are(replay: float, expected: int) -> None:
    batch_ids = ["old"] * 150 + ["new"] * 20

    rows, new = warm_rows(batch_ids, {"old"}, replay, seed=0)

    assert (new, len(rows)) == (20, expected)
