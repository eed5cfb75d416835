"""The web diagnostic page end to end: Debian's headless Chromium driven by Playwright against the live gateway.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and the ``playwright`` wheel; never
``playwright install``. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 30_000


def _png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


@dataclass
class Browsing:
    page: object
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        """Requests that left the gateway's origin (``data:`` and ``blob:`` URLs stay in the page)."""
        foreign = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob"):
                continue
            if f"{parts.scheme}://{parts.netloc}" != self.origin:
                foreign.append(url)
        return foreign


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browsing(browser, gateway):
    context = browser.new_context(viewport={"width": 1366, "height": 860}, base_url=gateway.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    session = Browsing(page, gateway.url)
    page.on("request", lambda request: session.requests.append(request.url))
    page.on("pageerror", lambda error: session.errors.append(str(error)))
    yield session
    context.close()
    assert not session.errors, f"JavaScript errors on the page: {session.errors}"


@pytest.fixture
def field_png(fields, tmp_path) -> Path:
    path = tmp_path / "field-0.png"
    path.write_bytes(_png(fields[0]))
    return path


def _open(browsing: Browsing):
    from playwright.sync_api import expect

    page = browsing.page
    page.goto("/")
    expect(page.locator("#server-status")).to_have_attribute("data-state", "ready")
    return page


def test_page_classifies_a_field_and_switches_overlays(browsing, gateway, field_png, artifacts_dir):
    from playwright.sync_api import expect

    page = _open(browsing)
    expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
    expect(page.locator("#ready-banner")).to_be_hidden()

    page.set_input_files("#file-input", str(field_png))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-state", "done", timeout=60_000)

    api = httpx.post(f"{gateway.url}/v1/classify", files={"file": ("field-0.png", field_png.read_bytes())},
                     timeout=60).json()
    expect(card).to_have_attribute("data-label", api["label"])
    # the page names classes as the served model's manifest does, not from a list of its own
    names = httpx.get(f"{gateway.url}/v1/model", timeout=10).json()["class_descriptions"]
    assert set(names) == set(api["probabilities"])
    expect(card.locator(".verdict-label")).to_have_text(names[api["label"]])
    expect(card.locator(".filename")).to_have_text("field-0.png")
    expect(card.locator(".prob")).to_have_count(4)
    shown = dict(zip(card.locator(".prob").evaluate_all("els => els.map(e => e.dataset.class)"),
                     (float(t.rstrip("%")) for t in card.locator(".prob-value").all_text_contents()), strict=True))
    assert shown == pytest.approx({k: 100 * v for k, v in api["probabilities"].items()}, abs=0.051)
    expect(card.locator(".verdict-conf")).to_contain_text(f"{100 * api['confidence']:.1f}%")
    expect(card.locator(".badge-review")).to_have_count(1 if api["needs_review"] else 0)
    # a synthetic field is not a real smear: the page says it is out of distribution, with the score
    assert any(r.startswith("out_of_distribution") for r in api["review_reasons"]) and api["ood_score"] > 1
    expect(card.locator(".review-reasons")).to_contain_text("Out of distribution (score")
    expect(card.locator(".cell-count strong")).to_have_text(str(api["cell_count"]))
    expect(card.locator(".cells img")).to_have_count(min(api["cell_count"], 12))
    expect(card.locator(".card-foot")).to_contain_text(api["model_version"])
    # the caption names the steps the served model runs (the shipped compact model: no CLAHE)
    with_images = httpx.post(f"{gateway.url}/v1/classify?images=true",
                             files={"file": ("field-0.png", field_png.read_bytes())}, timeout=60).json()
    steps = ", ".join(with_images["images"]["preprocessing"])
    expect(card.locator("figcaption", has_text="Preprocessed")).to_have_text(f"Preprocessed ({steps})")
    expect(page.locator("#announcer")).to_contain_text(names[api["label"]])
    assert page.locator("img:not([alt]), img[alt='']").count() == 0

    overlay = card.locator("img.overlay")
    expect(overlay).to_have_attribute("data-layer", "mask")
    mask_src = overlay.get_attribute("src")
    assert mask_src.startswith("data:image/png;base64,")
    card.locator("label.seg", has_text="U-Net gate").click()
    expect(overlay).to_have_attribute("data-layer", "attention")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert overlay.get_attribute("src") != mask_src
    expect(card.get_by_role("radio", name="U-Net gate")).to_be_checked()
    expect(card.locator(".overlay-legend")).to_contain_text("not what decided the class")
    # the occlusion evidence the page asked for (explain=true): the served map, its legend names the call
    explained = httpx.post(f"{gateway.url}/v1/classify?explain=true",
                           files={"file": ("field-0.png", field_png.read_bytes())}, timeout=120).json()
    card.locator("label.seg", has_text="Evidence").click()
    expect(overlay).to_have_attribute("data-layer", "evidence")
    expect(overlay).to_have_attribute("src", explained["images"]["evidence"])
    expect(card.locator(".overlay-legend")).to_contain_text(f"lowers the {names[api['label']]} call")
    expect(card.locator(".overlay-legend")).to_contain_text(f"{explained['images']['evidence_peak']:.2f}")
    expect(card.locator("figcaption").first).to_have_text("Original with occlusion evidence overlay")

    card.get_by_label("Opacity").fill("80")
    expect(overlay).to_have_css("opacity", "0.8")
    expect(card.locator(".opacity-value")).to_have_text("80%")
    page.screenshot(path=str(artifacts_dir / "web-page-result.png"), full_page=True)

    card.locator("label.seg", has_text="None").click()
    expect(overlay).to_be_hidden()
    card.locator("label.seg", has_text="Mask").click()
    expect(overlay).to_be_visible()
    expect(overlay).to_have_attribute("src", mask_src)

    assert browsing.foreign_requests() == []
    assert any(url.endswith("/v1/classify?images=true&explain=true") for url in browsing.requests)


def test_a_field_at_another_magnification_is_explained_and_a_stated_pixel_size_is_sent(browsing, gateway, fields,
                                                                                      tmp_path):
    from playwright.sync_api import expect

    zoomed = tmp_path / "zoomed.png"  # twice the magnification: the centre enlarged
    zoomed.write_bytes(_png(np.ascontiguousarray(np.kron(fields[2][56:168, 56:168], np.ones((2, 2, 1), np.uint8)))))
    page = _open(browsing)
    page.set_input_files("#file-input", str(zoomed))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-state", "done", timeout=60_000)
    expect(card.locator(".review-reasons")).to_contain_text("Another magnification: red cells")
    expect(card.locator(".scale-info")).to_contain_text("resized ×")
    training_um = httpx.get(f"{gateway.url}/v1/model", timeout=10).json()["pixel_size_um"]
    page.get_by_label("Pixel size").fill(f"{training_um / 2:.4f}")  # the 2x objective's pixel size
    page.set_input_files("#file-input", str(zoomed))
    stated = page.locator(".result").nth(1)
    expect(stated).to_have_attribute("data-state", "done", timeout=60_000)
    expect(stated.locator(".scale-info")).to_contain_text("µm/px")
    assert "Another magnification" not in " ".join(stated.locator(".review-reasons").all_text_contents())
    assert any("pixel_size_um=" in url for url in browsing.requests)


def test_bad_files_are_explained_in_plain_words(browsing, tmp_path, artifacts_dir):
    from playwright.sync_api import expect

    page = _open(browsing)
    text = tmp_path / "notes.txt"
    text.write_text("not a blood smear\n")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(_png(np.full((8, 8, 3), 200, np.uint8)))
    page.set_input_files("#file-input", [str(text), str(garbage), str(tiny)])

    cards = page.locator(".result")
    expect(cards).to_have_count(3)
    for index in range(3):
        expect(cards.nth(index)).to_have_attribute("data-state", "error")
    for index in range(2):
        expect(cards.nth(index).locator(".error-message")).to_contain_text("not an image the server can read")
        expect(cards.nth(index).locator(".error-code")).to_have_text("not_an_image")
        expect(cards.nth(index).locator(".error-detail")).to_contain_text("not a readable JPEG/PNG/TIFF/BMP image")
    expect(cards.nth(2).locator(".error-message")).to_contain_text("too small to analyse")
    expect(cards.nth(2).locator(".error-detail")).to_contain_text("8x8")
    expect(page.locator("#results-summary")).to_contain_text("3 not analysed")
    expect(page.locator("#announcer")).to_contain_text("notes.txt: not analysed")
    page.screenshot(path=str(artifacts_dir / "web-page-errors.png"), full_page=True)
    assert browsing.foreign_requests() == []


def test_drop_zone_is_reachable_and_operable_by_keyboard(browsing, field_png):
    from playwright.sync_api import expect

    page = _open(browsing)
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "dropzone":
            break
    zone = page.locator("#dropzone")
    expect(zone).to_be_focused()
    assert zone.evaluate("el => el.matches(':focus-visible')")
    assert zone.evaluate("el => getComputedStyle(el).outlineStyle") == "solid"
    # a key held for 100 ms, as people press it: the page opens the picker on release, once Chromium has
    # registered the user activation a file picker needs (synthetic key events register it late)
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter", delay=100)
    assert chooser.value.is_multiple()
    chooser.value.set_files(str(field_png))
    expect(page.locator(".result").first).to_have_attribute("data-state", "done", timeout=60_000)
    zone.focus()
    with page.expect_file_chooser():
        page.keyboard.press(" ", delay=100)


def test_not_ready_banner_shows_and_clears_when_the_server_is_ready(browsing):
    from playwright.sync_api import expect

    page = browsing.page
    refusals = {"left": 1}

    def readyz(route):
        if refusals["left"]:
            refusals["left"] -= 1
            route.fulfill(status=503, json={"status": "not ready", "model_version": None, "triton": None})
        else:
            route.continue_()

    page.route("**/readyz", readyz)
    page.goto("/")
    banner = page.locator("#ready-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("not ready")
    expect(page.locator("#server-status")).to_have_attribute("data-state", "down")
    expect(banner).to_be_hidden(timeout=10_000)
    expect(page.locator("#server-status")).to_have_attribute("data-state", "ready")


def test_batch_view_says_when_jobs_are_not_available(browsing):
    from playwright.sync_api import expect

    page = browsing.page
    page.route("**/v1/jobs", lambda route: route.fulfill(status=404, json={"detail": "Not Found"}))
    page.goto("/")
    expect(page.locator("#jobs-unavailable")).to_have_text("Batch jobs are not available on this server.")
    expect(page.locator("#job-form")).to_be_hidden()


def test_batch_view_submits_files_and_follows_progress(browsing, fields, tmp_path, artifacts_dir):
    """Against a stand-in for the jobs API answered inside the browser, so it runs with or without the real one."""
    from playwright.sync_api import expect

    page = browsing.page
    job = {"id": "20250106-093000-abc123", "created": "2025-01-06T09:30:00+00:00", "detail": None, "total": 2,
           "failed": 0, "background_skipped": 0, "model_version": "compact-test"}
    report = f"/v1/jobs/{job['id']}/files/index.html"
    seen = {"body": None, "polls": 0}

    def progress() -> dict:
        if seen["polls"] <= 1:
            return {**job, "status": "running", "done": 1, "pending": 1, "report": None}
        return {**job, "status": "done", "done": 2, "pending": 0, "report": report}

    def jobs_api(route):
        if route.request.method == "POST":
            seen["body"] = route.request.post_data_buffer
            route.fulfill(status=202, json={**job, "status": "running", "detail": "queued", "done": 0, "pending": 2})
        elif seen["body"] is None:
            route.fulfill(json={"jobs": []})
        else:
            seen["polls"] += 1
            route.fulfill(json={"jobs": [progress()]})

    def job_api(route):
        current = progress()
        finished = current["status"] == "done"
        slide = {"slide_id": "MOCK-SLIDE-7", "fields": 2, "done": current["done"], "failed": 0,
                 "verdict": "Pre" if finished else None, "verdict_confidence": 0.91,
                 "verdict_status": "conclusive" if finished else "pending", "verdict_reasons": [],
                 "review_fields": 1, "report": "/v1/jobs/x/files/slides/MOCK-SLIDE-7.html" if finished else None}
        disputed = {"slide_id": "MOCK-SLIDE-8", "fields": 6, "done": 6, "failed": 0, "verdict": "Early",
                    "verdict_confidence": 0.49, "verdict_status": "inconclusive", "review_fields": 0,
                    "verdict_reasons": ["fields disagree: Early 0.49 against Benign 0.48 (margin under 0.25)"]}
        route.fulfill(json={**current, "slides": [slide, disputed]})

    page.route("**/v1/jobs", jobs_api)
    page.route(f"**/v1/jobs/{job['id']}", job_api)
    paths = []
    for index in (1, 2):
        path = tmp_path / f"slide-field-{index}.png"
        path.write_bytes(_png(fields[index]))
        paths.append(str(path))
    page.goto("/")
    expect(page.locator("#jobs-empty")).to_be_visible()
    page.get_by_role("button", name="Start batch job").click()
    expect(page.locator("#job-message")).to_contain_text("Choose at least one field image")

    page.get_by_label("Field images", exact=True).set_input_files(paths)
    page.get_by_label("Slide ID").fill("MOCK-SLIDE-7")
    page.get_by_role("button", name="Start batch job").click()
    item = page.locator(".job", has_text="MOCK-SLIDE-7")
    expect(item).to_have_attribute("data-status", "running")
    expect(item.locator(".job-meta")).to_contain_text("1 of 2 fields")
    expect(item.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "1")
    expect(item.get_by_role("link")).to_have_count(0)
    expect(item).to_have_attribute("data-status", "done", timeout=8_000)  # polled, no user action
    expect(item.get_by_role("link", name="Open job report")).to_have_attribute("href", report.lstrip("/"))
    expect(item.locator(".job-slide").first).to_contain_text("Pre-B ALL (91%) · 1 for review")
    # a slide whose fields disagree is no verdict: the page says so, with the reason
    disputed = item.locator(".job-slide").nth(1)
    expect(disputed).to_have_attribute("data-verdict", "inconclusive")
    expect(disputed).to_contain_text("Inconclusive: needs review (fields disagree: Early 0.49 against Benign")
    expect(item.get_by_role("link", name="Report for slide MOCK-SLIDE-7")).to_be_visible()
    expect(page.locator("#announcer")).to_contain_text("MOCK-SLIDE-7, MOCK-SLIDE-8: done")
    body = seen["body"]
    assert body.count(b'name="files"') == 2
    assert b'filename="slide-field-1.png"' in body and b'filename="slide-field-2.png"' in body
    assert b'name="slide_id"\r\n\r\nMOCK-SLIDE-7' in body
    page.wait_for_timeout(400)  # the progress bar's width transition
    page.screenshot(path=str(artifacts_dir / "web-page-batch-view.png"), full_page=True)


def test_batch_job_submitted_from_the_page_runs_to_done(browsing, gateway, fields, tmp_path, artifacts_dir):
    from playwright.sync_api import expect

    if httpx.get(f"{gateway.url}/v1/jobs", timeout=10).status_code == 404:
        pytest.skip("the batch jobs API (GET /v1/jobs) is not on this gateway yet: it answers 404")
    paths = []
    for index in (1, 2):
        path = tmp_path / f"slide-field-{index}.png"
        path.write_bytes(_png(fields[index]))
        paths.append(str(path))

    page = _open(browsing)
    page.set_input_files("#job-files", paths)
    page.fill("#job-slide", "WEB-SLIDE-1")
    page.get_by_role("button", name="Start batch job").click()
    job = page.locator(".job", has_text="WEB-SLIDE-1")
    expect(job).to_have_count(1)
    expect(job).to_have_attribute("data-status", "done", timeout=90_000)
    expect(job.locator(".job-meta")).to_contain_text("2 of 2 fields")
    href = job.get_by_role("link", name="Open job report").get_attribute("href")
    assert href.endswith("/files/index.html")
    assert httpx.get(f"{gateway.url}/{href}", timeout=10).status_code == 200
    slide_report = job.get_by_role("link", name="Report for slide WEB-SLIDE-1")
    expect(slide_report).to_be_visible()
    assert httpx.get(f"{gateway.url}/{slide_report.get_attribute('href')}", timeout=10).status_code == 200
    page.wait_for_timeout(400)  # the progress bar's width transition
    page.screenshot(path=str(artifacts_dir / "web-page-batch.png"), full_page=True)
    assert browsing.foreign_requests() == []


def test_files_over_the_upload_limit_are_refused_before_uploading(browsing, field_png):
    from playwright.sync_api import expect

    page = browsing.page
    page.route("**/readyz", lambda route: route.fulfill(
        status=200, json={"status": "ready", "model_version": "test", "triton": None, "max_upload_bytes": 1000}))
    posted = []
    page.on("request", lambda request: posted.append(request.url) if "v1/classify" in request.url else None)
    page.goto("/")
    expect(page.locator("#server-status")).to_have_attribute("data-state", "ready")
    page.set_input_files("#file-input", str(field_png))
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-state", "error")
    expect(card.locator(".error-message")).to_contain_text("too large")
    expect(card.locator(".error-detail")).to_contain_text("upload limit of 1000 B")
    assert posted == []
