"""The samples page: one row per batch with its progress and parasitized fraction, the owner's only."""

import re
import unicodedata

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from diagnosis import selectors
from diagnosis.models import Analysis, Batch
from diagnosis.services import create_batch
from diagnosis.text import plain_line
from tests.factories import image_bytes, upload


def rows(page: str) -> dict[int, str]:
    return {int(pk): body for pk, body in re.findall(r'<tr data-batch="(\d+)">(.*?)</tr>', page, re.S)}


def cell(row: str, name: str) -> str:
    return re.sub(r"(?:<[^>]+>|\s)+", " ", re.search(rf"<td {name}>(.*?)</td>", row, re.S)[1]).strip()


def test_each_sample_shows_its_progress_and_parasitized_fraction(client, user, other_user):
    ward = create_batch(
        owner=user, uploads=[upload("p.png"), upload("u.png"), upload("q.png")], sample_reference="WARD-7"
    )
    clinic = create_batch(owner=user, uploads=[upload("f.png")], sample_reference="CLINIC-B", note="repeat smear")
    foreign = create_batch(owner=other_user, uploads=[upload("x.png")], sample_reference="WARD-7")
    done = {"status": "done", "decision_threshold": 0.11}
    ward.analyses.filter(original_filename="p.png").update(**done, label="Parasitized", probability_parasitized=0.3)
    ward.analyses.filter(original_filename="u.png").update(**done, label="Uninfected", probability_parasitized=0.01)
    clinic.analyses.update(status="failed", error="unreadable")
    Analysis.objects.filter(batch=foreign).update(status="done", label="Parasitized")

    client.force_login(user)
    page = client.get("/batches/").content.decode()
    listed = rows(page)
    assert list(listed) == [clinic.pk, ward.pk], "newest first, and never another user's"
    ward_row, clinic_row = listed[ward.pk], listed[clinic.pk]
    assert (cell(ward_row, 'data-count="total"'), cell(ward_row, 'data-count="finished"')) == ("3", "2 (in progress)")
    assert (
        cell(ward_row, 'data-count="parasitized"') == "1"
        and cell(ward_row, "data-parasitemia") == "50% of 2 (preliminary: 2 of 3 finished)"
    )
    assert cell(clinic_row, 'data-count="failed"') == "1" and cell(clinic_row, "data-parasitemia") == "—"
    assert (cell(ward_row, 'data-count="borderline"'), cell(clinic_row, 'data-count="borderline"')) == ("1", "0")
    assert "repeat smear" in clinic_row and f"/batches/{ward.pk}/report/" in ward_row
    assert "2 samples" in page

    # A reviewer's correction counts, as it shows on the cell itself.
    ward.analyses.filter(original_filename="u.png").update(review_verdict="disagree", corrected_label="Parasitized")
    ward_row = rows(client.get("/batches/").content.decode())[ward.pk]
    assert (
        cell(ward_row, 'data-count="parasitized"') == "2"
        and cell(ward_row, "data-parasitemia") == "100% of 2 (preliminary: 2 of 3 finished)"
    )
    assert selectors.batch_counts(batch=ward) == {
        "total": 3,
        "queued": 1,
        "running": 0,
        "done": 2,
        "failed": 0,
        "finished": 2,
        "parasitized": 2,
        "uninfected": 0,
        "borderline": 1,
        "parasitized_percent": 100,
    }

    assert list(rows(client.get("/batches/", {"search": "ward"}).content.decode())) == [ward.pk]
    assert list(rows(client.get("/batches/", {"search": "repeat"}).content.decode())) == [clinic.pk]
    assert "No sample matches “nothing”" in client.get("/batches/", {"search": "nothing"}).content.decode()


def test_the_samples_list_says_it_does_not_update_by_itself(client, user):
    """The dashboard and a batch's page update themselves; Samples did not, and did not say so: a
    sample finished (and positive) minutes ago still read "0 (in progress)" with "—" for its result."""
    batch = create_batch(owner=user, uploads=[upload("p.png"), upload("u.png")], sample_reference="W-9")
    client.force_login(user)
    note = 'This list does not update by itself: <a href="/batches/?search=W-9">reload it</a>'
    assert note in client.get("/batches/", {"search": "W-9"}).content.decode()
    batch.analyses.update(status="done", label="Parasitized", probability_parasitized=0.9)
    assert "does not update by itself" not in client.get("/batches/").content.decode()  # nothing left to wait for


def test_api_finds_a_sample_by_its_reference_with_its_counts(api_client, user, other_user):
    ward = create_batch(owner=user, uploads=[upload("p.png"), upload("q.png")], sample_reference="WARD-7")
    create_batch(owner=user, uploads=[upload("c.png")], sample_reference="CLINIC-B")
    create_batch(owner=other_user, uploads=[upload("x.png")], sample_reference="WARD-7")
    ward.analyses.filter(original_filename="p.png").update(status="done", label="Parasitized")

    found = api_client.get("/api/batches/", {"sample_reference": "ward-7"}).json()
    assert [batch["id"] for batch in found["results"]] == [ward.pk]
    counts = found["results"][0]["counts"]
    assert (counts["total"], counts["done"], counts["queued"], counts["parasitized"]) == (2, 1, 1, 1)
    assert counts["finished"] == 1 and counts["uninfected"] == 0
    assert api_client.get("/api/batches/").json()["count"] == 2
    assert api_client.get("/api/batches/", {"sample_reference": "WARD"}).json()["count"] == 0  # exact, not a search


def test_search_survives_paging(client, user):
    Batch.objects.bulk_create(
        [Batch(owner=user, sample_reference=f"WARD-{n}") for n in range(27)]
        + [Batch(owner=user, sample_reference="CLINIC-B")]
    )
    client.force_login(user)
    first = client.get("/batches/", {"search": "ward"}).content.decode()
    assert "Page 1 of 2 (27 samples)" in first and len(rows(first)) == 25
    assert 'href="?search=ward&page=2"' in first
    second = client.get("/batches/", {"search": "ward", "page": 2}).content.decode()
    assert len(rows(second)) == 2 and "CLINIC-B" not in second


def test_a_searched_list_is_kept_through_a_batch_its_deletion_and_a_cells_second_analysis(client, user):
    """Working through `?search=ward&page=2`, a user comes back to that page, not to the first one."""
    for n in range(3):
        create_batch(owner=user, uploads=[upload(f"{n}.png")], sample_reference=f"WARD-{n}")
    client.force_login(user)
    listing = "/batches/?search=ward&page=1"
    page = client.get(listing).content.decode()
    link = re.search(r'<a href="(/batches/(\d+)/\?from=[^"]+)">', page)
    batch_id = int(link[2])
    opened = client.get(link[1].replace("&amp;", "&")).content.decode()
    assert f'<a href="{listing.replace("&", "&amp;")}">← Back</a>' in opened
    deleting = re.search(r'href="(/batches/\d+/delete/\?from=[^"]+)"', opened)[1].replace("&amp;", "&")
    assert f'name="from" value="{listing.replace("&", "&amp;")}"' in client.get(deleting).content.decode()
    deleted = client.post(deleting, {"from": listing})
    assert deleted.status_code == 302 and deleted["Location"] == listing
    assert not Batch.objects.filter(pk=batch_id).exists()

    failed = Analysis.objects.filter(owner=user).first()
    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Cannot read the image.")
    dashboard = "/?status=failed&page=1"
    retry = client.get(f"/analyses/{failed.pk}/", {"from": dashboard}).content.decode()
    assert 'name="from" value="/?status=failed&amp;page=1"' in retry
    again = client.post(f"/analyses/{failed.pk}/retry/", {"from": dashboard}, follow=True)
    assert again.redirect_chain[-1][0] == f"/analyses/{failed.pk}/?from=%2F%3Fstatus%3Dfailed%26page%3D1"
    assert '<a href="/?status=failed&amp;page=1">← Back</a>' in again.content.decode()

    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Cannot read the image.")
    batch = failed.batch
    retry = client.get(f"/batches/{batch.pk}/", {"from": listing}).content.decode()
    assert 'name="from" value="/batches/?search=ward&amp;page=1"' in retry  # the batch's own "Analyse … again"
    again = client.post(f"/batches/{batch.pk}/retry/", {"from": listing}, follow=True)
    assert again.redirect_chain[-1][0] == f"/batches/{batch.pk}/?from=%2Fbatches%2F%3Fsearch%3Dward%26page%3D1"
    assert f'<a href="{listing.replace("&", "&amp;")}">← Back</a>' in again.content.decode()


def test_a_cell_opened_from_a_batch_leads_back_through_the_batch_to_the_searched_list(client, user):
    """The batch's grid linked each cell without ``from``: the cell's Back reached the batch page, whose
    own Back then fell to the first page of every sample, not to ``?search=ward&page=2``."""
    batch = create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-1")
    cell = batch.analyses.get()
    client.force_login(user)
    listing = "/batches/?search=ward&page=2"
    batch_page = client.get(f"/batches/{batch.pk}/", {"from": listing}).content.decode()
    cell_link = re.search(rf'<a href="(/analyses/{cell.pk}/[^"]*)">', batch_page)[1].replace("&amp;", "&")
    back_to_batch = re.search(r'<a href="([^"]+)">← Back</a>', client.get(cell_link).content.decode())[1]
    back_to_batch = back_to_batch.replace("&amp;", "&")
    assert back_to_batch.startswith(f"/batches/{batch.pk}/?from=")
    again = client.get(back_to_batch).content.decode()
    assert f'<a href="{listing.replace("&", "&amp;")}">← Back</a>' in again


def test_a_batchs_cells_come_back_in_the_order_they_were_sent(api_client, user):
    """A lab system may pair results with what it sent by position: names can repeat (cell.png from
    several folders), so only the order tells them apart."""
    sizes = [(120, 110), (90, 140), (130, 100)]
    images = [upload("cell.png", image_bytes(size=size)) for size in sizes]
    sent = api_client.post("/api/batches/", {"images": images, "sample_reference": "ORDER-1"}, format="multipart")
    assert sent.status_code == 202, sent.content
    batch_id = sent.json()["id"]
    as_sent = [(cell["width"], cell["height"]) for cell in sent.json()["analyses"]]
    assert as_sent == sizes
    detail = api_client.get(f"/api/batches/{batch_id}/").json()["analyses"]
    listed = api_client.get("/api/batches/?sample_reference=ORDER-1").json()["results"][0]["analyses"]
    assert [(c["width"], c["height"]) for c in detail] == [(c["width"], c["height"]) for c in listed] == sizes


MULLER_TYPED = unicodedata.normalize("NFC", "Müller-Đurić")
MULLER_FROM_A_MAC = unicodedata.normalize("NFD", MULLER_TYPED)  # "u" and a combining diaeresis


def test_a_reference_or_file_name_sent_decomposed_is_found_by_the_same_text_typed(api_client, web_client, user):
    """Stored as sent: a reference or file name a Mac sent decomposed was not found by the same
    letters typed, by the API's ?sample_reference=, the dashboard's search or the Samples search."""
    cells = [upload(MULLER_FROM_A_MAC + "_cell_1.png")]
    batch = create_batch(owner=user, uploads=cells, sample_reference=MULLER_FROM_A_MAC)
    found = api_client.get("/api/batches/", {"sample_reference": MULLER_TYPED}).json()["results"]
    assert [b["id"] for b in found] == [batch.pk]
    assert batch.analyses.get().original_filename == MULLER_TYPED + "_cell_1.png"
    for page in ("/", "/batches/"):
        assert f"#{batch.pk}" in web_client.get(page, {"search": MULLER_TYPED}).content.decode(), page
    assert api_client.get("/api/batches/", {"sample_reference": MULLER_FROM_A_MAC}).json()["count"] == 1


@pytest.mark.parametrize("between", ["\u200b", "\u00ad"], ids=["zero-width space", "soft hyphen"])
def test_a_reference_is_composed_once_its_invisible_characters_are_gone(between):
    """Composed first, then stripped of them: one between a letter and its accent kept the two
    apart, and a search or the upgrade's migration, applying it once, left "Müller" decomposed."""
    assert plain_line(f"Mu{between}\u0308ller") == "Müller"


def test_a_file_name_is_stored_composed_once_its_invisible_characters_are_gone(web_client, user):
    """plain_line composed after dropping them, but file names were composed before: "Mu\u200b\u0308ller"
    was stored decomposed, and neither the name as typed nor as uploaded found it any more."""
    uploaded = "Mu\u200b\u0308ller.png"  # "u", a zero-width space, then the diaeresis
    batch = create_batch(owner=user, uploads=[upload(uploaded)])
    assert batch.analyses.get().original_filename == "Müller.png"
    for typed in (uploaded, "Müller"):
        assert len(web_client.get("/", {"search": typed}).context["page"].object_list) == 1, ascii(typed)


@pytest.mark.parametrize("typed", ["recheck\u200b", "WARD\t7"], ids=["zero-width space pasted", "tab pasted"])
def test_a_note_is_found_by_text_pasted_with_an_invisible_character(web_client, user, typed):
    """Kept whole for a Persian word's joiners, the term as typed no longer found a note when a
    zero-width space came along with it, or a tab stood where the note has a space."""
    batch = create_batch(owner=user, uploads=[upload("a.png")], note="WARD 7: recheck tomorrow")
    assert f"#{batch.pk}" in web_client.get("/batches/", {"search": typed}).content.decode()


def test_a_note_with_a_zero_width_non_joiner_is_found_by_its_own_words(web_client, user):
    """A note keeps the joiners Persian, Urdu and Hindi words are written with, but the Samples
    search dropped them from what was typed, so such a word in a note was never found."""
    persian = "بیمار می\u200cخواهد"  # "the patient wants", as a Persian keyboard types it
    batch = create_batch(owner=user, uploads=[upload("a.png")], note=persian)
    for words in ("بیمار", "می\u200cخواهد"):
        assert f"#{batch.pk}" in web_client.get("/batches/", {"search": words}).content.decode(), ascii(words)


@pytest.mark.parametrize("sent", ["PT-\u202e0321", "WARD-7\u200b", "BED\u20663\u2069", "WARD\t7"], ids=ascii)
def test_a_reference_keeps_no_invisible_or_direction_changing_characters(api_client, sent):
    """A right-to-left override showed "PT-\u202e0321" as "PT-1230" on the batch page and the printed
    report; "WARD-7" with a zero-width space pasted along looked like WARD-7 and was not found by it."""
    sending = {"images": [upload("a.png")], "sample_reference": sent}
    answer = api_client.post("/api/batches/", sending, format="multipart")
    stored = answer.json()["sample_reference"]
    assert not [ch for ch in stored if unicodedata.category(ch) in ("Cc", "Cf")], ascii(stored)
    assert api_client.get("/api/batches/", {"sample_reference": stored}).json()["count"] == 1


@pytest.mark.parametrize("path", ["/upload/", "/api/batches/"])
def test_a_reference_that_grows_when_composed_is_refused_with_a_message(client, api_client, user, path):
    """Its length was checked before composing, which lengthens some letters (U+0958, Devanagari QA,
    composes to two code points): 100 letters passed, then overflowed the column (a 500 on PostgreSQL)."""
    sending = {"images": [upload("a.png")], "sample_reference": "WARD-" + "\u0958" * 95}
    if path == "/upload/":
        client.force_login(user)
        answer = client.post(path, sending)
    else:
        answer = api_client.post(path, sending, format="multipart")
    assert answer.status_code == 400 and re.search("(at most|no more than) 100 characters", answer.content.decode())
    assert not Batch.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_references_and_names_stored_decomposed_before_the_upgrade_are_found_after_it(user):
    """Lookups are composed now: a reference a lab system sent decomposed before, stored as sent, was
    no longer found even by the very bytes it was sent with."""
    executor = MigrationExecutor(connection)
    executor.migrate([("diagnosis", "0012_results_changed_at")])
    before = executor.loader.project_state([("diagnosis", "0012_results_changed_at")]).apps
    batch = before.get_model("diagnosis", "Batch").objects.create(
        owner_id=user.pk, sample_reference=MULLER_FROM_A_MAC + "\u200b", note=MULLER_FROM_A_MAC
    )
    before.get_model("diagnosis", "Analysis").objects.create(
        owner_id=user.pk, batch_id=batch.pk, original_filename=MULLER_FROM_A_MAC + ".png", image="uploads/x.png"
    )
    # U+0958 composes to two code points: 100 of them would be cut to fit the column, or overflow it.
    growing = "WARD-" + "\u0958" * 95
    kept = before.get_model("diagnosis", "Batch").objects.create(owner_id=user.pk, sample_reference=growing)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    for sent in (MULLER_TYPED, MULLER_FROM_A_MAC):
        assert [b.pk for b in selectors.batches_matching(user=user, sample_reference=sent)] == [batch.pk]
    stored = Batch.objects.get(pk=batch.pk)
    assert (stored.sample_reference, stored.note) == (MULLER_TYPED, MULLER_TYPED)
    assert Batch.objects.get(pk=kept.pk).sample_reference == growing  # left as it was, whole
    assert Analysis.objects.get().original_filename == MULLER_TYPED + ".png"
