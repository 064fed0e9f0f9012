"""The clinician's pages in a real browser on a 375 px phone, and with JavaScript switched off (a
locked-down hospital workstation): what a page offers must work, and what it says must be true."""

import re
import shutil

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone
from playwright.sync_api import expect

from diagnosis import services
from diagnosis.models import Analysis, Batch
from tests.browser import log_in, overflows_horizontally
from tests.conftest import fixture_cells
from tests.factories import PASSWORD, classified, image_bytes, make_reviewer, upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PHONE = {"width": 375, "height": 812}  # an iPhone X/11 Pro/12 mini, a common clinician's phone
NIH_NAME = "C100P61ThinF_IMG_20150918_144104_cell_162.png"


def cut_off(page, selector: str) -> list[str]:
    """The elements matching ``selector`` whose right edge is past the window or past the edge of the
    scrolling box they are in (a table-wrap): on a phone, whose scrollbars are hidden, they are unseen."""
    return page.evaluate(
        """(selector) => Array.from(document.querySelectorAll(selector)).filter((el) => {
            const box = el.getBoundingClientRect();
            const wrap = el.closest('.table-wrap');
            const edge = wrap ? wrap.getBoundingClientRect().right : Infinity;
            const right = Math.min(document.documentElement.clientWidth, edge);
            return box.width > 0 && box.right > right + 1;
        }).map((el) => el.innerText.trim() || el.outerHTML.slice(0, 60))""",
        selector,
    )


def test_on_a_phone_the_samples_table_shows_each_samples_result_and_report(open_page, user, not_analysed):
    """Samples is where a clinician reads a patient's parasitized fraction: on a 375 px phone its
    9-column table is twice the screen's width, and the fraction, the borderline and failed counts
    and the Report link lie past the right edge of a box whose scrollbar a phone does not show."""
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="WARD-7")
    for cell in batch.analyses.all():
        classified(cell)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size(PHONE)
    page.goto("/batches/")
    expect(page.locator("#samples [data-parasitemia]")).to_contain_text("100%")
    assert not overflows_horizontally(page)
    hidden = cut_off(page, "#samples [data-parasitemia], #samples td:last-child a")
    assert not hidden, f"off screen on a phone: {hidden}"
    open_page.errors[page].clear()


def test_on_a_phone_the_dashboard_keeps_each_cells_score_on_screen(open_page, user, not_analysed):
    """app.css says the result (label and score) stays on a phone's screen; at 375 px (and at 390)
    the P(parasitized) column is cut off: "0.91" shows as "0.9", its threshold and heading half gone."""
    cell = classified(services.create_analysis(owner=user, upload=upload(NIH_NAME)))
    waiting = services.create_analysis(owner=user, upload=upload("waiting.png"))
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size(PHONE)
    page.goto("/")
    expect(page.locator(f'tr[data-analysis="{cell.pk}"] [data-label]')).to_have_text("Parasitized")
    hidden = cut_off(page, "table.results th, table.results [data-probability], table.results [data-threshold]")
    assert not hidden, f"off screen on a phone: {hidden}"
    # With no room for the status column, a cell without a result says its status in the label's place.
    expect(page.locator(f'tr[data-analysis="{cell.pk}"] [data-status-note]')).to_be_hidden()
    expect(page.locator(f'tr[data-analysis="{waiting.pk}"] [data-status-note]')).to_have_text("Queued")
    failed = {"status": "failed", "error": "Model unavailable", "finished_at": timezone.now()}
    Analysis.objects.filter(pk=waiting.pk).update(**failed)
    expect(page.locator(f'tr[data-analysis="{waiting.pk}"] [data-status-note]')).to_have_text("Failed")
    page.set_viewport_size({"width": 1200, "height": 800})
    expect(page.locator(f'tr[data-analysis="{waiting.pk}"] [data-status-note]')).to_be_hidden()
    expect(page.locator(f'tr[data-analysis="{waiting.pk}"] [data-status]')).to_have_text("Failed")
    open_page.errors[page].clear()  # classified without a thumbnail file


def test_on_a_phone_each_dashboard_result_names_its_sample(open_page, user, not_analysed):
    """At 700 px and below the dashboard hides its Sample column: on a phone a row read
    "C100P61ThinF_..._cell_162.png  Parasitized  0.910", and nothing said whose sample it was."""
    batch = services.create_batch(owner=user, uploads=[upload(NIH_NAME)], sample_reference="WARD-7 bed 3")
    cell = classified(batch.analyses.get())
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size(PHONE)
    page.goto("/")
    row = page.locator(f'tr[data-analysis="{cell.pk}"]')
    sample = f"WARD-7 bed 3 #{batch.pk}"
    expect(row.locator(".file").get_by_text(sample)).to_be_visible()
    assert not cut_off(page, "table.results .file")
    page.set_viewport_size({"width": 1200, "height": 800})  # where the Sample column says it, once
    expect(row.get_by_role("link", name=sample)).to_be_visible()
    expect(row.locator(".file").get_by_text(sample)).to_be_hidden()
    open_page.errors[page].clear()  # classified without a thumbnail file


def test_on_a_phone_a_new_api_key_shown_once_fits_the_screen(open_page, user):
    """The key is shown once, to be copied into the lab system: its 40 characters do not wrap, so on
    a phone the page scrolls sideways and the key runs out of its card past the screen's edge."""
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size(PHONE)
    page.goto("/account/api-token/")
    page.get_by_label("Your password (needed for a new key)").fill(PASSWORD)
    page.get_by_role("button", name="Issue a key").click()
    expect(page.locator("#token-key")).to_have_text(re.compile(r"^[0-9a-f]{40}$"))
    assert not cut_off(page, "#token-key"), "the key runs past the screen's edge"
    assert not overflows_horizontally(page)


def test_on_a_phone_the_review_queue_does_not_scroll_sideways(open_page, user, not_analysed):
    """A reviewer's "Your recent reviews" and "Recent disagreements" lists name each cell by its file
    name, which does not wrap: an NIH-style name widens the page past a phone's screen."""
    reviewer = make_reviewer()
    cell = classified(services.create_analysis(owner=user, upload=upload(NIH_NAME)))
    services.review_analysis(
        analysis=cell, reviewer=reviewer, verdict="disagree", corrected_label="Uninfected", note="", replacing=None
    )
    page = open_page()
    log_in(page, reviewer.username, PASSWORD)
    page.set_viewport_size(PHONE)
    page.goto("/review/")
    expect(page.get_by_role("heading", name="Your recent reviews")).to_be_visible()
    assert not overflows_horizontally(page)


@pytest.fixture
def no_script_page(browser, live_server):
    """A page in a browser with JavaScript switched off (a locked-down hospital workstation)."""
    context = browser.new_context(base_url=live_server.url, java_script_enabled=False)
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def test_without_javascript_the_upload_page_offers_only_what_works(no_script_page, user, not_analysed, tmp_path):
    """upload.js says "Without JavaScript the plain form still works", but the page still offers a
    folder picker that has no name (its files are never sent: choosing a folder and pressing Upload
    is stopped with "Please select one or more files") and invites a drop that nothing handles."""
    page = no_script_page
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    problems = []
    if page.locator("#folder-picker").is_visible():
        folder = tmp_path / "slide-3"
        folder.mkdir()
        for cell in fixture_cells()[:2]:
            shutil.copy(cell, folder)
        page.set_input_files("#folder-picker", str(folder))
        page.get_by_role("button", name=re.compile("Upload and analyse")).click()
        page.wait_for_load_state()
        if not Batch.objects.exists():
            message = page.evaluate("document.getElementById('id_images').validationMessage")
            problems.append(f"a folder chosen with the folder picker is not uploaded (the browser says {message!r})")
    if page.get_by_text("Drop cell images here").is_visible():
        problems.append("the page invites a drop, which without JavaScript opens the file in place of the page")
    assert not problems, problems


def test_with_javascript_the_upload_page_offers_a_drop_and_a_folder(open_page, user):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    expect(page.get_by_text("Drop cell images here")).to_be_visible()
    expect(page.locator("#folder-picker")).to_be_visible()
    expect(page.get_by_role("group", name="Cell images: drop them here, or press Enter to choose")).to_be_visible()


def test_without_javascript_pages_do_not_promise_updates_they_cannot_make(no_script_page, user, not_analysed):
    """Without JavaScript the result page still says "this page refreshes when it finishes" and the
    batch page shows "0 / 1 finished" for ever, neither saying to reload; the report's Print button
    does nothing."""
    batch = services.create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-7")
    cell = batch.analyses.get()
    page = no_script_page
    log_in(page, user.username, PASSWORD)
    problems = []
    page.goto(f"/analyses/{cell.pk}/")
    if page.get_by_text("this page refreshes when it finishes").is_visible():
        problems.append("the result page promises to refresh itself")
    page.goto(f"/batches/{batch.pk}/")
    expect(page.locator("#progress-text")).to_contain_text("0 / 1 finished")
    if not page.get_by_text(re.compile("reload", re.IGNORECASE)).count():
        problems.append("the batch page does not say it updates only when reloaded")
    page.goto(f"/batches/{batch.pk}/report/")
    if page.get_by_role("button", name="Print").is_visible():
        problems.append("the report shows a Print button that does nothing")
    assert not problems, problems


def test_without_javascript_the_review_pages_offer_no_keyboard_shortcuts(no_script_page, user, not_analysed):
    """review.js handles A and D; without JavaScript the review page still showed a ticked "Keyboard
    shortcuts (A agree and save, D disagree)" box and A/D key caps beside the verdicts, pressing A did
    nothing, and the queue still said "Open a case and press A to agree"."""
    cell = classified(services.create_batch(owner=user, uploads=[upload("a.png")]).analyses.get())
    page = no_script_page
    log_in(page, make_reviewer().username, PASSWORD)
    page.goto(f"/review/{cell.pk}/")
    expect(page.get_by_role("radio", name="Agree", exact=True)).to_be_visible()
    expect(page.get_by_role("checkbox", name=re.compile("Keyboard shortcuts"))).to_be_hidden()
    expect(page.locator("kbd:visible")).to_have_count(0)
    page.goto("/review/")
    expect(page.get_by_text("Least confident predictions first.")).to_be_visible()
    expect(page.get_by_text("press A to agree")).to_be_hidden()


def test_with_javascript_the_review_pages_offer_the_keyboard_shortcuts(open_page, user, not_analysed):
    cell = classified(services.create_batch(owner=user, uploads=[upload("a.png")]).analyses.get())
    page = open_page()
    log_in(page, make_reviewer().username, PASSWORD)
    page.goto("/review/")
    expect(page.get_by_text("press A to agree")).to_be_visible()
    page.goto(f"/review/{cell.pk}/")
    expect(page.get_by_role("checkbox", name=re.compile("Keyboard shortcuts"))).to_be_checked()
    expect(page.get_by_role("radio", name="Agree A")).to_be_visible()
    open_page.errors[page].clear()  # classified without picture files


def test_without_javascript_the_result_page_offers_no_opacity_slider(no_script_page, user, not_analysed):
    """The heatmap's opacity slider is moved by analysis.js; without JavaScript it moved and nothing
    happened."""
    cell = classified(services.create_batch(owner=user, uploads=[upload("a.png")]).analyses.get())
    cell.overlay.save("overlay.png", ContentFile(image_bytes(color=(255, 0, 0))), save=True)
    page = no_script_page
    log_in(page, user.username, PASSWORD)
    page.goto(f"/analyses/{cell.pk}/")
    expect(page.get_by_text("Grad-CAM overlay")).to_be_visible()
    expect(page.get_by_label("Heatmap opacity")).to_be_hidden()


def test_with_javascript_the_opacity_slider_fades_the_heatmap(open_page, user, not_analysed):
    cell = classified(services.create_batch(owner=user, uploads=[upload("a.png")]).analyses.get())
    cell.overlay.save("overlay.png", ContentFile(image_bytes(color=(255, 0, 0))), save=True)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/analyses/{cell.pk}/")
    page.get_by_label("Heatmap opacity").fill("25")
    expect(page.locator("#overlay-image")).to_have_css("opacity", "0.25")


def test_with_javascript_pages_update_and_print(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-7")
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/analyses/{batch.analyses.get().pk}/")
    expect(page.get_by_text("this page refreshes when it finishes")).to_be_visible()
    expect(page.get_by_text("reload the page to see the result")).to_be_hidden()
    page.goto(f"/batches/{batch.pk}/report/")
    expect(page.get_by_role("button", name="Print")).to_be_visible()


def test_on_a_phone_an_unfinished_sample_says_it_is_unfinished(open_page, user, not_analysed):
    """The phone hides Samples' Cells and Finished columns: "0% of 2" of a sample with 38 cells still
    to come read as a finished negative sample of 2 cells."""
    batch = services.create_batch(owner=user, uploads=[upload(f"c{n}.png") for n in range(4)], sample_reference="W-1")
    for cell in list(batch.analyses.all())[:1]:
        classified(cell)
    assert Analysis.objects.filter(batch=batch, status="queued").count() == 3
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size({"width": 375, "height": 812})
    page.goto("/batches/")
    row = page.locator(f'tr[data-batch="{batch.pk}"]')
    expect(row.locator("[data-parasitemia]")).to_be_visible()
    expect(row.locator("[data-unfinished]")).to_have_text("(preliminary: 1 of 4 finished)")
    expect(row.locator("[data-unfinished]")).to_be_in_viewport()
    page.set_viewport_size({"width": 1200, "height": 800})  # where the Finished column says it
    expect(row.locator("[data-unfinished]")).to_be_hidden()
    open_page.errors[page].clear()
