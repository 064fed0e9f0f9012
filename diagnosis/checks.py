"""Settings that work one by one but not together: `manage.py check` (and every deploy) says so."""

from django.conf import settings
from django.core.checks import Warning, register


@register()
def sweeper_waits_longer_than_a_task_may_run(app_configs, **kwargs) -> list[Warning]:
    if settings.ANALYSIS_STALE_SECONDS > settings.CELERY_TASK_TIME_LIMIT:
        return []
    return [
        Warning(
            f"ANALYSIS_STALE_SECONDS ({settings.ANALYSIS_STALE_SECONDS}) is not longer than a task may run "
            f"(CELERY_TASK_TIME_LIMIT, {settings.CELERY_TASK_TIME_LIMIT}).",
            hint="The sweeper would send analyses that a worker is still running to a second worker. "
            "Raise ANALYSIS_STALE_SECONDS or lower CELERY_TASK_SOFT_TIME_LIMIT.",
            id="diagnosis.W001",
        )
    ]
