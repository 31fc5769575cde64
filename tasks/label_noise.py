"""The label-noise screen at ingest, and the release of a batch it held.

Ingest loads the champion once per run (``load_champion``: None without one, and the screen is
skipped) and calls ``screen_labels`` for each new batch after its row checks, before anything is
copied. The champion (registry alias ``champion``) scores the batch's accepted rows, decoding each
file as the prepare stage does; its yardstick is its own predictions on the held-out images its
run evaluated (the benchmark unless the gate judges on the test split), measured the same way
(tasks/data/noise.py). A noisy batch is held (rejected with reason ``label_noise_suspected``) or
loses only its suspect rows, as ``ingest.label_noise.action`` says; either way its suspects are
in ``data/quarantine/<batch>/suspects.csv`` and ``suspects.png``.

``python -m tasks.label_noise release BATCH --reason "..."`` (``ctl release``) lets the next ingest
take a held batch without the screen (its other checks still apply); the audit log records it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, spreadsheet_safe, write_json
from tasks.common.stage import setup_cli_logging
from tasks.common.workspace import Workspace, workspace_lock
from tasks.data.landing import BatchRejected, printable
from tasks.data.manifest import REJECTED_INFO, RELEASED_INFO
from tasks.data.noise import NoiseProfile, NoiseScreen, profile, screen
from tasks.data.screening import Accepted, BatchCheck, Quarantined
from tasks.data.splits import BENCHMARK
from tasks.registry.aliases import AuditEntry, append_audit, current_actor
from tasks.registry.tracking import CHAMPION, alias_version, has_registry, mlflow_tracking, tracking_uri

log = logging.getLogger(__name__)

LABEL_NOISE_SUSPECTED = "label_noise_suspected"
SUSPECTS_FILE = "suspects.csv"
SUSPECTS_PNG = "suspects.png"
SUSPECTS_COLUMNS = ("source_path", "label", "predicted", "confidence")
#: The screen's numbers for a noisy batch (read back by a release, for the audit log).
SCREEN_INFO = "label_noise.json"
#: Images decoded and scored at a time; a progress line after each chunk of a larger batch.
SCORE_CHUNK = 512
THUMBNAILS = 32


class Champion:
    """The registered champion as the screen uses it: its yardstick and its probabilities for files."""

    def __init__(self, version: str, split: str, yardstick: NoiseProfile, model: Any) -> None:
        self.version, self.split, self.profile, self.model = version, split, yardstick, model

    def pixels(self, file: Path) -> np.ndarray | None:
        """The file as the champion sees it (stored-size uint8 RGB), or None when it cannot decode it."""
        from tasks.model.serving import ImageRejected, decode_for_model

        try:
            return decode_for_model(file.read_bytes(), self.model.decoding)
        except (ImageRejected, OSError) as exc:
            log.warning("label-noise screen: %s not scored: %s", file.name, exc)
            return None

    def probabilities(self, files: list[Path], batch: str = "") -> np.ndarray:
        """(N, classes); a file the champion cannot decode gets zeros (never a suspect)."""
        out = np.zeros((len(files), len(self.model.classes)))
        for start in range(0, len(files), SCORE_CHUNK):
            chunk = [self.pixels(f) for f in files[start : start + SCORE_CHUNK]]
            rows = [i for i, p in enumerate(chunk) if p is not None]
            if rows:
                out[[start + i for i in rows]] = self.model.probabilities(np.stack([chunk[i] for i in rows]))
            if len(files) > SCORE_CHUNK:
                done = min(start + SCORE_CHUNK, len(files))
                log.info("label-noise screen of %s: %d of %d images scored", batch, done, len(files))
        return out


def _held_out_split(client: Any, run_id: str, judge_on: str) -> str | None:
    """The benchmark when the champion's run scored one (and the gate may judge on it), else the
    test split; None when the run logged neither."""
    files = {Path(f.path).name: f for f in client.list_artifacts(run_id, "evaluation")}
    for split in (BENCHMARK, "test") if judge_on != "test" else ("test",):
        found = files.get(f"predictions_{split}.csv")
        if found is not None and (found.file_size or 0) > 0:
            return split
    return None


def _read_held_out(client: Any, run_id: str, split: str, classes: tuple[str, ...]) -> Any:
    from tasks.model.predictions import read_predictions

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"evaluation/predictions_{split}.csv", tmp)
        return read_predictions(Path(path), classes)


def load_champion(cfg: PipelineConfig, ws: Workspace) -> Champion | None:
    """The champion and its yardstick; None (the screen is skipped) when there is none to use."""
    noise = cfg.ingest.label_noise
    if noise.action == "off":
        return None
    if not has_registry(ws):
        log.info("label-noise screen skipped: no champion yet (no model registry in %s)", ws.mlflow)
        return None
    name = cfg.register_.model_name
    with mlflow_tracking(tracking_uri(ws)) as client:
        version = alias_version(client, name, CHAMPION)
        if version is None:
            log.info("label-noise screen skipped: %s has no champion yet", name)
            return None
        registered = client.get_model_version(name, version)
        classes = tuple(json.loads(registered.tags.get("classes", "[]")))
        if classes != cfg.classes:
            log.warning("label-noise screen skipped: champion v%s has classes %s, not %s", version, classes,
                        list(cfg.classes))  # fmt: skip
            return None
        split = _held_out_split(client, registered.run_id, cfg.gate.judge_on)
        if split is None:
            log.warning("label-noise screen skipped: champion v%s's run has no held-out predictions", version)
            return None
        held_out = _read_held_out(client, registered.run_id, split, cfg.classes)
        from tasks.model.serving import load_registered, predates_image_model

        uri = f"models:/{name}/{version}"
        if predates_image_model(uri):
            log.warning("label-noise screen skipped: champion v%s predates the image-file model", version)
            return None
        model = load_registered(uri)
    yardstick = profile(held_out.y_true, held_out.probabilities, noise.confidence)
    log.info("label-noise screen: champion v%s, %d of %d held-out %s images suspect (%.1f%%)", version,
             yardstick.suspects, yardstick.n, split, 100 * yardstick.rate)  # fmt: skip
    return Champion(version, split, yardstick, model)


@dataclass
class LabelScreen:
    """A batch's screen: the outcome, the rows it was run on, and the champion that ran it."""

    batch: str
    result: NoiseScreen
    rows: list[Accepted]
    champion: Champion
    classes: tuple[str, ...]
    action: str
    #: Set when the whole batch is held.
    held: BatchRejected | None = None

    def info(self) -> dict[str, Any]:
        r = self.result
        return {
            "champion_version": self.champion.version, "held_out": self.champion.split, "n": r.n,
            "suspects": len(r.suspects), "rate": round(r.rate, 6), "baseline": round(r.baseline, 6),
            "reference": round(r.reference, 6), "p_value": r.p_value, "noisy": r.noisy, "action": self.action,
            "held": self.held is not None, "summary": r.summary(),
        }  # fmt: skip

    def suspects(self) -> list[tuple[Accepted, str, float]]:
        r = self.result
        return [(self.rows[i], self.classes[p], float(c)) for i, p, c in zip(r.suspects, r.predicted, r.confidence,
                                                                             strict=True)]  # fmt: skip

    def write(self, target: Path) -> None:
        """suspects.csv (every suspect, most confident first), suspects.png (the top ones) and the numbers."""
        from tasks.common.gallery import image_grid

        target.mkdir(parents=True, exist_ok=True)
        suspects = self.suspects()
        with (target / SUSPECTS_FILE).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(SUSPECTS_COLUMNS)
            for acc, predicted, confidence in suspects:
                # Labellers' text, opened by operators in a spreadsheet: never a live formula.
                writer.writerow([spreadsheet_safe(printable(acc.item.row.path)), spreadsheet_safe(acc.label),
                                 spreadsheet_safe(predicted), f"{confidence:.4f}"])  # fmt: skip
        shown = [(s, self.champion.pixels(s[0].item.source)) for s in suspects[:THUMBNAILS]]
        shown = [(s, p) for s, p in shown if p is not None]
        image_grid(
            target / SUSPECTS_PNG,
            [p for _, p in shown],
            [f"given {acc.label[:14]}\npred {pred[:14]} {conf:.2f}" for (acc, pred, conf), _ in shown],
            f"Batch {self.batch}: {len(suspects)} suspected label error(s), champion v{self.champion.version}",
        )
        write_json(target / SCREEN_INFO, self.info())


def released(quarantine: Path, batch: str) -> dict[str, Any] | None:
    path = quarantine / batch / RELEASED_INFO
    return read_json(path) if path.is_file() else None


def screen_labels(
    batch_dir: Path, check: BatchCheck, cfg: PipelineConfig, ws: Workspace, champion: Champion | None
) -> LabelScreen | None:
    """Screen the batch's accepted rows; None when skipped (no champion, screen off, released batch).

    ``quarantine_rows``: a noisy batch's suspects move from ``check.accepted`` to
    ``check.quarantined``, unless that would leave more than ``max_bad_fraction`` of it bad:
    then the whole batch is held, as with ``hold``."""
    noise, name = cfg.ingest.label_noise, batch_dir.name
    if noise.action == "off" or champion is None or not check.accepted:
        return None
    if record := released(ws.quarantine, name):
        check.notes.append(f"label-noise screen skipped: released by {record['actor']}: {record['reason']}")
        return None
    files = [acc.item.source for acc in check.accepted]
    labels = np.array([cfg.classes.index(acc.label) for acc in check.accepted], dtype=np.int64)
    result = screen(labels, champion.probabilities(files, name), champion.profile, noise.alpha, noise.tolerance)
    out = LabelScreen(name, result, list(check.accepted), champion, cfg.classes, noise.action)
    if not result.noisy:
        check.notes.append(f"label-noise screen passed: {result.summary()}")
        return out
    bad = len(check.quarantined) + len(result.suspects)
    if noise.action == "hold" or bad > cfg.ingest.max_bad_fraction * (len(check.accepted) + len(check.quarantined)):
        out.held = BatchRejected(
            name, LABEL_NOISE_SUSPECTED,
            f"{result.summary()}; suspects in data/quarantine/{name}/{SUSPECTS_FILE}. If the labels are right: "
            f"`ctl release {name} --reason ...`",
        )  # fmt: skip
        return out
    suspect_rows = {int(i) for i in result.suspects}
    for acc, predicted, confidence in out.suspects():
        detail = f"champion v{champion.version} says {predicted!r} ({confidence:.2f})"
        check.quarantined.append(Quarantined(acc.item, LABEL_NOISE_SUSPECTED, detail))
    check.accepted[:] = [acc for i, acc in enumerate(check.accepted) if i not in suspect_rows]
    check.notes.append(f"label-noise screen: {len(suspect_rows)} suspect row(s) quarantined: {result.summary()}")
    return out


def held_batches(ws: Workspace) -> list[str]:
    """Batches the screen held that no operator has released yet."""
    return sorted(
        p.parent.name
        for p in ws.quarantine.glob(f"*/{REJECTED_INFO}")
        if read_json(p).get("reason") == LABEL_NOISE_SUSPECTED and not (p.parent / RELEASED_INFO).is_file()
    )


def release_batch(cfg: PipelineConfig, ws: Workspace, batch: str, reason: str) -> str:
    """Let the next ingest take ``batch``, held by the screen, without the screen. Audited."""
    if not reason.strip():
        raise PipelineError("a release needs a reason (--reason)")
    target = ws.quarantine / batch
    with workspace_lock(ws, "ingest"):
        if not (target / REJECTED_INFO).is_file():
            raise PipelineError(f"batch {batch!r} is not held; held batches: {', '.join(held_batches(ws)) or 'none'}")
        rejection = read_json(target / REJECTED_INFO)
        if rejection["reason"] != LABEL_NOISE_SUSPECTED:
            raise PipelineError(
                f"batch {batch!r} was rejected ({rejection['reason']}), not held for label noise: deliver a fixed "
                "batch under a new name"
            )
        if record := released(ws.quarantine, batch):
            raise PipelineError(f"batch {batch!r} was already released by {record['actor']} at {record['at']}")
        screened = read_json(target / SCREEN_INFO) if (target / SCREEN_INFO).is_file() else {}
        numbers = {"batch": batch, **{k: screened[k] for k in ("n", "suspects", "rate", "p_value") if k in screened}}
        champion = screened.get("champion_version")
        entry = AuditEntry(
            "release", cfg.register_.model_name, champion, champion, None, current_actor(), reason, numbers
        )
        write_json(target / RELEASED_INFO, {"batch_id": batch, "actor": entry.actor, "reason": reason, "at": entry.at})
        append_audit(ws, entry)
    log.info("released batch %s (%s): the next ingest takes it without the label-noise screen", batch, reason)
    return f"released {batch}: the next ingest takes it without the label-noise screen (other checks still apply)"


def main() -> None:
    parser = argparse.ArgumentParser(description="Batches held by the label-noise screen at ingest.")
    sub = parser.add_subparsers(dest="command", required=True)
    release = sub.add_parser("release", help="let the next ingest take a held batch, without the screen")
    release.add_argument("batch")
    release.add_argument("--reason", required=True)
    args = parser.parse_args()
    setup_cli_logging()
    ws = Workspace(Path.cwd())
    try:
        print(release_batch(load_params(ws.params), ws, args.batch, args.reason))
    except PipelineError as exc:
        raise SystemExit(f"error: release: {exc}") from None


if __name__ == "__main__":
    main()
