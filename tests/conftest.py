import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient

from tests.browser import browser, open_page  # noqa: F401 - the browser tests' fixtures
from tests.every_test_runs import (  # noqa: F401 - the hooks that make a skip fail under .ci/run
    pytest_collectreport,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from tests.factories import PASSWORD, UserFactory, api_key

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_CELLS = Path(__file__).parent / "fixtures" / "cells"


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    media = tmp_path_factory.mktemp("media")
    (media / "incoming").mkdir()
    return media


@pytest.fixture(autouse=True)
def _private_media(settings, media_root):
    settings.MEDIA_ROOT = str(media_root)
    settings.FILE_UPLOAD_TEMP_DIR = str(media_root / "incoming")  # large test uploads spool there too


@pytest.fixture(autouse=True)
def _private_var_dir(settings, tmp_path_factory):
    """The checkout's var/ belongs to a platform that may be running from it: a test warming the
    model up in this process replaced its worker's marker (WorkerProcess gives workers one of their own)."""
    settings.VAR_DIR = tmp_path_factory.getbasetemp() / "var"
    settings.VAR_DIR.mkdir(exist_ok=True)


@pytest.fixture(autouse=True)
def _fresh_counters():
    """Throttle and login-failure counters live in the (local-memory) cache: each test starts at zero."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


@pytest.fixture
def api_client(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def admin_client(client, admin_user):
    """pytest-django's, which also names its superuser: ``admin_client.admin``."""
    client.force_login(admin_user)
    client.admin = admin_user
    return client


@pytest.fixture
def lab(user) -> APIClient:
    """The user's lab system: the API with the user's key, as a lab system sends it."""
    return APIClient(HTTP_AUTHORIZATION=f"Token {api_key(user)}")


@pytest.fixture
def not_analysed(monkeypatch):
    """Uploads stay queued, and off the broker: these tests are about the pages, not the worker
    (some finish cells themselves, as the worker would)."""
    from diagnosis import services

    monkeypatch.setattr(services, "enqueue_analyses", lambda **kwargs: None)


@pytest.fixture
def web_client(client, user):
    client.login(username=user.username, password=PASSWORD)
    return client


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixture_cells() -> list[Path]:
    return sorted(FIXTURE_CELLS.glob("*/*.png"))


def stored_files(media_root: Path) -> list[Path]:
    return [p for p in media_root.rglob("*") if p.is_file()]


def database_url() -> str:
    """URL of the test database pytest-django created, for processes outside this one."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER']}:{db.get('PASSWORD') or ''}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"


class WorkerProcess:
    """A real `celery worker` subprocess consuming the configured broker and the test database.
    Its VAR_DIR (where it writes its model marker) is a folder beside its log: the checkout's var/
    belongs to a platform that may be running from it."""

    def __init__(self, media_root: Path, log_path: Path, extra_env: dict | None = None, beat: bool = False):
        self.media_root, self.log_path, self.extra_env = media_root, log_path, extra_env or {}
        self.var_dir = log_path.with_name(f"{log_path.stem}-var")
        self.beat = beat
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None

    def start(self) -> "WorkerProcess":
        self.var_dir.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "MEDIA_ROOT": str(self.media_root),
            "VAR_DIR": str(self.var_dir),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            **self.extra_env,
        }
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "malaria_site",
            "worker",
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if self.beat:  # the stale-analysis sweeper, in the worker here (scripts/start runs beat on its own)
            command += ["--beat", "--schedule", str(self.log_path.with_suffix(".beat"))]
        already_logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.started_at = time.time()
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(already_logged)
        return self

    def _wait_ready(self, offset: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()[-3000:]}")
            if b" ready." in self.log_path.read_bytes()[offset:]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = 15) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


# The session worker takes from queues of its own, and a test's tasks go there only while it holds
# ``celery_worker_process``. Every other test's go to the settings' queues ("tests" and
# "tests-housekeeping"), which no worker takes from but those a test starts itself after
# ``without_session_worker`` has emptied them: a worker started for one test never analyses the
# cells that a later transactional or live-server test commits.
SESSION_WORKER_QUEUE = "tests-session-worker"


def default_queues() -> list[str]:
    """The queues every test's tasks go to unless it asked for the session worker."""
    return [settings.CELERY_TASK_DEFAULT_QUEUE, settings.HOUSEKEEPING_QUEUE]


def session_worker_queues() -> list[str]:
    """The session worker's, named as the settings name them from its CELERY_QUEUE."""
    return [SESSION_WORKER_QUEUE, f"{SESSION_WORKER_QUEUE}-housekeeping"]


def purge_queues(names: list[str]) -> None:
    from malaria_site.celery import app

    with app.connection_for_write() as connection:
        for name in names:
            connection.default_channel.queue_purge(name)


def queued_messages(name: str) -> int:
    """How many messages wait in the queue (declaring it, so an empty one reads 0 on any broker)."""
    from malaria_site.celery import app

    with app.connection_for_write() as connection:
        return connection.default_channel.queue_declare(queue=name).message_count


@pytest.fixture
def tasks_to_the_session_worker(monkeypatch):
    """Sends this test's tasks to the session worker's queues for its duration (the router is the
    process's: the live server's threads send there too); a task naming a queue of its own keeps it."""
    from malaria_site.celery import app

    router = app.amqp.router
    moved = dict(zip(default_queues(), session_worker_queues(), strict=True))
    route = router.route

    def to_the_session_worker(*args, **kwargs):
        options = route(*args, **kwargs)
        if options["queue"].name in moved:
            options["queue"] = app.amqp.queues[moved[options["queue"].name]]
        return options

    monkeypatch.setattr(router, "route", to_the_session_worker)


@pytest.fixture(scope="session")
def _session_worker(django_db_setup, media_root, tmp_path_factory):
    purge_queues(session_worker_queues())  # a previous run's leftovers must not reach this run's database
    worker = WorkerProcess(
        media_root,
        tmp_path_factory.mktemp("worker") / "worker.log",
        extra_env={"TEST_CELERY_QUEUE": SESSION_WORKER_QUEUE},
    ).start()
    _SESSION_WORKERS.append(worker)
    yield worker
    worker.stop()


_SESSION_WORKERS: list[WorkerProcess] = []


@pytest.fixture
def without_session_worker(transactional_db):
    """For tests that run their own workers, on the settings' queues: those are emptied of the tasks
    earlier tests left there, and the shared worker is stopped (it holds a model and a CPU of the
    test's). ``celery_worker_process`` starts it again for the tests after."""
    for worker in _SESSION_WORKERS:
        worker.stop()
    purge_queues(default_queues())


@pytest.fixture
def celery_worker_process(_session_worker, transactional_db, tasks_to_the_session_worker) -> WorkerProcess:
    """One worker for the whole session (starting one loads torch); tests get committed data, and
    their tasks reach it. What the test leaves queued is dropped when it ends, not analysed during the next."""
    if _session_worker.process.poll() is not None:
        _session_worker.start()
    yield _session_worker
    purge_queues(session_worker_queues())


def someone_waits_on_a_lock() -> bool:
    """Whether another connection to this (PostgreSQL) database is blocked on a lock now. Asked over
    this thread's connection, also from inside a transaction: the activity table is read afresh."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees its first reading again
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        return bool(cursor.fetchone()[0])


def wait_for(predicate, timeout: float = 90, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def login_password() -> str:
    return PASSWORD
