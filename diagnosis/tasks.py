from datetime import timedelta
from importlib import import_module

from celery import shared_task
from celery.signals import worker_process_init
from django.conf import settings
from django.db import InterfaceError, OperationalError

from diagnosis import callbacks, services


# The web processes import this module to send tasks: the model (torch) is loaded by the worker only.
@worker_process_init.connect
def warm_up_model(**kwargs) -> None:
    from diagnosis import inference

    inference.warm_up()


@shared_task(
    bind=True,
    acks_late=True,
    autoretry_for=(OperationalError, InterfaceError, ConnectionError),
    # 2, 4, 8 ... 60 s apart, 11 minutes in all: longer than the sweeper waits for a cell that has
    # stopped (ANALYSIS_STALE_SECONDS), so a database back within that finds the task still trying.
    # With 8 jittered retries, the task gave up after a minute or two and left its cells "running"
    # for the sweeper, which counted the outage as a worker crash.
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=False,
    max_retries=15,
)
def analyse_images(self, analysis_ids: list[int]) -> None:
    from diagnosis import inference

    inference.run_analyses(analysis_ids=analysis_ids, task_id=self.request.id, retries=self.request.retries)
    callbacks.notify_finished_batches(analysis_ids=analysis_ids)


@shared_task(ignore_result=True)
def deliver_batch_callback(batch_id: int) -> None:
    callbacks.deliver(batch_id=batch_id)


@shared_task(ignore_result=True)
def requeue_stale_analyses() -> int:
    requeued = services.requeue_stale_analyses()
    callbacks.requeue_due_callbacks()
    return requeued.sent


@shared_task(ignore_result=True)
def delete_expired_analyses() -> int:
    if settings.ANALYSIS_RETENTION_DAYS < 1:  # no retention period: keep everything
        return 0
    return services.delete_expired_analyses(older_than=timedelta(days=settings.ANALYSIS_RETENTION_DAYS))


# Far longer than storing the largest batch takes, so no upload still under way loses a file.
ORPHAN_AGE_HOURS = 6


@shared_task(ignore_result=True)
def delete_orphaned_files() -> int:
    return services.delete_orphaned_files(older_than=timedelta(hours=ORPHAN_AGE_HOURS))


@shared_task(ignore_result=True)
def clear_expired_sessions() -> None:
    """Sign-ins that ended stay as rows (the database session store never removes them), each with
    its user's id and the batches its forms made, until this removes them, as `clearsessions` does."""
    import_module(settings.SESSION_ENGINE).SessionStore.clear_expired()
