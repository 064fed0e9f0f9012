"""What the pages say as results arrive and files are chosen, in a real browser: to the eye (rows in
the order asked for, the model named) and to a screen reader (what a picture shows, what is skipped)."""

import re

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone
from playwright.sync_api import expect

from diagnosis import services
from diagnosis.models import Analysis
from tests.browser import log_in
from tests.factories import PASSWORD, classified, image_bytes, upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]
MODEL = "vgg19_bn-96px-20261126-e84911f9"


def finish(cell: Analysis, probability: float) -> None:
    label = "Parasitized" if probability >= 0.37 else "Uninfected"
    Analysis.objects.filter(pk=cell.pk).update(
        status="done",
        label=label,
        probability_parasitized=probability,
        decision_threshold=0.37,
        model_version=MODEL,
        finished_at=timezone.now(),
    )


def test_the_dashboard_sorted_by_score_keeps_that_order_and_names_the_model_as_results_arrive(
    open_page,
    user,
    not_analysed,
):
    """A cell finishing at 0.98 stayed below a 0.02 one on "Most suspicious first" until a reload,
    and its Model column kept its "—" as if no model had classified it."""
    batch = services.create_batch(owner=user, uploads=[upload(name) for name in ("low.png", "late.png", "mid.png")])
    low, late, mid = (batch.analyses.get(original_filename=name) for name in ("low.png", "late.png", "mid.png"))
    classified(low, probability_parasitized=0.02, label="Uninfected")
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/?sort=-probability_parasitized")
    files = page.locator("table.results tbody td.file a")
    expect(files).to_have_text(["low.png", "mid.png", "late.png"])  # unscored last, newest first
    finish(late, 0.98)
    row = page.locator(f'tr[data-analysis="{late.pk}"]')
    expect(row.locator("[data-label]")).to_have_text("Parasitized")
    expect(row.locator("[data-model]")).to_have_text(MODEL)
    expect(files).to_have_text(["late.png", "low.png", "mid.png"])
    finish(mid, 0.30)
    expect(files).to_have_text(["late.png", "mid.png", "low.png"])

    page.goto("/?sort=probability_parasitized")  # least suspicious first: the same rows the other way
    expect(files).to_have_text(["low.png", "mid.png", "late.png"])


def test_a_batch_thumbnail_showing_its_heatmap_says_so_to_a_screen_reader(open_page, user, not_analysed):
    batch = services.create_batch(owner=user, uploads=[upload("a.png")])
    cell = classified(batch.analyses.get(), finished_at=timezone.now())
    cell.overlay.save("overlay.png", ContentFile(image_bytes(color=(255, 0, 0))), save=True)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/batches/{batch.pk}/")
    img = page.locator("#cell-grid img")
    expect(img).to_have_attribute("alt", "Cell a.png")
    page.locator("#cell-grid a").focus()  # the keyboard's focus shows the heatmap in the thumbnail's place
    expect(img).to_have_attribute("src", re.compile(r"/overlay/$"))
    expect(img).to_have_attribute("alt", "Heatmap of a.png")
    page.locator("#cell-grid a").blur()
    expect(img).to_have_attribute("alt", "Cell a.png")


def test_a_screen_reader_hears_which_chosen_files_will_not_be_uploaded(open_page, user):
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto("/upload/")
    page.wait_for_load_state("load")
    page.locator("#id_images").set_input_files(
        [
            {"name": "a.png", "mimeType": "image/png", "buffer": image_bytes()},
            {"name": "._a.png", "mimeType": "image/png", "buffer": image_bytes()},
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"x"},
        ]
    )
    expect(page.locator("#file-list li.rejected")).to_have_count(2)
    expect(page.locator("#upload-status")).to_have_text("1 image to upload; 2 skipped (see the list).")
    page.locator("#id_images").set_input_files([{"name": "b.png", "mimeType": "image/png", "buffer": image_bytes()}])
    expect(page.locator("#upload-status")).to_have_text("")


@pytest.mark.parametrize("listing", ["batch grid", "dashboard"])
def test_a_reviewers_positive_stays_among_the_positives_as_results_arrive(open_page, user, not_analysed, listing):
    """The live lists re-sorted by score alone: once another cell finished, a low-scoring cell a
    microscopist had corrected to Parasitized went back below the negatives."""
    batch = services.create_batch(owner=user, uploads=[upload(f"{name}.png") for name in ("found", "neg", "late")])
    found, neg, late = (batch.analyses.get(original_filename=f"{name}.png") for name in ("found", "neg", "late"))
    classified(found, probability_parasitized=0.02, label="Uninfected")
    classified(neg, probability_parasitized=0.09, label="Uninfected")
    Analysis.objects.filter(pk=found.pk).update(review_verdict="disagree", corrected_label="Parasitized")
    path, names = {
        "batch grid": (f"/batches/{batch.pk}/", "#cell-grid .cell-name"),
        "dashboard": ("/?sort=-probability_parasitized", "table.results tbody td.file a"),
    }[listing]
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(path)
    names = page.locator(names)
    expect(names).to_have_text(["found.png", "neg.png", "late.png"])
    finish(late, 0.30)
    expect(page.locator(f'[data-analysis="{late.pk}"]')).to_have_attribute("data-finished", "1")
    expect(names).to_have_text(["found.png", "late.png", "neg.png"])


def test_a_batch_page_open_while_cells_finish_under_a_new_model_names_it(open_page, user, not_analysed):
    """Failed cells sent again after a new model was installed finish under it while the page is
    open: live.js updated their labels, but the page said nothing of a second model until reloaded."""
    batch = services.create_batch(owner=user, uploads=[upload("old.png"), upload("retried.png")])
    old, retried = (batch.analyses.get(original_filename=name) for name in ("old.png", "retried.png"))
    classified(old, model_version="vgg-test-1", decision_threshold=0.11, probability_parasitized=0.9)
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/batches/{batch.pk}/")
    expect(page.locator("#mixed-models")).to_be_hidden()
    cell = page.locator(f'#cell-grid [data-analysis="{retried.pk}"]')
    Analysis.objects.filter(pk=retried.pk).update(
        status="done",
        label="Uninfected",
        probability_parasitized=0.3,
        decision_threshold=0.6,
        model_version="vgg-test-2",
        finished_at=timezone.now(),
    )
    expect(cell.locator("[data-label]")).to_have_text("Uninfected")
    expect(cell.locator("[data-model]")).to_have_text("vgg-test-2")
    expect(page.locator(f'#cell-grid [data-analysis="{old.pk}"] [data-model]')).to_have_text("vgg-test-1")
    expect(page.locator("#mixed-models")).to_contain_text("Classified by 2 models")


def test_a_cell_failing_under_a_new_model_does_not_make_the_batch_two_models(open_page, user, not_analysed):
    """A failed cell keeps the model it failed under, and the page counted it: one failing under a
    newly installed (broken) model made the open page say "Classified by 2 models", a reload one."""
    batch = services.create_batch(owner=user, uploads=[upload("old.png"), upload("bad.png"), upload("later.png")])
    old, bad, later = (batch.analyses.get(original_filename=name) for name in ("old.png", "bad.png", "later.png"))
    classified(old, model_version="vgg-test-1", decision_threshold=0.37, finished_at=timezone.now())
    page = open_page()
    log_in(page, user.username, PASSWORD)
    page.goto(f"/batches/{batch.pk}/")
    Analysis.objects.filter(pk=bad.pk).update(
        status="failed", error="Model unavailable: not a VGG19", model_version="vgg-test-2", finished_at=timezone.now()
    )
    # The poll that marks the cell finished names the models in the same task (live.js): once the
    # mark is seen, what that poll made of the models is on the page.
    expect(page.locator(f'#cell-grid [data-analysis="{bad.pk}"]')).to_have_attribute("data-finished", "1")
    expect(page.locator("#mixed-models")).to_be_hidden()
    # A cell classified under the new model does make two, on the same open page.
    classified(later, model_version="vgg-test-2", decision_threshold=0.37, finished_at=timezone.now())
    expect(page.locator("#mixed-models")).to_contain_text("Classified by 2 models")
