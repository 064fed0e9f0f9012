"""Every URL the project serves, for the owner, another user and an anonymous visitor.

The URL list is read from the URL conf, so a new URL fails ``test_every_url_is_classified`` until
it is added to one of the tables below: by its name, or by its route where it has none.
"""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from diagnosis.models import Analysis
from diagnosis.services import create_analysis
from tests.factories import PASSWORD, api_key, make_reviewer, upload

# URL name -> how its kwargs are filled from the owner's objects.
OWNED = {
    "diagnosis:batch": "batch",
    "diagnosis:batch-status": "batch",
    "diagnosis:batch-csv": "batch",
    "diagnosis:batch-report": "batch",
    "diagnosis:batch-delete": "batch",
    "diagnosis:analysis-delete": "analysis",
    "diagnosis:analysis": "analysis",
    "diagnosis:analysis-file": "analysis-file",
    "api:analysis-detail": "analysis",
    "api:analysis-file": "analysis-file",
    "api:batch-detail": "batch",
}
# POST-only actions on an owned object -> (object, the owner's status: past the lookup; 409 or a
# redirect with a message where there is nothing to retry, as the owned analysis is done).
OWNED_ACTIONS = {
    "api:batch-callback-retry": ("batch", 409),
    "api:analysis-retry": ("analysis", 409),
    "api:batch-retry-failed": ("batch", 409),
    "diagnosis:analysis-retry": ("analysis", 302),
    "diagnosis:batch-retry": ("batch", 302),
}
# For staff only (counts across users, no patient data): everyone else gets 403, tested in test_ops.py.
STAFF_ONLY = ["api:ops-status"]
# Lists scoped to the user: another user gets 200 but must not see the owner's items.
LISTS = [
    "diagnosis:dashboard",
    "diagnosis:export-csv",
    "diagnosis:batch-list",
    "diagnosis:analyses-status",
    "api:analysis-list",
    "api:batch-list",
]
FORMS = ["diagnosis:upload"]
# Only for the `reviewers` group: everyone else gets 404.
REVIEWER_ONLY = {"diagnosis:review-queue": None, "diagnosis:review": "analysis"}
PUBLIC = [
    "login",
    "healthz",
    "api:token",
    "api:schema",
    "api:docs",
    "logout",
    "admin-logout",  # the admin's sign-out, the site's view
    "api:api-root",
]
# Patterns without a name, by route.
PUBLIC_ROUTES = [
    "admin/login/",  # the admin's sign-in, the site's throttled view (Django's own is admin:login)
    "favicon.ico",  # the site's icon, which browsers ask the admin's pages for
]
LOGIN_ONLY = ["password_change", "password_change_done", "diagnosis:api-token"]
# The admin's pages, the site's views in front of two of them: Django's admin checks staff itself
# (tests/test_admin.py, test_roles.py and, for the password change's lockout, test_security.py).
ADMIN_PREFIX = "admin:"
ADMIN_ROUTES = ["admin/password_change/"]  # the site's throttled view, behind the admin's staff check


def admin_unnamed_routes() -> set[str]:
    """Django admin's own patterns without a name: the catch-all (a 404, or the sign-in for anyone
    signed out) and, per registered model, the redirect of an object's bare address to its change page."""
    from django.contrib import admin

    models = {
        f"admin/{model._meta.app_label}/{model._meta.model_name}/<path:object_id>/" for model in admin.site._registry
    }
    return models | {"admin/(?P<url>.*)$"}


def all_urls(resolver=None, namespace="", prefix="") -> set[str]:
    """Every pattern of the URL conf: by its namespaced name, or by its route where it has no name."""
    found = set()
    for pattern in (resolver or get_resolver()).url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            found |= all_urls(pattern, inner, route)
        elif isinstance(pattern, URLPattern):
            found.add(namespace + pattern.name if pattern.name else route)
    return found


def test_every_url_is_classified():
    tables = (
        OWNED,
        OWNED_ACTIONS,
        STAFF_ONLY,
        LISTS,
        FORMS,
        REVIEWER_ONLY,
        PUBLIC,
        PUBLIC_ROUTES,
        LOGIN_ONLY,
        ADMIN_ROUTES,
    )
    known = set().union(*tables) | admin_unnamed_routes()
    unclassified = {url for url in all_urls() if url not in known and not url.startswith(ADMIN_PREFIX)}
    assert not unclassified, f"classify these URLs in tests/test_ownership.py: {sorted(unclassified)}"


def test_a_url_without_a_name_is_classified_too():
    """The list held named patterns only: admin/login/, admin/password_change/ and favicon.ico (and
    any view added later without a name) were never classified."""
    assert {"admin/login/", "admin/password_change/", "favicon.ico"} <= all_urls()


@pytest.mark.parametrize("url", PUBLIC_ROUTES)
def test_public_routes_answer_anyone(client, db, url):
    response = client.get("/" + url)
    assert response.status_code in (200, 302) and "login/?next=" not in response.get("Location", ""), url


@pytest.mark.parametrize("url", ADMIN_ROUTES)
def test_the_admins_routes_send_anyone_signed_out_to_the_admins_sign_in(client, db, url):
    response = client.get("/" + url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/?next="), url


@pytest.fixture
def owned(db, client, user):
    """A batch of the user's with one finished analysis (with an overlay)."""
    from django.test import Client

    owner_client = Client()
    owner_client.login(username=user.username, password=PASSWORD)
    response = owner_client.post("/upload/", {"images": [upload("owned.png")], "sample_reference": "S-1"})
    assert response.status_code == 302
    analysis = Analysis.objects.get(owner=user)
    analysis.overlay.save("o.png", analysis.image.file, save=False)
    Analysis.objects.filter(pk=analysis.pk).update(
        status="done", label="Uninfected", probability_parasitized=0.1, overlay=analysis.overlay.name
    )
    return {"analysis": analysis, "batch": analysis.batch}


def url_for(name: str, objects) -> str:
    from django.urls import reverse

    kind = OWNED.get(name) or REVIEWER_ONLY.get(name)
    if kind == "analysis-file":
        return reverse(name, kwargs={"pk": objects["analysis"].pk, "kind": "overlay"})
    if kind:
        return reverse(name, kwargs={"pk": objects[kind].pk})
    return reverse(name)


def web_or_api(name: str) -> str:
    return "api" if name.startswith("api:") else "web"


# What the pages poll answers 401, which their script acts on, rather than a redirect it cannot follow.
POLLED = ("diagnosis:analyses-status", "diagnosis:batch-status")


def anonymous_refused(response, name) -> bool:
    if web_or_api(name) == "api" or name in POLLED:
        return response.status_code == 401
    return response.status_code == 302 and "/accounts/login/" in response["Location"]


def as_user(client, user, name):
    """Session login for pages, a token for the API (both are supported there)."""
    client.logout()
    if web_or_api(name) == "api":
        client.defaults["HTTP_AUTHORIZATION"] = f"Token {api_key(user)}"
    else:
        client.defaults.pop("HTTP_AUTHORIZATION", None)
        client.login(username=user.username, password=PASSWORD)
    return client


@pytest.mark.parametrize("name", sorted(OWNED))
def test_owned_objects(client, user, other_user, owned, name):
    url = url_for(name, owned)
    assert as_user(client, user, name).get(url).status_code == 200, url
    assert as_user(client, other_user, name).get(url).status_code == 404, url
    client.logout()
    client.defaults.pop("HTTP_AUTHORIZATION", None)
    assert anonymous_refused(client.get(url), name), url


@pytest.mark.parametrize("name", sorted(OWNED_ACTIONS))
def test_owned_actions(client, user, other_user, owned, name):
    from django.urls import reverse

    kind, owner_status = OWNED_ACTIONS[name]
    url = reverse(name, kwargs={"pk": owned[kind].pk})
    response = as_user(client, user, name).post(url)
    assert response.status_code == owner_status, url
    if owner_status == 302:  # back to the page it came from, not to the sign-in
        assert not response["Location"].startswith("/accounts/login/"), response["Location"]
    assert as_user(client, other_user, name).post(url).status_code == 404, url
    client.logout()
    client.defaults.pop("HTTP_AUTHORIZATION", None)
    assert anonymous_refused(client.post(url), name), url


@pytest.mark.parametrize("name", LISTS)
def test_lists_show_only_the_users_own_items(client, user, other_user, owned, name):
    url = url_for(name, owned)
    if name == "diagnosis:analyses-status":
        url += f"?ids={owned['analysis'].pk}"
    mine = as_user(client, user, name).get(url)
    theirs = as_user(client, other_user, name).get(url)
    assert mine.status_code == theirs.status_code == 200
    marker = {
        "diagnosis:analyses-status": f'"id": {owned["analysis"].pk}'.encode(),
        "diagnosis:batch-list": f'data-batch="{owned["batch"].pk}"'.encode(),
    }.get(name, b"owned.png")
    assert marker in mine.getvalue() and marker not in theirs.getvalue()
    client.logout()
    client.defaults.pop("HTTP_AUTHORIZATION", None)
    assert anonymous_refused(client.get(url), name)


@pytest.mark.parametrize("name", sorted(REVIEWER_ONLY))
def test_review_pages_are_for_reviewers_only(client, user, owned, name):
    reviewer = make_reviewer()
    url = url_for(name, owned)
    assert as_user(client, reviewer, name).get(url).status_code == 200
    assert as_user(client, user, name).get(url).status_code == 404  # even the owner is not a reviewer
    client.logout()
    assert anonymous_refused(client.get(url), name)


@pytest.mark.parametrize("name", FORMS + LOGIN_ONLY)
def test_login_required_pages(client, user, name):
    url = url_for(name, {})
    assert anonymous_refused(client.get(url), name)
    assert as_user(client, user, name).get(url).status_code == 200


def test_reviewers_may_see_any_file_but_others_may_not(client, owned, other_user):
    reviewer = make_reviewer()
    url = url_for("diagnosis:analysis-file", owned)
    assert as_user(client, reviewer, "x").get(url).status_code == 200
    assert as_user(client, other_user, "x").get(url).status_code == 404


def test_files_are_not_served_as_html(client, user, owned):
    response = as_user(client, user, "x").get(url_for("diagnosis:analysis-file", owned))
    assert response["Content-Type"] == "image/png"
    assert response["X-Content-Type-Options"] == "nosniff" and "sandbox" in response["Content-Security-Policy"]


def test_files_are_named_as_the_png_kept_and_stay_out_of_the_browser_cache(client, user):
    from diagnosis.services import create_analysis
    from tests.factories import image_bytes

    jpeg = create_analysis(owner=user, upload=upload("cell.jpg", image_bytes(fmt="JPEG"), "image/jpeg"))
    for url in (f"/analyses/{jpeg.pk}/image/", f"/api/analyses/{jpeg.pk}/image/"):
        response = as_user(client, user, "x").get(url)
        assert response.status_code == 200 and response["Content-Type"] == "image/png"
        assert response["Content-Disposition"] == f'inline; filename="image-{jpeg.pk}.png"'
        assert response["Cache-Control"] == "private, no-store"


def test_back_and_delete_return_to_the_filtered_list_page_the_cell_was_opened_from(client, user):
    from urllib.parse import quote

    from diagnosis.services import create_analysis

    cell = create_analysis(owner=user, upload=upload("listed.png"))
    as_user(client, user, "x")
    listing = "/?status=queued&sort=created_at&page=1"
    dashboard = client.get(listing).content.decode()
    link = f"/analyses/{cell.pk}/?from={quote(listing, safe='')}"
    assert link in dashboard

    page = client.get(link).content.decode()
    assert '<a href="/?status=queued&amp;sort=created_at&amp;page=1">← Back</a>' in page
    confirm = client.get(f"/analyses/{cell.pk}/delete/?from={quote(listing, safe='')}").content.decode()
    assert f'name="from" value="{listing.replace("&", "&amp;")}"' in confirm
    deleted = client.post(f"/analyses/{cell.pk}/delete/", {"from": listing})
    assert deleted.status_code == 302 and deleted["Location"] == listing

    for elsewhere in ("https://evil.example/", "//evil.example/", "javascript:alert(1)"):
        other = create_analysis(owner=user, upload=upload("other.png"))
        page = client.get(f"/analyses/{other.pk}/?from={quote(elsewhere, safe='')}").content.decode()
        assert "evil.example" not in page and "javascript:" not in page
        gone = client.post(f"/analyses/{other.pk}/delete/", {"from": elsewhere})
        assert gone["Location"] == "/"


def test_api_routes_have_no_format_suffix_copies(api_client, user):
    analysis = create_analysis(owner=user, upload=upload())
    for path in (
        f"/api/analyses/{analysis.pk}.json",
        f"/api/analyses/{analysis.pk}/image.json",
        f"/api/analyses/{analysis.pk}/retry.json",
        "/api/batches.json",
    ):
        response = api_client.post(path) if path.endswith("retry.json") else api_client.get(path)
        assert response.status_code == 404, path
    assert api_client.get(f"/api/analyses/{analysis.pk}/").status_code == 200
