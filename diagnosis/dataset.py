"""Reviewed cells as a class-folder dataset that ``ml.train`` and ``ml.evaluate`` read.

File names carry a digest of the sample as the patient group (the part before ``_IMG_``), so ml's splits keep
a sample's cells together, as they do the NIH patients'.
"""

import csv
import logging
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


def export_reviewed_cells(*, out: Path) -> int:
    """Write every reviewed cell under ``out/<reviewed label>/`` plus ``out/reviewed.csv``; returns the count.
    Running it again brings the folder up to date: a relabelled cell moves to its new folder, a cell
    filed under an older name (an earlier group naming, another SECRET_KEY) is not left beside its
    new one, and a cell deleted since, or no longer reviewed, leaves. Only files the previous run
    listed in its manifest are ever removed."""
    for label in Analysis.Label.values:
        (out / label).mkdir(parents=True, exist_ok=True)
    earlier = _previously_exported(out)
    rows, written, exported = [], set(), []
    for analysis in reviewed_analyses():
        label, group = analysis.final_label, patient_group(analysis)
        name = f"{group}_IMG_{analysis.pk}{Path(analysis.image.name).suffix}"
        try:
            with analysis.image.open("rb") as source:
                (out / label / name).write_bytes(source.read())
        except FileNotFoundError:  # deleted since the list was read (by its owner, by retention)
            logger.warning("event=export_skipped analysis_id=%s: its image is gone", analysis.pk)
            continue
        written.add((out / label / name).resolve())
        exported.append(analysis)
        rows.append(
            [
                f"{label}/{name}",
                analysis.pk,
                group,
                analysis.label,
                label,
                analysis.probability_parasitized,
                analysis.model_version,
                analysis.reviewed_at.isoformat(),
            ]
        )
    for path in earlier - written:
        path.unlink(missing_ok=True)
    with open(out / MANIFEST_NAME, "w", newline="", encoding="utf-8") as manifest:
        writer = csv.writer(manifest)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    record_dataset_export(analyses=exported, out=str(out))
    return len(rows)


def _previously_exported(out: Path) -> set[Path]:
    """The cell files the last run listed in its manifest, inside the label folders only."""
    manifest = out / MANIFEST_NAME
    if not manifest.exists():
        return set()
    folders = {(out / label).resolve() for label in Analysis.Label.values}
    with open(manifest, newline="", encoding="utf-8") as handle:
        listed = {(out / row["file"]).resolve() for row in csv.DictReader(handle) if row.get("file")}
    return {path for path in listed if path.parent in folders and path.is_file()}
