from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from diagnosis.dataset import ExportRunning, export_reviewed_cells


class Command(BaseCommand):
    help = (
        "Write reviewed cells as OUT/Parasitized and OUT/Uninfected (by the reviewer's label) with a "
        "manifest, for `python -m ml.evaluate --data OUT` (the model on this lab's patients) or ml.train."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True)

    def handle(self, *args, out: str, **options):
        out = Path(out)
        try:
            count = export_reviewed_cells(out=out)
        except ExportRunning as running:
            raise CommandError(str(running)) from None
        except OSError as error:  # --out is a file, or somewhere this account cannot write
            raise CommandError(f"--out {out}: {error.strerror or error}") from None
        self.stdout.write(f"wrote {count} reviewed cells to {out} (manifest: {out / 'reviewed.csv'})")
