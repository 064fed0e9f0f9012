"""Pages whose cost must not grow with the size of the tables, only with what they show.

Each test seeds a few dozen rows with bulk_create (no image files: these pages only name them) and
checks a bound that holds for a page of any size (the timings, on a lab-sized PostgreSQL database,
are in the comments of the code each guards)."""

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnosis.models import AccessEvent, Analysis, Batch
from tests.factories import add_to_reviewers

pytestmark = pytest.mark.django_db


def _reviewer(client):
    reviewer = add_to_reviewers(
        get_user_model().objects.create_user("scale-reviewer", password="pw-for-tests-123", is_staff=True)
    )
    client.force_login(reviewer)
    return client


def _batches(owner, count: int, *, cells: int = 1, prefix: str = "WARD") -> list[Batch]:
    made = Batch.objects.bulk_create(Batch(owner=owner, sample_reference=f"{prefix}-{i}") for i in range(count))
    Analysis.objects.bulk_create(
        Analysis(
            owner=owner,
            batch=batch,
            image=f"uploads/{batch.pk}-{j}.png",
            original_filename=f"cell_{batch.pk}_{j}.png",
            status="done",
            label="Uninfected",
            probability_parasitized=0.1,
            decision_threshold=0.37,
            model_version="test-model",
        )
        for batch in made
        for j in range(cells)
    )
    return made


def _queries(client, url: str) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
        assert response.status_code == 200, url
    return [query["sql"] for query in captured.captured_queries]


# --- 1. Batch admin changelist: one query per row for its owner ---------------------------------


def test_batch_admin_changelist_query_count_does_not_grow_with_its_rows(client):
    reviewer = _reviewer(client)
    owners = [get_user_model().objects.create_user(f"clinician{i}") for i in range(3)]
    for owner in owners:
        _batches(owner, 1)
    few = len(_queries(reviewer, "/admin/diagnosis/batch/"))
    for owner in owners:
        _batches(owner, 10)
    many = len(_queries(reviewer, "/admin/diagnosis/batch/"))
    # 33 rows instead of 3: the same page, the same queries (Analysis admin: list_select_related).
    assert many == few, f"{few} queries for 3 batches, {many} for 33: one per row (Batch.owner is nullable)"


# --- 2. Samples page and /api/batches/: every skipped row's counts are worked out --------------


def _max_subplan_loops(sql: str) -> int:
    """The most times any subquery of this SELECT ran, as PostgreSQL's EXPLAIN ANALYZE counts it."""
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
        raw = cursor.fetchone()[0]
    plan = raw if isinstance(raw, list) else json.loads(raw)
    loops = []

    def walk(node):
        if node.get("Parent Relationship") == "SubPlan":
            loops.append(node["Actual Loops"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return max(loops, default=0)


def _counts_query(queries: list[str]) -> str:
    (query,) = [q for q in queries if q.startswith('SELECT "diagnosis_batch"') and "COALESCE((SELECT COUNT" in q]
    return query


@pytest.mark.skipif(connection.vendor != "postgresql", reason="reads PostgreSQL's EXPLAIN ANALYZE")
@pytest.mark.parametrize(
    "url, shown",
    [("/batches/?page=5", 10), ("/api/batches/?page=3", 10)],  # 110 batches: 25 a page there, 50 here
    ids=["samples-page", "api-batches"],
)
def test_a_deep_page_of_batches_counts_the_cells_of_the_rows_it_shows_only(client, user, url, shown):
    _batches(user, 110)
    client.force_login(user)
    query = _counts_query(_queries(client, url))
    loops = _max_subplan_loops(query)
    # Each of the eight count subqueries should run once per row shown (10 on this last page), not
    # once for every row the OFFSET skips: 20,000 batches made page 800 of /batches/ take 1.25 s.
    assert loops <= shown, f"each count subquery ran {loops} times for a page of {shown} batches"


# --- 3. Analysis admin: each search or filter scans the table four times -----------------------


def test_analysis_admin_search_reads_the_table_for_the_count_and_the_page_only(client, user):
    reviewer = _reviewer(client)
    _batches(user, 5, cells=4)
    queries = _queries(reviewer, "/admin/diagnosis/analysis/?q=cell_3")
    searching = [q for q in queries if "LIKE" in q.upper() and '"diagnosis_analysis"' in q]
    # The count and the page. date_hierarchy adds MIN/MAX and DISTINCT DATE_TRUNC over the same
    # unindexable ILIKEs: 640 ms for one search over 115,000 cells.
    assert len(searching) <= 2, "\n".join(q[:120] for q in searching)


def test_a_filtered_analysis_admin_page_does_not_count_every_cell_too(client, user):
    reviewer = _reviewer(client)
    _batches(user, 5, cells=4)
    queries = _queries(reviewer, "/admin/diagnosis/analysis/?status__exact=done")
    whole_table = [q for q in queries if re.fullmatch(r'SELECT COUNT\(\*\) AS "__count" FROM "diagnosis_analysis"', q)]
    assert not whole_table, "a filtered page counted the whole analysis table (show_full_result_count)"


# --- 4. Sweeps and the review queue: look-ups an index must serve -------------------------------

postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="reads PostgreSQL's EXPLAIN ANALYZE")


def _rows_read(sql: str, table: str) -> int:
    """Rows of ``table`` that running ``sql`` reads, kept or filtered out, over every loop, with
    sequential scans discouraged: where an index could serve the query PostgreSQL then takes it,
    so a test's small table reads as a lab's large one would."""
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE diagnosis_analysis")
        cursor.execute("ANALYZE diagnosis_batch")
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
        raw = cursor.fetchone()[0]
        cursor.execute("SET LOCAL enable_seqscan = on")
    plan = raw if isinstance(raw, list) else json.loads(raw)

    def read(node) -> int:
        own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * node.get("Actual Loops", 1)
        return (own if node.get("Relation Name") == table else 0) + sum(map(read, node.get("Plans", [])))

    return read(plan[0]["Plan"])


def _selects(captured) -> list[str]:
    return [query["sql"] for query in captured.captured_queries if query["sql"].startswith("SELECT")]


@postgres_only
def test_the_orphaned_file_sweep_reads_about_one_cell_row_per_file(settings, tmp_path, user):
    """Each chunk of 1,000 file names was looked up in columns without an index: a full scan of the
    cells per chunk, quadratic in the lab's history, on the worker that classifies cells (25 s a
    night at 300,000 cells, minutes at a million, cut off by the time limit at the same place)."""
    from diagnosis import services

    settings.MEDIA_ROOT = str(tmp_path)  # a media folder of its own, of thousands of files
    names = [(f"uploads/{i}.png", f"thumbnails/{i}.png", f"overlays/old-{i}.png") for i in range(3000)]
    Analysis.objects.bulk_create(
        Analysis(owner=user, image=image, thumbnail=thumbnail, overlay=overlay, original_filename="cell.png")
        for image, thumbnail, overlay in names
    )
    for folder in ("uploads", "thumbnails", "overlays"):
        (tmp_path / folder).mkdir()
    for name in (name for three in names for name in three):
        (tmp_path / name).touch()
    with CaptureQueriesContext(connection) as captured:
        assert services.delete_orphaned_files(older_than=timedelta(hours=6)) == 0
    read = sum(_rows_read(sql, "diagnosis_analysis") for sql in _selects(captured))
    files = 3 * len(names)  # three chunks of 1,000 in each folder: nine full scans of 3,000 cells before
    assert read <= 2 * files, f"the sweep read {read} cell rows to check {files} files"


@postgres_only
def test_the_review_queue_reads_the_reviewers_latest_reviews_not_all_they_gave(client, user):
    """'Your latest reviews' filtered on the reviewer and sorted on the time, with an index on the
    reviewer alone: every visit read and sorted all their reviews to show 20."""
    reviewer = _reviewer(client)
    me = get_user_model().objects.get(username="scale-reviewer")
    for batch in _batches(user, 200, cells=2):
        batch.analyses.update(
            review_verdict="agree", reviewed_by=me, reviewer_name=me.username, reviewed_at=timezone.now()
        )
    with CaptureQueriesContext(connection) as captured:
        assert reviewer.get("/review/").status_code == 200
    (mine,) = [sql for sql in _selects(captured) if f'"diagnosis_analysis"."reviewed_by_id" = {me.pk} ' in sql]
    read = _rows_read(mine, "diagnosis_analysis")
    assert read <= 40, f"the queue read {read} of the reviewer's 400 reviews to list their latest"


@postgres_only
def test_the_callback_sweep_reads_the_pending_batches_only(user):
    """Every minute the sweeper asked for due callbacks in a column without an index, walking every
    batch ever made to find the few pending."""
    from diagnosis import callbacks

    Batch.objects.bulk_create(Batch(owner=user, callback_state="delivered") for _ in range(500))
    Batch.objects.bulk_create(Batch(owner=user, callback_state="pending") for _ in range(3))
    sql, params = callbacks._due().values_list("pk", flat=True).query.sql_with_params()
    with connection.cursor() as cursor:
        sql = cursor.mogrify(sql, params)
    read = _rows_read(sql.decode() if isinstance(sql, bytes) else sql, "diagnosis_batch")
    assert read <= 20, f"one sweep read {read} batch rows to find 3 pending callbacks among 503"


# --- 5. The admin: filters and removals whose cost grew with every record --------------------


def test_the_owner_filter_asks_about_the_users_not_every_cell(client, user):
    """Django's RelatedOnlyFieldListFilter found the owners with a DISTINCT over the whole cell table,
    on every page of the list, however filtered: 55 ms at 300,000 cells, growing with each upload."""
    _batches(user, 20, cells=3)
    _batches(get_user_model().objects.create_user("colleague"), 2)  # with one owner only, no filter is shown
    reviewer = _reviewer(client)
    for url in ("/admin/diagnosis/analysis/?status__exact=failed", "/admin/diagnosis/batch/"):
        queries = _queries(reviewer, url)
        whole_table = [q for q in queries if re.search(r'SELECT DISTINCT [^()]* FROM "diagnosis_(analysis|batch)"', q)]
        assert not whole_table, whole_table[0][:200]
        assert f"owner__id__exact={user.pk}" in reviewer.get(url).content.decode()  # still offered


def test_removing_an_account_records_its_records_in_a_number_of_queries_that_does_not_grow(client):
    """Each batch's cells were counted and each entry saved one at a time: a lab system's account
    of 20,000 batches was some 40,000 queries in one request, past gunicorn's timeout."""
    admin = get_user_model().objects.create_superuser("remover", password="pw-for-tests-123")
    client.force_login(admin)

    def removal_queries(batches: int) -> int:
        leaver = get_user_model().objects.create_user(f"leaver{batches}")
        _batches(leaver, batches, cells=2)
        Analysis.objects.bulk_create(Analysis(owner=leaver, original_filename="single.png") for _ in range(batches))
        with CaptureQueriesContext(connection) as captured:
            assert client.post(f"/admin/auth/user/{leaver.pk}/delete/", {"post": "yes"}).status_code == 302
        trail = AccessEvent.objects.filter(owner_id=leaver.pk, action=AccessEvent.Action.DELETED)
        assert sorted(trail.values_list("detail", flat=True)) == ["1 cell"] * batches + ["2 cells"] * batches
        return len(captured.captured_queries)

    removal_queries(1)  # the first also fills Django's caches (content types)
    assert removal_queries(3) == removal_queries(30)


@pytest.mark.parametrize("superuser", [True, False], ids=["superuser", "user-admin"])
def test_confirming_the_deletion_of_accounts_runs_as_many_queries_for_20_as_for_10(client, superuser):
    """Each selected account's batches, cells and admin history were counted one query at a time
    (and, for an admin who is no superuser, whether it holds the review permission): 3 to 4 queries
    per account on the "Delete selected" confirmation."""
    from django.contrib.auth.models import Permission

    if superuser:
        admin = get_user_model().objects.create_superuser("confirmer", password="pw-for-tests-123")
    else:  # may delete clinicians' accounts, and (a reviewer) the records that go with them
        admin = get_user_model().objects.create_user("confirmer", password="pw-for-tests-123", is_staff=True)
        add_to_reviewers(admin)
        admin_rights = ["view_user", "delete_user", "delete_batch", "delete_analysis"]
        admin.user_permissions.set(Permission.objects.filter(codename__in=admin_rights))
    client.force_login(admin)

    def confirmation_queries(accounts: int) -> int:
        users = [get_user_model().objects.create_user(f"leaver{accounts}-{n}") for n in range(accounts)]
        for user in users:
            _batches(user, 2, cells=3)
        selected = {"action": "delete_selected", "_selected_action": [user.pk for user in users]}
        with CaptureQueriesContext(connection) as captured:
            page = client.post("/admin/auth/user/", selected).content.decode()
        assert "Are you sure" in page
        assert f"leaver{accounts}-0: 2 batches and 6 cells" in page
        assert f"<li>Batches: {2 * accounts}</li>" in page and f"<li>Cells: {6 * accounts}</li>" in page
        return len(captured.captured_queries)

    confirmation_queries(1)  # the first also fills Django's caches (content types)
    assert confirmation_queries(10) == confirmation_queries(20)
