"""Reviewed cells as a class-folder dataset that ``ml.train`` and ``ml.evaluate`` read.

File names carry a digest of the sample as the patient group (the part before ``_IMG_``), so ml's splits keep
a sample's cells together, as they do the NIH patients'.
"""

import contextlib
import csv
import fcntl
import logging
import shutil
from itertools import islice
from pathlib import Path

from django.utils.crypto import salted_hmac
from django.utils.text import slugify

from diagnosis.audit import record_dataset_export
from diagnosis.models import Analysis
from diagnosis.selectors import reviewed_analyses

logger = logging.getLogger("diagnosis.dataset")

MANIFEST_COLUMNS = [
    "file",
    "analysis_id",
    "patient_group",
    "model_label",
    "reviewed_label",
    "probability_parasitized",
    "model_version",
    "reviewed_at",
    # Added at the end, for readers by position: the label was the model's at this threshold, which
    # differs between models (0.3 is Parasitized under one, Uninfected under another).
    "decision_threshold",
]


def patient_group(analysis: Analysis) -> str:
    """One group per sample reference of each user; a batch without one is a group, and so is a
    single upload. A sample reference can name a patient and the data set leaves the clinical
    system, so the group carries a keyed digest of it (the same on every export), not the reference."""
    if not analysis.batch:
        return f"u{analysis.owner_id}-cell{analysis.pk}"
    # Unicode kept: an ASCII slug of a Cyrillic or Arabic reference is empty, and of "患者-123" is "123".
    reference = slugify(analysis.batch.sample_reference, allow_unicode=True)
    if not reference:
        return f"u{analysis.owner_id}-batch{analysis.batch_id}"
    return f"u{analysis.owner_id}-s{salted_hmac(GROUP_KEY_SALT, reference).hexdigest()[:12]}"


GROUP_KEY_SALT = "diagnosis.dataset.patient_group"
MANIFEST_NAME = "reviewed.csv"
PARTIAL_MANIFEST_NAME = "reviewed.csv.partial"
# The files earlier runs listed, kept until a run completes: each is removed then unless that run
# wrote it again. Without it, a second failed run would forget what the first one had copied.
PENDING_NAME = "reviewed.csv.pending"
# Held while a run writes: two at once would each remove what the other copies.
LOCK_NAME = ".export.lock"


# Cells read, copied and recorded this many at a time: an export of years of reviews holds one
# chunk in memory, not every row.
EXPORT_CHUNK = 500


def export_reviewed_cells(*, out: Path) -> int:
    """Write every reviewed cell under ``out/<reviewed label>/`` plus ``out/reviewed.csv``; returns the count.
    Running it again brings the folder up to date: a relabelled cell moves to its new folder, a cell
    filed under an older name (an earlier group naming, another SECRET_KEY) is not left beside its
    new one, and a cell deleted since, or no longer reviewed, leaves. Only files an earlier run
    listed are ever removed. The manifest is written beside the old one and takes its place at the
    end, so a run that fails half-way leaves the previous manifest as it was, and the next complete
    run still removes what the failed ones copied."""
    # Patient images: a folder this makes is its owner's only, as the uploads' folders are
    # (scripts/start's umask), whatever the umask of the shell that runs the export.
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # one there already keeps the modes it was given
        out.mkdir(mode=0o700)
    for label in Analysis.Label.values:
        (out / label).mkdir(exist_ok=True)
    with open(out / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportRunning(f"Another export into {out} is running; try again when it has finished.") from None
        return _export_into(out)


class ExportRunning(RuntimeError):
    pass


def _export_into(out: Path) -> int:
    earlier = _previously_exported(out)
    _write_file_list(out / PENDING_NAME, files=earlier, out=out)
    written: set[Path] = set()
    with open(out / PARTIAL_MANIFEST_NAME, "w", newline="", encoding="utf-8") as manifest:
        writer = csv.writer(manifest)
        writer.writerow(MANIFEST_COLUMNS)
        cells = reviewed_analyses().iterator(chunk_size=EXPORT_CHUNK)
        while chunk := list(islice(cells, EXPORT_CHUNK)):
            begun: list[Analysis] = []
            try:
                for cell in chunk:
                    _export_cell(cell, out=out, manifest=manifest, written=written, begun=begun)
            finally:  # a copy that fails (the disk full) leaves the cells before it in the folder
                record_dataset_export(analyses=begun, out=str(out))
    for path in earlier - written:
        path.unlink(missing_ok=True)
    (out / PARTIAL_MANIFEST_NAME).replace(out / MANIFEST_NAME)
    (out / PENDING_NAME).unlink()
    return len(written)


def _export_cell(analysis: Analysis, *, out: Path, manifest, written: set[Path], begun: list[Analysis]) -> None:
    """Copy the cell into the data set, adding it to ``begun`` as its copy starts: from then on part
    of it may have left, so the access trail holds it whether the copy ends or not."""
    label, group = analysis.final_label, patient_group(analysis)
    name = f"{group}_IMG_{analysis.pk}{Path(analysis.image.name).suffix}"
    try:
        source = analysis.image.open("rb")
    except FileNotFoundError:  # deleted since the list was read (by its owner, by retention)
        logger.warning("event=export_skipped analysis_id=%s: its image is gone", analysis.pk)
        return
    # Listed before it is copied: a run killed during the copy leaves no file that nothing lists.
    row = [f"{label}/{name}", analysis.pk, group, analysis.label, label, analysis.probability_parasitized]
    made = [analysis.model_version, analysis.reviewed_at.isoformat(), analysis.decision_threshold]
    csv.writer(manifest).writerow([*row, *made])
    manifest.flush()
    with source, open(out / label / name, "wb") as copy:
        begun.append(analysis)
        shutil.copyfileobj(source, copy)
    written.add((out / label / name).resolve())


def _write_file_list(path: Path, *, files: set[Path], out: Path) -> None:
    """A list of files in the manifest's form (label/name), written whole or not at all. The files
    are resolved paths: a label folder may be a link to another disk."""
    labels = {(out / label).resolve(): label for label in Analysis.Label.values}
    with open(path.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file"])
        writer.writerows([f"{labels[file.parent]}/{file.name}"] for file in sorted(files))
    path.with_suffix(".tmp").replace(path)


def _previously_exported(out: Path) -> set[Path]:
    """The cell files that earlier runs listed (the last complete one in its manifest, failed ones in
    their partial manifest and in the list they left pending), inside the label folders only."""
    folders = {(out / label).resolve() for label in Analysis.Label.values}
    listed = set()
    for manifest in (out / MANIFEST_NAME, out / PARTIAL_MANIFEST_NAME, out / PENDING_NAME):
        if manifest.exists():
            with open(manifest, newline="", encoding="utf-8") as handle:
                listed |= {(out / row["file"]).resolve() for row in csv.DictReader(handle) if row.get("file")}
    return {path for path in listed if path.parent in folders and path.is_file()}
