"""The printable batch report and the CSV exports, read as a clinician or a spreadsheet would."""

import csv
import io
import re

import pytest

from diagnosis.exports import csv_safe
from diagnosis.models import Analysis
from diagnosis.services import create_analysis, create_batch
from tests.factories import upload


def finish(analysis: Analysis, *, label: str, probability: float) -> None:
    Analysis.objects.filter(pk=analysis.pk).update(
        status=Analysis.Status.DONE,
        label=label,
        probability_parasitized=probability,
        decision_threshold=0.11,
        model_version="vgg-test-1",
    )


@pytest.fixture
def batch(user):
    batch = create_batch(
        owner=user,
        uploads=[upload("=HYPERLINK(evil).png"), upload("likely.png"), upload("pending.png")],
        sample_reference="@WARD-7",
    )
    by_name = {a.original_filename: a for a in batch.analyses.all()}
    finish(by_name["=HYPERLINK(evil).png"], label="Uninfected", probability=0.04)
    finish(by_name["likely.png"], label="Parasitized", probability=0.93)
    return batch


def test_report_puts_the_most_suspicious_cell_first_and_names_model_and_threshold(client, user, batch):
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert page.index("likely.png") < page.index("=HYPERLINK(evil).png") < page.index("pending.png")
    assert "<th>Cells</th><td>3</td>" in page and "<th>Parasitized</th><td>1</td>" in page
    assert "Parasitized fraction: <span data-parasitemia>50</span>%" in page
    assert "<span data-model>vgg-test-1</span>, labelling a cell Parasitized at a probability ≥ 0.11" in page
    assert "scaled to its own strongest region" in page  # the heatmaps' key, on paper too


def test_a_positive_a_reviewer_found_in_a_low_score_is_listed_among_the_positives(client, user):
    """Most suspicious first was by score alone: a cell the model scored 0.02 and a microscopist
    corrected to Parasitized sat below every higher-scoring negative, on the page and on paper."""
    from django.contrib.auth import get_user_model

    from diagnosis.services import review_analysis

    batch = create_batch(owner=user, uploads=[upload(f"{name}.png") for name in ("found", "neg", "pos", "waiting")])
    cells = {a.original_filename: a for a in batch.analyses.all()}
    finish(cells["found.png"], label="Uninfected", probability=0.02)
    finish(cells["neg.png"], label="Uninfected", probability=0.09)
    finish(cells["pos.png"], label="Parasitized", probability=0.80)
    reviewer = get_user_model().objects.create_superuser("microscopist", password="pw-for-tests-123")
    found = Analysis.objects.get(pk=cells["found.png"].pk)
    review_analysis(
        analysis=found, reviewer=reviewer, verdict="disagree", corrected_label="Parasitized", replacing=None
    )
    client.force_login(user)
    for path in (f"/batches/{batch.pk}/report/", f"/batches/{batch.pk}/", "/?sort=-probability_parasitized"):
        page = client.get(path).content.decode()
        order = sorted(cells, key=lambda name: page.index(f">{name}"))
        assert order == ["pos.png", "found.png", "neg.png", "waiting.png"], path
    page = client.get("/?sort=probability_parasitized").content.decode()  # least suspicious first
    assert sorted(cells, key=lambda name: page.index(f">{name}")) == ["neg.png", "found.png", "pos.png", "waiting.png"]


def test_the_report_prints_each_cells_whole_name_and_id(client, user):
    """Names cut in the middle printed two cells of different slides, one positive, alike on paper."""
    names = [f"WARD7_2026-12-01_slide{side}_field_03_cell_12.png" for side in "AB"]
    batch = create_batch(owner=user, uploads=[upload(name) for name in names])
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/report/").content.decode()
    for cell in batch.analyses.all():
        assert (
            f'<span class="cell-name">{cell.original_filename}</span> <span class="cell-id">(cell #{cell.pk})</span>'
            in page
        )
    # Nor is why a cell failed cut short: at 80 characters paper never said what was wrong.
    why = (
        "Cannot read the image: its stored file is damaged or no longer an image; an administrator can find the details"
    )
    batch.analyses.filter(original_filename=names[0]).update(status="failed", error=why)
    assert why in client.get(f"/batches/{batch.pk}/report/").content.decode()


def test_report_of_a_batch_nothing_has_classified_yet_says_so(client, user):
    batch = create_batch(owner=user, uploads=[upload("waiting.png")])
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert "No cell classified yet." in page and "data-model" not in page


@pytest.mark.parametrize("sign", ["\uff1d", "\uff0b", "\uff0d", "\uff20", "\ufe66"], ids=ascii)
def test_a_full_width_formula_sign_is_kept_from_running_as_one_too(sign):
    """Only ASCII signs were caught: Numbers takes a full-width "＝" for "=" and ran
    ＝HYPERLINK(...) from a file name, reference or note (node-csv escapes them for this)."""
    assert csv_safe(f"{sign}HYPERLINK(evil)") == f"'{sign}HYPERLINK(evil)"
    assert csv_safe(f"WARD{sign}7") == f"WARD{sign}7"


def test_csv_gives_threshold_and_keeps_user_text_from_running_as_formulas(client, user, batch):
    client.force_login(user)
    response = client.get(f"/batches/{batch.pk}/export.csv")
    assert response["Content-Type"].startswith("text/csv")
    exported = csv.DictReader(io.StringIO(response.getvalue().decode("utf-8-sig")))
    rows = {row["original_filename"]: row for row in exported}
    assert set(rows) == {"'=HYPERLINK(evil).png", "likely.png", "pending.png"}
    assert rows["likely.png"]["decision_threshold"] == "0.11" and rows["pending.png"]["decision_threshold"] == ""
    assert list(rows["likely.png"])[-3:] == ["borderline", "error", "review_note"] and rows["likely.png"]["error"] == ""
    Analysis.objects.filter(original_filename="pending.png").update(status="failed", error="=Cannot read the image")
    again = client.get(f"/batches/{batch.pk}/export.csv").getvalue().decode("utf-8-sig")
    failed = next(row for row in csv.DictReader(io.StringIO(again)) if row["original_filename"] == "pending.png")
    assert failed["status"] == "failed" and failed["error"] == "'=Cannot read the image"  # why, and no formula
    assert {row["sample_reference"] for row in rows.values()} == {"'@WARD-7"}


def test_the_csv_and_the_admin_list_show_a_score_just_under_the_threshold_as_under_it(client, user, batch):
    """0.10996, labelled Uninfected at 0.11, rounded to nearest would read 0.1100 beside "threshold 0.11"."""
    from django.contrib.auth import get_user_model

    Analysis.objects.filter(batch=batch, original_filename="likely.png").update(
        label="Uninfected", probability_parasitized=0.10996
    )
    client.force_login(user)
    rows = {
        row["original_filename"]: row
        for row in csv.DictReader(io.StringIO(client.get("/export.csv").getvalue().decode("utf-8-sig")))
    }
    assert (rows["likely.png"]["probability_parasitized"], rows["likely.png"]["label"]) == ("0.109", "Uninfected")
    assert rows["pending.png"]["probability_parasitized"] == ""
    client.force_login(get_user_model().objects.create_superuser("boss", password="pw-for-tests-123"))
    listing = client.get("/admin/diagnosis/analysis/").content.decode()
    assert "0.109" in listing and "0.110" not in listing


def test_one_bad_filter_value_is_ignored_and_said_so_while_the_others_still_apply(client, user):
    from diagnosis import services

    kept = services.create_analysis(owner=user, upload=upload("kept.png"))
    services.create_analysis(owner=user, upload=upload("dropped.png"))
    Analysis.objects.filter(pk=kept.pk).update(status="failed")
    client.force_login(user)
    query = "?status=failed&sort=outdated-choice&date_from=not-a-date"
    page = client.get("/" + query).content.decode()
    assert "kept.png" in page and "dropped.png" not in page
    assert "Ignored:" in page and "Sort" in page and "From" in page
    exported = client.get("/export.csv" + query).getvalue().decode("utf-8-sig")
    assert "kept.png" in exported and "dropped.png" not in exported


def test_the_label_filter_and_the_csv_follow_a_reviewers_correction_in_the_sites_time_zone(
    client, user, batch, settings
):
    from django.contrib.auth import get_user_model

    from diagnosis.services import review_analysis

    settings.TIME_ZONE = "Africa/Nairobi"  # UTC+3, no daylight saving
    reviewer = get_user_model().objects.create_superuser("microscopist", password="pw-for-tests-123")
    corrected = batch.analyses.get(original_filename="=HYPERLINK(evil).png")
    review_analysis(
        analysis=corrected, reviewer=reviewer, verdict="disagree", corrected_label="Parasitized", replacing=None
    )
    client.force_login(user)
    positives = client.get("/?label=Parasitized").content.decode()
    assert "likely.png" in positives and "HYPERLINK(evil).png" in positives
    assert "HYPERLINK(evil).png" not in client.get("/?label=Uninfected").content.decode()

    exported = client.get("/export.csv?label=Parasitized").getvalue().decode("utf-8-sig")
    assert exported.startswith('"analysis_id","batch_id",')  # every field quoted
    rows = {row["original_filename"]: row for row in csv.DictReader(io.StringIO(exported))}
    assert set(rows) == {"'=HYPERLINK(evil).png", "likely.png"}
    row = rows["'=HYPERLINK(evil).png"]
    assert (row["final_label"], row["label"], row["review_verdict"], row["reviewed_by"]) == (
        "Parasitized",
        "Uninfected",
        "disagree",
        "microscopist",
    )
    assert row["created_at"].endswith("+03:00") and row["reviewed_at"].endswith("+03:00")


def test_a_report_printed_early_says_it_is_preliminary_and_names_reviewer_threshold_and_zone(
    client, user, batch, settings
):
    from django.contrib.auth import get_user_model

    from diagnosis.services import review_analysis

    settings.TIME_ZONE = "Africa/Nairobi"
    reviewer = get_user_model().objects.create_superuser("microscopist", password="pw-for-tests-123")
    likely = batch.analyses.get(original_filename="likely.png")
    review_analysis(analysis=likely, reviewer=reviewer, verdict="agree", note="ring forms", replacing=None)
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert "Preliminary:</strong> 1 of 3 cells still being analysed" in page
    assert "(times in Africa/Nairobi)" in page and f'href="/batches/{batch.pk}/"' in page
    assert "Model: Parasitized 0.930 (threshold 0.11)." in page and "Confirmed by microscopist" in page
    assert "ring forms" in page and "P 0.040 (threshold 0.11)" in page and "deleted" not in page

    batch.analyses.filter(original_filename="pending.png").update(status="failed", error="Cannot read the image")
    final = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert "Preliminary" not in final and "Cannot read the image" in final

    # The report goes into the patient's file: it says, as the batch page does, that a cell is gone
    # (the one deleted may have been the positive one).
    client.post(f"/analyses/{likely.pk}/delete/")
    after = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert "1 cell of this batch was deleted:</strong> these counts are of the cells left" in after


def test_scores_are_shown_with_the_threshold_they_were_judged_against(client, user, batch):
    client.force_login(user)
    for page in (client.get("/"), client.get(f"/batches/{batch.pk}/")):
        html = page.content.decode()
        assert "<span data-probability>0.040</span>" in html and "threshold 0.11</small>" in html
        assert "Times are in UTC." in html


def test_a_score_just_under_the_threshold_never_reads_as_the_threshold():
    from diagnosis.templatetags.scores import score

    assert [score(p) for p in (0.1096, 0.11, 0.29, 0.99999, 0.0, None)] == [
        "0.109",
        "0.110",
        "0.290",
        "0.999",
        "0.000",
        "—",
    ]


def test_the_live_parasitized_percentage_is_the_one_the_page_renders(client, user):
    # 23 of 40 is 57.5 %, and floating point puts 23 / 40 * 100 just under it: both must say 57.
    batch = create_batch(owner=user, uploads=[upload(f"c{i}.png") for i in range(40)])
    ids = list(batch.analyses.order_by("pk").values_list("pk", flat=True))
    Analysis.objects.filter(pk__in=ids[:23]).update(status="done", label="Parasitized")
    Analysis.objects.filter(pk__in=ids[23:]).update(status="done", label="Uninfected")
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/").content.decode()
    live = client.get(f"/batches/{batch.pk}/status.json").json()["counts"]["parasitized_percent"]
    assert f"<span data-parasitemia>{live}</span>%" in page and live == 57


def test_empty_filters_still_show_how_to_start_and_a_reversed_date_range_is_named(client, user):
    client.force_login(user)
    empty = client.get("/?search=&status=&label=&reviewed=&date_from=&date_to=&sort=-created_at").content.decode()
    assert "No analyses yet." in empty and "No analyses match" not in empty
    reversed_range = client.get("/?date_from=2026-11-20&date_to=2026-11-01").content.decode()
    assert "The To date is before the From date, so nothing can match." in reversed_range


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_the_furthest_dates_a_date_field_takes_filter_rather_than_fail(client, user, settings, zone):
    settings.TIME_ZONE = zone
    create_analysis(owner=user, upload=upload("cell.png"))
    client.force_login(user)
    for query in ("date_to=9999-12-31", "date_from=0001-01-01", "date_from=0001-01-01&date_to=9999-12-31"):
        page, export = client.get(f"/?{query}"), client.get(f"/export.csv?{query}")
        assert page.status_code == export.status_code == 200, query
        assert "cell.png" in page.content.decode() and "cell.png" in export.getvalue().decode("utf-8-sig"), query
    assert "cell.png" not in client.get("/export.csv?date_to=0001-01-01").getvalue().decode("utf-8-sig")


def test_a_dashboard_export_too_large_to_finish_is_refused_saying_how_to_narrow_it(client, user, settings):
    settings.EXPORT_MAX_ROWS = 2
    for n in range(3):
        create_analysis(owner=user, upload=upload(f"cell-{n}.png"))
    client.force_login(user)
    refused = client.get("/export.csv?status=queued", follow=True)
    assert refused.redirect_chain == [("/?status=queued", 302)]
    assert "would hold 3 rows, more than one download carries (2)" in refused.content.decode()
    settings.EXPORT_MAX_ROWS = 3
    exported = client.get("/export.csv?status=queued")
    assert exported.status_code == 200 and len(b"".join(exported.streaming_content).splitlines()) == 4


def test_a_csv_opens_in_a_spreadsheet_with_its_non_ascii_text_intact(client, user):
    """Without a byte-order mark Excel reads a CSV in the computer's legacy code page: "Müller-Đurić"
    became "MÃ¼ller-Ä\x90uriÄ‡" in a downloaded export."""
    create_batch(owner=user, uploads=[upload("Müller-Đurić_cell_1.png")], sample_reference="Müller-Đurić")
    client.force_login(user)
    for path in ("/export.csv", f"/batches/{Analysis.objects.get().batch_id}/export.csv"):
        exported = client.get(path).getvalue()
        assert exported.startswith(b"\xef\xbb\xbf" + b'"analysis_id",'), path
        row = next(csv.DictReader(io.StringIO(exported.decode("utf-8-sig"))))
        assert row["sample_reference"] == "Müller-Đurić" and row["original_filename"] == "Müller-Đurić_cell_1.png"


def classified_by_two_models(user, cells: dict[str, tuple[str, float]]):
    """A batch of two cells, named and labelled with their scores as ``cells`` says, the second
    analysed again after a new model came (threshold 0.6)."""
    batch = create_batch(owner=user, uploads=[upload(name) for name in cells])
    (first, (label, probability)), (second, (new_label, new_probability)) = cells.items()
    old, new = (batch.analyses.get(original_filename=name) for name in (first, second))
    finish(old, label=label, probability=probability)
    finish(new, label=new_label, probability=new_probability)
    Analysis.objects.filter(pk=new.pk).update(model_version="vgg-test-2", decision_threshold=0.6)
    return batch, old, new


def test_a_batch_classified_by_two_models_says_which_cell_each_classified(client, user):
    """After a new model was installed and some cells analysed again, the batch page named no model
    at all, and the report's cells none: the same score is a positive under one and not the other."""
    cells = {"before.png": ("Parasitized", 0.3), "after.png": ("Uninfected", 0.3)}
    batch, _, after = classified_by_two_models(user, cells)
    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/").content.decode()
    note = 'id="mixed-models">Classified by <span data-model-count>2</span> models, each cell by the one it names'
    assert note in page
    assert '<span class="small muted model-name" data-model>vgg-test-2</span>' in page
    report = client.get(f"/batches/{batch.pk}/report/").content.decode()
    assert (
        "<br>Model <span data-model>vgg-test-1</span>" in report
        and "<br>Model <span data-model>vgg-test-2</span>" in report
    )

    Analysis.objects.filter(pk=after.pk).update(model_version="vgg-test-1", decision_threshold=0.11)
    page = client.get(f"/batches/{batch.pk}/").content.decode()  # one model: no note, no name on each cell
    assert 'id="mixed-models" hidden' in page and page.count("data-model hidden>") == 2


def test_most_suspicious_first_weighs_each_score_against_its_own_models_threshold(client, user):
    """Ordered by the raw score, a new model's sure negative (0.25 at a threshold of 0.6) stood above
    the old model's borderline one (0.105 at 0.11), on the batch page, the report and the dashboard."""
    cells = {"old-borderline.png": ("Uninfected", 0.105), "new-sure.png": ("Uninfected", 0.25)}
    batch, _, _ = classified_by_two_models(user, cells)
    client.force_login(user)
    for url in (f"/batches/{batch.pk}/", f"/batches/{batch.pk}/report/", "/?sort=-probability_parasitized"):
        page = client.get(url).content.decode()
        assert page.index("old-borderline.png") < page.index("new-sure.png"), url
    page = client.get("/?sort=probability_parasitized").content.decode()  # least suspicious first
    assert page.index("new-sure.png") < page.index("old-borderline.png")
    scores = [
        float(s) for s in re.findall(r'data-score="([-0-9.]+)"', client.get(f"/batches/{batch.pk}/").content.decode())
    ]
    assert scores == sorted(scores, reverse=True) and scores[1] == pytest.approx((0.25 - 0.6) / 0.6, abs=1e-6)
