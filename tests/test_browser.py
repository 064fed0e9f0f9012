"""The web interface in a real browser (Debian's Chromium via Playwright) against the live server and
a real Celery worker: sign-in, drag-and-drop upload, live batch progress, the heatmap viewer, CSV
export, the reviewer's keyboard shortcuts and the dashboard filters. Screenshots of the main pages
go to test-output/screenshots/."""

import base64
import csv
import os
import re
import signal
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.sessions.models import Session
from django.db import transaction
from django.utils import timezone
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect
from rest_framework.test import APIClient

from diagnosis import services
from diagnosis.exports import CSV_COLUMNS
from diagnosis.models import Analysis, Batch, private_storage
from diagnosis.templatetags.scores import score
from tests.browser import (
    VIEWPORT,
    broken_images,
    drop_files,
    log_in,
    overflows_horizontally,
    screenshot,
)
from tests.conftest import fixture_cells
from tests.factories import PASSWORD, classified, make_reviewer, upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ANALYSIS_TIMEOUT_MS = 180_000  # first inference loads torch and the weights on a busy 2-core machine


@contextmanager
def paused(worker):
    """Stops the worker's processes (SIGSTOP) so queued work waits until the block ends."""
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)


def test_upload_live_progress_heatmap_export_and_review(open_page, celery_worker_process, user):
    cells = fixture_cells()
    page = open_page()

    # 1. Sign in through the form.
    log_in(page, user.username, PASSWORD)
    expect(page.get_by_role("heading", name="Your analyses")).to_be_visible()
    expect(page.get_by_role("link", name="Review queue")).to_have_count(0)  # not a reviewer

    # 2. Drag the cell images onto the drop zone, name the sample, upload.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Upload").click()
    page.wait_for_url("**/upload/")  # waits for the load event, so upload.js is running
    expect(page.get_by_role("heading", name="Upload cell images")).to_be_visible()
    # Chosen from the keyboard (Enter on the drop zone opens the file chooser): a file that only
    # looks like an image makes the server refuse the whole batch, and the page says which file.
    page.locator("#dropzone").focus()
    with page.expect_file_chooser() as chooser_info:
        page.keyboard.press("Enter")
    chooser_info.value.set_files(
        [
            {"name": cells[0].name, "mimeType": "image/png", "buffer": cells[0].read_bytes()},
            {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"},
        ]
    )
    expect(page.locator("#file-list li")).to_have_count(2)
    page.locator("#upload-button").click()
    expect(page.locator("#file-list li.rejected")).to_contain_text("broken.pngrefused: the file is not a readable")
    expect(page.locator("#client-errors")).to_contain_text("Nothing was stored")
    open_page.expect_error(page, "status of 400 (Bad Request)")
    assert not Batch.objects.exists() and not Analysis.objects.exists()
    drop_files(page, "#dropzone", cells)
    expect(page.locator("#file-list li")).to_have_count(len(cells))
    expect(page.locator("#file-list li.rejected")).to_have_count(0)
    for cell in cells:
        expect(page.locator("#file-list")).to_contain_text(cell.name)
    upload_button = page.locator("#upload-button")
    expect(upload_button).to_have_text(f"Upload and analyse {len(cells)} images")
    page.get_by_label("Patient / sample reference").fill("WARD-7 slide 2")
    screenshot(page, "upload")

    # Each file's status line is kept in sessionStorage as it changes, to read after the redirect.
    page.evaluate(
        """() => new MutationObserver(() => sessionStorage.setItem('file-notes', JSON.stringify(
              Array.from(document.querySelectorAll('#file-list li span'), (note) => note.textContent))))
            .observe(document.getElementById('file-list'), {subtree: true, characterData: true, childList: true})"""
    )
    with paused(celery_worker_process):  # the batch page must open before any result exists
        upload_button.click()
        page.wait_for_url(re.compile(r"/batches/\d+/$"))
        page.mouse.move(0, 0)  # the grid waits to re-sort while the pointer rests on it
        assert page.evaluate("JSON.parse(sessionStorage.getItem('file-notes'))") == ["uploaded"] * len(cells)
        progress = page.locator("#progress-text")
        expect(progress).to_contain_text(f"0 / {len(cells)} finished")
        expect(page.locator(".flash")).to_have_text(f"{len(cells)} images queued for analysis.")
        page.evaluate("window.__marker = 'no reload'")
    batch = Batch.objects.get()
    assert batch.owner == user and batch.sample_reference == "WARD-7 slide 2"
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Batch #{batch.pk} — WARD-7 slide 2")

    # The page follows the worker without reloading.
    expect(progress).to_contain_text(f"{len(cells)} / {len(cells)} finished", timeout=ANALYSIS_TIMEOUT_MS)
    assert page.evaluate("window.__marker") == "no reload"
    analyses = list(batch.analyses.order_by("pk"))
    assert all(a.status == Analysis.Status.DONE for a in analyses), [a.error for a in analyses]
    parasitized = sum(a.label == Analysis.Label.PARASITIZED for a in analyses)
    expect(progress).to_contain_text(f"{parasitized} parasitized, 0 failed")
    expect(page.locator("#progress-bar")).to_have_js_property("value", len(cells))
    expect(page.locator("[data-parasitemia]")).to_have_text(str(round(100 * parasitized / len(cells))))
    most_suspicious_first = sorted(analyses, key=lambda a: (-a.probability_parasitized, a.pk))
    grid_order = page.locator("#cell-grid > li").evaluate_all("(items) => items.map((li) => li.dataset.analysis)")
    assert grid_order == [str(a.pk) for a in most_suspicious_first]
    for analysis in analyses:
        cell = page.locator(f'#cell-grid [data-analysis="{analysis.pk}"]')
        expect(cell.locator("[data-status]")).to_have_text("Done")
        expect(cell.locator("[data-label]")).to_have_text(analysis.label)
        expect(cell.locator("[data-probability]")).to_have_text(score(analysis.probability_parasitized))
    assert not broken_images(page) and not overflows_horizontally(page)
    screenshot(page, "batch", docs=True)

    # 3. The result page: the heatmap's opacity follows the slider (mouse and keyboard).
    first = analyses[0]
    page.locator(f'#cell-grid [data-analysis="{first.pk}"] a').click()
    page.wait_for_url(re.compile(rf"/analyses/{first.pk}/\?from=%2Fbatches%2F{batch.pk}%2F$"))  # Back: the batch
    expect(page.get_by_role("heading", level=1)).to_have_text(first.original_filename)
    overlay = page.locator("#overlay-image")
    expect(overlay).to_have_css("opacity", "1")
    slider = page.get_by_label("Heatmap opacity")
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    opacity = float(overlay.evaluate("(img) => getComputedStyle(img).opacity"))
    assert 0.15 < opacity < 0.45, opacity
    assert opacity == pytest.approx(int(slider.input_value()) / 100)
    slider.press("Home")
    expect(overlay).to_have_css("opacity", "0")
    expect(slider).to_have_attribute("aria-valuetext", "0%")
    slider.press("End")
    expect(overlay).to_have_css("opacity", "1")
    page.mouse.click(box["x"] + box["width"] * 0.65, box["y"] + box["height"] / 2)
    slider.blur()
    assert not broken_images(page) and not overflows_horizontally(page)
    screenshot(page, "analysis", docs=True)
    history = page.locator("#access-history")
    history.get_by_text("Who has opened this cell").click()  # folded away until asked for
    # Rendered with the page, so its own image requests come too late to be listed; a heatmap
    # preview fetched by the hover on the batch grid may or may not come before it.
    opening = history.locator("tbody tr").filter(has=page.locator("td", has_text=re.compile(r"^viewed$")))
    expect(opening).to_have_count(1)
    expect(opening.locator("td").nth(1)).to_have_text(user.username)
    expect(history.locator("tbody")).to_contain_text(f"uploaded the batch ({len(cells)} images)")
    screenshot(page, "analysis_history")
    assert not overflows_horizontally(page)

    # 4. Export the batch as CSV.
    page.get_by_role("link", name="← Back").click()
    page.wait_for_url(f"**/batches/{batch.pk}/")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export CSV").click()
    download = download_info.value
    assert download.suggested_filename == f"batch-{batch.pk}.csv"
    with open(download.path(), newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert [int(row["analysis_id"]) for row in rows] == [a.pk for a in analyses]
    for row, analysis in zip(rows, analyses, strict=True):
        assert row["original_filename"] == analysis.original_filename
        assert row["batch_id"] == str(batch.pk) and row["sample_reference"] == "WARD-7 slide 2"
        assert row["status"] == "done" and row["label"] == analysis.label
        # As the pages show it: three decimals, rounded down, so it never reads as reaching a threshold it missed.
        exported = float(row["probability_parasitized"])
        assert analysis.probability_parasitized - 1e-3 < exported <= analysis.probability_parasitized
        assert float(row["decision_threshold"]) == analysis.decision_threshold
        assert row["model_version"] == analysis.model_version != ""
        assert row["review_verdict"] == "" and row["finished_at"]
    assert sorted(row["original_filename"] for row in rows) == sorted(cell.name for cell in cells)

    # 5. A reviewer agrees with one case (A) and corrects the next (D, Enter).
    reviewer_page = open_page()
    reviewer = make_reviewer()
    log_in(reviewer_page, reviewer.username, PASSWORD)
    reviewer_page.get_by_role("navigation", name="Main").get_by_role("link", name="Review queue").click()
    reviewer_page.wait_for_url("**/review/")
    expect(reviewer_page.get_by_role("heading", name="Review queue")).to_be_visible()
    rows = reviewer_page.locator("table.results tbody tr")
    expect(rows).to_have_count(len(cells))
    assert not broken_images(reviewer_page)
    screenshot(reviewer_page, "review_queue")
    rows.first.get_by_role("link", name="Review").click()
    reviewer_page.wait_for_url(re.compile(r"/review/\d+/$"))
    agreed = Analysis.objects.get(pk=int(re.search(r"/review/(\d+)/", reviewer_page.url)[1]))
    expect(reviewer_page.get_by_role("heading", level=1)).to_have_text(f"Review {agreed.original_filename}")
    assert not broken_images(reviewer_page)
    screenshot(reviewer_page, "review")
    reviewer_page.keyboard.press("a")
    expect(reviewer_page.locator(".flash")).to_have_text(
        f"Review of {agreed.original_filename} saved (agreed). Change it"
    )
    expect(reviewer_page.locator(".flash").get_by_role("link", name="Change it")).to_have_attribute(
        "href", f"/review/{agreed.pk}/"
    )
    agreed.refresh_from_db()
    assert (agreed.review_verdict, agreed.reviewed_by, agreed.corrected_label) == ("agree", reviewer, "")

    reviewer_page.wait_for_load_state()  # the next case, with its shortcuts
    disagreed = Analysis.objects.get(pk=int(re.search(r"/review/(\d+)/", reviewer_page.url)[1]))
    assert disagreed.pk != agreed.pk and not disagreed.review_verdict
    reviewer_page.keyboard.press("d")
    select = reviewer_page.get_by_label("Corrected label (when disagreeing)")
    expect(select).to_be_focused()
    other_label = ({"Parasitized", "Uninfected"} - {disagreed.label}).pop()
    expect(select).to_have_value(other_label)
    select.press("Enter")
    expect(reviewer_page.locator(".flash")).to_have_text(
        f"Review of {disagreed.original_filename} saved (disagreed). Change it"
    )
    disagreed.refresh_from_db()
    assert (disagreed.review_verdict, disagreed.corrected_label) == ("disagree", other_label)

    # The single-key shortcuts can be switched off, and stay off in this browser.
    reviewer_page.wait_for_load_state()
    third = Analysis.objects.get(pk=int(re.search(r"/review/(\d+)/", reviewer_page.url)[1]))
    reviewer_page.get_by_label("Keyboard shortcuts").uncheck()
    reviewer_page.reload()
    expect(reviewer_page.get_by_label("Keyboard shortcuts")).not_to_be_checked()
    # A listener on the window hears the key after review.js's on the document: by then a shortcut
    # would have submitted the form (requestSubmit dispatches "submit" at once).
    reviewer_page.evaluate("""() => {
        document.getElementById("review-form").addEventListener("submit", () => { window.reviewSubmitted = true; });
        window.addEventListener("keydown", () => { window.keyHeard = true; });
    }""")
    reviewer_page.keyboard.press("a")
    try:
        reviewer_page.wait_for_function("window.keyHeard === true")
        submitted = reviewer_page.evaluate("window.reviewSubmitted === true")
    except PlaywrightError as navigated:  # the review went, and the next case is on its way
        submitted = navigated
    assert not submitted, f"A with the shortcuts off sent the review: {submitted}"
    expect(reviewer_page.locator('input[value="agree"]')).not_to_be_checked()
    third.refresh_from_db()
    assert not third.review_verdict and reviewer_page.locator(".flash").count() == 0
    # Switched on again, the same key on the same loaded page does save.
    # After a D that chose a label, A agrees without it (an agreement with another label is refused).
    reviewer_page.get_by_label("Keyboard shortcuts").check()
    reviewer_page.keyboard.press("d")
    reviewer_page.get_by_label("Corrected label (when disagreeing)").blur()
    reviewer_page.keyboard.press("a")
    expect(reviewer_page.locator(".flash")).to_have_text(
        f"Review of {third.original_filename} saved (agreed). Change it"
    )
    # Change it opens that review as it was saved.
    reviewer_page.locator(".flash").get_by_role("link", name="Change it").click()
    reviewer_page.wait_for_url(f"**/review/{third.pk}/")
    expect(reviewer_page.get_by_role("radio", name=re.compile("^Agree"))).to_be_checked()

    # The owner sees both verdicts.
    page.goto(f"/analyses/{agreed.pk}/")
    expect(page.locator("#review-verdict")).to_contain_text(f"Agreed by {reviewer.username}")
    page.goto(f"/analyses/{disagreed.pk}/")
    expect(page.locator("#review-verdict")).to_contain_text(f"Disagreed by {reviewer.username}")
    expect(page.locator("#analysis-facts [data-label]")).to_have_text(other_label)

    page.get_by_role("link", name="Malaria cell screening").click()
    expect(page.locator("table.results tbody tr")).to_have_count(len(cells))
    assert not broken_images(page) and not overflows_horizontally(page)
    screenshot(page, "dashboard", docs=True)

    # The sample list sums the batch up.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Samples").click()
    row = page.locator(f'#samples tr[data-batch="{batch.pk}"]')
    expect(row).to_contain_text("WARD-7 slide 2")
    parasitized = sum(a.final_label == "Parasitized" for a in batch.analyses.all())  # the correction counts
    expect(row.locator('[data-count="parasitized"]')).to_have_text(str(parasitized))
    expect(row.locator("[data-parasitemia]")).to_contain_text(f"{round(100 * parasitized / len(cells))}%")
    assert not overflows_horizontally(page)
    screenshot(page, "samples", docs=True)
    # On a phone the result (its fraction of how many cells), the failures and the report stay on screen.
    page.set_viewport_size({"width": 390, "height": 844})
    expect(row.locator("[data-parasitemia]")).to_contain_text(f"of {len(cells)}")
    for shown in ("[data-parasitemia]", '[data-count="failed"]', "td:last-child a"):
        expect(row.locator(shown)).to_be_in_viewport()
    assert not overflows_horizontally(page)
    page.set_viewport_size(VIEWPORT)

    # 6. The owner deletes one cell, then the rest of the batch, files included.
    page.goto(f"/analyses/{agreed.pk}/")
    page.get_by_role("link", name="Delete…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Delete {agreed.original_filename}?")
    screenshot(page, "confirm_delete")
    page.get_by_role("button", name="Delete for good").click()
    page.wait_for_url(f"**/batches/{batch.pk}/")
    expect(page.locator(".flash")).to_contain_text(f"Deleted {agreed.original_filename}")
    expect(page.locator("#cell-grid li")).to_have_count(len(cells) - 1)
    assert not private_storage.exists(agreed.image.name) and not private_storage.exists(agreed.overlay.name)
    remaining = list(batch.analyses.all())
    page.get_by_role("link", name="Delete batch…").click()
    page.get_by_role("button", name="Delete for good").click()
    page.wait_for_url("**/batches/")
    expect(page.locator(".flash")).to_contain_text(f"Deleted batch #{batch.pk}")
    expect(page.locator("p.empty")).to_contain_text("No samples yet.")
    assert not any(private_storage.exists(a.image.name) for a in remaining)


def test_dashboard_filters_survive_pagination(open_page, user, other_user):
    ward = Batch.objects.create(owner=user, sample_reference="WARD-9")
    clinic = Batch.objects.create(owner=user, sample_reference="CLINIC-B")
    foreign = Batch.objects.create(owner=other_user, sample_reference="WARD-9")
    now = timezone.now()

    def analysis(batch, n, label):
        return Analysis(
            owner=batch.owner,
            batch=batch,
            original_filename=f"{batch.sample_reference.lower()}-{label.lower()}-{n:02}.png",
            status=Analysis.Status.DONE,
            label=label,
            probability_parasitized=0.9 if label == "Parasitized" else 0.1,
            model_version="test",
            finished_at=now,
        )

    Analysis.objects.bulk_create(
        [analysis(ward, n, "Parasitized") for n in range(30)]
        + [analysis(ward, n, "Uninfected") for n in range(4)]
        + [analysis(clinic, n, "Parasitized") for n in range(6)]
        + [analysis(foreign, n, "Parasitized") for n in range(3)]
    )
    Analysis.objects.update(created_at=now - timedelta(hours=1))

    page = open_page()
    log_in(page, user.username, PASSWORD)
    pager = page.get_by_role("navigation", name="Pages")
    expect(pager).to_contain_text("Page 1 of 2 (40 analyses)")

    filters = page.get_by_role("form", name="Filter analyses")
    filters.get_by_label("Search").fill("ward-9")
    filters.get_by_label("Label").select_option("Parasitized")
    filters.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r"search=ward-9"))
    rows = page.locator("table.results tbody tr")
    expect(pager).to_contain_text("Page 1 of 2 (30 analyses)")
    expect(rows).to_have_count(25)
    samples = rows.locator("td:nth-child(3)")
    labels = rows.locator("[data-label]")
    assert all(text.startswith("WARD-9") for text in samples.all_inner_texts())
    assert set(labels.all_inner_texts()) == {"Parasitized"}
    export = page.get_by_role("link", name="Export CSV")
    assert "search=ward-9" in export.get_attribute("href") and "label=Parasitized" in export.get_attribute("href")

    pager.get_by_role("link", name="Next →").click()
    page.wait_for_url(re.compile(r"page=2"))
    assert "search=ward-9" in page.url and "label=Parasitized" in page.url
    expect(pager).to_contain_text("Page 2 of 2 (30 analyses)")
    expect(rows).to_have_count(5)
    assert all(text.startswith("WARD-9") for text in samples.all_inner_texts())
    assert set(labels.all_inner_texts()) == {"Parasitized"}
    expect(filters.get_by_label("Search")).to_have_value("ward-9")
    expect(filters.get_by_label("Label")).to_have_value("Parasitized")

    pager.get_by_role("link", name="← Previous").click()
    page.wait_for_url(re.compile(r"page=1"))
    assert "search=ward-9" in page.url
    expect(rows).to_have_count(25)

    filters.get_by_label("Search").fill("no-such-sample")
    filters.get_by_role("button", name="Apply").click()
    expect(page.locator(".empty")).to_contain_text("No analyses match these filters")
    page.get_by_role("link", name="Show all analyses").click()
    expect(pager).to_contain_text("Page 1 of 2 (40 analyses)")

    # On a tablet in portrait the page does not scroll sideways and the filters still work.
    page.set_viewport_size({"width": 768, "height": 1024})
    assert not overflows_horizontally(page)
    filters.get_by_label("Search").fill("clinic")
    filters.get_by_label("Search").press("Enter")
    expect(pager).to_contain_text("Page 1 of 1 (6 analyses)")
    assert not overflows_horizontally(page)
    screenshot(page, "dashboard_tablet")


def test_a_lab_system_key_is_issued_on_the_account_page_and_works(open_page, user):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="API token").click()
    expect(page.locator("#no-token")).to_be_visible()
    page.get_by_role("button", name="Issue a key").click()  # the browser itself asks for the password
    expect(page.get_by_role("alert")).to_have_count(0)
    page.get_by_label("Your password").fill("not-" + PASSWORD)
    page.get_by_role("button", name="Issue a key").click()
    expect(page.get_by_role("alert")).to_contain_text(
        "That is not your password. A new key needs your current password."
    )
    open_page.expect_error(page, "400")
    page.get_by_label("Your password").fill(PASSWORD)
    page.get_by_role("button", name="Issue a key").click()
    key = page.locator("#token-key").inner_text()
    page.reload()  # the browser sends the form again: the key was shown once, and no other is issued
    expect(page.locator(".flash")).to_contain_text("That form had been used already, so no key was issued")
    expect(page.locator("#token-key")).to_have_count(0)
    expect(page.locator("#token-expiry")).to_contain_text("It works until")
    assert not overflows_horizontally(page)
    screenshot(page, "api_token")
    assert APIClient().get("/api/batches/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200

    page.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("heading", name="Revoke the API token?")).to_be_visible()
    page.get_by_role("link", name="Keep it").click()
    assert APIClient().get("/api/batches/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    page.get_by_role("button", name="Revoke").click()
    page.get_by_role("button", name="Revoke the key").click()
    expect(page.locator(".flash")).to_contain_text("API token revoked")
    expect(page.locator("#no-token")).to_be_visible()
    assert APIClient().get("/api/batches/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 401


def test_a_cell_that_fails_while_the_batch_page_is_open_can_be_sent_again_from_it(
    open_page, celery_worker_process, user
):
    cells = fixture_cells()[:2]
    page = open_page()
    log_in(page, user.username, PASSWORD)
    with paused(celery_worker_process):
        with transaction.atomic():
            batch = services.create_batch(owner=user, uploads=[upload(p.name, p.read_bytes()) for p in cells])
            broken = batch.analyses.get(original_filename=cells[0].name)
            stored = Path(broken.image.path)
            original = stored.read_bytes()
            stored.write_bytes(b"lost to a storage fault")
        page.goto(f"/batches/{batch.pk}/")
        retry = page.get_by_role("button", name=re.compile("Analyse the failed cells again"))
        expect(retry).to_be_hidden()

    # The page learns of the failure by polling and offers the retry without a reload.
    expect(page.locator("#progress-text")).to_contain_text("2 / 2 finished", timeout=ANALYSIS_TIMEOUT_MS)
    expect(page.locator("#progress-text")).to_contain_text("1 failed")
    expect(retry).to_be_visible()
    expect(retry).to_have_text("Analyse the failed cells again (1)")

    stored.write_bytes(original)  # the fault is repaired
    retry.click()
    expect(page.locator(".flash")).to_have_text("1 failed cell queued for analysis again.")
    expect(page.locator("#progress-text")).to_contain_text("2 / 2 finished", timeout=ANALYSIS_TIMEOUT_MS)
    expect(page.locator("#progress-text")).to_contain_text("0 failed")
    expect(retry).to_be_hidden()
    broken.refresh_from_db()
    assert broken.status == Analysis.Status.DONE and broken.error == ""


def test_an_upload_too_large_in_all_is_trimmed_and_a_refusal_keeps_the_form(open_page, user, settings):
    cells = fixture_cells()
    first_two = sum(cell.stat().st_size for cell in cells[:2])
    settings.REQUEST_MAX_BYTES = first_two + 3 * 1024 + 65536  # room for two cells and the form around them
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.get_by_label("Patient / sample reference").fill("WARD-3")
    drop_files(page, "#dropzone", cells)
    expect(page.locator("#file-list li")).to_have_count(len(cells))
    expect(page.locator("#file-list li.rejected")).to_have_count(len(cells) - 2)
    expect(page.locator("#file-list li.rejected").first).to_contain_text("one upload takes at most")
    expect(page.locator("#upload-button")).to_have_text("Upload and analyse 2 images")

    settings.REQUEST_MAX_BYTES = 1000  # the server's limit fell after the page was loaded
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("The request is too large")
    expect(page.locator("#client-errors")).to_contain_text("Nothing was stored.")
    open_page.expect_error(page, "status of 413")
    expect(page.locator("#file-list li:not(.rejected) span")).to_have_text(["not stored", "not stored"])
    expect(page.get_by_label("Patient / sample reference")).to_have_value("WARD-3")
    expect(page.locator("#upload-button")).to_be_enabled()
    assert not Batch.objects.exists() and not Analysis.objects.exists()

    # The session ends before the click: the page says so rather than leave for the sign-in page.
    settings.REQUEST_MAX_BYTES = first_two * 10
    Session.objects.all().delete()
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("Your session has ended, so nothing was stored.")
    assert page.url.endswith("/upload/") and not Batch.objects.exists()


def test_the_selection_stays_as_sent_while_an_upload_is_on_its_way(open_page, user, not_analysed):
    cells = fixture_cells()
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    # A drop whose every file is skipped replaces the images chosen before: nothing unlisted is sent.
    page.set_input_files("#id_images", str(cells[0]))
    drop_files(page, "#dropzone", [("notes.gif", b"GIF89a")], content_type="image/gif")
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("None of the chosen files can be uploaded")
    assert not Batch.objects.exists()

    held = []
    page.route("**/upload/", lambda route: held.append(route) if route.request.method == "POST" else route.continue_())
    page.set_input_files("#id_images", [str(cell) for cell in cells[:2]])
    page.locator("#upload-button").click()
    expect(page.get_by_role("status")).to_have_text("Uploading 2 images…")
    for control in ("#id_images", "#folder-picker", "#upload-button"):
        expect(page.locator(control)).to_be_disabled()
    drop_files(page, "#dropzone", [cells[2]], check_highlight=False)
    expect(page.locator("#file-list li")).to_have_text([re.compile(cells[0].name), re.compile(cells[1].name)])
    held[0].continue_()
    page.wait_for_url(re.compile(r"/batches/\d+/$"))
    assert sorted(Analysis.objects.values_list("original_filename", flat=True)) == sorted(c.name for c in cells[:2])


def test_a_dropped_folder_uploads_the_images_inside_it(open_page, user, not_analysed):
    """Browsers hand a dropped folder over as one entry, its files only through the directory API.
    Playwright cannot drag a folder from the desktop, so the drop carries entries shaped like
    Chromium's: a folder whose reader returns its entries in two batches, then none."""
    cell = base64.b64encode(fixture_cells()[0].read_bytes()).decode()
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.evaluate(
        """(cell) => {
            const bytes = Uint8Array.from(atob(cell), (c) => c.charCodeAt(0));
            const file = (path) => ({ isFile: true, isDirectory: false, fullPath: path,
                file: (done) => done(new File([bytes], path.split("/").pop(), { type: "image/png" })) });
            const folder = (path, children) => ({ isFile: false, isDirectory: true, fullPath: path,
                createReader: () => { const batches = [children.slice(0, 2), children.slice(2)];
                    return { readEntries: (done) => done(batches.shift() || []) }; } });
            const root = folder("/slide-3", [file("/slide-3/b.png"), file("/slide-3/._b.png"),
                folder("/slide-3/more", [file("/slide-3/more/c.png")]), file("/slide-3/a.png"),
                file("/slide-3/notes.txt")]);
            const drop = new Event("drop", { bubbles: true, cancelable: true });
            const dropped = new File([], "slide-3");  // what a folder looks like in dataTransfer.files
            Object.defineProperty(drop, "dataTransfer",
                { value: { files: [dropped], items: [{ webkitGetAsEntry: () => root }] } });
            document.getElementById("dropzone").dispatchEvent(drop);
        }""",
        cell,
    )
    listed = page.locator("#file-list li")
    expect(listed).to_have_count(5)
    expect(page.locator("#file-list li.rejected")).to_have_count(2)
    expect(listed.filter(has_text="slide-3/._b.png")).to_contain_text("skipped: hidden file")
    expect(listed.filter(has_text="slide-3/notes.txt")).to_contain_text("skipped: not a PNG")
    expect(listed.filter(has_text="slide-3/more/c.png")).not_to_have_class("rejected")
    expect(page.locator("#upload-button")).to_have_text("Upload and analyse 3 images")
    page.locator("#upload-button").click()
    page.wait_for_url(re.compile(r"/batches/\d+/"))
    (batch,) = Batch.objects.filter(owner=user)
    assert sorted(batch.analyses.values_list("original_filename", flat=True)) == ["a.png", "b.png", "c.png"]


def test_the_dashboard_tells_a_screen_reader_what_finished(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png"), upload("c.png")])
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/")
    announcer = page.get_by_role("status")
    expect(announcer).to_have_text("")
    done = {"status": "done", "label": "Parasitized", "probability_parasitized": 0.9}
    with transaction.atomic():  # both at once: one poll sees both finish
        batch.analyses.filter(original_filename="a.png").update(**done)
        batch.analyses.filter(original_filename="b.png").update(status="failed", error="Cannot read the image.")
    expect(announcer).to_have_text("2 analyses finished: 1 parasitized, 1 failed.")
    expect(page.locator("[data-status]").filter(has_text="Queued")).to_have_count(1)


def test_a_borderline_call_is_marked_as_it_arrives_and_the_dashboard_lists_them(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("near.png"), upload("sure.png")])
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/batches/{batch.pk}/")
    badges = page.locator("#cell-grid [data-borderline]")
    expect(badges).to_have_count(2)
    expect(badges.first).to_be_hidden()
    done = {"status": "done", "decision_threshold": 0.11, "label": "Parasitized"}
    with transaction.atomic():
        batch.analyses.filter(original_filename="near.png").update(**done, probability_parasitized=0.2)
        batch.analyses.filter(original_filename="sure.png").update(**done, probability_parasitized=0.99)
    near = page.locator(f'[data-analysis="{batch.analyses.get(original_filename="near.png").pk}"]')
    sure = page.locator(f'[data-analysis="{batch.analyses.get(original_filename="sure.png").pk}"]')
    expect(near.locator("[data-borderline]")).to_be_visible()
    expect(sure.get_by_text("Parasitized")).to_be_visible()
    expect(sure.locator("[data-borderline]")).to_be_hidden()
    expect(page.locator("#progress-text")).to_contain_text("1 borderline")

    page.goto("/")
    page.get_by_label("Call").select_option(label="Borderline only")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("tbody tr").get_by_role("link", name="near.png")).to_be_visible()


def test_live_pages_say_when_they_stop_updating_rather_than_wait_for_ever(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("waiting.png"), upload("gone.png")])
    gone = batch.analyses.get(original_filename="gone.png")
    page = open_page()
    log_in(page, user.username, PASSWORD)

    # A cell deleted in another window: its page stops polling and says so.
    page.goto(f"/analyses/{gone.pk}/")
    services.delete_analysis(analysis=gone)
    expect(page.get_by_role("alert")).to_contain_text("This record no longer exists")

    # The session ends (signed out in another tab, or the shift is over) while the batch page is open.
    page.goto(f"/batches/{batch.pk}/")
    expect(page.locator("#progress-text")).to_contain_text("0 / 1 finished")
    Session.objects.all().delete()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Your session has ended, so this page no longer updates.")
    open_page.expect_error(page, "401")
    alert.get_by_role("link", name="Sign in again").click()
    page.wait_for_url(re.compile(rf"/accounts/login/\?next=%2Fbatches%2F{batch.pk}%2F$"))
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()


def test_the_api_docs_and_the_printable_report_work_under_the_content_security_policy(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-9")
    page = open_page(enforce_csp=True)
    page.goto("/api/docs/")  # public: integrators read it before they have an account
    expect(page.get_by_role("heading", name=re.compile("Malaria cell screening API"))).to_be_visible()
    # Redoc's own "by Redocly" logo comes from its CDN: the policy stops that request.
    open_page.expect_error(page, "'https://cdn.redoc.ly/redoc/logo-mini.svg' violates")

    log_in(page, user.username, PASSWORD)
    # The site's own scripts run under the policy (a violation is a console error, failing the test).
    for path in ("/upload/", f"/batches/{batch.pk}/", f"/analyses/{batch.analyses.get().pk}/", "/account/api-token/"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
    page.goto(f"/batches/{batch.pk}/report/")
    page.evaluate("window.print = () => { window.__printed = true; }")  # no print dialog in a test
    page.get_by_role("button", name="Print").click()
    assert page.evaluate("window.__printed") is True


def test_the_per_file_limit_is_checked_in_bytes_before_sending(open_page, user, settings, tmp_path):
    big = fixture_cells()[0]
    settings.UPLOAD_MAX_BYTES = big.stat().st_size - 1  # one byte short: a whole-MB limit would let it through
    small = tmp_path / "small.png"
    small.write_bytes(upload("small.png").read())
    assert small.stat().st_size <= settings.UPLOAD_MAX_BYTES
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    drop_files(page, "#dropzone", [big, small])
    expect(page.locator("#file-list li.rejected")).to_have_count(1)
    expect(page.locator("#file-list li.rejected")).to_contain_text(big.name)
    expect(page.locator("#file-list li.rejected")).to_contain_text("larger than")
    expect(page.locator("#upload-button")).to_have_text("Upload and analyse 1 image")


def test_a_refused_file_is_marked_and_the_others_stay_chosen_for_the_next_attempt(open_page, user, not_analysed):
    cells = fixture_cells()[:2]
    truncated = ("cut-short.png", cells[0].read_bytes()[:200])  # a PNG name and header, its data missing
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.get_by_label("Patient / sample reference").fill("WARD-5")
    drop_files(page, "#dropzone", [cells[0], truncated, cells[1]])
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("Nothing was stored: cut-short.png cannot be analysed")
    open_page.expect_error(page, "status of 400")
    # At the top of the list, its reason without its name again.
    expect(page.locator("#file-list li").first).to_have_class("rejected")
    expect(page.locator("#file-list li.rejected")).to_contain_text("cut-short.pngrefused: the file is not a readable")
    expect(page.locator("#upload-button")).to_have_text("Upload and analyse 2 images")
    expect(page.get_by_label("Patient / sample reference")).to_have_value("WARD-5")
    assert not Batch.objects.exists()
    page.locator("#upload-button").click()
    page.wait_for_url(re.compile(r"/batches/\d+/$"))
    batch = Batch.objects.get()
    assert batch.sample_reference == "WARD-5"
    assert sorted(batch.analyses.values_list("original_filename", flat=True)) == sorted(c.name for c in cells)


def test_the_upload_form_sent_again_after_back_stores_nothing_twice(open_page, user, not_analysed):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.set_input_files("#id_images", [str(cell) for cell in fixture_cells()[:2]])
    page.get_by_label("Patient / sample reference").fill("WARD-3")
    page.locator("#upload-button").click()
    page.wait_for_url(re.compile(r"/batches/\d+/$"))
    first = Batch.objects.get()
    # As Chromium after Back: the form fetched afresh, the files put back, the reference not.
    page.go_back()
    page.set_input_files("#id_images", [str(cell) for cell in fixture_cells()[:2]])
    page.locator("#upload-button").click()
    page.wait_for_url(f"**/batches/{first.pk}/")
    expect(page.locator(".flash")).to_contain_text(f"already uploaded as batch #{first.pk}")
    assert Batch.objects.count() == 1 and Analysis.objects.count() == 2


def test_pages_about_a_cell_with_a_long_name_fit_a_phone(open_page, user):
    long_name = "C100P61ThinF_IMG_20150918_144104_cell_162_second_scan_of_the_slide.png"
    cell = classified(services.create_analysis(owner=user, upload=upload(long_name)))
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in (f"/analyses/{cell.pk}/", f"/analyses/{cell.pk}/delete/"):
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_contain_text("cell_162")
        assert not overflows_horizontally(page), path
