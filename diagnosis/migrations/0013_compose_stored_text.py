"""Text stored before references, notes and file names were composed (diagnosis.text): a reference
a lab system sent decomposed is found again by the composed lookups. The rules are copied here, as
they were when this ran."""

import unicodedata

from django.db import migrations


def _plain_line(text: str) -> str:
    kept = (" " if ch.isspace() else ch for ch in text)
    return unicodedata.normalize("NFC", "".join(ch for ch in kept if unicodedata.category(ch) not in ("Cc", "Cf"))).strip()


def _composed(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _rewrite(model, rules: dict) -> None:
    changed = []
    limits = {field: model._meta.get_field(field).max_length for field in rules}
    for row in model.objects.only("pk", *rules).iterator(chunk_size=2000):
        new = {field: rule(getattr(row, field)) for field, rule in rules.items()}
        # Some letters grow when composed: such a row stays as it was, rather than be cut to fit.
        if any(limits[field] and len(value) > limits[field] for field, value in new.items()):
            continue
        if any(getattr(row, field) != value for field, value in new.items()):
            for field, value in new.items():
                setattr(row, field, value)
            changed.append(row)
    model.objects.bulk_update(changed, list(rules), batch_size=2000)


def compose_stored_text(apps, schema_editor):
    _rewrite(apps.get_model("diagnosis", "Batch"), {"sample_reference": _plain_line, "note": _composed})
    _rewrite(apps.get_model("diagnosis", "Analysis"), {"original_filename": _composed})


class Migration(migrations.Migration):
    dependencies = [
        ("diagnosis", "0012_results_changed_at"),
    ]

    operations = [migrations.RunPython(compose_stored_text, migrations.RunPython.noop)]
