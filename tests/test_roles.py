"""Who may see and change what: every page, file, API operation and admin page, for each role.

Roles: anonymous, the owner, another clinician, a `reviewers` member (not staff), a staff user
without the review permission (but with every model permission on cells, batches, the trail and
accounts: a help desk), a staff reviewer, a superuser, and the owner deactivated with a session
still open; each also with an API token.
"""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from diagnosis.models import AccessEvent, Analysis
from diagnosis.services import create_batch
from tests.factories import api_key, classified, reviewers_group, upload

User = get_user_model()
ROLES = ["anon", "owner", "outsider", "reviewer", "staff", "staff_reviewer", "superuser", "deactivated"]
REVIEWERS = {"reviewer", "staff_reviewer", "superuser"}
STAFF = {"staff", "staff_reviewer", "superuser"}
ADMIN_REVIEWERS = {"staff_reviewer", "superuser"}
STAFF_PERMS = [
    "view_analysis",
    "change_analysis",
    "delete_analysis",
    "view_batch",
    "change_batch",
    "delete_batch",
    "view_accessevent",
    "view_user",
    "change_user",
    "view_apitoken",
]


@pytest.fixture
def world(db):
    owner = User.objects.create_user("owner", password="pw")
    batch = create_batch(owner=owner, uploads=[upload("owned.png"), upload("broken.png")], sample_reference="S-OWN")
    done, failed = batch.analyses.order_by("id")
    done = classified(done, probability_parasitized=0.30, decision_threshold=0.11)  # borderline
    done.overlay.save("o.png", done.image.file, save=False)
    Analysis.objects.filter(pk=done.pk).update(overlay=done.overlay.name)
    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Model unavailable")
    users = {
        "owner": owner,
        "outsider": User.objects.create_user("outsider", password="pw"),
        "reviewer": User.objects.create_user("reviewer", password="pw"),
        "staff": User.objects.create_user("staff", password="pw", is_staff=True),
        "staff_reviewer": User.objects.create_user("staffrev", password="pw", is_staff=True),
        "superuser": User.objects.create_superuser("root", password="pw"),
        "deactivated": User.objects.create_user("gone", password="pw"),
    }
    reviewers = reviewers_group()
    users["reviewer"].groups.add(reviewers)
    users["staff_reviewer"].groups.add(reviewers)
    users["staff"].user_permissions.set(Permission.objects.filter(codename__in=STAFF_PERMS))
    gone_batch = create_batch(owner=users["deactivated"], uploads=[upload("gone.png")])
    clients, keys = {"anon": Client()}, {"anon": None}
    for role, user in users.items():
        clients[role] = Client()
        clients[role].force_login(user)
        keys[role] = api_key(user)
    # The deactivated user: signed in and holding a key, then deactivated behind their back.
    User.objects.filter(pk=users["deactivated"].pk).update(is_active=False)
    return {
        "users": users,
        "clients": clients,
        "keys": keys,
        "batch": batch,
        "done": Analysis.objects.get(pk=done.pk),
        "failed": Analysis.objects.get(pk=failed.pk),
        "gone_batch": gone_batch,
    }


def login_redirect(prefix="/accounts/login/"):
    return ("redirect", prefix)


def web_expect(owner_ok=200, others=404, anon=None, for_reviewers=None):
    anon = anon or login_redirect()
    row = {}
    for role in ROLES:
        if role in ("anon", "deactivated"):
            row[role] = anon
        elif role == "owner":
            row[role] = owner_ok
        elif for_reviewers is not None and role in REVIEWERS:
            row[role] = for_reviewers
        else:
            row[role] = others
    return row


def admin_expect(for_admin_reviewers=200, staff=403, for_superuser=None):
    row = {}
    for role in ROLES:
        if role == "superuser":
            row[role] = for_superuser or for_admin_reviewers
        elif role in ADMIN_REVIEWERS:
            row[role] = for_admin_reviewers
        elif role == "staff":
            row[role] = staff
        else:
            row[role] = login_redirect("/admin/login/")
    return row


def api_expect(owner_ok=200, others=404):
    return {role: 401 if role in ("anon", "deactivated") else owner_ok if role == "owner" else others for role in ROLES}


def table(w):
    a, f, b = w["done"].pk, w["failed"].pk, w["batch"].pk
    polled_anon = 401
    rows = [
        # ---- the site: the owner's own records ----
        ("GET", f"/batches/{b}/", web_expect()),
        ("GET", f"/batches/{b}/status.json", web_expect(anon=polled_anon)),
        ("GET", f"/batches/{b}/export.csv", web_expect()),
        ("GET", f"/batches/{b}/report/", web_expect()),
        ("GET", f"/batches/{b}/delete/", web_expect()),
        ("GET", f"/batches/{b}/retry/", web_expect(owner_ok=("redirect", f"/batches/{b}/"))),
        ("GET", f"/analyses/{a}/", web_expect()),
        ("GET", f"/analyses/{a}/delete/", web_expect()),
        ("GET", f"/analyses/{f}/retry/", web_expect(owner_ok=("redirect", f"/analyses/{f}/"))),
        *[
            ("GET", f"/analyses/{a}/{kind}/", web_expect(for_reviewers=200))
            for kind in ("image", "picture", "overlay", "thumbnail")
        ],
        ("GET", "/review/", web_expect(owner_ok=404, for_reviewers=200)),
        ("GET", f"/review/{a}/", web_expect(owner_ok=404, for_reviewers=200)),
        # wrong methods
        (
            "POST",
            f"/analyses/{a}/image/",
            web_expect(owner_ok=405, others=405, anon=login_redirect(), for_reviewers=405),
        ),
        ("DELETE", f"/analyses/{a}/", web_expect(owner_ok=405, others=405)),
        ("PUT", f"/batches/{b}/", web_expect(owner_ok=405, others=405)),
        # ---- the API, with tokens ----
        ("GET", f"/api/analyses/{a}/", api_expect()),
        ("GET", f"/api/analyses/{a}/image/", api_expect()),
        ("GET", f"/api/analyses/{a}/overlay/", api_expect()),
        ("GET", f"/api/batches/{b}/", api_expect()),
        ("PUT", f"/api/batches/{b}/", api_expect(owner_ok=405, others=405)),
        ("PATCH", f"/api/analyses/{a}/", api_expect(owner_ok=405, others=405)),
        (
            "GET",
            "/api/ops/status/",
            {r: 401 if r in ("anon", "deactivated") else 200 if r in STAFF else 403 for r in ROLES},
        ),
        ("GET", "/api/", api_expect(others=200)),
        # ---- the admin ----
        ("GET", "/admin/diagnosis/analysis/", admin_expect()),
        ("GET", f"/admin/diagnosis/analysis/?batch={b}", admin_expect()),
        ("GET", "/admin/diagnosis/analysis/?q=owned", admin_expect()),
        ("GET", f"/admin/diagnosis/analysis/{a}/change/", admin_expect()),
        ("GET", f"/admin/diagnosis/analysis/{a}/history/", admin_expect()),
        ("GET", f"/admin/diagnosis/analysis/{a}/delete/", admin_expect(for_admin_reviewers=403, for_superuser=200)),
        ("GET", "/admin/diagnosis/analysis/add/", admin_expect(for_admin_reviewers=403)),
        ("GET", "/admin/diagnosis/batch/", admin_expect()),
        ("GET", f"/admin/diagnosis/batch/{b}/change/", admin_expect()),
        ("GET", f"/admin/diagnosis/batch/{b}/history/", admin_expect()),
        ("GET", f"/admin/diagnosis/batch/{b}/delete/", admin_expect(for_admin_reviewers=403, for_superuser=200)),
        ("GET", "/admin/diagnosis/accessevent/", admin_expect(for_admin_reviewers=403, staff=200, for_superuser=200)),
        (
            "GET",
            "/admin/diagnosis/accessevent/add/",
            admin_expect(for_admin_reviewers=403, staff=403, for_superuser=403),
        ),
        ("GET", "/admin/autocomplete/?app_label=diagnosis&model_name=analysis&field_name=batch", admin_expect()),
        (
            "GET",
            "/admin/autocomplete/?app_label=diagnosis&model_name=analysis&field_name=owner",
            admin_expect(for_admin_reviewers=403, staff=200, for_superuser=200),
        ),
        ("GET", "/admin/auth/user/", admin_expect(for_admin_reviewers=403, staff=200, for_superuser=200)),
        ("GET", "/admin/diagnosis/apitoken/", admin_expect(for_admin_reviewers=403, staff=200, for_superuser=200)),
    ]
    return rows


def matches(response, expected) -> bool:
    if isinstance(expected, tuple):
        return response.status_code == 302 and response["Location"].startswith(expected[1])
    return response.status_code == expected


def send(w, role, method, url):
    api = url.startswith("/api/")
    client = Client() if api else w["clients"][role]
    headers = {}
    if api and w["keys"][role]:
        headers["HTTP_AUTHORIZATION"] = f"Token {w['keys'][role]}"
    return getattr(client, method.lower())(url, **headers)


def test_every_page_file_and_operation_answers_each_role_as_it_should(world):
    wrong = []
    for method, url, expected in table(world):
        for role in ROLES:
            response = send(world, role, method, url)
            if not matches(response, expected[role]):
                got = response.status_code, response.get("Location", "")
                wrong.append(f"{method} {url} as {role}: expected {expected[role]}, got {got}")
    assert not wrong, "\n".join(wrong)


def post_as(w, role, method, url, data=None):
    api = url.startswith("/api/")
    client = Client() if api else w["clients"][role]
    headers = {"HTTP_AUTHORIZATION": f"Token {w['keys'][role]}"} if api and w["keys"][role] else {}
    return getattr(client, method.lower())(url, data or {}, **headers)


def test_actions_of_anyone_but_the_owner_change_nothing(world):
    a, f, b = world["done"].pk, world["failed"].pk, world["batch"].pk
    actions = [
        ("POST", f"/analyses/{f}/retry/", "web"),
        ("POST", f"/batches/{b}/retry/", "web"),
        ("POST", f"/analyses/{a}/delete/", "web"),
        ("POST", f"/batches/{b}/delete/", "web"),
        ("POST", f"/api/analyses/{f}/retry/", "api"),
        ("POST", f"/api/batches/{b}/retry-failed/", "api"),
        ("POST", f"/api/batches/{b}/callback/retry/", "api"),
        ("DELETE", f"/api/analyses/{a}/", "api"),
        ("DELETE", f"/api/batches/{b}/", "api"),
    ]
    wrong = []
    for method, url, kind in actions:
        for role in ROLES:
            if role == "owner":
                continue
            response = post_as(world, role, method, url)
            if role in ("anon", "deactivated"):
                ok = response.status_code == 401 if kind == "api" else response.status_code == 302
            else:
                ok = response.status_code == 404
            if not ok:
                wrong.append(f"{method} {url} as {role}: {response.status_code}")
    assert Analysis.objects.get(pk=f).status == "failed" and Analysis.objects.filter(pk=a).exists()
    assert not wrong, "\n".join(wrong)


LIST_URLS = [
    "/",
    "/?call=borderline",
    "/?search=owned",
    "/export.csv",
    "/export.csv?call=borderline",
    "/batches/",
    "/batches/?search=s-own",
    "/api/analyses/",
    "/api/analyses/?borderline=true",
    "/api/batches/",
    "/api/batches/?sample_reference=s-own",
]


def test_lists_exports_and_polls_show_the_owners_cells_to_the_owner_only(world):
    a, b = world["done"].pk, world["batch"].pk
    wrong = []
    for url in [*LIST_URLS, f"/status.json?ids={a},{world['failed'].pk}", f"/api/analyses/?batch={b}"]:
        for role in ROLES:
            response = send(world, role, "GET", url)
            body = b"".join(response.streaming_content) if response.streaming else response.content
            shown = (
                b"owned.png" in body
                or b"S-OWN" in body
                or f'"id": {a}'.encode() in body
                or f'"id":{a}'.encode() in body
            )
            if role == "owner":
                if response.status_code != 200 or not shown:
                    wrong.append(f"{url} as owner: {response.status_code}, shown={shown}")
            elif shown:
                wrong.append(f"{url} as {role}: the owner's cell shown ({response.status_code})")
    assert not wrong, "\n".join(wrong)


def test_admin_actions_and_the_trail_by_role(world):
    f, b = world["failed"].pk, world["batch"].pk
    retry = {"action": "retry_failed", "_selected_action": [str(f)]}
    for role in ("staff", "staff_reviewer", "owner", "reviewer"):
        world["clients"][role].post("/admin/diagnosis/analysis/", retry)
        assert Analysis.objects.get(pk=f).status == "failed", role
    lockout = {"action": "clear_sign_in_lockout", "_selected_action": [str(world["users"]["owner"].pk)]}
    assert world["clients"]["staff_reviewer"].post("/admin/auth/user/", lockout).status_code == 403
    # The trail: read-only for everyone, exportable by those who may read it.
    event = AccessEvent.objects.create(username="x", action="viewed", channel="web", analysis_id=1)
    for role in ("staff", "superuser"):
        c = world["clients"][role]
        assert c.post(f"/admin/diagnosis/accessevent/{event.pk}/change/", {"username": "y"}).status_code == 403
        assert c.post(f"/admin/diagnosis/accessevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
        exported = c.post("/admin/diagnosis/accessevent/", {"action": "export_csv", "_selected_action": [event.pk]})
        assert exported.status_code == 200 and exported["Content-Type"].startswith("text/csv"), role
    assert AccessEvent.objects.filter(pk=event.pk, username="x").exists()
    refused = world["clients"]["staff_reviewer"].post(
        "/admin/diagnosis/accessevent/", {"action": "export_csv", "_selected_action": [event.pk]}
    )
    assert refused.status_code == 403
    # Superuser retries: it works.
    world["clients"]["superuser"].post("/admin/diagnosis/analysis/", retry)
    assert Analysis.objects.get(pk=f).status == "queued"
    assert b


def test_a_reviewer_opening_another_users_cell_is_recorded(world):
    a = world["done"].pk
    reviewer = world["users"]["reviewer"]
    c = world["clients"]["reviewer"]
    assert c.get(f"/review/{a}/").status_code == 200
    for kind in ("image", "picture", "overlay", "thumbnail"):
        assert c.get(f"/analyses/{a}/{kind}/").status_code == 200
    got = set(AccessEvent.objects.filter(user=reviewer, analysis_id=a).values_list("action", "detail"))
    assert got == {("viewed", "review"), *{("downloaded", k) for k in ("image", "picture", "overlay", "thumbnail")}}
    c2 = world["clients"]["staff_reviewer"]
    assert c2.get(f"/admin/diagnosis/analysis/{a}/change/").status_code == 200
    assert AccessEvent.objects.filter(user=world["users"]["staff_reviewer"], analysis_id=a, channel="admin").exists()


def test_staff_who_may_clear_lockouts_cannot_grant_the_review_permission_or_superuser(world):
    """README: a staff account without the review permission sees no one's cells "whatever other
    model permissions it holds"; lockouts are cleared with change_user. That permission must not be
    a way to the review permission or to superuser, for its own account or a clinician's."""
    c = world["clients"]["staff"]
    reviewers = str(reviewers_group().pk)
    for role in ("staff", "outsider"):
        account = world["users"][role]
        escalation = {
            "username": account.username,
            "is_active": "on",
            "is_staff": "on",
            "is_superuser": "on",
            "groups": [reviewers],
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
        }
        c.post(f"/admin/auth/user/{account.pk}/change/", escalation)
        account.refresh_from_db()
        assert not account.is_superuser and not account.groups.exists(), role
    assert not world["users"]["outsider"].is_staff
    assert c.get("/admin/diagnosis/analysis/").status_code == 403


def test_staff_without_the_review_permission_cannot_delete_an_owners_cells_by_deleting_the_account(world):
    """README: other users' cells are for reviewers only; "deleting them needs Django's delete
    permission as well" (as well as the review permission: PatientRecordAdmin.has_delete_permission)."""
    staff = world["users"]["staff"]
    staff.user_permissions.add(Permission.objects.get(codename="delete_user"))
    owner = world["users"]["owner"]
    c = world["clients"]["staff"]
    assert c.get(f"/admin/diagnosis/analysis/{world['done'].pk}/delete/").status_code == 403  # directly: refused
    c.post(f"/admin/auth/user/{owner.pk}/delete/", {"post": "yes"})
    assert Analysis.objects.filter(owner=owner).count() == 2, "the owner's cells were deleted by a non-reviewer"


def test_a_reviewer_searching_the_admins_batches_for_a_patients_reference_leaves_a_trace(world):
    """README: every opening of a result or batch ... in admin ... is recorded; an API list page is
    recorded for that reason (a bulk read leaves a trace). The admin's batch list, searched by a
    sample reference (which may name the patient), shows every user's matching batches."""
    reviewer = world["users"]["staff_reviewer"]
    before = AccessEvent.objects.filter(user=reviewer).count()
    listing = world["clients"]["staff_reviewer"].get("/admin/diagnosis/batch/?q=s-own")
    assert listing.status_code == 200 and b"S-OWN" in listing.content and b"owner" in listing.content
    assert AccessEvent.objects.filter(user=reviewer).count() > before, "no entry in the access trail"


def test_a_help_desk_account_may_not_take_over_a_reviewers_or_a_superusers_account(world):
    """change_user (to lift lockouts) must not set a password that signs in as someone with more access."""
    c = world["clients"]["staff"]
    for role in ("staff_reviewer", "superuser", "reviewer"):
        target = world["users"][role]
        assert c.get(f"/admin/auth/user/{target.pk}/password/").status_code == 403, role
        c.post(
            f"/admin/auth/user/{target.pk}/password/", {"password1": "Taken-Over-123", "password2": "Taken-Over-123"}
        )
        target.refresh_from_db()
        assert not target.check_password("Taken-Over-123"), role
    clinician = world["users"]["outsider"]  # an ordinary account's stays the help desk's to manage
    assert c.get(f"/admin/auth/user/{clinician.pk}/password/").status_code == 200


def test_a_help_desk_account_may_not_delete_a_reviewers_account_from_the_list_either(world):
    staff = world["users"]["staff"]
    staff.user_permissions.add(Permission.objects.get(codename="delete_user"))
    reviewer, clinician = world["users"]["reviewer"], world["users"]["outsider"]
    c = world["clients"]["staff"]
    action = {"action": "delete_selected", "_selected_action": [str(reviewer.pk)], "post": "yes"}
    c.post("/admin/auth/user/", action)
    assert User.objects.filter(pk=reviewer.pk).exists(), "a reviewer's account deleted by the help desk"
    c.post("/admin/auth/user/", {**action, "_selected_action": [str(clinician.pk)]})
    assert not User.objects.filter(pk=clinician.pk).exists(), "an ordinary account stays the help desk's to remove"


def test_a_help_desk_account_may_not_take_over_a_deactivated_reviewer_nor_lift_a_superusers_lockout(world, settings):
    """A reviewer on leave is still a reviewer (has_perm says no only while the account is inactive):
    a help desk that set its password and ticked Active could sign in and see every user's cells.
    Nor may it keep lifting a superuser's lockout, which would turn the lockout off for that account."""
    reviewer, root, clinician = world["users"]["reviewer"], world["users"]["superuser"], world["users"]["outsider"]
    User.objects.filter(pk=reviewer.pk).update(is_active=False)
    c = world["clients"]["staff"]
    assert c.get(f"/admin/auth/user/{reviewer.pk}/password/").status_code == 403
    c.post(f"/admin/auth/user/{reviewer.pk}/password/", {"password1": "Taken-Over-123", "password2": "Taken-Over-123"})
    reactivate = {
        "username": reviewer.username,
        "is_active": "on",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "0:0",
    }
    c.post(f"/admin/auth/user/{reviewer.pk}/change/", reactivate)
    reviewer.refresh_from_db()
    assert not reviewer.is_active and not reviewer.check_password("Taken-Over-123")

    settings.LOGIN_MAX_FAILURES = 2
    for name in ("root", "outsider"):
        for _ in range(3):
            Client().post("/accounts/login/", {"username": name, "password": "guess"})
    cleared = c.post(
        "/admin/auth/user/",
        {"action": "clear_sign_in_lockout", "_selected_action": [str(root.pk), str(clinician.pk)]},
        follow=True,
    ).content.decode()
    assert "Not cleared for root" in cleared and "Sign-in lockouts cleared for 1 user" in cleared

    def locked_out(name):
        return Client().post("/accounts/login/", {"username": name, "password": "pw"}).status_code == 429

    assert locked_out("root") and not locked_out("outsider")
