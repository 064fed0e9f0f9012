"""Faults and load against real processes. Each test prints its figure (run with -s to see them)."""

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from django.db import connection
from PIL import Image

from diagnosis.models import Analysis
from tests.conftest import ROOT, WorkerProcess, database_url, fixture_cells, free_port, wait_for
from tests.factories import PASSWORD, api_key

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def big_cell_png(side: int = 2400) -> bytes:
    """A real cell scaled up: decoding and overlay rendering at this size keep a task busy for seconds."""
    cell = Image.open(fixture_cells()[0]).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    cell.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def done_events(*logs: Path) -> list[str]:
    return [m for log in logs for m in re.findall(r"event=done analysis_id=(\d+)", log.read_text(errors="replace"))]


def wait_until_logged(count: int, *logs: Path) -> None:
    """The worker logs ``done`` just after committing it: let those lines land before stopping it or reading them."""
    wait_for(lambda: len(set(done_events(*logs))) >= count, timeout=15, interval=0.1)


def test_worker_killed_mid_task_loses_nothing_and_records_once(without_session_worker, user, media_root, tmp_path):
    from malaria_site.celery import app

    app.control.purge()
    fast_sweeper = {"ANALYSIS_STALE_SECONDS": "6", "SWEEP_INTERVAL_SECONDS": "2"}
    first = WorkerProcess(media_root, tmp_path / "first.log").start()
    client_token = api_key(user)
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {client_token}")
    content = big_cell_png()
    files = [io.BytesIO(content) for _ in range(6)]
    for index, handle in enumerate(files):
        handle.name = f"big-{index}.png"
    assert api.post("/api/batches/", {"images": files}).status_code == 202

    wait_for(lambda: Analysis.objects.filter(status="running").exists(), timeout=60, interval=0.05)
    first.stop(sig=signal.SIGKILL)  # the whole worker, mid-task
    running_when_killed = Analysis.objects.filter(status="running").count()
    assert running_when_killed > 0

    second = WorkerProcess(media_root, tmp_path / "second.log", extra_env=fast_sweeper, beat=True).start()
    try:
        started = time.monotonic()
        try:
            wait_for(lambda: Analysis.objects.filter(status="done").count() == 6, timeout=180)
        except AssertionError as timed_out:  # say where recovery stalled: a bare timeout told nothing
            states = list(Analysis.objects.values_list("pk", "status", "attempts"))
            log = (tmp_path / "second.log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"{timed_out}; (id, status, attempts): {states}\nsecond worker:\n{log}") from None
        recovery = time.monotonic() - started
        wait_until_logged(6, tmp_path / "first.log", tmp_path / "second.log")
    finally:
        second.stop()
    events = done_events(tmp_path / "first.log", tmp_path / "second.log")
    ids = [str(pk) for pk in Analysis.objects.values_list("pk", flat=True)]
    assert sorted(events) == sorted(ids), "every analysis recorded exactly once"
    assert Analysis.objects.filter(attempts__gte=2).exists()
    print(
        f"\n[worker kill -9] {running_when_killed} running when killed; all 6 done {recovery:.1f}s after restart; "
        f"{len(events)} results recorded for 6 analyses"
    )


@contextmanager
def redis_server(port: int):
    """A private, non-persistent Redis to play the broker: killing it loses every message in it."""
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), timeout=20, interval=0.1)
        yield redis
    finally:
        redis.kill()
        redis.wait(timeout=20)


@contextmanager
def web_server(media_root: Path, broker_env: dict, log_path: Path):
    """The site in its own process, so its uploads enqueue on the private broker; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        **broker_env,
        "DATABASE_URL": database_url(),
        "MEDIA_ROOT": str(media_root),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    with open(log_path, "wb") as web_log:  # the child keeps its own descriptor
        web = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=web_log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _reachable(base), timeout=60)
        yield base
    finally:
        web.terminate()
        web.wait(timeout=20)


def private_broker_env(port: int, *, stale_seconds: int) -> dict:
    """A broker of its own, which is also the server's cache, as REDIS_URL makes one Redis both."""
    return {
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "TEST_REDIS_CACHE_URL": f"redis://127.0.0.1:{port}/1",
        "ANALYSIS_STALE_SECONDS": str(stale_seconds),
        "SWEEP_INTERVAL_SECONDS": "2",
    }


def signing_in_works(base: str, user) -> bool:
    """A token from the API and a session from the sign-in page: both count failures in the cache."""
    token = requests.post(f"{base}/api/auth/token/", data={"username": user.username, "password": PASSWORD}, timeout=30)
    browser = requests.Session()
    form = browser.get(f"{base}/accounts/login/", timeout=30).text
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)[1]
    signed_in = browser.post(
        f"{base}/accounts/login/",
        data={"username": user.username, "password": PASSWORD, "csrfmiddlewaretoken": csrf},
        headers={"Referer": f"{base}/accounts/login/"},
        allow_redirects=False,
        timeout=30,
    )
    return token.status_code == 200 and signed_in.status_code == 302


def test_while_redis_fails_the_lockout_still_counts_in_the_process(settings, user):
    """A Redis that refuses connections must neither refuse sign-ins nor stop counting guesses."""
    from django.core.cache import cache

    from diagnosis import login_throttle
    from malaria_site.cache import FallbackRedisCache, redis_cache

    settings.CACHES = {"default": redis_cache(f"redis://127.0.0.1:{free_port()}/0")}  # nothing listens
    settings.LOGIN_MAX_FAILURES = 3
    FallbackRedisCache.unreachable_until = 0.0
    FallbackRedisCache.in_memory.clear()
    try:
        request = SimpleNamespace(META={"REMOTE_ADDR": "198.51.100.4"}, get_signed_cookie=lambda *a, **k: "")
        for _ in range(3):  # each attempt counted, its password wrong
            assert login_throttle.admit(request, user.username)
        assert not login_throttle.admit(request, user.username)
        assert cache.get("anything", "default") == "default"
        assert FallbackRedisCache.unreachable_until > time.monotonic()  # not asked again for a while
    finally:
        FallbackRedisCache.unreachable_until = 0.0
        FallbackRedisCache.in_memory.clear()


needs_redis_server = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server as the broker")


@needs_redis_server
def test_counts_kept_in_memory_while_redis_failed_do_not_outlive_a_sign_in(settings, user):
    """Redis fails, a typo is counted in memory, Redis is back and the user signs in (clearing the
    count): at the next failure of Redis that old count must not come back to lock them out."""
    from django.core.cache import cache

    from diagnosis import login_throttle
    from malaria_site.cache import FallbackRedisCache, redis_cache

    port = free_port()
    settings.CACHES = {"default": redis_cache(f"redis://127.0.0.1:{port}/0")}
    settings.LOGIN_MAX_FAILURES = 2
    request = SimpleNamespace(META={"REMOTE_ADDR": "198.51.100.5"}, get_signed_cookie=lambda *a, **k: "")
    FallbackRedisCache.in_memory.clear()
    try:
        FallbackRedisCache.unreachable_until = 0.0
        login_throttle.admit(request, user.username)  # a typo; nothing listens yet: counted in memory
        with redis_server(port):
            FallbackRedisCache.unreachable_until = 0.0  # its 5 s are up
            assert login_throttle.admit(request, user.username)
            login_throttle.signed_in(request, user.username)
            cache.set("default-expiry", 1)
            assert 0 < redis_ttl(port, cache.make_key("default-expiry")) <= 300, "Django's default, not never"
        FallbackRedisCache.unreachable_until = time.monotonic() + 60  # failing again
        login_throttle.admit(request, user.username)  # a typo
        assert login_throttle.admit(request, user.username), "one typo since signing in"
    finally:
        FallbackRedisCache.unreachable_until = 0.0
        FallbackRedisCache.in_memory.clear()


def redis_ttl(port: int, key: str) -> int:
    import redis

    return redis.Redis(port=port).ttl(key)


@needs_redis_server
def test_uploads_while_the_broker_is_down_are_kept_and_finished_later(transactional_db, user, media_root, tmp_path):
    port = free_port()
    broker = private_broker_env(port, stale_seconds=600)
    with web_server(media_root, broker, tmp_path / "web.log") as base:
        headers = {"Authorization": f"Token {api_key(user)}"}
        cells = fixture_cells()
        started = time.monotonic()
        statuses = [
            requests.post(
                f"{base}/api/analyses/",
                headers=headers,
                timeout=60,
                files={"image": (cell.name, cell.read_bytes(), "image/png")},
            ).status_code
            for cell in cells
        ]
        upload_seconds = (time.monotonic() - started) / len(cells)
        assert statuses == [202] * len(cells)
        assert Analysis.objects.filter(status="queued", enqueued_at__isnull=True).count() == len(cells)
        assert signing_in_works(base, user), "the cache is down with the broker: nothing is counted, no one refused"

        with redis_server(port):
            worker = WorkerProcess(media_root, tmp_path / "worker.log", extra_env=broker, beat=True).start()
            try:
                wait_for(lambda: Analysis.objects.filter(status="done").count() == len(cells), timeout=120)
            finally:
                worker.stop()
    print(
        f"\n[broker down] {len(cells)}/{len(cells)} uploads accepted with the broker down "
        f"({upload_seconds:.2f}s each), all finished after it came back; 0 lost"
    )


@contextmanager
def stalled_broker(port: int):
    """A broker address that takes connections and never answers: a Redis that is paused or
    swapping, or a network that drops its packets."""
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    held, stop = [], threading.Event()

    def hold_connections():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    holder = threading.Thread(target=hold_connections, daemon=True)
    holder.start()
    try:
        yield
    finally:
        stop.set()
        holder.join()
        for connection_ in held:
            connection_.close()
        listener.close()


GUNICORN_TIMEOUT = (
    60  # deploy/gunicorn.conf.py's default: past it gunicorn kills the worker, and the upload has no answer
)


def test_an_upload_while_the_broker_stalls_is_answered_and_kept(transactional_db, user, media_root, tmp_path):
    port = free_port()
    with (
        stalled_broker(port),
        web_server(media_root, private_broker_env(port, stale_seconds=600), tmp_path / "web.log") as base,
    ):
        cell = fixture_cells()[0]
        started = time.monotonic()
        try:
            response = requests.post(
                f"{base}/api/analyses/",
                headers={"Authorization": f"Token {api_key(user)}"},
                timeout=GUNICORN_TIMEOUT,  # in production an answer after that would be no answer
                files={"image": (cell.name, cell.read_bytes(), "image/png")},
            )
        except requests.Timeout:
            pytest.fail(f"the upload had no answer within gunicorn's {GUNICORN_TIMEOUT} s: it waits on the broker")
        waited = time.monotonic() - started
        started = time.monotonic()
        assert signing_in_works(base, user), "the cache stalls with the broker: sign-in must not wait on it"
        signing_in = time.monotonic() - started
    assert response.status_code == 202, response.text
    analysis = Analysis.objects.get()
    assert analysis.status == "queued" and analysis.enqueued_at is None  # the sweeper sends it later
    assert (media_root / analysis.image.name).is_file()
    log = (tmp_path / "web.log").read_text(errors="replace")
    assert f"event=enqueue_failed analysis_ids={analysis.pk}" in log, "the enqueue gave the broker up" + log[-3000:]
    print(
        f"\n[broker stalls] the upload was answered in {waited:.1f}s and kept for the sweeper; "
        f"signing in took {signing_in:.1f}s"
    )


@needs_redis_server
def test_broker_lost_mid_task_loses_nothing_and_records_once(transactional_db, user, media_root, tmp_path):
    """Redis dies with queued messages in it while a task runs; it comes back empty."""
    port = free_port()
    broker = private_broker_env(port, stale_seconds=10)
    count = 6
    with web_server(media_root, broker, tmp_path / "web.log") as base, redis_server(port) as redis:
        worker = WorkerProcess(media_root, tmp_path / "worker.log", extra_env=broker, beat=True).start()
        try:
            content, token = big_cell_png(), api_key(user)
            for index in range(count):  # one task message each, so most wait in the broker
                response = requests.post(
                    f"{base}/api/analyses/",
                    headers={"Authorization": f"Token {token}"},
                    files={"image": (f"big-{index}.png", content, "image/png")},
                    timeout=120,
                )
                assert response.status_code == 202, response.text
            wait_for(lambda: Analysis.objects.filter(status="running").exists(), timeout=60, interval=0.05)
            redis.kill()  # mid-task, with the rest of the batch's messages still in the broker
            redis.wait(timeout=20)
            waiting_when_lost = Analysis.objects.exclude(status="done").count()
            time.sleep(3)
            with redis_server(port):
                started = time.monotonic()
                wait_for(lambda: Analysis.objects.filter(status="done").count() == count, timeout=240)
                recovery = time.monotonic() - started
                wait_until_logged(count, tmp_path / "worker.log")
        finally:
            worker.stop()
    events = done_events(tmp_path / "worker.log")
    ids = [str(pk) for pk in Analysis.objects.values_list("pk", flat=True)]
    assert sorted(events) == sorted(ids), "every analysis recorded exactly once"
    assert waiting_when_lost > 1
    assert "event=requeue" in (tmp_path / "worker.log").read_text(), "the lost messages were sent again"
    print(
        f"\n[broker lost] Redis killed mid-task with {waiting_when_lost} of {count} not done; "
        f"all {count} done {recovery:.1f}s after it came back empty; {len(events)} results recorded"
    )


def _reachable(base: str) -> bool:
    try:
        return requests.get(f"{base}/accounts/login/", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_load_ten_clients_three_hundred_images(celery_worker_process, live_server, user):
    token = api_key(user)
    cells = [(p.name, p.read_bytes()) for p in fixture_cells()]
    clients, batches_per_client, batch_size = 10, 3, 10
    errors: list[str] = []

    def client(index: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {token}"
        for b in range(batches_per_client):
            files = [
                ("images", (f"c{index}-b{b}-{i}-{cells[i % 4][0]}", cells[i % 4][1], "image/png"))
                for i in range(batch_size)
            ]
            response = session.post(f"{live_server.url}/api/batches/", files=files, timeout=120)
            if response.status_code != 202:
                errors.append(f"{response.status_code} {response.text[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = clients * batches_per_client * batch_size
    assert not errors
    wait_for(lambda: Analysis.objects.filter(status="done").count() == total, timeout=600, interval=1)
    wall = time.monotonic() - started
    wait_until_logged(total, celery_worker_process.log_path)
    assert Analysis.objects.count() == total
    assert Analysis.objects.filter(status="done", overlay="").count() == 0
    recorded = done_events(celery_worker_process.log_path)
    assert len(recorded) - len(set(recorded)) == 0, "no analysis recorded twice"
    print(
        f"\n[load] {clients} clients, {total} images: {total}/{total} done, 0 lost, 0 duplicated, "
        f"{wall:.1f}s wall, {total / wall:.1f} images/s"
    )


@pytest.mark.skipif("sqlite" in os.environ.get("DATABASE_URL", "sqlite"), reason="PostgreSQL only (CI)")
def test_database_connection_dropped_mid_task_is_retried(celery_worker_process, user):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(user)
    files = []
    for index in range(4):
        handle = io.BytesIO(big_cell_png())
        handle.name = f"big-{index}.png"
        files.append(handle)
    assert api.post("/api/batches/", {"images": files}).status_code == 202
    wait_for(lambda: Analysis.objects.filter(status="running").exists(), timeout=60, interval=0.05)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        dropped = cursor.fetchone()[0]
    assert dropped >= 1, "the worker's connection was to be cut while it worked"
    wait_for(lambda: Analysis.objects.filter(status="done").count() == 4, timeout=180)
    log = celery_worker_process.log_path.read_text(errors="replace")
    print(
        f"\n[db drop] {dropped} worker connection(s) terminated mid-task; 4/4 done; "
        f"retries logged: {log.count('Retry in')}"
    )


def test_a_database_outage_shorter_than_the_sweepers_wait_is_left_to_the_task(settings):
    """The task retries a database error for longer than the sweeper waits for a cell that has
    stopped: with 8 jittered retries it gave up after a minute or two of a PostgreSQL restart and
    left its cells "running", until the sweeper took them as a worker crash."""
    from celery.utils.time import get_exponential_backoff_interval

    from diagnosis.tasks import analyse_images as task

    assert task.retry_jitter is False  # each pause as long as written, not 0 to that
    pauses = [
        get_exponential_backoff_interval(task.retry_backoff, retries, task.retry_backoff_max, full_jitter=False)
        for retries in range(task.max_retries)
    ]
    assert sum(pauses) > settings.ANALYSIS_STALE_SECONDS, pauses


def test_the_worker_reconnects_to_its_broker_however_long_it_is_down():
    """Celery's default gave up after 100 tries (some 47 minutes of a Redis outage): the worker
    exited, and under scripts/start the web server with it. kombu reads None as "for ever"."""
    from malaria_site.celery import app

    assert app.conf.broker_connection_max_retries is None


@pytest.mark.skipif("sqlite" in os.environ.get("DATABASE_URL", "sqlite"), reason="PostgreSQL only (CI)")
@pytest.mark.django_db(transaction=True)
def test_a_kept_database_connection_lost_meanwhile_is_replaced_before_a_request_uses_it():
    """With DATABASE_CONN_MAX_AGE set, a web process keeps its connection between requests; after
    PostgreSQL restarted, its first request failed on the lost one (a 500) unless it is tried first.
    (Django's test client leaves out what each request starts with, close_old_connections: so
    called here as a real request would call it.)"""
    import psycopg
    from django.db import close_old_connections

    connection.close()
    connection.settings_dict["CONN_MAX_AGE"] = 600
    try:
        connection.ensure_connection()
        backend = connection.connection.info.backend_pid
        with psycopg.connect(database_url(), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", [backend])
        close_old_connections()  # the next request starts
        assert Analysis.objects.count() == 0
        assert connection.connection.info.backend_pid != backend
    finally:
        connection.close()
        connection.settings_dict["CONN_MAX_AGE"] = 0
