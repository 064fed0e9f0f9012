"""Pages whose cost must not grow with the size of the tables, only with what they show.

Each test seeds a few dozen rows with bulk_create (no image files: these pages only name them) and
checks a bound that holds for a page of any size (the timings, on a lab-sized PostgreSQL database,
are in the comments of the code each guards)."""

import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection
from django.test.utils import CaptureQueriesContext

from diagnosis.models import Analysis, Batch

pytestmark = pytest.mark.django_db


def _reviewer(client):
    reviewer = get_user_model().objects.create_user("scale-reviewer", password="pw-for-tests-123", is_staff=True)
    reviewer.groups.add(Group.objects.get(name="reviewers"))
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
