"""Whether a retrain starts from the champion, and which images a warm start trains on. Pure logic.

A warm start fine-tunes the champion on the images of the batches it has not seen plus a seeded
replay sample of those it has, instead of training the pretrained backbone on everything again.
The decision is made by the ``parent`` step (tasks/parent.py) from the champion's registry
record and written to ``data/parent``; the train stage reads it back (``warm_rows``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

#: The params that make two models the same task with the same architecture and inputs: a
#: champion that differs in any of them is no start for a warm start (run params, flattened).
COMPATIBILITY_KEYS = (
    "classes",
    "prepare.image_size",
    "train.backbone",
    "train.strategy",
    "train.frozen_stages",
    "train.image_size",
)


#: Registry tags a version carries about its start (tasks/registry/lineage.py writes them).
WARM_STARTS_TAG = "warm_starts_in_row"
PARENT_TAG = "parent_version"
START_TAG = "training_start"


@dataclass(frozen=True)
class ChampionFacts:
    """What the registry says of the champion, as the decision needs it."""

    version: str
    #: Its run's params, flattened as MLflow keeps them (strings).
    params: Mapping[str, str]
    #: The batches its training data held.
    batches: tuple[str, ...]
    #: How many warm starts in a row led to it (0: trained in full).
    warm_starts_in_row: int = 0
    #: Why its weights cannot be used, if they cannot (an older registry format).
    unusable: str = ""


@dataclass(frozen=True)
class StartDecision:
    mode: Literal["warm", "full"]
    reason: str
    parent_version: str | None = None
    #: The parent's batches: their images are replayed, the others are new.
    parent_batches: tuple[str, ...] = ()
    #: Counting this one: train.warm_start_full_every of them in a row force a full retrain.
    warm_starts_in_row: int = 0
    new_batches: tuple[str, ...] = field(default=())

    def record(self) -> dict[str, Any]:
        """As JSON holds it (lists, not tuples), so a record compares equal to its reread self."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StartDecision:
        fields = {**record}
        for key in ("parent_batches", "new_batches"):
            fields[key] = tuple(fields.get(key) or ())
        return cls(**{k: fields[k] for k in cls.__dataclass_fields__ if k in fields})


def decide_start(
    current: Mapping[str, str],
    champion: ChampionFacts | None,
    batches: Sequence[str],
    enabled: bool,
    full_every: int,
) -> StartDecision:
    """Warm-start from ``champion`` when it is the same task, saw only batches still in the data,
    and new batches arrived; else a full retrain, with the reason. ``current``: this run's
    flattened params for ``COMPATIBILITY_KEYS``."""
    if not enabled:
        return StartDecision("full", "train.warm_start is null: every retrain starts from the pretrained weights")
    if champion is None:
        return StartDecision("full", "no champion yet")
    v = f"champion v{champion.version}"
    if champion.unusable:
        return StartDecision("full", f"{v} {champion.unusable}")
    differs = [k for k in COMPATIBILITY_KEYS if champion.params.get(k) != current[k]]
    if differs:
        return StartDecision("full", f"{v} differs in {', '.join(differs)}")
    gone = sorted(set(champion.batches) - set(batches))
    if gone:
        return StartDecision("full", f"{v} was trained on batches no longer in the data: {', '.join(gone)}")
    new = tuple(b for b in batches if b not in set(champion.batches))
    if not new:
        return StartDecision("full", f"no new batches since {v}: params or code changed, so a full retrain")
    if champion.warm_starts_in_row + 1 > full_every:
        return StartDecision(
            "full", f"{v} is already warm start {champion.warm_starts_in_row} in a row "
            f"(train.warm_start_full_every {full_every}): a full retrain",
        )  # fmt: skip
    return StartDecision(
        "warm", f"{v} + new batch(es) {', '.join(new)}", champion.version, tuple(sorted(champion.batches)),
        champion.warm_starts_in_row + 1, new,
    )  # fmt: skip


def warm_rows(
    batch_ids: Sequence[str], parent_batches: Collection[str], replay: float, seed: int
) -> tuple[np.ndarray, int]:
    """(indices of the train rows a warm start uses, ascending; how many of them are new): every
    row of a batch the parent did not see, plus a seeded sample of ``replay`` old rows per new
    one (all old rows if fewer)."""
    seen = np.fromiter((b in parent_batches for b in batch_ids), dtype=bool, count=len(batch_ids))
    new, old = np.flatnonzero(~seen), np.flatnonzero(seen)
    n_replay = min(len(old), round(replay * len(new)))
    replayed = np.random.default_rng(seed).choice(old, size=n_replay, replace=False) if n_replay else old[:0]
    return np.sort(np.concatenate([new, replayed])), len(new)
