"""The pages where use gets awkward, in a real browser: a phone's screen, a session that ends while
something is typed, notes of several lines."""

import contextlib
import errno
import io
import re
import socket
import threading

import pytest
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from playwright.sync_api import expect
from rest_framework.test import APIClient

from diagnosis import services, tokens
from diagnosis.models import Analysis, Batch, private_storage
from tests.browser import log_in, overflows_horizontally
from tests.conftest import fixture_cells
from tests.factories import PASSWORD, UserFactory, classified, image_bytes, make_reviewer, upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PHONE = {"width": 390, "height": 844}
NIH_NAME = "C100P61ThinF_IMG_20150918_144104_cell_162.png"  # 45 characters and no space to wrap at


def off_screen(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    return box["x"] + box["width"] > page.viewport_size["width"]


def test_a_notes_line_breaks_are_shown_where_it_is_read(open_page, user, not_analysed):
    note = "Fever 3 days\nReturned from Kisumu\nOn doxycycline"
    batch = services.create_batch(owner=user, uploads=[upload("a.png")], note=note)
    cell = classified(batch.analyses.get())
    services.review_analysis(
        analysis=cell, reviewer=user, verdict="agree", note="Ring forms\nseen at x100", replacing=None
    )
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/batches/{batch.pk}/")
    assert page.locator("p.note").inner_text() == note
    page.goto(f"/batches/{batch.pk}/report/")
    assert "Fever 3 days\nReturned from Kisumu" in page.inner_text("body")
    assert "Ring forms\nseen at x100" in page.inner_text("body")
    page.goto(f"/analyses/{cell.pk}/")
    assert "Ring forms\nseen at x100" in page.locator("#review-verdict").inner_text()
    open_page.errors[page].clear()  # the cell was classified without a heatmap file: its <img> is a 404


def test_on_a_phone_the_upload_list_the_result_and_the_review_button_stay_on_screen(
    open_page,
    user,
    not_analysed,
):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.set_viewport_size(PHONE)
    page.goto("/upload/")
    files = [{"name": NIH_NAME, "mimeType": "image/png", "buffer": fixture_cells()[0].read_bytes()}]
    files.append({"name": NIH_NAME.replace(".png", "_b.png"), "mimeType": "image/png", "buffer": b"not an image"})
    page.set_input_files("#id_images", files)
    expect(page.locator("#file-list li")).to_have_count(2)
    list_box = page.locator("#file-list").bounding_box()
    for note in page.locator("#file-list li span").all():  # each file's size or refusal
        box = note.bounding_box()
        assert box["x"] + box["width"] <= list_box["x"] + list_box["width"] + 1, note.inner_text()
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("Nothing was stored")
    open_page.expect_error(page, "status of 400")
    assert not overflows_horizontally(page)  # the refusal names the long file

    cell = classified(services.create_analysis(owner=user, upload=upload(NIH_NAME)))
    page.goto("/")
    result = f'tr[data-analysis="{cell.pk}"] [data-label]'
    expect(page.locator(result)).to_have_text("Parasitized")
    assert not off_screen(page, result) and not overflows_horizontally(page)

    reviewer_page = open_page()
    log_in(reviewer_page, make_reviewer().username, PASSWORD)
    reviewer_page.set_viewport_size(PHONE)
    reviewer_page.goto("/review/")
    assert not off_screen(reviewer_page, f'a[aria-label="Review {NIH_NAME}"]')
    for opened in (page, reviewer_page):
        opened.wait_for_load_state("load")
        open_page.errors[opened].clear()  # classified without a heatmap file: its thumbnail is a 404


def test_a_review_typed_as_the_session_ended_is_kept_and_saved_after_signing_in_again(
    open_page,
    user,
    not_analysed,
):
    cell = classified(services.create_analysis(owner=user, upload=upload("slide-4.png")))
    reviewer = make_reviewer()
    page = open_page()
    log_in(page, reviewer.username, PASSWORD)
    page.goto(f"/review/{cell.pk}/")
    page.wait_for_load_state("load")
    page.locator('input[value="disagree"]').check()
    page.get_by_label("Corrected label (when disagreeing)").select_option("Uninfected")
    note = "Stain artefact over the cell, not a ring form."
    page.get_by_label("Note").fill(note)
    Session.objects.all().delete()  # away too long

    page.get_by_role("button", name="Save review").click()
    expect(page.locator("#session-ended")).to_be_visible()
    expect(page.locator("#session-ended")).to_contain_text("this review is not saved yet")
    assert page.url.endswith(f"/review/{cell.pk}/") and page.get_by_label("Note").input_value() == note

    other_tab = page.context.new_page()  # as the message's link does; a new sign-in, a new CSRF token
    log_in(other_tab, reviewer.username, PASSWORD)
    other_tab.close()
    page.get_by_role("button", name="Save review").click()
    page.wait_for_url(re.compile(r"/review/$"))
    saved = Analysis.objects.get(pk=cell.pk)
    assert (saved.review_verdict, saved.corrected_label, saved.review_note) == ("disagree", "Uninfected", note)
    open_page.errors[page].clear()  # classified without a heatmap file: its <img> was a 404


def test_an_upload_after_signing_in_again_in_another_tab_goes_through(open_page, user, not_analysed):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    # Another site under the same domain sets a cookie of the name, on a path: the server reads the last.
    host = page.evaluate("location.hostname")
    page.context.add_cookies([{"name": "csrftoken", "value": "A" * 32, "domain": host, "path": "/upload/"}])
    cells = [str(path) for path in fixture_cells()[:2]]
    page.set_input_files("#id_images", cells)
    page.get_by_label("Patient / sample reference").fill("WARD-7 bed 12")
    Session.objects.all().delete()
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("Your session has ended")

    other_tab = page.context.new_page()
    log_in(other_tab, user.username, PASSWORD)
    other_tab.close()
    page.set_input_files("#id_images", cells)  # as the message says: choose the files again
    page.locator("#upload-button").click()
    page.wait_for_url(re.compile(r"/batches/\d+/$"))
    assert Analysis.objects.filter(owner=user, batch__sample_reference="WARD-7 bed 12").count() == 2


def test_an_upload_the_server_did_not_finish_says_it_may_have_been_stored(open_page, user, not_analysed):
    """A 502 from the proxy (gunicorn's timeout, a worker restarting) comes after the request was
    read: the batch may be stored, so the page must not say that nothing was."""
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.route("**/upload/", lambda route: route.fulfill(status=502, body="Bad Gateway", content_type="text/html"))
    page.set_input_files("#id_images", [str(fixture_cells()[0])])
    page.locator("#upload-button").click()
    errors = page.locator("#client-errors")
    expect(errors).to_contain_text("The server did not finish the upload (HTTP 502). It may have been stored")
    expect(errors).not_to_contain_text("Nothing was stored")
    expect(page.locator("#file-list li span")).to_have_text(["may have been stored"])  # not "not stored"
    open_page.expect_error(page, "502")


def test_a_connection_lost_after_the_files_were_sent_says_the_upload_may_have_been_stored(
    open_page,
    user,
    not_analysed,
):
    """The server may store a batch whose answer never arrives: a page saying "nothing was stored"
    sends the clinician to upload the same cells twice."""
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    # A route never sends the body, so the browser would not report it sent: a real socket reads
    # all of it, then closes without an answer, as a proxy restarting mid-request does.
    with server_that_hangs_up(origin=page.evaluate("location.origin")) as address:
        page.locator("#upload-form").evaluate("(form, address) => { form.action = address; }", address)
        page.set_input_files("#id_images", [str(fixture_cells()[0])])
        page.locator("#upload-button").click()
        errors = page.locator("#client-errors")
        expect(errors).to_contain_text("The connection was lost after every file was sent")
    expect(errors).not_to_contain_text("Nothing was stored")
    expect(page.locator("#file-list li span")).to_have_text(["may have been stored"])
    open_page.expect_error(page, "ERR_EMPTY_RESPONSE")


def test_an_upload_that_never_reached_the_server_says_nothing_was_stored(open_page, user, not_analysed):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.route("**/upload/", lambda route: route.abort("connectionrefused"))
    page.set_input_files("#id_images", [str(fixture_cells()[0])])
    page.locator("#upload-button").click()
    expect(page.locator("#client-errors")).to_contain_text("The upload did not reach the server")
    expect(page.locator("#file-list li span")).to_have_text(["not stored"])
    open_page.expect_error(page, "ERR_CONNECTION_REFUSED")


@contextlib.contextmanager
def server_that_hangs_up(*, origin: str):
    """An address whose server lets ``origin`` post to it, reads each request whole and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with connection, connection.makefile("rb") as request:
                head = [line for line in iter(request.readline, b"\r\n")]
                length = next((int(h.split(b":")[1]) for h in head if h.lower().startswith(b"content-length")), 0)
                request.read(length)
                if head[0].startswith(b"OPTIONS"):  # the browser's preflight for the cross-origin post
                    connection.sendall(
                        b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: "
                        + origin.encode()
                        + b"\r\nAccess-Control-Allow-Methods: POST\r\nAccess-Control-Allow-Headers: *"
                        + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/upload/"
    finally:
        listener.close()


NEAR = {"status": "done", "label": "Parasitized", "probability_parasitized": 0.2, "decision_threshold": 0.11}


def test_a_screen_reader_hears_that_a_call_that_finished_is_borderline(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("near.png"), upload("later.png")])
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/")
    announcer = page.get_by_role("status")
    batch.analyses.filter(original_filename="near.png").update(**NEAR)
    expect(announcer).to_have_text("1 analysis finished: 1 parasitized (1 borderline, to confirm first).")


def test_a_borderline_call_is_marked_for_the_reviewer_and_settled_by_the_review(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("near.png")], sample_reference="WARD-2")
    cell = classified(batch.analyses.get(), **NEAR)
    reviewer = make_reviewer()
    page = open_page()
    log_in(page, reviewer.username, PASSWORD)
    page.goto("/review/")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="Review near.png"))
    expect(row.locator(".borderline")).to_have_text("borderline")
    page.goto(f"/review/{cell.pk}/")
    expect(page.locator("#borderline-note")).to_contain_text("confirm this cell by microscopy")
    open_page.expect_error(page, "404")  # the test's cell has no overlay file

    services.review_analysis(
        analysis=cell, reviewer=reviewer, verdict="disagree", corrected_label="Uninfected", replacing=None
    )
    owner = open_page()
    log_in(owner, user.username, PASSWORD)
    owner.goto(f"/analyses/{cell.pk}/")
    expect(owner.locator("#analysis-facts [data-label]")).to_have_text("Uninfected")
    expect(owner.locator("#borderline-note")).to_contain_text(f"{reviewer.username} reviewed it on")
    expect(owner.locator("#borderline-note")).not_to_contain_text("before relying on it")
    owner.goto(f"/batches/{batch.pk}/report/")
    expect(owner.locator("figcaption")).to_contain_text("Model: Parasitized 0.200 (threshold 0.11), borderline.")
    expect(owner.locator("figcaption")).not_to_contain_text("Uninfected (borderline)")


def test_a_printed_page_keeps_the_labels_fill(open_page, user, not_analysed):
    cell = classified(services.create_analysis(owner=user, upload=upload("near.png")), **NEAR)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/analyses/{cell.pk}/")
    page.emulate_media(media="print")
    label = page.locator("#analysis-facts [data-label]")
    expect(label).to_have_text("Parasitized")
    style = "el => getComputedStyle(el).printColorAdjust || getComputedStyle(el).webkitPrintColorAdjust"
    adjust = label.evaluate(style)
    assert adjust == "exact", "printed, the white Parasitized label loses its red fill"


def test_a_second_click_on_issue_a_key_while_it_is_sent_sends_nothing(open_page, user, monkeypatch):
    """Both clicks reached the server and issued a key each: the browser shows the answer to the
    second, so when the first was stored last, the key copied into the lab system never worked."""
    issue, arrived, answer = tokens.new_token, threading.Event(), threading.Event()

    def once_the_second_click_is_in(**kwargs):
        arrived.set()
        answer.wait(20)  # a busy server: the second click lands while the first is being answered
        return issue(**kwargs)

    monkeypatch.setattr(tokens, "new_token", once_the_second_click_is_in)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/account/api-token/")
    sent = []
    page.on("request", lambda request: request.method == "POST" and sent.append(request.url))
    page.get_by_label("Your password (needed for a new key)").fill(PASSWORD)
    button = page.locator("button[value=issue]")
    # Counted where the next page can read it: the clicks' own page is gone by then.
    button.evaluate(
        "(el) => el.addEventListener('click', () => { sessionStorage.clicks = +(sessionStorage.clicks || 0) + 1; })"
    )
    box = button.bounding_box()
    # Clicks as the mouse makes them: a script can run on a page only until it starts to leave.
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert arrived.wait(20), "the first click's request never reached the server"
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # while the first is unanswered
    answer.set()
    key = page.locator("#token-key").inner_text()
    assert page.evaluate("sessionStorage.clicks") == "2", "the second click missed the button"
    assert len(sent) == 1, sent
    assert APIClient().get("/api/analyses/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200


def test_an_upload_page_left_open_by_one_clinician_stores_nothing_for_the_next(open_page, not_analysed):
    """A shared workstation: A chooses a patient's images and is called away, A signs out in another
    tab and B signs in. A's page still read "Log out A", and its Upload stored A's patient in B's account."""
    a, b = UserFactory(), UserFactory()
    page = open_page()
    log_in(page, a.username, PASSWORD)
    page.goto("/upload/")
    page.set_input_files("#id_images", [str(cell) for cell in fixture_cells()[:2]])
    page.get_by_label("Patient / sample reference").fill("PATIENT-OF-A")
    other_tab = page.context.new_page()
    other_tab.goto("/")
    other_tab.get_by_role("button", name=f"Log out {a.username}").click()
    log_in(other_tab, b.username, PASSWORD)
    other_tab.close()

    page.locator("#upload-button").click()
    expect(page.get_by_role("alert")).to_contain_text("Someone else has signed in on this browser")
    expect(page.get_by_role("alert")).to_contain_text("Nothing was stored.")
    open_page.errors[page].clear()  # the browser logs the 409
    assert not Batch.objects.exists()
    expect(page.get_by_label("Patient / sample reference")).to_have_value("PATIENT-OF-A")  # nothing typed is lost


def test_a_file_name_with_quotes_is_shown_as_it_was_chosen(open_page, user, not_analysed):
    """Browsers send a double quote in a file name as %22 (the HTML standard's multipart encoding),
    and the batch page, the CSV and the report named the cell 'slide %22B%22 cell 3.png'."""
    name = 'slide "B" cell 3.png'
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.set_input_files("#id_images", [{"name": name, "mimeType": "image/png", "buffer": image_bytes()}])
    page.locator("#upload-button").click()
    page.wait_for_url(re.compile(r"/batches/\d+/$"))
    expect(page.locator("#cell-grid .cell-name")).to_have_text(name)
    assert Analysis.objects.get().original_filename == name


def test_the_upload_list_gives_a_small_files_size_in_bytes(open_page, user, not_analysed):
    """A cell crop under half a kilobyte was listed as "0 KB", as if it were empty."""
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    sizes = {"tiny.png": 300, "one.png": 1, "small.png": 812, "crop.png": 3 * 1024, "photo.png": 5 * 1024 * 1024 // 2}
    files = [{"name": name, "mimeType": "image/png", "buffer": b"x" * size} for name, size in sizes.items()]
    page.set_input_files("#id_images", files)
    shown = page.locator("#file-list li span")
    expect(shown).to_have_text(["300 bytes", "1 byte", "812 bytes", "3 KB", "2.5 MB"])


def test_an_upload_onto_a_full_disk_is_shown_as_nothing_stored(open_page, user, not_analysed, monkeypatch):
    """upload.js took every status from 500 up as "it may have been stored", the server's 507 too."""

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(private_storage, "_save", disk_full)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.set_input_files("#id_images", [str(fixture_cells()[0])])
    page.locator("#upload-button").click()
    open_page.expect_error(page, "507")
    told = page.locator("#client-errors")
    expect(told).to_contain_text("The server could not store the images (No space left on device)")
    expect(told).to_contain_text("Nothing was stored.")
    expect(told).not_to_contain_text("may have been stored")
    assert not Analysis.objects.exists()


@pytest.mark.parametrize("model", ["analysis", "batch", "accessevent"])
def test_the_admins_search_box_is_not_remembered_by_the_browser(open_page, model):
    """The site's own search fields are not remembered on a shared workstation; the admin's, where
    patient references are typed to search every user's records, was."""
    admin = get_user_model().objects.create_superuser("boss", password=PASSWORD)
    page = open_page()
    log_in(page, admin.username, PASSWORD)
    page.goto(f"/admin/diagnosis/{model}/")
    expect(page.locator("#searchbar")).to_have_attribute("autocomplete", "off")


@pytest.mark.parametrize("shown_on", ["its page", "the printed report"])
def test_a_result_left_open_stops_showing_its_patient_once_the_idle_sign_out_ends_the_session(
    open_page,
    user,
    settings,
    not_analysed,
    shown_on,
):
    """The idle sign-out acts on the next request, and a finished cell's page sends none: the file
    name, sample reference, pictures and result stayed on screen for whoever came by. The printed
    report, a page of its own, did not load idle.js at all."""
    batch = services.create_batch(owner=user, uploads=[upload("Doe_Jane_0815.png")], sample_reference="MRN-4711")
    cell = classified(batch.analyses.get())
    page = open_page()
    page.clock.install()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/analyses/{cell.pk}/" if shown_on == "its page" else f"/batches/{batch.pk}/report/")
    expect(page.get_by_text("Doe_Jane_0815.png").first).to_be_visible()
    page.clock.fast_forward(f"{settings.SESSION_IDLE_MINUTES - 1}:00")  # still within the limit
    expect(page.get_by_text("Doe_Jane_0815.png").first).to_be_visible()
    # The server ends the sign-in first: a question sent before, answered only after the clock had
    # moved on, held back the later ticks (one question at a time), and the page was never told.
    Session.objects.all().delete()
    page.clock.fast_forward("02:00")  # past the limit: the page asks, and is told it is signed out
    expect(page.get_by_role("alert")).to_contain_text("You were signed out after 30 minutes without activity")
    open_page.expect_error(page, "401")
    shown = page.locator("body").inner_text()
    assert "Doe_Jane_0815.png" not in shown and "MRN-4711" not in shown, shown[:400]


def test_the_printed_report_keeps_long_unbroken_text_on_the_paper(open_page, user, not_analysed):
    """A reference, note or link without a space ran off the paper's edge: the header's reference
    had no rule to break it, and a review note widened its grid column until the row of cells was
    wider than the page (Chrome shrinks or clips it)."""
    link = "https://lis.hospital.example/results/2026/12/01/WARD_7/PATIENT_000123456/SLIDE_B/field_03?view=full"
    batch = services.create_batch(
        owner=user,
        uploads=[upload(f"cell_{n}.png") for n in range(8)],
        sample_reference="LIS_2026_12_01_WARD_7_BED_12_PATIENT_000123456_SLIDE_B_THIN_FILM_GIEMSA_FIELD_03",
        note=f"Referred, see {link}",
    )
    cells = [classified(cell) for cell in batch.analyses.order_by("pk")]
    services.review_analysis(analysis=cells[0], reviewer=user, verdict="agree", note=f"See {link}", replacing=None)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.emulate_media(media="print")
    page.set_viewport_size({"width": 718, "height": 1000})  # A4 less Chrome's default margins, at 96 px an inch
    page.goto(f"/batches/{batch.pk}/report/")
    assert not overflows_horizontally(page)
    open_page.errors[page].clear()  # the cells were classified without heatmap files: their <img> are 404s


def printed_pages(page) -> list[str]:
    """The text of each page of the report as Chromium prints it to PDF (A4, its default margins)."""
    import pypdf

    return [paper.extract_text() for paper in pypdf.PdfReader(io.BytesIO(page.pdf(format="A4"))).pages]


def test_every_printed_page_of_a_long_report_names_the_sample_and_says_preliminary(open_page, user, not_analysed):
    """Pages 2 and later of a long report carried neither the sample's reference nor "Preliminary":
    a page that came loose from the first was an unnamed, seemingly final list of results."""
    batch = services.create_batch(
        owner=user, uploads=[upload(f"cell_{n}.png") for n in range(60)], sample_reference="WARD-7-BED-12"
    )
    for cell in batch.analyses.order_by("pk")[1:]:
        classified(cell)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/batches/{batch.pk}/report/")
    papers = printed_pages(page)
    assert len(papers) >= 3, "the report should run past two pages"
    for number, text in enumerate(papers, 1):
        assert "WARD-7-BED-12" in text and f"Batch #{batch.pk}" in text, f"page {number}: {text[:300]}"
        assert "Preliminary" in text, f"page {number}: {text[:300]}"
    expect(page.locator("[data-running-head]")).to_be_hidden()  # on the screen, the header says it once

    classified(batch.analyses.order_by("pk").first())  # finished: nothing preliminary left
    page.reload()
    papers = printed_pages(page)
    assert all("WARD-7-BED-12" in text for text in papers)
    assert not any("Preliminary" in text for text in papers)
    open_page.errors[page].clear()  # the cells were classified without heatmap files: their <img> are 404s


def test_a_refusal_and_a_warning_do_not_look_like_a_success(open_page, user, settings, not_analysed):
    """Every message had the success style (.flash, green, with a green border) and role="status":
    "That export would hold ... rows" and "... was deleted while you had it open" looked like
    "12 images queued for analysis.", and a screen reader heard the refusal only when idle."""
    settings.EXPORT_MAX_ROWS = 0
    cell = classified(services.create_batch(owner=user, uploads=[upload("a.png")]).analyses.get())
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.get_by_role("link", name="Export CSV").click()
    refusal = page.get_by_role("alert")
    expect(refusal).to_contain_text("That export would hold")
    expect(refusal).to_have_css("background-color", "rgb(253, 236, 236)")
    expect(refusal).to_have_css("color", "rgb(163, 22, 27)")

    reviewer = open_page()
    log_in(reviewer, make_reviewer().username, PASSWORD)
    reviewer.goto(f"/review/{cell.pk}/")
    open_page.expect_error(reviewer, "404")  # the test's cell has no overlay file
    pk = cell.pk
    cell.delete()
    reviewer.locator('input[value="agree"]').check()
    reviewer.get_by_role("button", name="Save review").click()
    warning = reviewer.locator(".flash")
    expect(warning).to_have_text(f"Cell {pk} was deleted while you had it open: there is nothing to review.")
    expect(warning).to_have_css("background-color", "rgb(255, 246, 224)")
