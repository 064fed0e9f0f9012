"""Reviewers confirm or correct the model's calls; two reviewers on one case never overwrite silently."""

import re

import pytest
from django.db import OperationalError
from django.test import Client

from diagnosis.models import AccessEvent, Analysis, Batch
from diagnosis.services import create_analysis, create_batch
from tests.factories import UserFactory, make_reviewer, upload


@pytest.fixture
def case(user):
    analysis = create_analysis(owner=user, upload=upload("case.png"))
    Analysis.objects.filter(pk=analysis.pk).update(
        status="done", label="Parasitized", probability_parasitized=0.6, decision_threshold=0.5, model_version="m"
    )
    return Analysis.objects.get(pk=analysis.pk)


def reviewer_client() -> tuple[Client, object]:
    reviewer = make_reviewer()
    client = Client()
    client.force_login(reviewer)
    return client, reviewer


def seen_review_time(page: str) -> str:
    return re.search(r'name="replacing"(?: value="([^"]*)")?', page)[1] or ""


def test_a_second_reviewer_is_told_who_got_there_first_and_may_then_replace_it(case):
    (first, first_reviewer), (second, second_reviewer) = reviewer_client(), reviewer_client()
    opened_by_first = seen_review_time(first.get(f"/review/{case.pk}/").content.decode())
    opened_by_second = seen_review_time(second.get(f"/review/{case.pk}/").content.decode())
    assert opened_by_first == opened_by_second == ""

    saved = first.post(f"/review/{case.pk}/", {"verdict": "agree", "replacing": opened_by_first})
    assert saved.status_code == 302

    refused = second.post(
        f"/review/{case.pk}/",
        {"verdict": "disagree", "corrected_label": "Uninfected", "replacing": opened_by_second},
    )
    page = refused.content.decode()
    assert refused.status_code == 400
    assert f"{first_reviewer.username} reviewed this case at" in page and "save again to replace it" in page
    kept = Analysis.objects.get(pk=case.pk)
    assert kept.review_verdict == "agree" and kept.reviewed_by == first_reviewer

    again = second.post(
        f"/review/{case.pk}/",
        {"verdict": "disagree", "corrected_label": "Uninfected", "replacing": seen_review_time(page)},
    )
    assert again.status_code == 302
    replaced = Analysis.objects.get(pk=case.pk)
    assert replaced.review_verdict == "disagree" and replaced.corrected_label == "Uninfected"
    assert replaced.reviewed_by == second_reviewer


def test_the_queue_lists_disagreements_with_their_reviewer_in_a_fixed_number_of_queries(
    case, user, django_assert_max_num_queries
):
    client, _ = reviewer_client()
    reviewers = [UserFactory() for _ in range(5)]
    for index, their_reviewer in enumerate(reviewers):
        other = create_analysis(owner=user, upload=upload(f"other-{index}.png"))
        Analysis.objects.filter(pk=other.pk).update(
            status="done",
            label="Parasitized",
            probability_parasitized=0.9,
            review_verdict="disagree",
            corrected_label="Uninfected",
            reviewed_by=their_reviewer,
        )
    with django_assert_max_num_queries(12):
        page = client.get("/review/").content.decode()
    assert all(their_reviewer.username in page for their_reviewer in reviewers)


def test_a_mistake_in_the_form_keeps_what_was_typed_and_still_notices_a_review_saved_meanwhile(case):
    (first, first_reviewer), (second, _) = reviewer_client(), reviewer_client()
    opened = seen_review_time(second.get(f"/review/{case.pk}/").content.decode())
    assert first.post(f"/review/{case.pk}/", {"verdict": "agree", "replacing": ""}).status_code == 302

    too_long = second.post(f"/review/{case.pk}/", {"verdict": "disagree", "note": "x" * 2001, "replacing": opened})
    page = too_long.content.decode()
    assert too_long.status_code == 400 and "Note: Ensure this value has at most 2000 characters" in page
    assert 'value="disagree" checked' in page and "x" * 2001 in page and 'maxlength="2000"' in page
    assert seen_review_time(page) == opened  # not the newer review's time: that one has not been seen

    conflict = second.post(
        f"/review/{case.pk}/",
        {"verdict": "disagree", "corrected_label": "Uninfected", "note": "short", "replacing": seen_review_time(page)},
    )
    assert conflict.status_code == 400 and f"{first_reviewer.username} reviewed this case" in conflict.content.decode()
    assert Analysis.objects.get(pk=case.pk).reviewed_by == first_reviewer


def test_a_review_note_at_the_length_the_browser_allows_is_saved_with_its_line_breaks(case):
    reviewer, _ = reviewer_client()
    typed = "\n".join(["no ring forms"] * 200)[:2000]  # sent by the browser with CR LF line breaks
    saved = reviewer.post(f"/review/{case.pk}/", {"verdict": "agree", "note": typed.replace("\n", "\r\n")})
    assert saved.status_code == 302, saved.content.decode()[:2000]
    assert Analysis.objects.get(pk=case.pk).review_note == typed
    one_more = reviewer.post(f"/review/{case.pk}/", {"verdict": "agree", "note": typed + "x", "replacing": ""})
    assert one_more.status_code == 400 and "at most 2000 characters (it has 2001)" in one_more.content.decode()
    assert 'aria-invalid="true" aria-describedby="id_note-error"' in one_more.content.decode()


def test_an_agreement_with_another_label_chosen_is_refused_not_saved_without_it(case):
    """Agree ticked, then Parasitized chosen as the correction: saved as an agreement, the reviewer's
    correction dropped, on the site and in the admin alike."""
    reviewer, _ = reviewer_client()
    other = "Uninfected" if case.label == "Parasitized" else "Parasitized"
    refused = reviewer.post(f"/review/{case.pk}/", {"verdict": "agree", "corrected_label": other, "replacing": ""})
    assert (
        refused.status_code == 400 and "You agreed with the model but chose another label" in refused.content.decode()
    )
    staff = make_reviewer(is_staff=True)
    in_admin = Client()
    in_admin.force_login(staff)
    admin = in_admin.post(
        f"/admin/diagnosis/analysis/{case.pk}/change/",
        {"review_verdict": "agree", "corrected_label": other, "review_note": "", "replacing": ""},
    )
    assert admin.status_code == 200 and "You agreed with the model but chose another label" in admin.content.decode()
    assert not Analysis.objects.get(pk=case.pk).review_verdict
    same = reviewer.post(f"/review/{case.pk}/", {"verdict": "agree", "corrected_label": case.label, "replacing": ""})
    assert same.status_code == 302 and Analysis.objects.get(pk=case.pk).corrected_label == ""  # no contradiction


def test_a_refused_verdict_marks_the_field_it_is_about_for_a_screen_reader(case):
    """The error was shown in the form's alert only: a screen reader on the label's select heard nothing."""
    reviewer, _ = reviewer_client()
    page = reviewer.post(f"/review/{case.pk}/", {"verdict": "disagree", "replacing": ""}).content.decode()
    select = re.search(r'<select name="corrected_label"[^>]*>', page)[0]
    assert 'aria-invalid="true"' in select and 'aria-describedby="id_corrected_label-error"' in select
    described = re.search(r'<div id="id_corrected_label-error">(.*?)</div>', page, re.S)[1]
    assert "A disagreement needs the corrected label" in described
    assert "aria-invalid" not in re.search(r'<textarea name="note"[^>]*>', page)[0]


def test_a_refusal_that_is_no_conflict_does_not_carry_a_review_saved_meanwhile(case):
    """Told only that a disagreement needs its label, the second reviewer has not been told of the
    first's review: correcting the label and saving must not replace it unseen."""
    (first, first_reviewer), (second, _) = reviewer_client(), reviewer_client()
    opened = seen_review_time(second.get(f"/review/{case.pk}/").content.decode())
    assert first.post(f"/review/{case.pk}/", {"verdict": "agree", "replacing": ""}).status_code == 302
    forgot = second.post(f"/review/{case.pk}/", {"verdict": "disagree", "replacing": opened})
    page = forgot.content.decode()
    assert forgot.status_code == 400 and "needs the corrected label" in page and seen_review_time(page) == opened
    fixed = {"verdict": "disagree", "corrected_label": "Uninfected", "replacing": seen_review_time(page)}
    conflict = second.post(f"/review/{case.pk}/", fixed)
    assert conflict.status_code == 400 and f"{first_reviewer.username} reviewed this case" in conflict.content.decode()
    assert Analysis.objects.get(pk=case.pk).reviewed_by == first_reviewer


@pytest.mark.parametrize(
    ("replacing", "message"),
    [
        ("0001-01-01T00:00:00+01:00", "not the review time the page gave"),
        ("9999-12-31T23:59:59-01:00", "not the review time the page gave"),
        ("not a time", "Enter a valid date/time"),
    ],
)
def test_an_edited_review_time_is_a_form_error_not_a_server_error(case, replacing, message):
    reviewer, _ = reviewer_client()
    response = reviewer.post(f"/review/{case.pk}/", {"verdict": "agree", "replacing": replacing})
    assert response.status_code == 400 and message in response.content.decode()
    assert Analysis.objects.get(pk=case.pk).review_verdict == ""


def test_a_cell_without_a_result_is_not_offered_for_review(client, user):
    from diagnosis.services import create_analysis
    from tests.factories import upload

    waiting = create_analysis(owner=user, upload=upload("waiting.png"))
    reviewer = make_reviewer()
    client.force_login(reviewer)
    response = client.get(f"/review/{waiting.pk}/", follow=True)
    assert response.redirect_chain == [("/review/", 302)]
    # By number: its name (another user's, a patient's perhaps) was shown, and no entry recorded it.
    assert f"Cell {waiting.pk} has no result to review (Queued)." in response.content.decode()
    assert "waiting.png" not in response.content.decode()
    assert client.post(f"/review/{waiting.pk}/", {"verdict": "agree"}).status_code == 302
    waiting.refresh_from_db()
    assert waiting.review_verdict == ""


def test_reviewers_saving_in_turn_are_sent_to_cases_nobody_else_has_open(user):
    cases = []
    for confidence in (0.01, 0.02, 0.03):  # the queue's order: least confident first
        analysis = create_analysis(owner=user, upload=upload(f"{confidence}.png"))
        Analysis.objects.filter(pk=analysis.pk).update(
            status="done", label="Parasitized", probability_parasitized=0.5 + confidence, decision_threshold=0.5
        )
        cases.append(analysis.pk)
    (first, _), (second, _) = reviewer_client(), reviewer_client()
    first.get(f"/review/{cases[0]}/")
    second.get(f"/review/{cases[1]}/")
    saved = first.post(f"/review/{cases[0]}/", {"verdict": "agree", "replacing": ""})
    assert saved.url == f"/review/{cases[2]}/", "the second case is open on the other reviewer's screen"
    first.get(saved.url)
    saved = second.post(f"/review/{cases[1]}/", {"verdict": "agree", "replacing": ""})
    assert saved.url == f"/review/{cases[2]}/", "when every case left is open elsewhere, the queue's first"


def test_the_api_filters_and_reports_the_reviewers_label(case):
    from rest_framework.test import APIClient

    from diagnosis.services import review_analysis
    from tests.factories import UserFactory

    review_analysis(
        analysis=case, reviewer=UserFactory(), verdict="disagree", corrected_label="Uninfected", replacing=None
    )
    api = APIClient()
    api.force_authenticate(case.owner)
    (row,) = api.get("/api/analyses/?label=Uninfected").json()["results"]
    assert (row["id"], row["final_label"], row["label"]) == (case.pk, "Uninfected", "Parasitized")
    assert api.get("/api/analyses/?label=Parasitized").json()["results"] == []


@pytest.mark.parametrize("query", ["label=parasitized", "label=Positive", "status=DONE", "status=finished"])
def test_the_api_refuses_a_filter_value_it_does_not_know(case, query):
    """An unknown value must not be ignored: a lab system would take the unfiltered list for the filtered one."""
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(case.owner)
    response = api.get(f"/api/analyses/?{query}")
    name, value = query.split("=")
    assert response.status_code == 400
    assert response.json()["detail"] == f'{name}: "{value}" is not a valid choice.'
    empty = api.get("/api/analyses/?status=done&label=")  # a script's unset $LABEL: no list of every label
    assert empty.status_code == 400 and empty.json()["detail"].startswith("label is empty")


@pytest.mark.parametrize("failing", ["diagnosis.services.send_again", "diagnosis.review.record_access"])
def test_a_review_is_saved_with_its_re_send_and_trail_entry_or_not_at_all(user, monkeypatch, failing):
    batch = create_batch(owner=user, uploads=[upload("cell.png")])
    Analysis.objects.filter(batch=batch).update(status="done", label="Parasitized", probability_parasitized=0.6)
    cell = batch.analyses.get()

    def database_gone(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(failing, database_gone)
    client, _ = reviewer_client()
    client.raise_request_exception = False
    answered = client.post(f"/review/{cell.pk}/", {"verdict": "disagree", "corrected_label": "Uninfected"})
    assert answered.status_code == 500
    cell.refresh_from_db()
    assert cell.review_verdict == "" and cell.reviewed_at is None and not AccessEvent.objects.filter(action="reviewed")


def test_a_verdict_given_by_mistake_is_found_again_and_changed(case):
    client, reviewer = reviewer_client()
    other_reviewer_client, _ = reviewer_client()
    form = client.get(f"/review/{case.pk}/").content.decode()
    saved = client.post(
        f"/review/{case.pk}/", {"verdict": "agree", "replacing": seen_review_time(form)}, follow=True
    ).content.decode()
    assert f'Review of case.png saved (agreed). <a href="/review/{case.pk}/">Change it</a>' in saved
    queue = client.get("/review/").content.decode()
    mine = re.search(r'<ul id="my-reviews">(.*?)</ul>', queue, re.S)[1]
    assert f'href="/review/{case.pk}/"' in mine and "agreed" in mine
    assert 'id="my-reviews"' not in other_reviewer_client.get("/review/").content.decode()  # each sees their own
    form = client.get(f"/review/{case.pk}/").content.decode()
    client.post(
        f"/review/{case.pk}/",
        {"verdict": "disagree", "corrected_label": "Uninfected", "replacing": seen_review_time(form)},
    )
    case.refresh_from_db()
    assert (case.review_verdict, case.final_label, case.reviewed_by) == ("disagree", "Uninfected", reviewer)


def test_a_review_keeps_its_reviewers_name_when_their_account_is_removed(case, user):
    from diagnosis.services import review_analysis

    _, reviewer = reviewer_client()
    review_analysis(analysis=case, reviewer=reviewer, verdict="agree", note="ring forms", replacing=None)
    name = reviewer.username
    reviewer.delete()
    case.refresh_from_db()
    assert case.reviewed_by is None and case.reviewer == name
    owner = Client()
    owner.force_login(user)
    assert f"Agreed by {name}" in owner.get(f"/analyses/{case.pk}/").content.decode()
    assert name in b"".join(owner.get("/export.csv").streaming_content).decode()


def test_the_migration_signs_reviews_made_before_it(transactional_db, user):
    import importlib

    from django.apps import apps

    reviewer = UserFactory()
    case = create_analysis(owner=user, upload=upload("old.png"))
    Analysis.objects.filter(pk=case.pk).update(status="done", review_verdict="agree", reviewed_by=reviewer)
    importlib.import_module("diagnosis.migrations.0009_owners_reviewers_and_indexes").sign_existing_reviews(apps, None)
    assert Analysis.objects.get(pk=case.pk).reviewer_name == reviewer.username


def _checked(page: str, name: str) -> str:
    """The value of the checked radio button or selected option of ``name`` on a review page ("" if none)."""
    if name == "verdict":
        found = re.search(r'name="verdict" value="(\w+)"(?: required)? checked', page)
    else:
        select = re.search(rf'<select name="{name}".*?</select>', page, re.S)[0]
        found = re.search(r'<option value="(\w+)" selected', select)
    return found[1] if found else ""


def test_change_it_opens_the_reviewers_own_verdict_and_not_anyone_elses(case):
    client, _ = reviewer_client()
    colleague, _ = reviewer_client()
    form = client.get(f"/review/{case.pk}/").content.decode()
    assert _checked(form, "verdict") == ""
    verdict = {"verdict": "disagree", "corrected_label": "Uninfected", "note": "no ring"}
    client.post(f"/review/{case.pk}/", {**verdict, "replacing": seen_review_time(form)})
    again = client.get(f"/review/{case.pk}/").content.decode()
    assert (_checked(again, "verdict"), _checked(again, "corrected_label")) == ("disagree", "Uninfected")
    assert re.search(r'<textarea name="note"[^>]*>no ring</textarea>', again)
    # A colleague reads the review beside the form; saving theirs must not sign this reviewer's note.
    theirs = colleague.get(f"/review/{case.pk}/").content.decode()
    assert (_checked(theirs, "verdict"), _checked(theirs, "corrected_label")) == ("", "")
    assert re.search(r'<textarea name="note"[^>]*></textarea>', theirs) and "“no ring”" in theirs


def test_the_queue_and_the_case_name_the_sample_each_cell_came_from(user):
    client, reviewer = reviewer_client()
    batch = create_batch(owner=user, uploads=[upload("cell.png")], sample_reference="WARD-7 bed 3")
    single = create_analysis(owner=user, upload=upload("cell.png"))  # the same file name, another sample
    Analysis.objects.update(status="done", label="Uninfected", probability_parasitized=0.2, decision_threshold=0.5)
    queue = client.get("/review/").content.decode()
    rows = re.findall(r"<tr>(.*?)</tr>", queue, re.S)
    assert any(f"batch #{batch.pk} (WARD-7 bed 3)" in row and "cell.png" in row for row in rows)
    assert any(f"/review/{single.pk}/" in row and "single upload" in row for row in rows)
    Batch.objects.filter(pk=batch.pk).update(note="febrile, returned from Chittagong")
    case = client.get(f"/review/{batch.analyses.get().pk}/").content.decode()
    assert f"batch #{batch.pk} (WARD-7 bed 3)" in case and "“febrile, returned from Chittagong”" in case
    # Every cell's heatmap has red somewhere: the key says it is this cell's own scale.
    owner = Client()
    owner.force_login(user)
    Analysis.objects.filter(pk=single.pk).update(overlay=f"overlays/{single.pk}.png")
    result = owner.get(f"/analyses/{single.pk}/").content.decode()
    assert all("scaled to its own strongest region" in page for page in (case, result))
    assert "a single upload" in result
    in_batch = owner.get(f"/analyses/{batch.analyses.get().pk}/").content.decode()
    assert f'<a href="/batches/{batch.pk}/">Batch #{batch.pk}</a>, WARD-7 bed 3' in in_batch
    client.post(f"/review/{single.pk}/", {"verdict": "agree"})
    mine = re.search(r'<ul id="my-reviews">(.*?)</ul>', client.get("/review/").content.decode(), re.S)[1]
    assert "cell.png</a>, single upload: agreed" in mine
    # The owner sees which cells a reviewer has confirmed, not only those corrected.
    owner = Client()
    owner.force_login(user)
    rows = re.findall(r'<tr data-analysis="(\d+)".*?</tr>', owner.get("/").content.decode(), re.S)
    confirmed = re.findall(
        r'<tr data-analysis="(\d+)"[^>]*>(?:(?!</tr>).)*\(confirmed by reviewer\)',
        owner.get("/").content.decode(),
        re.S,
    )
    assert len(rows) == 2 and confirmed == [str(single.pk)]


def test_the_queue_ranks_a_score_by_its_share_of_the_room_on_its_side_of_the_threshold(user):
    """At a threshold of 0.11, 0.000 is as sure as a score can be, and 0.565 halfway: ranked by their
    plain distance from 0.11 (0.11 against 0.455), the certain one came first."""
    client, _ = reviewer_client()
    for score in (0.0, 0.565, 0.103, 0.966, 0.3, 1.0):
        cell = create_analysis(owner=user, upload=upload(f"{score}.png"))
        label = "Parasitized" if score >= 0.11 else "Uninfected"
        threshold = 1.0 if score == 1.0 else 0.11  # on a threshold of 1.0: no room beside it, the least sure
        Analysis.objects.filter(pk=cell.pk).update(
            status="done", label=label, probability_parasitized=score, decision_threshold=threshold
        )
    queue = client.get("/review/").content.decode()
    order = re.findall(r'<td class="file">([0-9.]+)\.png</td>', queue)
    assert order == ["1.0", "0.103", "0.3", "0.565", "0.966", "0.0"]


def test_a_reviewers_empty_dashboard_points_to_the_queue_and_the_menu_marks_the_page(db):
    client, _ = reviewer_client()
    dashboard = client.get("/").content.decode()
    assert "other users' cells are in the" in dashboard and 'href="/review/">Review queue</a>.' in dashboard
    assert re.search(r'<a href="/"\s+aria-current="page">Dashboard</a>', dashboard)
    queue = client.get("/review/").content.decode()
    assert re.search(r'<a href="/review/"\s+aria-current="page">Review queue</a>', queue)


def test_a_review_saved_after_its_cell_was_deleted_says_so(user):
    """Deleted a moment before the save (not during it), the save was a bare 404 "Not found ... or
    it belongs to another account", the verdict and note typed lost without a word on why."""
    batch = create_batch(owner=user, uploads=[upload("going.png")])
    cell = batch.analyses.get()
    Analysis.objects.filter(pk=cell.pk).update(status="done", label="Parasitized", probability_parasitized=0.9)
    client, _ = reviewer_client()
    assert client.get(f"/review/{cell.pk}/").status_code == 200
    batch.delete()
    saved = client.post(f"/review/{cell.pk}/", {"verdict": "agree", "replacing": ""}, follow=True)
    assert saved.redirect_chain == [("/review/", 302)]
    assert f"Cell {cell.pk} was deleted while you had it open" in saved.content.decode()


def test_a_reviewer_taken_out_of_the_reviewers_with_a_case_open_is_told_the_account_may_not(case):
    """The save answered 404, "the record may have been deleted, or it belongs to another account",
    neither of which had happened."""
    client, reviewer = reviewer_client()
    assert client.get(f"/review/{case.pk}/").status_code == 200
    reviewer.groups.clear()
    refused = client.post(f"/review/{case.pk}/", {"verdict": "agree", "replacing": ""})
    assert refused.status_code == 403
    assert "Your account may not do this. Nothing was changed." in refused.content.decode()
    assert not Analysis.objects.get(pk=case.pk).review_verdict


def test_the_reviewers_note_reaches_the_api_the_csv_and_the_lab_system(case, user):
    """The note ("gametocytes seen, repeat smear") was on the result page and the printed report
    only: the API, the CSV and the callback carried the corrected label without it."""
    from diagnosis import callbacks
    from tests.factories import api_key

    client, _ = reviewer_client()
    note = "=gametocytes seen, repeat smear"
    sent = {"verdict": "disagree", "corrected_label": "Uninfected", "note": note, "replacing": ""}
    assert client.post(f"/review/{case.pk}/", sent).status_code == 302
    lab = Client(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    assert lab.get(f"/api/analyses/{case.pk}/").json()["review_note"] == note
    owner = Client()
    owner.force_login(user)
    exported = b"".join(owner.get("/export.csv").streaming_content).decode("utf-8-sig")
    assert exported.splitlines()[1].endswith(f'"\'{note}"')  # kept from running as a formula
    batch = create_batch(owner=user, uploads=[upload("b.png")])
    reviewed = batch.analyses.get()
    Analysis.objects.filter(pk=reviewed.pk).update(status="done", label="Uninfected", review_note="rings?")
    assert callbacks._payload(batch)["batch"]["analyses"][0]["review_note"] == "rings?"
