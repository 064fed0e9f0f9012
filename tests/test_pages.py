"""Every page's markup holds together for assistive technology: each id an attribute or a label
points at is on the page, no id is used twice, and the page says its language and fits a phone."""

import re
from html.parser import HTMLParser

import pytest
from django.utils import timezone

from diagnosis.models import Analysis
from diagnosis.services import create_analysis, create_batch
from tests.factories import add_to_reviewers, classified, make_reviewer, upload

REFERRING = ("aria-describedby", "aria-labelledby", "aria-controls", "for", "list")


class Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.references: list[tuple[str, str, str]] = []  # (tag, attribute, id)
        self.html: dict[str, str | None] = {}
        self.viewport = False
        self.mains = 0
        self.headers: list[str] = []  # each table header's text (a screen reader reads it out per cell)
        self._header: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.append(attributes["id"])
        for name in REFERRING:
            for target in (attributes.get(name) or "").split():
                self.references.append((tag, name, target))
        if tag == "html":
            self.html = attributes
        if tag == "meta" and attributes.get("name") == "viewport":
            self.viewport = True
        self.mains += tag == "main"
        if tag == "th":
            self._header = []

    def handle_data(self, data):
        if self._header is not None:
            self._header.append(data)

    def handle_endtag(self, tag):
        if tag == "th" and self._header is not None:
            self.headers.append("".join(self._header).strip())
            self._header = None


@pytest.fixture
def pages(user):
    """A path for each page a signed-in reviewer can open, with a batch, a finished cell and a
    failed one behind them, and the pages as they show a form's errors."""
    add_to_reviewers(user)
    batch = create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="WARD-1")
    done, failed = batch.analyses.order_by("pk")
    classified(done, finished_at=timezone.now())
    Analysis.objects.filter(pk=failed.pk).update(status="failed", error="Cannot read the image.")
    single = create_analysis(owner=user, upload=upload("c.png"))
    return [
        "/",
        "/?status=failed&date_from=not-a-date",
        "/upload/",
        "/batches/",
        f"/batches/{batch.pk}/",
        f"/batches/{batch.pk}/report/",
        f"/batches/{batch.pk}/delete/",
        f"/analyses/{done.pk}/",
        f"/analyses/{failed.pk}/",
        f"/analyses/{single.pk}/delete/",
        "/review/",
        f"/review/{done.pk}/",
        "/account/api-token/",
        "/accounts/password_change/",
        "/accounts/logout/",
        "/api/docs/",
    ]


def checked(page: str) -> Markup:
    markup = Markup()
    markup.feed(page)
    missing = [f"<{tag} {name}={target!r}>" for tag, name, target in markup.references if target not in markup.ids]
    assert not missing, f"pointing at ids that are not on the page: {missing}"
    duplicated = sorted({i for i in markup.ids if markup.ids.count(i) > 1})
    assert not duplicated, f"ids used twice: {duplicated}"
    assert markup.html.get("lang"), "the page does not say its language"
    assert markup.viewport, "no viewport: a phone shows the page at desktop width"
    assert markup.mains == 1, f"{markup.mains} main landmarks: a screen reader's 'go to main content' needs one"
    assert all(markup.headers), f"a table column without a header: {markup.headers}"
    return markup


def test_every_page_refers_only_to_ids_it_has_and_says_its_language(client, user, pages):
    client.force_login(user)
    for path in pages:
        response = client.get(path)
        assert response.status_code == 200, path
        try:
            checked(response.content.decode())
        except AssertionError as problem:
            raise AssertionError(f"{path}: {problem}") from None


def test_pages_showing_a_forms_errors_still_point_at_what_they_say(client, user):
    client.force_login(user)
    refused_upload = client.post("/upload/", {"images": [upload("x.png", b"not an image")], "note": "n" * 2001})
    assert refused_upload.status_code == 400
    checked(refused_upload.content.decode())
    client.logout()
    for form in ({"username": "", "password": ""}, {"username": user.username, "password": "wrong"}):
        checked(client.post("/accounts/login/", form).content.decode())


def test_a_note_at_the_length_the_browser_allows_is_taken_with_its_line_breaks(client, user):
    """A textarea's maxlength counts a line break as one character, but the browser sends it as CR
    LF: counted as two, a note the page accepted was refused and the upload lost."""
    typed = "\n".join(["ring forms"] * 182)[:2000]
    assert len(typed) == 2000
    client.force_login(user)
    response = client.post("/upload/", {"images": [upload()], "note": typed.replace("\n", "\r\n")})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Analysis.objects.get(owner=user).batch.note == typed


def test_cells_of_one_slide_keep_the_end_of_their_names_that_tells_them_apart(client, user):
    names = [f"C100P61ThinF_IMG_20150918_144104_cell_{n}.png" for n in (162, 163)]
    batch = create_batch(owner=user, uploads=[upload(name) for name in names], sample_reference="WARD-1")
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/").content.decode()  # shown as text, not only in a tooltip
    assert re.search(r">[^<]*…[^<]*cell_162\.png<", page) and re.search(r">[^<]*…[^<]*cell_163\.png<", page)
    report = client.get(f"/batches/{batch.pk}/report/").content.decode()  # on paper: whole (test_exports)
    assert all(f'<span class="cell-name">{name}</span>' in report for name in names)


def test_a_password_change_says_it_ends_the_api_key(client, user):
    from tests.factories import api_key

    client.force_login(user)
    assert "API key stops working" not in client.get("/accounts/password_change/").content.decode()
    api_key(user)
    assert "API key stops working" in client.get("/accounts/password_change/").content.decode()
    assert "API token" in client.get("/accounts/password_change/done/").content.decode()


def test_a_sample_opened_from_the_dashboard_leads_back_to_it(client, user):
    batch = create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-1")
    client.force_login(user)
    dashboard = client.get("/?page=1").content.decode()
    assert f'href="/batches/{batch.pk}/?from=%2F%3Fpage%3D1"' in dashboard
    assert 'href="/?page=1"' in client.get(f"/batches/{batch.pk}/?from=%2F%3Fpage%3D1").content.decode()


def test_a_shared_workstation_keeps_no_patient_name_in_its_history_autofill_or_cookies(client, user):
    """Browser history keeps page titles, autofill keeps what fields were given, and cookies are
    readable at the workstation: none may carry a file name or reference, often the patient's."""
    batch = create_batch(owner=user, uploads=[upload("Rahman_Amina_cell1.png")], sample_reference="Rahman Amina")
    cell = classified(batch.analyses.get())
    client.force_login(user)
    pages = [f"/analyses/{cell.pk}/", f"/analyses/{cell.pk}/delete/", f"/batches/{batch.pk}/delete/"]
    for path in pages:
        title = re.search(r"<title>(.*?)</title>", client.get(path).content.decode(), re.S)[1]
        assert "Rahman" not in title, (path, title)
    fields = [("/upload/", "sample_reference"), ("/upload/", "note"), ("/", "search"), ("/batches/", "search")]
    for path, field in fields:
        tag = re.search(rf"<(?:input|textarea)[^>]*name=\"{field}\"[^>]*>", client.get(path).content.decode())[0]
        assert 'autocomplete="off"' in tag, (path, tag)
    client.post(f"/analyses/{cell.pk}/delete/")
    assert all("Rahman" not in morsel.value for morsel in client.cookies.values())
    assert "Deleted Rahman_Amina_cell1.png" in client.get("/").content.decode(), "the message is still shown"

    reviewer = make_reviewer()
    client.force_login(reviewer)
    other = classified(create_analysis(owner=user, upload=upload("Rahman_Amina_cell2.png")))
    review_page = client.get(f"/review/{other.pk}/").content.decode()
    assert "Rahman" not in re.search(r"<title>(.*?)</title>", review_page, re.S)[1]
    assert 'autocomplete="off"' in re.search(r"<textarea[^>]*name=\"note\"[^>]*>", review_page)[0]


def test_every_page_has_a_title_of_its_own(client, user):
    """Tabs and browser history tell pages apart by their titles; the bare site name tells nothing."""
    batch = create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-1")
    cell = classified(batch.analyses.get())
    titles = {"/accounts/login/": client.get("/accounts/login/")}
    client.force_login(user)
    for path in (
        "/", "/upload/", "/batches/", f"/batches/{batch.pk}/", f"/batches/{batch.pk}/report/",
        f"/analyses/{cell.pk}/", "/account/api-token/", "/accounts/password_change/",
        "/accounts/password_change/done/",
    ):  # fmt: skip
        titles[path] = client.get(path)
    titles["/accounts/logout/"] = client.post("/accounts/logout/", follow=True)
    for path, response in titles.items():
        title = re.search(r"<title>(.*?)</title>", response.content.decode(), re.S)[1].strip()
        assert title.endswith(" · Malaria cell screening"), (path, title)
