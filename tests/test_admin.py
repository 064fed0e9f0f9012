import os
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

from diagnosis.models import AccessEvent, Analysis, ApiToken
from diagnosis.services import create_analysis, create_batch
from diagnosis.tokens import new_token
from tests.conftest import someone_waits_on_a_lock, wait_for
from tests.factories import add_to_reviewers, api_key, classified, upload


@pytest.fixture
def finished(user):
    return classified(create_analysis(owner=user, upload=upload("review-me.png")))


def test_changelist_with_filters_and_search(admin_client, finished):
    base = "/admin/diagnosis/analysis/"
    page = admin_client.get(base).content.decode()
    assert "review-me.png" in page and "0.910" in page and f"/analyses/{finished.pk}/thumbnail/" in page
    for query in (
        "?status__exact=done",
        "?label__exact=Parasitized",
        "?review_verdict__exact=",
        f"?owner__id__exact={finished.owner_id}",
        "?q=review-me",
        "?reviewed=no",
    ):
        response = admin_client.get(base + query)
        assert response.status_code == 200 and "review-me.png" in response.content.decode(), query
    assert "review-me.png" not in admin_client.get(base + "?status__exact=failed").content.decode()
    assert "review-me.png" not in admin_client.get(base + "?reviewed=yes").content.decode()
    assert "By label the model gave" in page and "By reviewed" in page and "single upload" in page
    change = admin_client.get(f"{base}{finished.pk}/change/").content.decode()
    assert "0.910" in change and "0.91000" not in change  # a score as it reads elsewhere, not a raw float


def test_the_admin_marks_and_filters_borderline_calls_as_the_pages_do(admin_client, user):
    """Reviewers review here too, and borderline calls are the ones to confirm first."""
    near = classified(create_analysis(owner=user, upload=upload("near.png")), probability_parasitized=0.40)
    sure = classified(create_analysis(owner=user, upload=upload("sure.png")), probability_parasitized=0.99)
    assert near.is_borderline and not sure.is_borderline
    base = "/admin/diagnosis/analysis/"
    assert "By borderline (confirm first)" in admin_client.get(base).content.decode()
    for query, shown, hidden in (
        ("?borderline=yes", "near.png", "sure.png"),
        ("?borderline=no", "sure.png", "near.png"),
    ):
        page = admin_client.get(base + query).content.decode()
        assert shown in page and hidden not in page, query
    change = admin_client.get(f"{base}{near.pk}/change/").content.decode()
    assert re.search(r"Borderline:</label>\s*<div class=\"readonly\"><img[^>]*alt=\"True\"", change)


def test_change_view_shows_both_images_and_locks_predictions(admin_client, finished):
    page = admin_client.get(f"/admin/diagnosis/analysis/{finished.pk}/change/").content.decode()
    assert f"/analyses/{finished.pk}/picture/" in page  # the original as browsers draw it (a TIFF as a PNG)
    assert 'name="label"' not in page and 'name="probability_parasitized"' not in page
    assert "Decision threshold" in page and "0.37" in page and 'name="decision_threshold"' not in page
    assert 'name="review_verdict"' in page


def test_review_saves_verdict_with_reviewer_and_time(admin_client, finished):
    response = admin_client.post(
        f"/admin/diagnosis/analysis/{finished.pk}/change/",
        {
            "review_verdict": "disagree",
            "corrected_label": "Uninfected",
            "review_note": "stain artefact",
            "label": "Uninfected",
        },  # a tampered prediction field must be ignored
    )
    assert response.status_code == 302
    finished.refresh_from_db()
    assert finished.review_verdict == "disagree" and finished.corrected_label == "Uninfected"
    assert finished.reviewed_by == admin_client.admin and finished.reviewed_at is not None
    assert finished.label == "Parasitized" and finished.review_note == "stain artefact"


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        ({"review_verdict": "disagree", "corrected_label": "", "review_note": ""}, "corrected label"),
        # Without a verdict nothing would record who changed the final label, or when.
        ({"review_verdict": "", "corrected_label": "Uninfected", "review_note": "clean"}, "A review needs a verdict"),
    ],
)
def test_an_incomplete_review_is_a_form_error_and_changes_nothing(admin_client, finished, sent, error):
    response = admin_client.post(f"/admin/diagnosis/analysis/{finished.pk}/change/", sent)
    assert response.status_code == 200 and error in response.content.decode()
    finished.refresh_from_db()
    assert (finished.review_verdict, finished.corrected_label, finished.review_note) == ("", "", "")
    assert finished.final_label == "Parasitized"


def test_admins_send_failed_analyses_of_any_user_back_to_the_worker(admin_client, finished, other_user):
    failed = create_analysis(owner=other_user, upload=upload("broken.png"))
    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Model unavailable: no weights")
    response = admin_client.post(
        "/admin/diagnosis/analysis/",
        {"action": "retry_failed", "_selected_action": [str(failed.pk), str(finished.pk)]},
        follow=True,
    )
    assert "1 failed analyses queued again; the others were left alone." in response.content.decode()
    assert Analysis.objects.get(pk=failed.pk).status == "queued" and Analysis.objects.get(pk=failed.pk).error == ""
    assert Analysis.objects.get(pk=finished.pk).status == "done"


def test_admins_see_who_holds_an_api_key_and_revoke_it_without_reading_it(admin_client, user, settings):
    from datetime import timedelta

    from django.utils import timezone
    from rest_framework.test import APIClient

    from diagnosis.models import ApiToken

    key = api_key(user)
    token = ApiToken.objects.get(user=user)
    listing = admin_client.get("/admin/diagnosis/apitoken/").content.decode()
    detail = admin_client.get(f"/admin/diagnosis/apitoken/{token.pk}/change/").content.decode()
    assert user.username in listing and token.hint in listing
    assert key not in listing + detail and token.digest not in listing + detail
    assert admin_client.get("/admin/diagnosis/apitoken/add/").status_code == 403
    ApiToken.objects.filter(pk=token.pk).update(created=timezone.now() - timedelta(days=settings.API_TOKEN_DAYS + 1))
    assert "expired " in admin_client.get("/admin/diagnosis/apitoken/").content.decode()

    admin_client.post(f"/admin/diagnosis/apitoken/{token.pk}/delete/", {"post": "yes"})
    assert not ApiToken.objects.filter(user=user).exists()
    assert APIClient().get("/api/analyses/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 401


def staff_with(client, *codenames: str):
    from django.contrib.auth.models import Permission

    staff = get_user_model().objects.create_user("clerk", password="pw-for-tests-123", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client.force_login(staff)
    return client


def test_the_admin_sign_in_shares_the_lockout_of_the_web_sign_in(client, db, settings):
    from django.test import Client

    settings.LOGIN_MAX_FAILURES = 3
    get_user_model().objects.create_superuser("boss", password="pw-for-tests-123")
    for _ in range(3):
        wrong = client.post("/admin/login/", {"username": "boss", "password": "guess"})
        assert wrong.status_code == 200 and "_auth_user_id" not in client.session
    right = client.post("/admin/login/", {"username": "boss", "password": "pw-for-tests-123"})
    assert "Too many failed sign-in attempts" in right.content.decode() and "_auth_user_id" not in client.session
    assert Client().post("/accounts/login/", {"username": "boss", "password": "pw-for-tests-123"}).status_code == 429


def test_staff_outside_the_reviewers_group_see_no_patient_records_whatever_their_permissions(client, finished):
    # On the site only reviewers see other users' cells and their images; the admin is no way round it.
    failed = create_analysis(owner=finished.owner, upload=upload("broken.png"))
    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Model unavailable")
    clerk = staff_with(client, "view_analysis", "change_analysis", "delete_analysis", "view_batch")
    for page in ("analysis/", f"analysis/{finished.pk}/change/", "batch/"):
        assert clerk.get(f"/admin/diagnosis/{page}").status_code == 403, page
    assert "/admin/diagnosis/analysis/" not in clerk.get("/admin/").content.decode()
    verdict = {"review_verdict": "disagree", "corrected_label": "Uninfected"}
    clerk.post(f"/admin/diagnosis/analysis/{finished.pk}/change/", verdict)
    clerk.post("/admin/diagnosis/analysis/", {"action": "retry_failed", "_selected_action": [str(failed.pk)]})
    clerk.post(f"/admin/diagnosis/analysis/{finished.pk}/delete/", {"post": "yes"})
    finished.refresh_from_db()
    assert finished.review_verdict == "" and Analysis.objects.get(pk=failed.pk).status == "failed"


def test_a_reviewer_who_is_staff_reviews_in_the_admin_with_no_further_permissions(client, finished):
    reviewer = staff_with(client)
    add_to_reviewers(get_user_model().objects.get(username="clerk"))
    get_user_model().objects.create_superuser("service-account-with-no-cells", password="x")
    listing = reviewer.get("/admin/diagnosis/analysis/")
    assert listing.status_code == 200 and "review-me.png" in listing.content.decode()
    # The owner filter names the owners of the records listed, not every account there is.
    for changelist in (listing, reviewer.get("/admin/diagnosis/batch/")):
        assert changelist.status_code == 200 and "service-account-with-no-cells" not in changelist.content.decode()
    assert finished.owner.username in listing.content.decode()
    page = reviewer.get(f"/admin/diagnosis/analysis/{finished.pk}/change/").content.decode()
    assert 'name="review_verdict"' in page
    assert reviewer.get(f"/analyses/{finished.pk}/picture/").status_code == 200  # the images it shows open
    saved = reviewer.post(
        f"/admin/diagnosis/analysis/{finished.pk}/change/",
        {"review_verdict": "disagree", "corrected_label": "Uninfected", "replacing": ""},
    )
    assert saved.status_code == 302
    finished.refresh_from_db()
    assert finished.final_label == "Uninfected" and finished.reviewed_by.username == "clerk"
    # Deleting needs Django's delete permission as well, and so does analysing someone's cells again.
    assert reviewer.post(f"/admin/diagnosis/analysis/{finished.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Analysis.objects.filter(pk=finished.pk).exists()
    failed = create_analysis(owner=finished.owner, upload=upload("broken.png"))
    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Model unavailable")
    assert 'value="retry_failed"' not in reviewer.get("/admin/diagnosis/analysis/").content.decode()
    reviewer.post("/admin/diagnosis/analysis/", {"action": "retry_failed", "_selected_action": [str(failed.pk)]})
    assert Analysis.objects.get(pk=failed.pk).status == "failed"


@pytest.mark.skipif("sqlite" in os.environ.get("DATABASE_URL", "sqlite"), reason="PostgreSQL only (CI): row locks")
@pytest.mark.django_db(transaction=True)  # the colleague's review comes over a connection of its own
def test_a_colleagues_review_saved_during_an_admin_save_waits_and_is_told(client, monkeypatch):
    import threading

    from django.db import connection

    from diagnosis.admin import ReviewAdminForm
    from diagnosis.services import REVIEW_CONFLICT, review_analysis
    from tests.factories import UserFactory

    case = classified(create_analysis(owner=UserFactory(), upload=upload("race.png")))
    colleague, outcome = UserFactory(username="colleague"), []

    def colleague_saves():
        try:
            review_analysis(
                analysis=case, reviewer=colleague, verdict="disagree", corrected_label="Uninfected", replacing=None
            )
            outcome.append("saved")
        except ValidationError as refusal:
            outcome.append(refusal.code)
        finally:
            connection.close()

    colleague_thread = threading.Thread(target=colleague_saves)
    checked = ReviewAdminForm.clean

    def checked_then_colleague_saves(form):
        data = checked(form)
        colleague_thread.start()
        # The colleague's save is done, or it waits on the lock the admin's check took: the admin's goes on then.
        wait_for(lambda: not colleague_thread.is_alive() or someone_waits_on_a_lock(), timeout=20, interval=0.05)
        return data

    monkeypatch.setattr(ReviewAdminForm, "clean", checked_then_colleague_saves)
    admin = get_user_model().objects.create_superuser("boss", password="pw-for-tests-123")
    client.force_login(admin)
    saved = client.post(
        f"/admin/diagnosis/analysis/{case.pk}/change/",
        {"review_verdict": "agree", "corrected_label": "", "review_note": "", "replacing": ""},
    )
    colleague_thread.join(timeout=10)
    assert saved.status_code == 302 and Analysis.objects.get(pk=case.pk).reviewed_by == admin
    assert outcome == [REVIEW_CONFLICT]  # told who got there first, as on the site


@pytest.mark.parametrize("batch", ["9" * 25, "-" + "9" * 25, "+" + "9" * 25, " " + "9" * 25])
def test_the_batch_link_edited_past_any_id_says_there_is_no_such_batch(admin_client, finished, batch):
    response = admin_client.get("/admin/diagnosis/analysis/", {"batch": batch}, follow=True)
    assert response.status_code == 200 and f"There is no batch #{batch.strip()[:30]}." in response.content.decode()
    assert response.redirect_chain == [("/admin/diagnosis/analysis/", 302)]
    from diagnosis.services import create_batch

    batch = create_batch(owner=finished.owner, uploads=[upload("in-the-batch.png")])
    linked = admin_client.get(f"/admin/diagnosis/analysis/?batch={batch.pk}").content.decode()
    assert "in-the-batch.png" in linked and "review-me.png" not in linked


def test_the_admin_lists_and_filters_cells_by_the_label_they_show(admin_client, finished, user):
    from diagnosis.services import review_analysis

    corrected = classified(create_analysis(owner=user, upload=upload("corrected.png")))
    review_analysis(
        analysis=corrected,
        reviewer=admin_client.admin,
        verdict="disagree",
        corrected_label="Uninfected",
        note="",
        replacing=None,
    )
    base = "/admin/diagnosis/analysis/"
    parasitized = admin_client.get(base + "?final_label=Parasitized").content.decode()
    uninfected = admin_client.get(base + "?final_label=Uninfected").content.decode()
    assert "review-me.png" in parasitized and "corrected.png" not in parasitized
    assert "corrected.png" in uninfected and "Uninfected (corrected)" in uninfected


def test_a_batch_in_the_admin_links_to_its_cells(admin_client, user):
    from diagnosis.services import create_batch

    batch = create_batch(owner=user, uploads=[upload("one.png"), upload("two.png")])
    create_analysis(owner=user, upload=upload("elsewhere.png"))
    page = admin_client.get(f"/admin/diagnosis/batch/{batch.pk}/change/").content.decode()
    link = f"/admin/diagnosis/analysis/?batch={batch.pk}"
    assert f'href="{link}"' in page and "2 cells" in page
    cells = admin_client.get(link).content.decode()
    assert "one.png" in cells and "two.png" in cells and "elsewhere.png" not in cells


def test_opening_a_batch_in_the_admin_is_recorded_and_hides_callback_credentials(admin_client, user):
    from diagnosis.models import AccessEvent, Batch
    from diagnosis.services import create_batch

    batch = create_batch(owner=user, uploads=[upload()], sample_reference="PT-77")
    Batch.objects.filter(pk=batch.pk).update(callback_url="https://lab:s3cret@lis.example.org/results")
    page = admin_client.get(f"/admin/diagnosis/batch/{batch.pk}/change/").content.decode()
    assert "PT-77" in page and "lis.example.org" in page and "s3cret" not in page
    assert 'name="sample_reference"' not in page  # the owner's record, not editable here
    viewed = AccessEvent.objects.get(batch_id=batch.pk, action=AccessEvent.Action.VIEWED)
    assert viewed.username == admin_client.admin.username and viewed.channel == "admin"


def test_an_admin_page_refused_for_want_of_permission_records_no_opening(client, finished):
    from diagnosis.models import AccessEvent

    clerk = staff_with(client, "view_analysis")  # a model permission, but not a reviewer
    assert clerk.get(f"/admin/diagnosis/analysis/{finished.pk}/change/").status_code == 403
    assert not AccessEvent.objects.filter(analysis_id=finished.pk).exists()
    add_to_reviewers(get_user_model().objects.get(username="clerk"))
    assert clerk.get(f"/admin/diagnosis/analysis/{finished.pk}/change/").status_code == 200
    assert AccessEvent.objects.get(analysis_id=finished.pk).username == "clerk"


def test_batches_and_cells_cannot_be_added_in_the_admin(admin_client):
    for model in ("batch", "analysis"):
        assert admin_client.get(f"/admin/diagnosis/{model}/add/").status_code == 403
        assert (
            f'href="/admin/diagnosis/{model}/add/"'
            not in admin_client.get(f"/admin/diagnosis/{model}/").content.decode()
        )


def test_saving_a_reviewed_case_unchanged_keeps_its_reviewer(admin_client, finished, user):
    from diagnosis.services import review_analysis

    review_analysis(analysis=finished, reviewer=user, verdict="agree", note="ring forms", replacing=None)
    finished.refresh_from_db()
    response = admin_client.post(
        f"/admin/diagnosis/analysis/{finished.pk}/change/",
        {
            "review_verdict": "agree",
            "corrected_label": "",
            "review_note": "ring forms",
            "replacing": finished.reviewed_at.isoformat(),
        },
    )
    assert response.status_code == 302
    unchanged = Analysis.objects.get(pk=finished.pk)
    assert (unchanged.reviewed_by, unchanged.reviewed_at) == (user, finished.reviewed_at)


def test_a_review_saved_elsewhere_while_the_admin_form_was_open_is_not_replaced_unseen(admin_client, finished):
    import re

    from diagnosis.services import review_analysis
    from tests.factories import UserFactory

    url = f"/admin/diagnosis/analysis/{finished.pk}/change/"

    def replacing_on(page) -> str:
        return re.search(r'name="replacing"(?: value="([^"]*)")?', page.content.decode())[1] or ""

    opened = replacing_on(admin_client.get(url))
    assert opened == ""  # not reviewed yet
    colleague = UserFactory(username="colleague")
    review_analysis(
        analysis=finished, reviewer=colleague, verdict="disagree", corrected_label="Uninfected", replacing=None
    )
    agree = {"review_verdict": "agree", "corrected_label": "", "review_note": ""}
    refused = admin_client.post(url, {**agree, "replacing": opened})
    assert refused.status_code == 200 and "colleague reviewed this case at" in refused.content.decode()
    kept = Analysis.objects.get(pk=finished.pk)
    assert (kept.reviewed_by, kept.review_verdict, kept.final_label) == (colleague, "disagree", "Uninfected")
    # Having read it, the admin saves again from the page as shown: now it replaces the colleague's.
    replaced = admin_client.post(url, {**agree, "replacing": replacing_on(refused)})
    assert replaced.status_code == 302
    final = Analysis.objects.get(pk=finished.pk)
    assert (final.reviewed_by, final.review_verdict, final.final_label) == (admin_client.admin, "agree", "Parasitized")


def test_a_clinician_opening_the_admin_by_mistake_is_not_locked_out(client, user, settings):
    from tests.factories import PASSWORD

    settings.LOGIN_MAX_FAILURES = 1
    refused = client.post("/admin/login/", {"username": user.username, "password": PASSWORD})
    assert refused.status_code == 200 and "_auth_user_id" not in client.session
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302


def test_an_empty_password_at_the_admin_sign_in_does_not_reset_the_count(client, db, settings):
    settings.LOGIN_MAX_FAILURES = 3
    get_user_model().objects.create_superuser("boss", password="pw-for-tests-123")
    for password in ("guess-1", "guess-2", "", "guess-3"):
        client.post("/admin/login/", {"username": "boss", "password": password})
    right = client.post("/admin/login/", {"username": "boss", "password": "pw-for-tests-123"})
    assert "Too many failed sign-in attempts" in right.content.decode() and "_auth_user_id" not in client.session


def test_deleting_an_account_records_the_patient_data_that_goes_with_it(admin_client, user):
    from diagnosis.models import AccessEvent
    from diagnosis.services import create_batch

    batch = create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="PT-1")
    single = create_analysis(owner=user, upload=upload("alone.png"))
    response = admin_client.post(f"/admin/auth/user/{user.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not get_user_model().objects.filter(pk=user.pk).exists()
    deleted = AccessEvent.objects.filter(action=AccessEvent.Action.DELETED, username=admin_client.admin.username)
    assert set(deleted.values_list("batch_id", "analysis_id", "owner_id", "detail")) == {
        (batch.pk, None, user.pk, "2 cells"),
        (None, single.pk, user.pk, "1 cell"),
    }


def test_a_case_reviewed_in_the_hour_a_clock_change_repeats_can_be_saved_again(admin_client, finished, settings):
    """01:30 happens twice in London on 25 October 2026: the form must carry which one it saw."""
    import re
    from datetime import UTC, datetime

    settings.TIME_ZONE = "Europe/London"
    reviewed_at = datetime(2026, 10, 25, 0, 30, 0, 123456, tzinfo=UTC)  # 01:30:00.123456 BST, the first 01:30
    Analysis.objects.filter(pk=finished.pk).update(
        review_verdict="agree", reviewed_by=admin_client.admin, reviewed_at=reviewed_at
    )
    url = f"/admin/diagnosis/analysis/{finished.pk}/change/"
    opened = re.search(r'name="replacing" value="([^"]*)"', admin_client.get(url).content.decode())[1]
    saved = admin_client.post(url, {"review_verdict": "disagree", "corrected_label": "Uninfected", "replacing": opened})
    assert saved.status_code == 302, "the review time read back is the one it was"
    assert Analysis.objects.get(pk=finished.pk).final_label == "Uninfected"


def test_the_admins_history_keeps_no_sample_reference_or_file_name(admin_client, user):
    from django.contrib.admin.models import LogEntry

    from diagnosis.services import create_batch

    batch = create_batch(owner=user, uploads=[upload("smith-john.png")], sample_reference="S-SMITH")
    cell = batch.analyses.get()
    selected = {"action": "delete_selected", "_selected_action": [cell.pk], "post": "yes"}
    assert admin_client.post("/admin/diagnosis/analysis/", selected).status_code == 302
    assert admin_client.post(f"/admin/diagnosis/batch/{batch.pk}/delete/", {"post": "yes"}).status_code == 302
    kept = list(LogEntry.objects.values_list("object_repr", flat=True))
    assert len(kept) == 2 and not [r for r in kept if "SMITH" in r.upper()], kept


def test_deleting_an_account_counts_what_goes_with_it_rather_than_listing_it(admin_client, user):
    from diagnosis.services import create_batch

    create_batch(owner=user, uploads=[upload(f"cell-{n}.png") for n in range(3)])
    create_analysis(owner=user, upload=upload("single.png"))
    page = admin_client.get(f"/admin/auth/user/{user.pk}/delete/").content.decode()
    assert f"{user.username}: 1 batch and 4 cells" in page
    assert "cell-0.png" not in page and "Analysis " not in page  # no line per cell
    assert admin_client.post(f"/admin/auth/user/{user.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Analysis.objects.exists()


def _locked_out(username: str, password: str) -> bool:
    from django.test import Client

    return Client().post("/accounts/login/", {"username": username, "password": password}).status_code == 429


def _lock_out(username: str) -> None:
    from django.test import Client

    for _ in range(2):
        Client(REMOTE_ADDR="10.0.0.7").post("/accounts/login/", {"username": username, "password": "guess"})
        Client(REMOTE_ADDR="127.0.0.1").post("/accounts/login/", {"username": username, "password": "guess"})


def test_an_administrator_clears_a_users_sign_in_lockout_from_every_address(admin_client, user, settings):
    from django.contrib.admin.models import LogEntry
    from django.test import Client

    from tests.factories import PASSWORD

    settings.LOGIN_MAX_FAILURES = 2
    colleague = get_user_model().objects.create_user("colleague", password=PASSWORD)
    _lock_out(user.username)
    _lock_out(colleague.username)
    assert _locked_out(user.username, PASSWORD) and _locked_out(colleague.username, PASSWORD)

    assert 'value="clear_sign_in_lockout"' in admin_client.get("/admin/auth/user/").content.decode()
    chosen = {"action": "clear_sign_in_lockout", "_selected_action": [str(user.pk)]}
    response = admin_client.post("/admin/auth/user/", chosen, follow=True)
    assert "Sign-in lockouts cleared for 1 user." in response.content.decode()
    assert Client().post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302
    assert not _locked_out(user.username, PASSWORD)
    elsewhere = Client(REMOTE_ADDR="10.0.0.7")
    assert elsewhere.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302
    assert _locked_out(colleague.username, PASSWORD)  # only the chosen user
    entry = LogEntry.objects.get(object_id=str(user.pk))
    assert entry.user == admin_client.admin and "Cleared the sign-in lockout" in entry.get_change_message()


def test_a_new_password_an_administrator_sets_can_be_used_at_once(
    admin_client, user, settings, django_capture_on_commit_callbacks
):
    from django.test import Client

    settings.LOGIN_MAX_FAILURES = 2
    _lock_out(user.username)
    new = "a-Fresh-passphrase-42"
    with django_capture_on_commit_callbacks(execute=True):  # the lockout is lifted once the password is saved
        response = admin_client.post(f"/admin/auth/user/{user.pk}/password/", {"password1": new, "password2": new})
    assert response.status_code == 302
    assert Client().post("/accounts/login/", {"username": user.username, "password": new}).status_code == 302


def test_staff_who_may_not_change_users_cannot_clear_lockouts(client, user, settings):
    from tests.factories import PASSWORD

    settings.LOGIN_MAX_FAILURES = 2
    _lock_out(user.username)
    clerk = staff_with(client, "view_user")
    page = clerk.get("/admin/auth/user/")
    assert page.status_code == 200 and "clear_sign_in_lockout" not in page.content.decode()
    chosen = {"action": "clear_sign_in_lockout", "_selected_action": [str(user.pk)]}
    clerk.post("/admin/auth/user/", chosen)
    assert _locked_out(user.username, PASSWORD)


def test_a_new_password_set_with_changepassword_can_be_used_at_once(
    user, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from django.core.management import call_command
    from django.test import Client

    settings.LOGIN_MAX_FAILURES = 2
    _lock_out(user.username)
    new = "a-Fresh-passphrase-42"
    monkeypatch.setattr("getpass.getpass", lambda prompt="": new)
    with django_capture_on_commit_callbacks(execute=True):
        call_command("changepassword", user.username)
    assert Client().post("/accounts/login/", {"username": user.username, "password": new}).status_code == 302


def test_a_new_password_whose_save_is_rolled_back_leaves_the_lockout(
    user, settings, django_capture_on_commit_callbacks
):
    from django.db import transaction

    from tests.factories import PASSWORD

    settings.LOGIN_MAX_FAILURES = 2
    _lock_out(user.username)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            user.set_password("a-Fresh-passphrase-42")
            user.save()
            raise RuntimeError("the admin's form failed after saving the user")
    assert _locked_out(user.username, PASSWORD)


def test_the_demo_accounts_scripts_start_prints_exist_after_a_database_reset(db, settings, tmp_path, client):
    """Removing var/db.sqlite3 to start afresh kept var/demo-credentials.txt: scripts/start printed
    two accounts that no longer existed, and nobody could sign in."""
    import io

    from django.core.management import call_command

    settings.VAR_DIR = tmp_path

    def printed_accounts() -> list[tuple[str, str]]:
        out = io.StringIO()
        call_command("create_demo_users", stdout=out)
        return re.findall(r"^(\w+) / (\S+) ", out.getvalue(), re.M)

    first = printed_accounts()
    assert [name for name, _ in first] == ["demo", "admin"]
    assert printed_accounts() == first  # the next start prints the same accounts, creating none
    get_user_model().objects.all().delete()  # the database is reset; the file stays
    again = printed_accounts()
    assert again != first and (tmp_path / "demo-credentials.txt").stat().st_mode & 0o777 == 0o600
    for username, password in again:
        assert client.login(username=username, password=password), username
    get_user_model().objects.create_user("colleague")  # an existing site without the demo file
    (tmp_path / "demo-credentials.txt").unlink()
    out = io.StringIO()
    call_command("create_demo_users", stdout=out)
    assert "Users already exist" in out.getvalue() and not (tmp_path / "demo-credentials.txt").exists()


def test_an_api_keys_expiry_and_an_access_entrys_title_are_in_the_sites_time_zone(admin_client, settings, user):
    """Both were formatted in UTC while the user's own pages, the lists and the footer use
    TIME_ZONE: an auditor in Nairobi read 22:30 on 03-01 for what happened at 01:30 on 03-02."""
    settings.TIME_ZONE = "Africa/Nairobi"
    settings.API_TOKEN_DAYS = 90
    evening = datetime(2026, 3, 1, 22, 30, tzinfo=UTC)
    token, _ = new_token(user=user)
    ApiToken.objects.filter(pk=token.pk).update(created=evening - timedelta(days=90))
    listing = admin_client.get("/admin/diagnosis/apitoken/").content.decode()
    assert "2026-03-02" in listing and "2026-03-01" not in listing
    event = AccessEvent.objects.create(username="alice", action="viewed", channel="web", analysis_id=1)
    AccessEvent.objects.filter(pk=event.pk).update(at=evening)
    page = admin_client.get(f"/admin/diagnosis/accessevent/{event.pk}/change/").content.decode()
    assert "2026-03-02 01:30" in page and "2026-03-01 22:30" not in page


def test_the_favicon_browsers_ask_admin_pages_for_is_the_sites_icon(admin_client):
    """Django's admin pages name no icon, so browsers asked for /favicon.ico: a 404 in the log for
    every admin page opened."""
    answer = admin_client.get("/favicon.ico")
    assert answer.status_code == 302 and re.fullmatch(r"/static/img/favicon(\.[0-9a-f]{12})?\.svg", answer["Location"])


def test_an_admin_search_for_other_patients_is_recorded_each_time(admin_client, user, other_user):
    """A list page is recorded by the span of ids it held, and a repeat within 10 minutes left out:
    searches for SMITH and then JONES, other patients' batches between the same first and last ids,
    left one entry, and the second search no trace."""
    for owner, reference in [
        (user, "SMITH JONES household"),
        (user, "SMITH Anna"),
        (other_user, "JONES Bob"),
        (other_user, "SMITH JONES 2"),
    ]:
        create_batch(owner=owner, uploads=[upload("a.png")], sample_reference=reference)
    for search in ("SMITH", "JONES"):
        assert admin_client.get("/admin/diagnosis/batch/", {"q": search}).status_code == 200
    lists = AccessEvent.objects.filter(
        username=admin_client.admin.username, action="viewed", detail__startswith="list of 3 batches"
    )
    assert lists.count() == 2
