from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from diagnosis.retention import MAX_RETENTION_DAYS
from diagnosis.services import delete_expired_analyses


class Command(BaseCommand):
    help = "Delete analyses (images, heatmaps, results) older than the retention period, and emptied batches."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, help="default ANALYSIS_RETENTION_DAYS")

    def handle(self, *args, days=None, **options):
        if days is None:
            days = settings.ANALYSIS_RETENTION_DAYS
            if days < 1:
                raise CommandError("No retention period: pass --days N or set ANALYSIS_RETENTION_DAYS.")
        elif not 1 <= days <= MAX_RETENTION_DAYS:  # 0 would be every analysis; see MAX_RETENTION_DAYS
            raise CommandError(f"--days {days}: give a retention period from 1 to {MAX_RETENTION_DAYS} days.")
        count = delete_expired_analyses(older_than=timedelta(days=days))
        self.stdout.write(f"deleted {count} analyses uploaded more than {days} days ago")
