"""Borderline calls: a finished cell whose score is close to its threshold, marked to be confirmed
first, the same way in Python (pages, CSV, callbacks) and in SQL (filters, counts)."""

import csv
import io
import re

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis import callbacks, selectors, services
from diagnosis.models import Analysis, Batch, is_borderline
from diagnosis.services import create_analysis, create_batch, delete_batch
from ml.metrics import borderline_band, borderline_figures
from tests.factories import api_key, classified, upload

pytestmark = pytest.mark.django_db

# At the shipped model's threshold of 0.11 and the default share of 0.5: [0.055, 0.555).
EDGES = {0.0549: False, 0.055: True, 0.1: True, 0.11: True, 0.5549: True, 0.555: False, 0.97: False}


def cells(owner, scores, *, threshold=0.11) -> list[Analysis]:
    batch = create_batch(owner=owner, uploads=[upload(f"{score}.png") for score in scores])
    return [
        classified(
            cell,
            probability_parasitized=score,
            decision_threshold=threshold,
            label="Parasitized" if threshold is not None and score >= threshold else "Uninfected",
        )
        for cell, score in zip(batch.cells_as_sent, scores, strict=True)
    ]


def test_the_band_reaches_halfway_to_either_end_of_the_scale():
    low, high = borderline_band(threshold=0.11, confidence=0.5)
    assert (low, high) == pytest.approx((0.055, 0.555))
    assert borderline_band(threshold=0.5, confidence=0.2) == pytest.approx((0.4, 0.6))


def test_pages_and_queries_agree_on_which_calls_are_borderline(user):
    marked = {cell.probability_parasitized: cell.is_borderline for cell in cells(user, list(EDGES))}
    assert marked == EDGES
    found = Analysis.objects.filter(is_borderline()).values_list("probability_parasitized", flat=True)
    assert sorted(found) == sorted(score for score, borderline in EDGES.items() if borderline)


def test_a_cell_without_a_recorded_threshold_is_judged_against_one_half(user):
    near, far = cells(user, [0.3, 0.2], threshold=None)
    assert (near.is_borderline, far.is_borderline) == (True, False)
    assert list(Analysis.objects.filter(is_borderline())) == [near]


def test_an_unfinished_or_failed_cell_is_never_borderline(user):
    queued, failed = cells(user, [0.2, 0.2])
    Analysis.objects.filter(pk=queued.pk).update(status="queued")
    Analysis.objects.filter(pk=failed.pk).update(status="failed")
    for cell in Analysis.objects.all():
        assert not cell.is_borderline
    assert not Analysis.objects.filter(is_borderline()).exists()


def test_a_share_of_zero_marks_none(user, settings):
    settings.BORDERLINE_CONFIDENCE = 0
    (cell,) = cells(user, [0.11])
    assert not cell.is_borderline and not Analysis.objects.filter(is_borderline()).exists()


def test_the_dashboard_marks_and_filters_the_owners_borderline_calls_only(client, user, other_user):
    near, sure = cells(user, [0.2, 0.99])
    (foreign,) = cells(other_user, [0.2])
    client.force_login(user)
    page = client.get("/").content.decode()
    assert page.count('data-borderline title="') == 2  # one badge per row, shown on one only
    assert page.count("hidden>borderline</span>") == 1

    filtered = client.get("/", {"call": "borderline"}).content.decode()
    assert f'data-analysis="{near.pk}"' in filtered
    assert f'data-analysis="{sure.pk}"' not in filtered and f'data-analysis="{foreign.pk}"' not in filtered

    client.force_login(other_user)
    theirs = client.get("/", {"call": "borderline"}).content.decode()
    assert f'data-analysis="{foreign.pk}"' in theirs and f'data-analysis="{near.pk}"' not in theirs


def test_the_result_page_says_a_borderline_call_needs_confirming(client, user, other_user):
    near, sure = cells(user, [0.2, 0.99])
    client.force_login(user)
    assert "Borderline call." in client.get(f"/analyses/{near.pk}/").content.decode()
    assert "Borderline call." not in client.get(f"/analyses/{sure.pk}/").content.decode()
    client.force_login(other_user)
    assert client.get(f"/analyses/{near.pk}/").status_code == 404


def test_the_pages_borderline_count_says_it_counts_the_reviewed_calls_too(client, user, other_user):
    """Once a reviewer has settled a borderline call its badge goes, but the batch page's progress
    line still counted it: "1 borderline" over a grid with none marked, and Samples' Borderline
    column said 1 as well. Only the printed report said "(reviewed or not)"."""
    near, _ = cells(user, [0.2, 0.99])
    services.review_analysis(analysis=near, reviewer=other_user, verdict="agree", replacing=None)
    client.force_login(user)
    page = client.get(f"/batches/{near.batch_id}/").content.decode()
    assert '<span data-count="borderline">1</span> borderline (reviewed or not)</p>' in page
    badges = re.findall(r"<span [^>]*data-borderline[^>]*>", page)
    assert len(badges) == 2 and all(badge.endswith(" hidden>") for badge in badges)  # the settled one too
    assert '<th scope="col">Borderline (reviewed or not)</th>' in client.get("/batches/").content.decode()


def test_the_batch_page_report_and_status_count_borderline_calls(client, user, other_user):
    near, sure = cells(user, [0.2, 0.99])
    batch = near.batch
    client.force_login(user)
    assert '<span data-count="borderline">1</span> borderline' in client.get(f"/batches/{batch.pk}/").content.decode()
    report = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert "<tr><th>Borderline calls (reviewed or not)</th><td>1</td></tr>" in report
    assert report.count("(borderline)") == 1
    status = client.get(f"/batches/{batch.pk}/status.json").json()
    assert status["counts"]["borderline"] == 1
    assert {item["id"]: item["borderline"] for item in status["analyses"]} == {near.pk: True, sure.pk: False}
    client.force_login(other_user)
    assert client.get(f"/batches/{batch.pk}/status.json").status_code == 404


def test_the_csv_says_which_calls_are_borderline(client, user):
    near, sure = cells(user, [0.2, 0.99])
    waiting = create_analysis(owner=user, upload=upload("waiting.png"))
    client.force_login(user)
    response = client.get("/export.csv")
    exported = csv.DictReader(io.StringIO(response.getvalue().decode("utf-8-sig")))
    rows = {row["analysis_id"]: row["borderline"] for row in exported}
    assert rows == {str(near.pk): "yes", str(sure.pk): "no", str(waiting.pk): ""}


def test_the_api_marks_filters_and_counts_borderline_calls(api_client, user, other_user):
    near, sure = cells(user, [0.2, 0.99])
    (foreign,) = cells(other_user, [0.2])
    listed = api_client.get("/api/analyses/").json()["results"]
    assert {item["id"]: item["borderline"] for item in listed} == {near.pk: True, sure.pk: False}
    only = api_client.get("/api/analyses/", {"borderline": "true"}).json()["results"]
    assert [item["id"] for item in only] == [near.pk]
    waiting = create_analysis(owner=user, upload=upload("waiting.png"))
    others = api_client.get("/api/analyses/", {"borderline": "false"}).json()["results"]
    assert {item["id"] for item in others} == {sure.pk, waiting.pk}, "the cells whose `borderline` reads false"
    refused = api_client.get("/api/analyses/", {"borderline": "maybe"})
    assert refused.status_code == 400 and "borderline" in refused.json()
    assert api_client.get(f"/api/batches/{near.batch_id}/").json()["counts"]["borderline"] == 1
    assert api_client.get(f"/api/batches/{foreign.batch_id}/").status_code == 404

    outsider = APIClient()
    outsider.credentials(HTTP_AUTHORIZATION=f"Token {api_key(other_user)}")
    theirs = outsider.get("/api/analyses/", {"borderline": "true"}).json()["results"]
    assert [item["id"] for item in theirs] == [foreign.pk]


def test_the_callback_tells_the_lab_system_which_calls_are_borderline(user):
    near, sure = cells(user, [0.2, 0.99])
    payload = callbacks._payload(near.batch)
    assert {a["id"]: a["borderline"] for a in payload["batch"]["analyses"]} == {near.pk: True, sure.pk: False}
    assert payload["batch"]["counts"]["borderline"] == 1


def test_the_samples_page_counts_each_batchs_borderline_calls(client, user):
    near, _ = cells(user, [0.2, 0.99])
    client.force_login(user)
    page = client.get("/batches/").content.decode()
    assert f'<tr data-batch="{near.batch_id}">' in page and '<td data-count="borderline">1</td>' in page
    assert selectors.batch_counts(batch=near.batch)["borderline"] == 1


def test_ml_counts_the_cells_the_band_marks_and_the_errors_it_holds():
    scores = [0.0, 0.06, 0.2, 0.9, 0.95]
    positives = [False, True, False, True, False]  # 0.06 missed and 0.2 a false alarm, both marked
    figures = borderline_figures(scores, positives, 0.11)
    assert figures["band"] == pytest.approx([0.055, 0.555])
    assert (figures["cells"], figures["errors"]) == (2, 2)
    assert (figures["share_of_cells"], figures["share_of_errors"]) == (0.4, 2 / 3)
    assert (figures["error_rate_inside"], figures["error_rate_outside"]) == (1.0, 1 / 3)


@pytest.mark.parametrize("verdict, corrected", [("agree", ""), ("disagree", "Uninfected")])
def test_a_borderline_call_a_reviewer_has_settled_is_not_sent_back_to_the_microscope(client, user, verdict, corrected):
    (cell,) = cells(user, [0.2])
    Analysis.objects.filter(pk=cell.pk).update(
        review_verdict=verdict, corrected_label=corrected, reviewed_at=timezone.now(), reviewer_name="dr-lee"
    )
    client.force_login(user)
    page = client.get(f"/analyses/{cell.pk}/").content.decode()
    assert "The model's call was <strong>borderline</strong>" in page and "dr-lee reviewed it on" in page
    assert "before relying on it" not in page
    # Nor does the dashboard's row, the batch's grid, or what their live updates read.
    badge = re.compile(rf'data-analysis="{cell.pk}".*?<span class="badge borderline" data-borderline[^>]*hidden>', re.S)
    for listing in ("/", f"/batches/{cell.batch_id}/"):
        assert badge.search(client.get(listing).content.decode()), listing
    status = client.get(f"/batches/{cell.batch_id}/status.json").json()
    assert [item["borderline"] for item in status["analyses"]] == [False]


def test_the_csv_keeps_its_earlier_columns_where_they_were(client, user):
    cells(user, [0.2])
    client.force_login(user)
    header = next(csv.reader(io.StringIO(client.get("/export.csv").getvalue().decode("utf-8-sig"))))
    # Where a lab's import has read them since the first export: the new column comes last.
    assert [header.index(name) for name in ("analysis_id", "final_label", "model_version", "finished_at")] == [
        0,
        5,
        9,
        15,
    ]
    assert header[16:] == ["borderline", "error", "review_note"] and len(header) == 19  # each added at the end


@pytest.mark.parametrize("path", ["/batches/", "/api/batches/"])
def test_a_batch_deleted_while_a_page_of_them_is_counted_is_left_out(client, user, monkeypatch, path):
    kept = create_batch(owner=user, uploads=[upload("a.png")], sample_reference="KEPT")
    gone = create_batch(owner=user, uploads=[upload("b.png")], sample_reference="GONE")
    counted = selectors.with_counts

    def deleted_in_between(*, batches):
        batches = list(batches)
        delete_batch(batch=Batch.objects.get(pk=gone.pk))
        return counted(batches=batches)

    monkeypatch.setattr(selectors, "with_counts", deleted_in_between)
    client.force_login(user)
    response = client.get(path)
    assert response.status_code == 200
    if path.startswith("/api/"):
        assert [batch["id"] for batch in response.json()["results"]] == [kept.pk]
    else:
        assert f'data-batch="{kept.pk}"' in response.content.decode() and "GONE" not in response.content.decode()
