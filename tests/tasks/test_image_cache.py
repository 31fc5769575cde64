from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.common.config import PipelineConfig, ValidateConfig
from tasks.common.files import sha256_file
from tasks.common.workspace import Workspace
from tasks.data import image_cache
from tasks.data.benchmark import benchmark_manifest
from tasks.data.image_cache import ImageInfoCache
from tasks.data.images import ImageInfo, check_image


class CountingCheck:
    """check_image, counting the files it decodes."""

    def __init__(self) -> None:
        self.decoded: list[str] = []

    def __call__(self, path: Path, cfg: ValidateConfig) -> ImageInfo:
        self.decoded.append(path.name)
        return check_image(path, cfg)


@pytest.fixture
def benchmark_ws(tmp_path: Path, write_png: Callable[..., Path]) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    for i, label in enumerate(["a", "a", "b"]):
        write_png(ws.benchmark / label / f"{i}.png", size=(10, 10), seed=i)
    return ws


def test_benchmark_is_decoded_once_then_only_changed_files(
    benchmark_ws: Workspace, make_cfg: Callable[..., PipelineConfig], write_png: Callable[..., Path]
) -> None:
    ws, cfg = benchmark_ws, make_cfg()
    first = CountingCheck()
    rows = benchmark_manifest(ws, cfg, first)
    assert sorted(first.decoded) == ["0.png", "1.png", "2.png"]

    again = CountingCheck()
    assert benchmark_manifest(ws, cfg, again) == rows and again.decoded == []

    touched = ws.benchmark / "a" / "0.png"
    os.utime(touched, ns=(1, 1))  # same bytes, new mtime: still a hit
    changed = write_png(ws.benchmark / "b" / "2.png", size=(12, 12), seed=9)
    third = CountingCheck()
    rows3 = benchmark_manifest(ws, cfg, third)
    assert third.decoded == ["2.png"]
    row = next(r for r in rows3 if r["path"] == "b/2.png")
    assert (row["width"], row["sha256"]) == (12, sha256_file(changed))
    assert row["pixel_sha256"] == check_image(changed, cfg.validate_).pixel_sha256


def test_a_new_check_version_or_setting_misses(
    benchmark_ws: Workspace, make_cfg: Callable[..., PipelineConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, cfg = benchmark_ws, make_cfg()
    benchmark_manifest(ws, cfg)
    file = ws.benchmark / "a" / "0.png"
    digest = sha256_file(file)

    hit = CountingCheck()
    ImageInfoCache(ws.benchmark_checks, cfg.validate_, hit).check(file, digest)
    assert hit.decoded == []

    monkeypatch.setattr(image_cache, "CHECK_VERSION", image_cache.CHECK_VERSION + 1)
    bumped = CountingCheck()
    ImageInfoCache(ws.benchmark_checks, cfg.validate_, bumped).check(file, digest)
    assert bumped.decoded == ["0.png"]
    monkeypatch.undo()

    stricter = make_cfg(validate={"min_image_side": 9}).validate_
    other = CountingCheck()
    ImageInfoCache(ws.benchmark_checks, stricter, other).check(file, digest)
    assert other.decoded == ["0.png"]


@pytest.mark.parametrize("content", [b"\x80\x81 not utf-8", b'{"key": ', b"[]", b'{"key": "x", "images": []}'])
def test_an_unreadable_cache_is_ignored_with_a_warning(
    benchmark_ws: Workspace,
    make_cfg: Callable[..., PipelineConfig],
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    ws, cfg = benchmark_ws, make_cfg()
    expected = benchmark_manifest(ws, cfg)
    key = image_cache.cache_key(cfg.validate_).encode()
    ws.benchmark_checks.write_bytes(content.replace(b'"x"', b'"' + key + b'"'))

    check = CountingCheck()
    with caplog.at_level(logging.WARNING, logger="tasks.data.image_cache"):
        assert benchmark_manifest(ws, cfg, check) == expected
    assert len(check.decoded) == 3
    assert "ignoring unreadable image cache" in caplog.text
    again = CountingCheck()
    benchmark_manifest(ws, cfg, again)  # rewritten whole
    assert again.decoded == []


def test_a_failing_image_is_checked_every_time(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    from tasks.data.rows import RowProblem

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    check = CountingCheck()
    cache = ImageInfoCache(tmp_path / "cache.json", make_cfg().validate_, check)
    for _ in range(2):
        with pytest.raises(RowProblem):
            cache.check(broken, sha256_file(broken))
    assert check.decoded == ["broken.png", "broken.png"]


@pytest.mark.integration
def test_ingest_checks_new_batches_against_the_cached_benchmark(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    from tasks.common.files import read_json
    from tasks.ingest import run_ingest

    ws, cfg = dvc_workspace, make_cfg(ingest={"max_bad_fraction": 0.5})
    held = write_png(ws.benchmark / "a" / "held.png", size=(10, 10), seed=1)
    for name in ("b1", "b2"):  # b2's leak is caught from the cache b1's ingest wrote
        write_png(ws.landing / name / "b" / "new.png", size=(10, 10), seed=len(name) + ord(name[1]))
        (ws.landing / name / "a").mkdir()
        (ws.landing / name / "a" / "leak.png").write_bytes(held.read_bytes())
        result = run_ingest(cfg, ws)
        assert result.ingested == [name] and result.quarantined == {name: {"split_leak": 1}}
        cached = read_json(ws.benchmark_checks)["images"]
        assert list(cached) == [sha256_file(held)]
        assert cached[sha256_file(held)]["pixel_sha256"] == check_image(held, cfg.validate_).pixel_sha256
