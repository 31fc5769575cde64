"""Sorting a new batch's rows into accepted and quarantined, before anything is copied."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tasks.common.config import PipelineConfig
from tasks.data.images import ImageInfo, check_image
from tasks.data.landing import _Row
from tasks.data.rows import DUPLICATE, EXTENSION_NOT_ALLOWED, LABEL_CONFLICT, SPLIT_LEAK, RowProblem, normalise_label


@dataclass(frozen=True)
class KnownImage:
    label: str
    where: str  # batch/source path, for messages
    benchmark: bool = False


@dataclass(frozen=True)
class Accepted:
    item: _Row
    label: str  # the class name, after normalisation
    info: ImageInfo


@dataclass(frozen=True)
class Quarantined:
    item: _Row
    reason: str
    detail: str


@dataclass
class BatchCheck:
    accepted: list[Accepted] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        total = len(self.accepted) + len(self.quarantined)
        return len(self.quarantined) / total if total else 0.0

    def reasons(self) -> Counter[str]:
        return Counter(q.reason for q in self.quarantined)


def _check_row(item: _Row, cfg: PipelineConfig) -> Accepted:
    if item.problem:
        raise item.problem
    label = normalise_label(item.row.label, cfg.classes)
    assert item.source is not None
    if item.source.suffix.lower() not in cfg.ingest.image_extensions:
        raise RowProblem(
            EXTENSION_NOT_ALLOWED, f"extension not allowed; allowed: {', '.join(cfg.ingest.image_extensions)}"
        )
    return Accepted(item, label, check_image(item.source, cfg.validate_))


def _against_known(accepted: Accepted, known: KnownImage) -> RowProblem:
    if known.benchmark:
        return RowProblem(SPLIT_LEAK, f"same image as benchmark image {known.where}: the benchmark must stay unseen")
    if known.label != accepted.label:
        return RowProblem(
            LABEL_CONFLICT, f"labelled {accepted.label!r} but the same image is {known.label!r} in {known.where}"
        )
    return RowProblem(DUPLICATE, f"same image already ingested as {known.where}")


def check_batch(rows: list[_Row], cfg: PipelineConfig, known: dict[str, KnownImage]) -> BatchCheck:
    """Sort a batch's rows into accepted and quarantined (with the reason).

    ``known`` maps the pixel hash of every image ingested so far, and of the benchmark, to
    where it is: the same picture again is a duplicate, a label conflict or a split leak.
    Rows of one batch that show the same picture under different labels are all quarantined:
    nothing says which label is right.
    """
    result = BatchCheck()
    candidates: list[Accepted] = []
    for item in rows:
        try:
            candidates.append(_check_row(item, cfg))
        except RowProblem as problem:
            result.quarantined.append(Quarantined(item, problem.reason, problem.detail))
    labels_in_batch: dict[str, set[str]] = {}
    for acc in candidates:
        labels_in_batch.setdefault(acc.info.pixel_sha256, set()).add(acc.label)
    seen: dict[str, Accepted] = {}
    for acc in candidates:
        pixels = acc.info.pixel_sha256
        if len(labels_in_batch[pixels]) > 1:
            problem = RowProblem(
                LABEL_CONFLICT, f"the same image has labels {sorted(labels_in_batch[pixels])} in this batch"
            )
        elif pixels in known:
            problem = _against_known(acc, known[pixels])
        elif pixels in seen and seen[pixels].item.source == acc.item.source:
            problem = RowProblem(DUPLICATE, f"the same file listed again (first as {seen[pixels].item.row.path!r})")
        elif pixels in seen:
            problem = RowProblem(DUPLICATE, f"same image as {seen[pixels].item.row.path} in this batch")
        else:
            seen[pixels] = acc
            result.accepted.append(acc)
            continue
        result.quarantined.append(Quarantined(acc.item, problem.reason, problem.detail))
    normalised = [a for a in result.accepted if a.label != a.item.row.label]
    if normalised:
        first = normalised[0]
        example = f"{first.item.row.label!r} -> {first.label!r}"
        result.notes.append(f"{len(normalised)} label(s) normalised for whitespace/case, e.g. {example}")
    return result


def too_many_bad(check: BatchCheck, cfg: PipelineConfig) -> str | None:
    """Why the whole batch is rejected, or None when its good rows can be ingested."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in check.reasons().most_common())
    if not check.accepted:
        return f"no row of the batch is usable: {reasons}"
    if check.bad_fraction > cfg.ingest.max_bad_fraction:
        return (
            f"{len(check.quarantined)} of {len(check.accepted) + len(check.quarantined)} rows are bad "
            f"({check.bad_fraction:.0%} > max_bad_fraction {cfg.ingest.max_bad_fraction:.0%}): {reasons}"
        )
    return None
