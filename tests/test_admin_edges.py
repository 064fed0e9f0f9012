"""How reviewers and administrators work through a day, at its edges: searches that must leave a
trace, verdicts a colleague replaced, admin URLs edited by hand, large deletions, long notes."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from diagnosis.models import NOTE_MAX_LENGTH, AccessEvent, Analysis, ApiToken, Batch
from diagnosis.services import create_analysis, create_batch
from tests.factories import api_key, classified, make_reviewer, upload


def reviewer(*, staff: bool = False) -> tuple[Client, object]:
    account = make_reviewer(is_staff=staff)
    client = Client()
    client.force_login(account)
    return client, account


def test_the_admins_autocomplete_search_of_every_users_batches_by_sample_reference_leaves_a_trace(user):
    """The admin's batch list records a search by sample reference (a patient's name, often), since
    it lists that patient's batches across every user. Django's autocomplete endpoint runs the same
    search (BatchAdmin.search_fields) for any reviewer, answers with the batches' ids, and records
    nothing; no page of the project uses it."""
    create_batch(owner=user, uploads=[upload("c.png")], sample_reference="SMITH John 1962")
    staff_reviewer, _ = reviewer(staff=True)
    query = {"app_label": "diagnosis", "model_name": "analysis", "field_name": "batch", "term": "smith"}
    answer = staff_reviewer.get("/admin/autocomplete/", query)
    assert answer.status_code == 200 and answer.json()["results"] == []
    listed = staff_reviewer.get("/admin/diagnosis/batch/", {"q": "smith"})  # the list's search: found, and recorded
    assert "SMITH John 1962" in listed.content.decode()
    assert AccessEvent.objects.filter(action=AccessEvent.Action.VIEWED, channel="admin").exists()


def test_a_colleagues_earlier_verdict_is_still_shown_once_another_reviewer_replaced_it(user):
    """Reviewer A agrees with the model; reviewer B, seeing it, saves a disagreement over it. From
    then on nothing a reviewer can open says that A had agreed (A's "Your recent reviews" loses the
    case, the review page names B only): two microscopists disagreeing on a cell, the case a lab
    most wants a third opinion on, is hidden. Only the admin-only access trail keeps 'reviewed (agree)'."""
    cell = classified(create_analysis(owner=user, upload=upload("case.png")), probability_parasitized=0.6)
    (first, first_reviewer), (second, _) = reviewer(), reviewer()
    assert first.post(f"/review/{cell.pk}/", {"verdict": "agree", "replacing": ""}).status_code == 302
    cell.refresh_from_db()
    replaced = second.post(
        f"/review/{cell.pk}/",
        {"verdict": "disagree", "corrected_label": "Uninfected", "replacing": cell.reviewed_at.isoformat()},
    )
    assert replaced.status_code == 302
    page = second.get(f"/review/{cell.pk}/").content.decode()
    assert re.search(rf"since replaced: {first_reviewer.username} agreed at \d{{4}}-", page), page
    assert first.get(f"/review/{cell.pk}/").content.decode().count("since replaced") == 1


@pytest.mark.parametrize(
    ("page", "query"),
    [
        ("analysis", {"owner": "9" * 25}),
        ("analysis", {"owner_id": "9" * 25}),
        ("analysis", {"reviewed_by": "9" * 25}),
        ("analysis", {"reviewed_by_id": "9" * 25}),
        ("batch", {"owner": "9" * 25}),
        ("batch", {"owner_id": "9" * 25}),
        # PostgreSQL only: an inet column compared with text that is no address.
        ("accessevent", {"client_ip": "not-an-address"}),
    ],
)
def test_an_admin_list_url_edited_by_hand_is_no_server_error(admin_client, user, page, query):
    """?batch= edited past any id is answered ("There is no batch #..."); the owner and reviewer keys
    of the same lists, and the trail's client_ip, are not: SQLite overflows on a number past 64 bits
    (OverflowError) and PostgreSQL refuses text that is no address (ValueError), both a 500."""
    classified(create_analysis(owner=user, upload=upload("a.png")))
    answer = admin_client.get(f"/admin/diagnosis/{page}/", query)
    assert answer.status_code < 500


def test_deleting_batches_in_the_admin_counts_their_cells_rather_than_listing_each(admin_client, user):
    """The users' admin counts what a deletion takes with it, because Django's page names every
    cell; the batch admin's 'Delete selected' still names every one (20,000 cells: 1.8 MB, 1.7 s here;
    a year's batches, tens of megabytes)."""
    batches = Batch.objects.bulk_create([Batch(owner=user, sample_reference=f"S{i}") for i in range(3)])
    Analysis.objects.bulk_create(
        Analysis(owner=user, batch=b, image=f"uploads/{b.pk}-{j}.png", original_filename="c.png")
        for b in batches
        for j in range(40)
    )
    confirm = admin_client.post(
        "/admin/diagnosis/batch/",
        {"action": "delete_selected", "select_across": "1", "index": "0", "_selected_action": [str(batches[0].pk)]},
    )
    assert confirm.status_code == 200
    page = confirm.content.decode()
    assert page.count("/admin/diagnosis/analysis/") < 10, "every cell of the selected batches is listed"


def test_a_review_note_saved_in_the_admin_has_the_sites_length_limit(admin_client, user):
    """The site caps a note at NOTE_MAX_LENGTH; the admin takes any length. A longer note saved there
    then makes the reviewer's own 'Change it' on the site a form error until they trim it."""
    cell = classified(create_analysis(owner=user, upload=upload("a.png")))
    note = "x" * (NOTE_MAX_LENGTH + 500)
    admin_client.post(
        f"/admin/diagnosis/analysis/{cell.pk}/change/",
        {"review_verdict": "agree", "corrected_label": "", "review_note": note, "replacing": ""},
    )
    cell.refresh_from_db()
    assert len(cell.review_note) <= NOTE_MAX_LENGTH


@pytest.mark.parametrize("page", ["analysis", "batch", "accessevent"])
def test_the_admin_lists_offer_no_counts_over_the_whole_table(admin_client, user, page, django_assert_max_num_queries):
    classified(create_analysis(owner=user, upload=upload("a.png")))
    plain = admin_client.get(f"/admin/diagnosis/{page}/")
    assert plain.status_code == 200 and "Show counts" not in plain.content.decode()
    with django_assert_max_num_queries(len(plain.context["cl"].result_list) + 12):  # not one count per filter choice
        assert admin_client.get(f"/admin/diagnosis/{page}/", {"_facets": "True"}).status_code == 200


@pytest.mark.parametrize(
    ("page", "query"),
    [
        ("analysis", {"id__in": "1," + "9" * 25}),
        ("accessevent", {"client_ip__exact": "not-an-address"}),  # PostgreSQL only
    ],
)
def test_the_other_id_and_address_filters_edited_by_hand_are_no_server_error(admin_client, user, page, query):
    """A list of ids, or the address under another lookup: past the guards, a 500."""
    classified(create_analysis(owner=user, upload=upload("a.png")))
    admin_client.raise_request_exception = False
    answer = admin_client.get(f"/admin/diagnosis/{page}/", query)
    assert answer.status_code < 500


def test_an_account_with_admin_history_is_deactivated_not_deleted_with_that_history(admin_client, user):
    """Django deletes an account's admin history with it: who granted a role, set a password or
    cleared a lockout would be gone once the admin who did it left and their account was removed."""
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.contrib.contenttypes.models import ContentType

    departing = get_user_model().objects.create_superuser("departing", password="pw-for-tests-123")
    LogEntry.objects.create(
        user=departing,
        content_type=ContentType.objects.get_for_model(get_user_model()),
        object_id=str(user.pk),
        object_repr=str(user),
        action_flag=CHANGE,
        change_message="Changed is_superuser.",
    )
    page = admin_client.get(f"/admin/auth/user/{departing.pk}/delete/").content.decode()
    assert "departing: the admin history of their 1 change" in page and "deactivate the account instead" in page
    admin_client.post(f"/admin/auth/user/{departing.pk}/delete/", {"post": "yes"})
    selected = {"action": "delete_selected", "_selected_action": [departing.pk], "post": "yes"}
    admin_client.post("/admin/auth/user/", selected)
    assert get_user_model().objects.filter(pk=departing.pk).exists()
    assert LogEntry.objects.filter(user=departing, change_message="Changed is_superuser.").exists()
    # An account without such history (a clinician's) is still deleted as before.
    assert admin_client.post(f"/admin/auth/user/{user.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not get_user_model().objects.filter(pk=user.pk).exists()


@pytest.mark.parametrize(
    ("page", "lookup"),
    [("batch", "callback_url__contains"), ("batch", "idempotency_key__startswith"), ("apitoken", "digest__startswith")],
)
def test_a_hidden_field_cannot_be_read_back_by_guessing_at_it_in_the_list_url(admin_client, user, page, lookup):
    """The batch page shows only the callback URL's host, as it may carry credentials, and no page
    shows a lab system's Idempotency-Key or an API key's digest; but Django lists by any of the model's
    own fields in the query string: ?callback_url__contains=key=s3 listed the batch when the guess
    was right and not otherwise, so a reviewer read the whole URL back a character at a time."""
    batch = create_batch(owner=user, uploads=[upload("a.png")])
    Batch.objects.filter(pk=batch.pk).update(callback_url="https://127.0.0.1/r?key=s3cret", idempotency_key="lis-42")
    api_key(user)
    right = {"callback_url": "key=s3", "idempotency_key": "lis-4", "digest": ApiToken.objects.get().digest[:4]}
    for guess in (right[lookup.split("__")[0]], "no such text"):
        assert admin_client.get(f"/admin/diagnosis/{page}/", {lookup: guess}).status_code == 400, guess
    assert admin_client.get(f"/admin/diagnosis/{page}/", {"id__gte": 1}).status_code == 200  # the others answer


@pytest.mark.parametrize("how", ["delete page", "delete selected", "deleted by its owner meanwhile"])
def test_deleting_in_the_admin_keeps_a_withdrawal_still_to_be_delivered(admin_client, user, monkeypatch, rf, how):
    """The batch list shows the batches their owners deleted whose lab system is still to be told,
    and deleting one there (or one its owner deleted while the admin's action ran) went to
    services.delete_batch, which deletes a withdrawn batch outright: the lab system was never sent
    batch.withdrawn and kept reporting the results the owner had deleted."""
    from django.contrib import admin
    from django.utils import timezone

    from diagnosis import callbacks
    from diagnosis.admin import BatchAdmin
    from diagnosis.services import delete_batch

    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    sent, given_up = (create_batch(owner=user, uploads=[upload("a.png")]) for _ in range(2))
    Batch.objects.update(
        callback_url="http://127.0.0.1:9150/r", callback_state="delivered", callback_delivered_at=timezone.now()
    )
    seen_earlier = Batch.objects.get(pk=sent.pk)
    for batch in (sent, given_up):
        delete_batch(batch=Batch.objects.get(pk=batch.pk))  # kept, empty, to tell the lab system
    Batch.with_withdrawn.filter(pk=given_up.pk).update(callback_state="failed")
    if how == "delete page":
        assert admin_client.post(f"/admin/diagnosis/batch/{sent.pk}/delete/", {"post": "yes"}).status_code == 403
        assert admin_client.post(f"/admin/diagnosis/batch/{given_up.pk}/delete/", {"post": "yes"}).status_code == 302
    elif how == "delete selected":
        selected = {"action": "delete_selected", "post": "yes", "_selected_action": [sent.pk, given_up.pk]}
        page = admin_client.post("/admin/diagnosis/batch/", selected, follow=True).content.decode()
        assert "Left out: 1 batch deleted by the owner" in page and "Successfully deleted 1 batch." in page
    else:
        request = rf.post("/admin/diagnosis/batch/")
        request.user = admin_client.admin
        BatchAdmin(Batch, admin.site).delete_queryset(request, [seen_earlier, given_up])
    assert list(Batch.with_withdrawn.values_list("pk", "callback_state")) == [(sent.pk, "pending")]


@pytest.mark.parametrize(
    ("page", "action"),
    [
        ("diagnosis/analysis", "retry_failed"),
        ("diagnosis/analysis", "delete_selected"),
        ("diagnosis/batch", "retry_callbacks"),
        ("diagnosis/accessevent", "export_csv"),
        ("diagnosis/apitoken", "delete_selected"),
        ("auth/user", "clear_sign_in_lockout"),
        ("auth/group", "delete_selected"),
    ],
)
@pytest.mark.parametrize("selection", ["abc", "1.5", "9" * 25])
def test_an_action_on_a_selection_that_is_no_id_is_refused(admin_client, user, page, action, selection):
    """Every list's actions filtered pk__in=<the ticked rows> unchecked: a stale or scripted form's
    "abc" or "1.5" was a ValueError, and a number past 64 bits an OverflowError on SQLite, a 500."""
    cell = classified(create_analysis(owner=user, upload=upload("a.png")))
    api_key(user)
    chosen = {"action": action, "index": "0", "post": "yes", "_selected_action": [selection, cell.pk]}
    answer = admin_client.post(f"/admin/{page}/", chosen, follow=True)
    assert answer.redirect_chain == [(f"/admin/{page}/", 302)]
    assert "Nothing was done: the selection held something that is no id." in answer.content.decode()
    assert Analysis.objects.filter(pk=cell.pk).exists() and ApiToken.objects.exists()


@pytest.mark.parametrize(
    ("page", "query", "refusal"),
    [
        ("diagnosis/accessevent", {"user": "9" * 25}, "There is no user #999"),
        ("diagnosis/accessevent", {"analysis_id": "9" * 25}, "There is no cell #999"),
        ("diagnosis/apitoken", {"user__id__exact": "9" * 25}, "There is no user #999"),
        ("auth/user", {"groups__id__exact": "9" * 25}, "There is no group #999"),
        ("auth/group", {"id": "9" * 25}, "There is no record #999"),
        ("diagnosis/accessevent", {"client_ip": "10.0.0.1,10.0.0.2"}, "&#x27;10.0.0.1,10.0.0.2&#x27; is no client"),
    ],
)
def test_the_other_lists_filters_edited_by_hand_are_answered(admin_client, user, page, query, refusal):
    """Only the cell and batch lists answered an id filter past 64 bits: the trail's and the API
    tokens' ?user=, the users' ?groups= and the like were an OverflowError on SQLite, a 500. And the
    trail split a plain ?client_ip=a,b on its comma as if it were ?client_ip__in=, so took it for
    two addresses, which PostgreSQL then refused to compare as one (ValueError, a 500)."""
    api_key(user)
    AccessEvent.objects.create(username="x", user=user, action="viewed", channel="web", client_ip="10.0.0.1")
    answer = admin_client.get(f"/admin/{page}/", query, follow=True)
    assert answer.redirect_chain == [(f"/admin/{page}/", 302)] and refusal in answer.content.decode()
    if "client_ip" in query:  # a list of addresses is still taken as one
        listed = admin_client.get("/admin/diagnosis/accessevent/", {"client_ip__in": "10.0.0.1,10.0.0.2"})
        assert len(listed.context["cl"].result_list) == 1


@pytest.mark.parametrize("page", ["batch", "analysis"])
def test_the_admins_search_finds_a_name_pasted_in_another_unicode_form(admin_client, user, page):
    """The site stores sample references and file names composed, and its own searches compose what
    is typed; the admin's search compared the raw text, so a "Müller" pasted from a Mac's file name
    ("u" and a combining mark), or with a zero-width space copied along, found nothing."""
    create_batch(owner=user, uploads=[upload("Müller.png")], sample_reference="Müller Anna 1962")
    listed = admin_client.get(f"/admin/diagnosis/{page}/", {"q": "Mu\u0308ller\u200b"})
    assert len(listed.context["cl"].result_list) == 1
