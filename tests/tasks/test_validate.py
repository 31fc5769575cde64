from __future__ import annotations

import csv
import json
import math
import shutil
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chi2, hypergeom

from tasks.common.config import PipelineConfig, ValidateConfig
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, sha256_file
from tasks.common.workspace import Workspace
from tasks.data.expectations import GX_DIR, SUITE, open_context, suite_expectations
from tasks.data.images import check_image
from tasks.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME, read_all_manifests
from tasks.data.rows import RowProblem, normalise_label
from tasks.data.validation import (
    LabelDrift,
    batch_drifts,
    build_table,
    drift_p_value,
    drift_report,
    label_drift,
    render_summary,
)
from tasks.validate import run_validate

REPO = Path(__file__).resolve().parents[2]
CFG = ValidateConfig()

# ---------------------------------------------------------------- check_image


def test_check_image_reads_a_good_png(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    path = write_png(tmp_path / "x.png", size=(12, 9))

    info = check_image(path, CFG)

    assert (info.width, info.height, info.format, info.mode, info.channels) == (12, 9, "PNG", "RGB", 3)
    assert info.bytes == path.stat().st_size


def test_check_image_pixel_hash_survives_re_encoding(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    png = write_png(tmp_path / "x.png", size=(10, 10), mode="L")
    with Image.open(png) as img:
        img.save(tmp_path / "y.png", compress_level=0)  # other bytes, same pixels

    assert sha256_file(png) != sha256_file(tmp_path / "y.png")
    assert check_image(png, CFG).pixel_sha256 == check_image(tmp_path / "y.png", CFG).pixel_sha256


@pytest.mark.parametrize(
    ("size", "reason"),
    [((7, 20), "too_small"), ((20, 5000), "too_large"), ((4097, 4097), "decompression_bomb")],
)
def test_check_image_size_bounds_come_from_the_header(tmp_path: Path, size: tuple[int, int], reason: str) -> None:
    path = tmp_path / "x.png"
    Image.new("L", size).save(path)

    with pytest.raises(RowProblem) as info:
        check_image(path, CFG)

    assert info.value.reason == reason


def test_check_image_names_a_format_that_is_not_allowed(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10)).save(tmp_path / "x.png", format="BMP")

    with pytest.raises(RowProblem) as info:
        check_image(tmp_path / "x.png", CFG)

    assert (info.value.reason, info.value.detail) == ("format_not_allowed", "format BMP; allowed: PNG, JPEG")


def test_check_image_opens_formats_the_params_allow(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10)).save(tmp_path / "x.bmp")

    assert check_image(tmp_path / "x.bmp", ValidateConfig(formats=("PNG", "BMP"))).format == "BMP"


def test_check_image_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RowProblem) as info:
        check_image(tmp_path / "gone.png", CFG)

    assert info.value.reason == "missing_file"


# ---------------------------------------------------------------- labels and drift


@pytest.mark.parametrize(
    ("label", "expected"), [("coat", "coat"), (" coat ", "coat"), ("Coat", "coat"), ("T-Shirt\t", "t-shirt")]
)
def test_normalise_label_fixes_whitespace_and_case(label: str, expected: str) -> None:
    assert normalise_label(label, ("coat", "t-shirt")) == expected


@pytest.mark.parametrize(("label", "reason"), [("", "blank_label"), ("   ", "blank_label"), ("cat", "unknown_label")])
def test_normalise_label_rejects_blank_and_unknown(label: str, reason: str) -> None:
    with pytest.raises(RowProblem) as info:
        normalise_label(label, ("coat", "shirt"))

    assert info.value.reason == reason
    if reason == "unknown_label":
        assert "allowed: coat, shirt" in info.value.detail and "params.yaml" in info.value.detail


def test_normalise_label_refuses_a_case_match_that_is_ambiguous() -> None:
    with pytest.raises(RowProblem, match="unknown label"):
        normalise_label("COAT", ("coat", "Coat"))


def test_label_drift_is_the_jensen_shannon_distance() -> None:
    same = label_drift(Counter(a=5, b=5), Counter(a=50, b=50), ("a", "b"))
    disjoint = label_drift(Counter(a=5), Counter(b=5), ("a", "b"))
    # By hand: p=(1,0), q=(.5,.5), m=(.75,.25): JS = .5*log2(1/.75) + .5*(.5*log2(.5/.75) + .5*log2(.5/.25))
    half = label_drift(Counter(a=4), Counter(a=1, b=1), ("a", "b"))
    js = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))

    assert same == pytest.approx(0.0, abs=1e-12)
    assert disjoint == pytest.approx(1.0)
    assert half == pytest.approx(math.sqrt(js))
    assert math.isnan(label_drift(Counter(a=1), Counter(), ("a", "b")))


def test_drift_p_value_is_pearsons_chi_square_test_of_homogeneity() -> None:
    batch, reference = Counter(a=30, b=50, c=20), Counter(a=300, b=400, c=300)
    table = np.array([[30, 50, 20], [300, 400, 300]])
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()  # by hand, no continuity correction

    p_value, test = drift_p_value(batch, reference, ("a", "b", "c"))

    assert test == "chi2" and p_value == pytest.approx(chi2.sf(statistic, df=2))


def test_drift_p_value_accounts_for_the_batch_size_where_the_distance_cannot() -> None:
    # The same 60/40 split against a 50/50 reference: sampling noise in 10 labels, a shift in 1,000.
    reference = Counter(a=5000, b=5000)
    small, large = Counter(a=6, b=4), Counter(a=600, b=400)

    assert label_drift(small, reference, ("a", "b")) == pytest.approx(label_drift(large, reference, ("a", "b")))
    assert drift_p_value(small, reference, ("a", "b"))[0] > 0.5
    assert drift_p_value(large, reference, ("a", "b"))[0] < 1e-6


def test_drift_p_value_is_simulated_when_expected_counts_are_small() -> None:
    # 2 x 2 with expected counts below 5: the exact conditional p-value sums the hypergeometric
    # probabilities of every table with these margins whose chi-square is at least the observed one.
    batch, reference, classes = Counter(a=7, b=1), Counter(a=10, b=12), ("a", "b")

    def statistic(a: int) -> float:
        table = np.array([[a, 8 - a], [17 - a, 5 + a]])
        expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
        return float(((table - expected) ** 2 / expected).sum())

    exact = sum(hypergeom.pmf(a, 30, 17, 8) for a in range(9) if statistic(a) >= statistic(7) - 1e-9)
    p_value, test = drift_p_value(batch, reference, classes)

    assert test == "monte_carlo" and p_value == pytest.approx(exact, abs=0.01)
    assert drift_p_value(batch, reference, classes) == (p_value, test)  # seeded: a re-run gives the same value


def test_drift_p_value_with_nothing_to_test() -> None:
    assert drift_p_value(Counter(a=5), Counter(), ("a", "b")) == (1.0, "none")  # the first batch
    assert drift_p_value(Counter(a=5), Counter(a=9), ("a", "b")) == (1.0, "none")  # one class in both


def test_batch_drifts_compare_each_batch_with_the_ones_before_it() -> None:
    rows = [{"batch_id": "b1", "label": "a"}, {"batch_id": "b1", "label": "b"}, {"batch_id": "b2", "label": "a"}]
    rows += [{"batch_id": "b3", "label": "a"}, {"batch_id": "b3", "label": "b"}]

    drifts = batch_drifts(rows, ("a", "b"))

    assert math.isnan(drifts["b1"].distance) and (drifts["b1"].p_value, drifts["b1"].test) == (1.0, "none")
    b2, b3 = (Counter(a=1), Counter(a=1, b=1)), (Counter(a=1, b=1), Counter(a=2, b=1))
    assert drifts["b2"] == LabelDrift(label_drift(*b2, ("a", "b")), *drift_p_value(*b2, ("a", "b")))
    assert drifts["b3"] == LabelDrift(label_drift(*b3, ("a", "b")), *drift_p_value(*b3, ("a", "b")))


# ---------------------------------------------------------------- the manifest table


def write_raw_batch(
    raw: Path, batch: str, items: list[tuple[str, str]], write_png: Callable[..., Path], size: int = 10
) -> list[dict]:
    """A batch as ingest leaves it in data/raw: images plus a manifest with real properties."""
    rows = []
    for name, label in items:
        path = write_png(raw / batch / "images" / name, size=(size, size), seed=zlib.crc32(f"{batch}/{name}".encode()))
        info = check_image(path, CFG)
        rows.append({
            "path": f"images/{name}", "source_path": name, "label": label, "sha256": sha256_file(path),
            "pixel_sha256": info.pixel_sha256, "width": info.width, "height": info.height, "mode": info.mode,
            "channels": info.channels, "bytes": info.bytes, "format": info.format, "batch_id": batch,
        })  # fmt: skip
    with (raw / batch / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def balanced(n: int, classes: tuple[str, ...] = ("a", "b"), prefix: str = "") -> list[tuple[str, str]]:
    return [(f"{prefix}{i}.png", classes[i % len(classes)]) for i in range(n)]


def test_build_table_adds_split_and_dataset_columns(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    write_raw_batch(tmp_path, "b1", balanced(6), write_png)
    write_raw_batch(tmp_path, "b2", [("x.png", "a"), ("y.png", "a")], write_png)

    table = build_table(read_all_manifests(tmp_path), tmp_path, [], make_cfg())

    assert set(table["split"]) <= {"train", "val", "test"}
    assert table["class_count"].tolist() == [5, 3, 5, 3, 5, 3, 5, 5]
    assert table["class_imbalance"].max() == pytest.approx(5 / 3)
    assert table.loc[table["batch_id"] == "b1", "batch_label_drift"].eq(0.0).all()
    b2_drift = label_drift(Counter(a=2), Counter(a=3, b=3), ("a", "b"))
    assert table.loc[table["batch_id"] == "b2", "batch_label_drift"].tolist() == pytest.approx([b2_drift] * 2)
    assert table.loc[table["batch_id"] == "b1", "batch_label_drift_p"].eq(1.0).all()
    b2_p = drift_p_value(Counter(a=2), Counter(a=3, b=3), ("a", "b"))[0]
    assert table.loc[table["batch_id"] == "b2", "batch_label_drift_p"].tolist() == [b2_p] * 2
    assert drift_report(table) == {
        "b1": {"images": 6, "js_distance": 0.0, "p_value": 1.0, "test": "none"},
        "b2": {"images": 2, "js_distance": round(b2_drift, 4), "p_value": float(f"{b2_p:.3g}"), "test": "monte_carlo"},
    }
    assert table["labels_for_image"].eq(1).all() and table["splits_for_image"].eq(1).all()
    assert table["decodable"].all() and table["content_unchanged"].all()


def test_build_table_spots_a_tampered_and_an_unreadable_file(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    write_raw_batch(tmp_path, "b1", balanced(4), write_png)
    write_png(tmp_path / "b1" / "images" / "0.png", size=(10, 10), seed=123)
    (tmp_path / "b1" / "images" / "1.png").write_bytes(b"")

    table = build_table(read_all_manifests(tmp_path), tmp_path, [], make_cfg())

    assert table["content_unchanged"].tolist() == [False, True, True, True]
    assert table["decodable"].tolist() == [True, False, True, True]


def test_render_summary_names_rule_observed_value_and_rows() -> None:
    report = {
        "passed": False, "n_images": 10, "n_batches": 1, "data_docs": "file:///docs/index.html",
        "failures": [{"rule": "class_min", "severity": "critical", "observed": 3, "rows": ["smallest class 'b' (3)"],
                      "more_rows": 0}],
        "warnings": [{"rule": "label_drift:warning", "severity": "warning", "observed": 0.0021, "rows": ["batch b2"],
                      "more_rows": 7}],
        "label_drift": {"b1": {"images": 6, "js_distance": 0.0, "p_value": 1.0, "test": "none"},
                        "b2": {"images": 40, "js_distance": 0.4123, "p_value": 0.00211, "test": "monte_carlo"}},
    }  # fmt: skip

    text = render_summary(report)

    assert "Data validation FAILED" in text
    assert "| critical | class_min | 3 | smallest class 'b' (3) |" in text
    assert "| warning | label_drift:warning | 0.0021 | batch b2 (+7 more) |" in text
    assert "Label drift of the newest batch b2 (40 images): JS distance 0.412, p = 0.0021 (monte_carlo)" in text
    assert text.endswith("Data Docs: file:///docs/index.html")
    assert len(text.splitlines()) < 25  # one screen


# ---------------------------------------------------------------- the GX checkpoint


def test_the_committed_suite_is_the_one_the_code_defines() -> None:
    committed = open_context(REPO).suites.get(SUITE)

    def key(e) -> str:
        c = e.configuration
        severity = str(getattr(e.severity, "value", e.severity)).lower()
        return json.dumps([c.type, c.kwargs, c.meta, severity], sort_keys=True, default=str)

    assert sorted(map(key, committed.expectations)) == sorted(map(key, suite_expectations()))


@pytest.fixture
def gx_workspace(tmp_path: Path) -> Workspace:
    shutil.copytree(REPO / GX_DIR, tmp_path / GX_DIR, ignore=shutil.ignore_patterns("uncommitted"))
    return Workspace(tmp_path)


def failed_rules(ws: Workspace) -> dict[str, dict]:
    return {f["rule"]: f for f in read_json(ws.reports / "validate.json")["failures"]}


@pytest.mark.integration
def test_run_validate_passes_clean_data_and_builds_data_docs(
    gx_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = gx_workspace
    write_raw_batch(ws.raw, "b1", balanced(6), write_png)

    result = run_validate(make_cfg(validate={"min_images_per_class": 3}), ws)  # a few images per class

    assert (result.n_images, result.n_batches, result.class_counts) == (6, 1, {"a": 3, "b": 3})
    report = read_json(ws.reports / "validate.json")
    assert report["passed"] is True and report["failures"] == [] and report["rules_checked"] >= 20
    docs = Path(result.data_docs.removeprefix("file://"))
    assert docs.is_file() and docs.is_relative_to(ws.root / GX_DIR / "uncommitted")
    assert "PASSED" in (ws.reports / "validate.md").read_text()
    assert len((ws.reports / "manifest.csv").read_text().splitlines()) == 7


@pytest.mark.integration
def test_run_validate_blocks_a_class_below_the_minimum(
    gx_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = gx_workspace
    write_raw_batch(ws.raw, "b1", [*balanced(6), ("x.png", "a"), ("y.png", "a")], write_png)

    with pytest.raises(PipelineError, match="data validation failed: class_min \\(observed 3"):
        run_validate(make_cfg(validate={"min_images_per_class": 4}), ws)

    failure = failed_rules(ws)["class_min"]
    assert failure["observed"] == 3 and "smallest class 'b' (3)" in failure["rows"][0]
    assert "FAILED" in (ws.reports / "validate.md").read_text()


@pytest.mark.integration
def test_run_validate_blocks_a_missing_class_and_a_hand_edited_manifest(
    gx_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = gx_workspace
    write_raw_batch(ws.raw, "b1", balanced(4, ("a",)), write_png)
    manifest = ws.raw / "b1" / MANIFEST_NAME
    text = manifest.read_text().splitlines()
    text[1] = text[1].replace(",a,", ",zebra,", 1)
    manifest.write_text("\n".join(text) + "\n")

    with pytest.raises(PipelineError):
        run_validate(make_cfg(), ws)

    failures = failed_rules(ws)
    assert {"every_class", "label_in_classes"} <= set(failures)
    assert failures["label_in_classes"]["rows"] == ["b1/0.png"]


@pytest.mark.integration
def test_run_validate_blocks_an_image_in_two_splits_and_two_labels(
    gx_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = gx_workspace
    rows = write_raw_batch(ws.raw, "b1", balanced(6), write_png)
    # The benchmark holds a copy of b1/0.png, labelled differently: a leak and a conflict.
    ws.benchmark.mkdir(parents=True)
    shutil.copyfile(ws.raw / "b1" / rows[0]["path"], ws.benchmark / "copy.png")
    (ws.benchmark / "labels.csv").write_text("path,label\ncopy.png,b\n")

    with pytest.raises(PipelineError):
        run_validate(make_cfg(), ws)

    failures = failed_rules(ws)
    assert {"split_leak", "label_conflict", "sha256_unique"} <= set(failures)
    assert "b1/0.png" in failures["split_leak"]["rows"] and "benchmark/copy.png" in failures["split_leak"]["rows"]


@pytest.mark.integration
def test_run_validate_warns_on_label_drift_and_blocks_above_the_block_level(
    gx_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = gx_workspace
    write_raw_batch(ws.raw, "b1", balanced(20), write_png)
    write_raw_batch(ws.raw, "b2", balanced(16, ("a",), prefix="n"), write_png)
    p_value, test = drift_p_value(Counter(a=16), Counter(a=10, b=10), ("a", "b"))
    distance = label_drift(Counter(a=16), Counter(a=10, b=10), ("a", "b"))
    assert p_value < 0.005 and test == "monte_carlo"

    # A few images per class; label drift: warn below p = 0.01 by default, no block level.
    result = run_validate(make_cfg(validate={"min_images_per_class": 3}), ws)

    assert "label_drift:warning" in result.warnings
    report = read_json(ws.reports / "validate.json")
    warning = {w["rule"]: w for w in report["warnings"]}["label_drift:warning"]
    assert warning["observed"] == pytest.approx(p_value, rel=0.01)
    assert warning["rows"][-1] == f"batch b2 (16 images): JS distance {distance:.3f}, p = {p_value:.2g} (monte_carlo)"
    assert report["label_drift"]["b2"] == {
        "images": 16, "js_distance": round(distance, 4), "p_value": float(f"{p_value:.3g}"), "test": "monte_carlo"
    }  # fmt: skip
    assert f"Label drift of the newest {warning['rows'][-1]}" in (ws.reports / "validate.md").read_text()

    strict = {"min_images_per_class": 3, "label_drift": {"warn_alpha": 0.01, "block_alpha": 0.005}}
    with pytest.raises(PipelineError, match="label_drift:critical"):
        run_validate(make_cfg(validate=strict), ws)


@pytest.mark.integration
def test_run_validate_blocks_content_changed_since_ingest(
    gx_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = gx_workspace
    write_raw_batch(ws.raw, "b1", balanced(6), write_png)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(ws.raw / "b1" / "images" / "2.png")

    with pytest.raises(PipelineError, match="content_unchanged"):
        run_validate(make_cfg(), ws)

    assert failed_rules(ws)["content_unchanged"]["rows"] == ["b1/2.png"]


def test_run_validate_without_data(gx_workspace: Workspace, make_cfg: Callable[..., PipelineConfig]) -> None:
    with pytest.raises(PipelineError, match="no ingested data"):
        run_validate(make_cfg(), gx_workspace)


def test_run_validate_without_a_gx_project(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_raw_batch(ws.raw, "b1", balanced(4), write_png)

    with pytest.raises(PipelineError, match=r"no Great Expectations project .*`python -m tasks.data.expectations`"):
        run_validate(make_cfg(), ws)
