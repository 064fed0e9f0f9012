"""Reviewed cells leave as a dataset ml reads: the reviewer's label decides the folder, the sample
the patient group, and ml.evaluate scores the shipped model on them."""

import csv
import io
import os
import re

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone
from PIL import Image

from diagnosis.models import AccessEvent, Analysis
from diagnosis.services import create_analysis, create_batch
from ml.data import list_samples
from ml.evaluate import evaluate_folder
from ml.model import CLASS_NAMES
from tests.conftest import fixture_cells
from tests.factories import upload


def finished(analysis: Analysis, *, label: str, verdict: str = "", corrected: str = "") -> Analysis:
    Analysis.objects.filter(pk=analysis.pk).update(
        status="done",
        label=label,
        probability_parasitized=0.9 if label == "Parasitized" else 0.1,
        decision_threshold=0.37,
        model_version="m1",
        review_verdict=verdict,
        corrected_label=corrected,
        reviewed_at=timezone.now() if verdict else None,
    )
    return Analysis.objects.get(pk=analysis.pk)


def test_reviewed_cells_export_by_reviewed_label_and_sample(user, other_user, tmp_path):
    cells = fixture_cells()
    as_uploads = [upload(cell.name, cell.read_bytes()) for cell in cells]
    ward = create_batch(owner=user, uploads=as_uploads[:3], sample_reference="WARD-7 slide 2")
    agreed, corrected, unreviewed = ward.analyses.order_by("pk")
    agreed = finished(agreed, label="Parasitized", verdict="agree")
    corrected = finished(corrected, label="Parasitized", verdict="disagree", corrected="Uninfected")
    finished(unreviewed, label="Uninfected")
    single = finished(create_analysis(owner=other_user, upload=as_uploads[3]), label="Uninfected", verdict="agree")

    out = tmp_path / "reviewed"
    # An export made when groups carried the sample reference, and files that are not the export's.
    (out / "Parasitized").mkdir(parents=True)
    old_name = f"Parasitized/u{user.pk}-ward-7-slide-2_IMG_{agreed.pk}.png"
    (out / old_name).write_bytes(b"old name")
    (out / "reviewed.csv").write_text(f"file,analysis_id\n{old_name},{agreed.pk}\n../outside.png,0\n")
    (tmp_path / "outside.png").write_bytes(b"not in the export")
    (out / "Parasitized" / "siteB_IMG_5.png").write_bytes(b"another site's export, merged in")
    for _ in range(2):  # a second run brings the same folder up to date, duplicating nothing
        call_command("export_reviewed_cells", out=str(out), stdout=io.StringIO())
    assert (out / "Parasitized" / "siteB_IMG_5.png").exists() and (tmp_path / "outside.png").exists()
    assert not (out / old_name).exists()
    (out / "Parasitized" / "siteB_IMG_5.png").unlink()  # left alone; out of the way of the checks below
    samples = list_samples(out)
    by_id = {int(s.path.stem.rsplit("_IMG_", 1)[1]): s for s in samples}
    assert set(by_id) == {agreed.pk, corrected.pk, single.pk}
    assert CLASS_NAMES[by_id[agreed.pk].label] == "Parasitized"
    assert CLASS_NAMES[by_id[corrected.pk].label] == "Uninfected", "the reviewer's label, not the model's"
    ward_group = by_id[agreed.pk].patient_group
    assert ward_group == by_id[corrected.pk].patient_group and re.fullmatch(rf"u{user.pk}-s[0-9a-f]{{12}}", ward_group)
    # The sample reference (it may name a patient) appears in no file name and nowhere in the manifest.
    assert not [path for path in out.rglob("*") if "ward" in path.name.lower()]
    assert "ward" not in (out / "reviewed.csv").read_text().lower()
    assert by_id[single.pk].patient_group == f"u{other_user.pk}-cell{single.pk}"
    assert by_id[agreed.pk].path.read_bytes() == agreed.image.open("rb").read()  # the picture kept
    exported = Image.open(by_id[agreed.pk].path).convert("RGB")
    assert exported.tobytes() == Image.open(cells[0]).convert("RGB").tobytes()

    with open(out / "reviewed.csv", newline="", encoding="utf-8") as handle:
        manifest = {int(row["analysis_id"]): row for row in csv.DictReader(handle)}
    assert set(manifest) == set(by_id)
    assert (manifest[corrected.pk]["model_label"], manifest[corrected.pk]["reviewed_label"]) == (
        "Parasitized",
        "Uninfected",
    )
    # The threshold the model's label was made at: scores of two models' are not comparable without it.
    assert float(manifest[corrected.pk]["decision_threshold"]) == corrected.decision_threshold

    # A later review that changes its mind moves the cell; a deleted cell leaves the data set.
    Analysis.objects.filter(pk=agreed.pk).update(review_verdict="disagree", corrected_label="Uninfected")
    Analysis.objects.filter(pk=single.pk).delete()
    call_command("export_reviewed_cells", out=str(out), stdout=io.StringIO())
    assert [CLASS_NAMES[s.label] for s in list_samples(out) if s.path.stem.endswith(f"_IMG_{agreed.pk}")] == [
        "Uninfected"
    ]
    assert not [s for s in list_samples(out) if s.path.stem.endswith(f"_IMG_{single.pk}")]

    report = evaluate_folder(str(out), str(settings.MODEL_WEIGHTS))
    assert report["n"] == 2 and report["patient_groups"] == 1 and report["uninfected"] == 2


def test_a_reference_in_any_script_keeps_one_patient_in_one_group_and_two_apart(user):
    """An ASCII-only slug makes a Cyrillic name empty (each batch its own group, one patient on both
    sides of a split) and "患者-123" the same as "病人-123"."""
    from diagnosis.dataset import patient_group

    def group(reference: str) -> str:
        return patient_group(create_batch(owner=user, uploads=[upload()], sample_reference=reference).analyses.get())

    assert group("Иванов И.") == group("Иванов И.") != group("Петров П.")
    assert group("患者-123") != group("病人-123")
    assert group("WARD-7 slide 2") == group("ward 7 slide 2")


def test_a_cell_whose_image_went_during_an_export_is_left_out_and_the_rest_listed(user, tmp_path):
    from diagnosis.dataset import export_reviewed_cells
    from diagnosis.models import private_storage

    kept, gone = (
        finished(create_analysis(owner=user, upload=upload(f"{n}.png")), label="Uninfected", verdict="agree")
        for n in "ab"
    )
    private_storage.delete(gone.image.name)  # deleted by its owner or by retention as the export ran
    out = tmp_path / "reviewed"
    assert export_reviewed_cells(out=out) == 1
    with open(out / "reviewed.csv", newline="") as manifest:
        assert [int(row["analysis_id"]) for row in csv.DictReader(manifest)] == [kept.pk]
    assert [s.path.name for s in list_samples(out)] == [f"u{user.pk}-cell{kept.pk}_IMG_{kept.pk}.png"]


def test_every_cell_exported_into_the_data_set_is_in_the_access_trail(user, tmp_path):
    from diagnosis.dataset import export_reviewed_cells

    cell = finished(create_analysis(owner=user, upload=upload("a.png")), label="Uninfected", verdict="agree")
    finished(create_analysis(owner=user, upload=upload("b.png")), label="Uninfected")  # not reviewed: not exported
    assert export_reviewed_cells(out=tmp_path / "reviewed") == 1
    (event,) = AccessEvent.objects.filter(action="exported")
    assert (event.analysis_id, event.owner_id, event.channel) == (cell.pk, user.pk, "cli")
    assert event.username == "(export_reviewed_cells)" and str(tmp_path / "reviewed") in event.detail


def test_an_export_that_fails_half_way_keeps_the_last_manifest_and_the_next_run_tidies_up(user, tmp_path):
    from diagnosis.dataset import export_reviewed_cells

    def reviewed(name: str) -> Analysis:
        return finished(create_analysis(owner=user, upload=upload(name)), label="Uninfected", verdict="agree")

    def exported_name(cell: Analysis) -> str:
        return f"u{user.pk}-cell{cell.pk}_IMG_{cell.pk}.png"

    first = reviewed("a.png")
    out = tmp_path / "reviewed"
    assert export_reviewed_cells(out=out) == 1
    listed = (out / "reviewed.csv").read_text()

    # Two cells reviewed since; the copy of the last one fails (a folder stands where its file goes).
    copied, blocked = reviewed("b.png"), reviewed("c.png")
    (out / "Uninfected" / exported_name(blocked)).mkdir()
    try:
        export_reviewed_cells(out=out)
    except IsADirectoryError:
        pass
    else:
        raise AssertionError("the copy onto a folder should have failed")
    assert (out / "reviewed.csv").read_text() == listed, "the last complete manifest still describes the folder"
    assert (out / "Uninfected" / exported_name(copied)).exists()
    trail = AccessEvent.objects.filter(action="exported").values_list("analysis_id", flat=True)
    # Each run records what it copies: the first cell twice, the cell copied before the failure
    # once, and the cell whose copy could not start not at all.
    assert sorted(trail) == [first.pk, first.pk, copied.pk]

    # The cell copied by the failed run is deleted; the next run fails as well, on the same cell;
    # the one after completes and takes that copy away all the same.
    Analysis.objects.filter(pk=copied.pk).delete()
    with pytest.raises(IsADirectoryError):
        export_reviewed_cells(out=out)
    (out / "Uninfected" / exported_name(blocked)).rmdir()
    assert export_reviewed_cells(out=out) == 2
    assert sorted(s.path.name for s in list_samples(out)) == sorted([exported_name(first), exported_name(blocked)])
    assert not (out / "reviewed.csv.partial").exists() and not (out / "reviewed.csv.pending").exists()


def test_an_export_into_label_folders_on_another_disk_runs_again(user, tmp_path):
    """A label folder may be a link to a larger disk: the lists of earlier runs still name it."""
    from diagnosis.dataset import export_reviewed_cells

    finished(create_analysis(owner=user, upload=upload("a.png")), label="Uninfected", verdict="agree")
    out, elsewhere = tmp_path / "reviewed", tmp_path / "big-disk"
    (elsewhere / "uninfected-cells").mkdir(parents=True)
    out.mkdir()
    (out / "Uninfected").symlink_to(elsewhere / "uninfected-cells")
    assert export_reviewed_cells(out=out) == export_reviewed_cells(out=out) == 1
    assert len(list((elsewhere / "uninfected-cells").iterdir())) == 1


def test_a_second_export_into_the_same_folder_while_one_runs_is_refused(user, tmp_path):
    import fcntl

    from django.core.management import CommandError

    from diagnosis.dataset import LOCK_NAME, ExportRunning, export_reviewed_cells

    finished(create_analysis(owner=user, upload=upload("a.png")), label="Uninfected", verdict="agree")
    out = tmp_path / "reviewed"
    out.mkdir()
    with open(out / LOCK_NAME, "w") as running:  # as the first run holds it
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(ExportRunning, match="Another export into"):
            export_reviewed_cells(out=out)
        with pytest.raises(CommandError, match="Another export into"):
            call_command("export_reviewed_cells", out=str(out), stdout=io.StringIO())
    assert not (out / "reviewed.csv").exists()
    assert export_reviewed_cells(out=out) == 1


def test_a_folder_the_export_makes_is_its_owners_only_whatever_the_umask(user, tmp_path):
    """The folder holds patient images; run from a shell with umask 022 it was open to every account."""
    previous = os.umask(0o022)
    try:
        call_command("export_reviewed_cells", out=str(tmp_path / "new" / "reviewed"), stdout=io.StringIO())
        (tmp_path / "chosen").mkdir(mode=0o750)
        call_command("export_reviewed_cells", out=str(tmp_path / "chosen"), stdout=io.StringIO())
    finally:
        os.umask(previous)
    assert (tmp_path / "new" / "reviewed").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "chosen").stat().st_mode & 0o777 == 0o750  # a folder given keeps its modes


def test_an_export_to_a_place_it_cannot_write_is_a_command_error(db, tmp_path):
    """--out naming a file ended in a NotADirectoryError traceback."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CommandError, match="--out .*a-file: Not a directory"):
        call_command("export_reviewed_cells", out=str(tmp_path / "a-file"))
