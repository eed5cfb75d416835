"""A queue of synthetic slides through the real embedded Triton: counts, columns, failures, reruns, reports."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from batch.ledger import DONE, FAILED, LEDGER_FILE, SKIPPED, TILE, SQLiteLedger
from batch.reports import ReportWriteError, result_columns
from batch.runner import BatchOptions, run_batch
from batch.summary import gallery_selection
from engine.model import ServedModel
from hybridcn.synth import synth_field
from preprocessing import field_qc

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
SLIDES, PER_SLIDE = 4, 8


def _write(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.from_repository(REPOSITORY)


@pytest.fixture(scope="module")
def queue(tmp_path_factory) -> tuple[Path, set[tuple[str, str]], set[tuple[str, str]]]:
    """4 slides x 8 synthetic fields, plus 4 bad files among them (truncated, not an image, empty, gone)."""
    root = tmp_path_factory.mktemp("queue")
    good = set()
    for s in range(SLIDES):
        for i in range(PER_SLIDE):
            path = _write(root / f"S{s}" / f"f{i}.png", synth_field((s + i) % 4, seed=9000 + 10 * s + i).image)
            good.add((f"S{s}", str(path)))
    data = (root / "S0" / "f0.png").read_bytes()
    (root / "S1" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "S1" / "garbage.jpg").write_bytes(b"plain text, not an image at all")
    (root / "S2" / "empty.png").write_bytes(b"")
    os.symlink(root / "nowhere.png", root / "S3" / "gone.png")
    bad = {("S1", str(root / "S1" / "truncated.png")), ("S1", str(root / "S1" / "garbage.jpg")),
           ("S2", str(root / "S2" / "empty.png")), ("S3", str(root / "S3" / "gone.png"))}
    return root, good, bad


def _results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_queue_of_slides_with_bad_files_among_good_ones(triton_server, queue, model, tmp_path, monkeypatch):
    root, good, bad = queue
    out = tmp_path / "out"
    options = BatchOptions(out_dir=out, repository=REPOSITORY, triton_urls=(triton_server.grpc_url,), workers=2,
                           gallery_size=2)
    summary = run_batch([root], options)
    assert summary.counts[DONE] == len(good) == SLIDES * PER_SLIDE
    assert summary.counts[FAILED] == len(bad) and summary.processed == len(good) + len(bad)

    rows = _results(out)
    assert list(rows[0]) == result_columns(model.classes)
    keys = [(r["slide_id"], r["source"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(good) + len(bad)
    assert {k for k, r in zip(keys, rows, strict=True) if r["status"] == DONE} == good
    for row in rows:
        if row["status"] == DONE:
            probabilities = [float(row[f"p_{name}"]) for name in model.classes]
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
            assert row["label"] == model.classes[int(np.argmax(probabilities))]
            assert float(row["confidence"]) == pytest.approx(max(probabilities), abs=1e-6)
            assert row["model_version"] == model.model_version and int(row["cell_count"]) >= 0
            assert row["needs_review"] in ("0", "1") and row["tile_x"] == "" and row["error"] == ""
            # synthetic fields are not real smears: the CSV carries the out-of-distribution score and reason
            assert float(row["ood_score"]) > 1 and "out_of_distribution" in row["review_reasons"]
    reasons = {Path(r["source"]).name: r["error"] for r in rows if r["status"] == FAILED}
    assert reasons["garbage.jpg"].startswith("not_an_image")
    assert reasons["empty.png"].startswith("empty")
    assert reasons["gone.png"].startswith("unreadable")
    assert reasons["truncated.png"].split(":")[0] in ("truncated", "not_an_image")

    with open(out / "slides.csv", newline="") as handle:
        slides = {r["slide_id"]: r for r in csv.DictReader(handle)}
    assert sorted(slides) == [f"S{s}" for s in range(SLIDES)]
    assert [int(slides[f"S{s}"]["done"]) for s in range(SLIDES)] == [PER_SLIDE] * SLIDES
    assert [int(slides[f"S{s}"]["failed"]) for s in range(SLIDES)] == [0, 2, 1, 1]
    for slide in slides.values():
        assert sum(int(slide[f"n_{name}"]) for name in model.classes) == PER_SLIDE
        assert slide["verdict"] in model.classes
    document = json.loads((out / "slides.json").read_text())
    assert document["model_version"] == model.model_version and len(document["slides"]) == SLIDES
    with SQLiteLedger(out / LEDGER_FILE, readonly=True) as ledger:  # gallery images kept during the run
        chosen = set()
        for slide in slides:
            flagged, worst = gallery_selection([r for r in ledger.rows() if r.spec.slide_id == slide],
                                               model.classes, options.gallery_size)
            chosen |= {r.field_id for r in (*flagged, *worst)}
        assert set(ledger.gallery_images(chosen)) == chosen
    page = (out / "slides" / "S1.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 3  # field, mask and attention of a gallery field
    assert "garbage.jpg" in page and (out / "index.html").is_file()

    # the same command again: nothing to do, the same rows
    again = run_batch([root], options)
    assert again.processed == 0 and [(r["slide_id"], r["source"]) for r in _results(out)] == keys

    # --retry-failed: the bad files are tried again and still fail, with their attempt counted
    retried = run_batch([root], BatchOptions(**{**options.__dict__, "retry_failed": True}))
    assert retried.processed == len(bad) and retried.counts[FAILED] == len(bad)
    with SQLiteLedger(out / LEDGER_FILE, readonly=True) as ledger:
        assert {r.attempts for r in ledger.rows() if r.status == FAILED} == {2}

    # a full disk while writing the reports: a loud error, the old files and the ledger intact
    before = (out / "results.csv").read_bytes()
    import batch.reports

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch.reports.os, "fsync", disk_full)
    with pytest.raises(ReportWriteError, match="No space left on device"):
        run_batch([root], options)
    monkeypatch.undo()
    assert (out / "results.csv").read_bytes() == before
    with SQLiteLedger(out / LEDGER_FILE, readonly=True) as ledger:
        assert ledger.counts()[DONE] == len(good)
        assert ledger.get_meta()["run_state"] == "failed"


def test_a_large_slide_image_is_tiled_and_background_skipped(triton_server, model, tmp_path):
    layout = ["F.F", ".F.", "FF."]
    size = model.field_size  # slides are tiled in fields of scanner pixels
    image = np.full((3 * size, 3 * size, 3), 255, np.uint8)
    seed = 100
    for row, line in enumerate(layout):
        for col, cell in enumerate(line):
            if cell == "F":
                field = synth_field(seed % 4, seed=seed).image
                while field_qc(field).empty:
                    seed += 1
                    field = synth_field(seed % 4, seed=seed).image
                seed += 1
                image[row * size : (row + 1) * size, col * size : (col + 1) * size] = field
    slide = tmp_path / "slide-42.tif"
    tifffile.imwrite(slide, image, photometric="rgb", compression="zlib", tile=(256, 256), bigtiff=True)
    summary = run_batch([slide], BatchOptions(out_dir=tmp_path / "out", repository=REPOSITORY,
                                              triton_urls=(triton_server.grpc_url,), workers=1, gallery_size=1))
    assert (summary.counts[DONE], summary.counts[SKIPPED]) == (5, 4)
    rows = _results(tmp_path / "out")
    expected = {(col * size, row * size) for row, line in enumerate(layout) for col, cell in enumerate(line)
                if cell == "F"}
    assert {(int(r["tile_x"]), int(r["tile_y"])) for r in rows} == expected
    assert {(r["slide_id"], r["kind"], r["tile_w"]) for r in rows} == {("slide-42", TILE, str(size))}
    with open(tmp_path / "out" / "slides.csv", newline="") as handle:
        (only,) = list(csv.DictReader(handle))
    assert (only["done"], only["background_skipped"]) == ("5", "4")


def test_a_manifest_pixel_size_tiles_a_slide_in_training_fields(triton_server, model, tmp_path):
    size = model.field_size
    fields = [synth_field(i % 4, seed=300 + i).image for i in range(2)]
    image = np.kron(np.concatenate(fields, axis=1), np.ones((2, 2, 1), np.uint8))  # a 2x objective: 448 px a field
    slide = tmp_path / "fine.tif"
    tifffile.imwrite(slide, image, photometric="rgb", compression="zlib", tile=(256, 256))
    pixel_size = model.manifest.ood.pixel_size_um / 2
    manifest = tmp_path / "queue.csv"
    manifest.write_text(f"slide_id,path,pixel_size_um\nfine,{slide.name},{pixel_size}\n")
    summary = run_batch([manifest], BatchOptions(out_dir=tmp_path / "out", repository=REPOSITORY, tile="always",
                                                 triton_urls=(triton_server.grpc_url,), workers=1, gallery_size=0))
    assert summary.counts[DONE] == 2
    rows = _results(tmp_path / "out")
    assert {(int(r["tile_x"]), int(r["tile_w"])) for r in rows} == {(0, 2 * size), (2 * size, 2 * size)}
    assert all(float(r["pixel_size_um"]) == pytest.approx(pixel_size, rel=1e-3) for r in rows)
    assert {r["rescaled_by"] for r in rows} == {""}  # tiles of one training field each need no resizing
    assert not any("scale_" in r["review_reasons"] for r in rows)
