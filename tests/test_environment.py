import os

import pytest
from django.conf import settings
from django.db import connection


@pytest.mark.skipif(not os.environ.get("REQUIRE_REAL_SERVICES"), reason="only .ci/run demands PostgreSQL and Redis")
def test_ci_runs_against_real_postgresql_and_redis(db):
    assert connection.vendor == "postgresql"
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    from malaria_site.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
