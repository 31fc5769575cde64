"""Why a labelled row cannot be used: one short reason code per cause, with a detail."""

from __future__ import annotations

from collections.abc import Sequence

BAD_FILENAME = "bad_filename"

PATH_OUTSIDE_BATCH = "path_outside_batch"

BLANK_LABEL = "blank_label"

UNKNOWN_LABEL = "unknown_label"

MISSING_FILE = "missing_file"

EMPTY_FILE = "empty_file"

EXTENSION_NOT_ALLOWED = "extension_not_allowed"

UNREADABLE = "unreadable"

FORMAT_NOT_ALLOWED = "format_not_allowed"

MODE_NOT_ALLOWED = "mode_not_allowed"

ANIMATED = "animated"

DECOMPRESSION_BOMB = "decompression_bomb"

TOO_SMALL = "too_small"

TOO_LARGE = "too_large"

DUPLICATE = "duplicate"

LABEL_CONFLICT = "label_conflict"

SPLIT_LEAK = "split_leak"


class RowProblem(Exception):
    """Why one labelled row cannot be used: a reason code and a human detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def normalise_label(label: str, classes: Sequence[str]) -> str:
    """The class a label names. Surrounding whitespace and letter case are normalised (labelling
    tools differ on both) when that matches exactly one class; anything else is rejected."""
    if label in classes:
        return label
    stripped = label.strip()
    if not stripped:
        raise RowProblem(BLANK_LABEL, "blank label")
    matches = [c for c in classes if c.casefold() == stripped.casefold()]
    if len(matches) == 1:
        return matches[0]
    raise RowProblem(
        UNKNOWN_LABEL,
        f"unknown label {label!r}; allowed: {', '.join(classes)} "
        "(a new class needs a change to 'classes' in params.yaml)",
    )
