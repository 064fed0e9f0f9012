from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from diagnosis.audit import counted
from diagnosis.services import requeue_stale_analyses


class Command(BaseCommand):
    help = "Enqueue again analyses whose task was lost (broker down at upload, worker died mid-task)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than",
            type=int,
            help="seconds; default ANALYSIS_STALE_SECONDS; 0: every unfinished cell, running ones too "
            "(once the broker lost its queue, with no worker running)",
        )

    def handle(self, *args, older_than=None, **options):
        if older_than is not None and older_than < 0:
            raise CommandError(f"--older-than {older_than}: give an age in seconds, 0 or more.")
        requeued = requeue_stale_analyses(older_than=None if older_than is None else timedelta(seconds=older_than))
        self.stdout.write(f"re-enqueued {counted(requeued.sent, 'cell')}")
        if left := requeued.found - requeued.sent:  # the broker is still down: say so, not "done"
            raise CommandError(
                f"{counted(left, 'cell')} could not be sent: the broker refused or could not be reached. "
                "They stay queued; run this again once it is back (the worker's sweeper also retries)."
            )
