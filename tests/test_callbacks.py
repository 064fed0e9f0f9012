"""Batch callbacks: the results are POSTed, signed, to an allowed lab-system URL once every cell is
finished; failures pause and retry, then give up; nothing else can be made to call out."""

import hashlib
import hmac
import json
import re
import socket
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.db.models import F
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis import callbacks, services
from diagnosis.models import AccessEvent, Analysis, Batch, private_storage
from malaria_site.celery import app as celery_app
from tests.conftest import fixture_cells, wait_for
from tests.factories import upload

State = Batch.CallbackState


@pytest.fixture
def receiver():
    """A lab system's endpoint on this machine: records each POST, answers with queued codes (else 200)."""
    received, answers = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(SimpleNamespace(path=self.path, headers=dict(self.headers), body=body))
            code = answers.pop(0) if answers else 200
            self.send_response(code)
            if code in (301, 302, 307):
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/results", received=received, answers=answers)
    server.shutdown()
    server.server_close()


def finished_batch(user, url: str) -> Batch:
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], callback_url=url)
    batch.analyses.update(status=Analysis.Status.DONE, label="Uninfected", probability_parasitized=0.02)
    return batch


def refreshed(batch: Batch) -> Batch:
    batch.refresh_from_db()
    return batch


def make_due(batch: Batch) -> None:
    Batch.objects.filter(pk=batch.pk).update(callback_due_at=timezone.now() - timedelta(seconds=1))


@pytest.mark.worker
@pytest.mark.slow
def test_the_worker_posts_a_signed_result_when_the_last_cell_is_finished(celery_worker_process, user, receiver):
    api = APIClient()
    api.force_authenticate(user)
    cells = fixture_cells()[:3]
    handles = [open(path, "rb") for path in cells]  # noqa: SIM115 - closed below
    try:
        created = api.post(
            "/api/batches/", {"images": handles, "sample_reference": "WARD-2", "callback_url": receiver.url}
        )
    finally:
        for handle in handles:
            handle.close()
    assert created.status_code == 202 and created.json()["callback_state"] == "pending", created.content
    batch_id = created.json()["id"]

    wait_for(lambda: receiver.received, timeout=120)
    (call,) = receiver.received
    assert call.path == "/results" and call.headers["X-Malaria-Batch"] == str(batch_id)
    expected = "sha256=" + hmac.new(settings.CALLBACK_SECRET.encode(), call.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(call.headers["X-Malaria-Signature"], expected)

    payload = json.loads(call.body)["batch"]
    analyses = {a.pk: a for a in Analysis.objects.filter(batch_id=batch_id)}
    assert payload["id"] == batch_id and payload["sample_reference"] == "WARD-2"
    assert payload["counts"]["total"] == 3 and payload["counts"]["done"] == 3
    assert {a["id"]: (a["status"], a["label"]) for a in payload["analyses"]} == {
        pk: ("done", a.label) for pk, a in analyses.items()
    }
    shown = wait_for(lambda: (b := api.get(f"/api/batches/{batch_id}/").json())["callback_state"] == "delivered" and b)
    assert shown["callback_attempts"] == 1 and shown["callback_delivered_at"]


@pytest.mark.parametrize(
    "url",
    [
        "https://lis01/results",
        "https://lab_lis.ward-3:8443/in",
        "https://LIS01/x",
        "https://lis02:8443/in",  # the one port allowed of it
        "https://lis03/in",  # 443, as allowed
        "https://[2001:db8::7]:8443/in",
        "https://[2001:db8::1:8443]/in",  # an IPv6 address, any port
    ],
)
def test_a_hospital_host_name_without_a_domain_is_a_callback_url_where_allowed(settings, api_client, url):
    """An entry names a host (any port of it) or host:port: an allowed host's other services (its
    mail server's 25, say) cannot be called, nor probed by the errors an attempt reports."""
    settings.CALLBACK_ALLOWED_HOSTS = [
        "lis01",
        "lab_lis.ward-3",
        "lis02:8443",
        "lis03:443",
        "[2001:db8::7]:8443",
        "2001:db8::1:8443",
        "lis04:²",  # a mistyped entry spoils no other
    ]
    response = api_client.post("/api/batches/", {"images": [upload()], "callback_url": url})
    assert response.status_code == 202, response.content
    assert response.json()["callback_url"] == url


@pytest.mark.parametrize(
    ("allowed", "url", "message"),
    [
        ([], "http://127.0.0.1/x", "not enabled on this server"),
        (["127.0.0.1"], "http://10.0.0.5/x", "may not call 10.0.0.5"),
        (["127.0.0.1"], "ftp://127.0.0.1/x", "must be an http or https URL"),
        (["127.0.0.1"], "not a url", "must be an http or https URL"),
        (["127.0.0.1"], "http://lis:s3cret@127.0.0.1/x", "must not carry a user name or password"),
        (["127.0.0.1"], "http://127.0.0.1:99999/x", "not a port number"),
        (["127.0.0.1"], "http://127.0.0.1:0/x", "not a port number"),
        (["127.0.0.1", "plain-http"], "http://127.0.0.1/x", "must be https"),
        (["127.0.0.1"], "http://127.0.0.1/ergebnisse/prüfung", "percent-encode"),
        (["127.0.0.1"], "http://127.0.0.1/results/ward 3", "spaces or control characters"),
        (["127.0.0.1"], "http://127.0.0.1/results\r\nX-Injected: 1", "spaces or control characters"),
        (["127.0.0.1"], "http://127.0.0.1/results\tx\x7f", "spaces or control characters"),
        (["lis01:8443"], "https://lis01:25/x", "may not call lis01 on this port"),  # its mail server
        (["lis01:8443"], "https://lis01/x", "may not call lis01 on this port"),
        (["[2001:db8::7]:8443"], "https://[2001:db8::7]:8080/x", "may not call 2001:db8::7 on this port"),
        (["lis01:²", "lis01:8443①"], "https://lis01/x", "may not call lis01"),  # a typo, no 500 (int() refused it)
    ],
)
def test_a_callback_url_this_server_may_not_call_is_refused_and_nothing_is_stored(
    settings, api_client, allowed, url, message
):
    settings.CALLBACK_ALLOW_HTTP = "plain-http" not in allowed
    settings.CALLBACK_ALLOWED_HOSTS = allowed
    response = api_client.post("/api/batches/", {"images": [upload()], "callback_url": url})
    assert response.status_code == 400 and message in response.json()["detail"]
    assert not Batch.objects.exists()


def test_a_failed_attempt_pauses_then_the_next_one_delivers_once(user, receiver):
    batch = finished_batch(user, receiver.url)
    receiver.answers.append(500)
    assert not callbacks.deliver(batch_id=batch.pk)
    failed = refreshed(batch)
    assert (failed.callback_state, failed.callback_attempts) == (State.PENDING, 1)
    assert "HTTP 500" in failed.callback_error
    pause = failed.callback_due_at - timezone.now()
    assert timedelta(seconds=50) < pause <= callbacks.retry_pause(1)

    assert not callbacks.deliver(batch_id=batch.pk)  # still pausing: no request
    assert len(receiver.received) == 1
    make_due(batch)
    assert callbacks.deliver(batch_id=batch.pk)
    assert not callbacks.deliver(batch_id=batch.pk)  # a redelivered task: already done
    delivered = refreshed(batch)
    assert (delivered.callback_state, delivered.callback_attempts, delivered.callback_error) == (State.DELIVERED, 2, "")
    assert len(receiver.received) == 2


def test_many_failed_attempts_pause_at_most_an_hour_and_still_end(settings, user, receiver):
    """Doubling the pause without a cap overflowed a timedelta past attempt 32: the attempt raised
    before it was recorded, so the callback was tried again for ever."""
    settings.CALLBACK_MAX_ATTEMPTS = 40
    batch = finished_batch(user, receiver.url)
    Batch.objects.filter(pk=batch.pk).update(callback_attempts=35)
    receiver.answers.append(500)
    assert not callbacks.deliver(batch_id=batch.pk)
    failed = refreshed(batch)
    assert (failed.callback_state, failed.callback_attempts) == (State.PENDING, 36)
    assert timedelta(minutes=59) < failed.callback_due_at - timezone.now() <= timedelta(hours=1)
    Batch.objects.filter(pk=batch.pk).update(callback_attempts=39)
    make_due(batch)
    receiver.answers.append(500)
    assert not callbacks.deliver(batch_id=batch.pk)
    assert refreshed(batch).callback_state == State.FAILED


def test_results_the_receiver_took_are_in_the_access_trail_whatever_it_answered(user, receiver):
    batch = finished_batch(user, receiver.url)
    receiver.answers.append(500)  # it may have stored them before it failed: they left this server
    assert not callbacks.deliver(batch_id=batch.pk)
    (disclosure,) = AccessEvent.objects.all()
    host = receiver.url.split("/")[2]
    assert (disclosure.action, disclosure.batch_id, disclosure.owner_id) == ("exported", batch.pk, user.pk)
    assert disclosure.detail == f"results POSTed to {host}; the receiver answered HTTP 500"


def test_the_batch_page_says_where_the_results_go_and_whether_they_arrived(client, user, receiver):
    batch = finished_batch(user, receiver.url)
    client.force_login(user)
    host = receiver.url.split("/")[2]
    page = lambda: client.get(f"/batches/{batch.pk}/").content.decode()  # noqa: E731
    assert f"Results for the lab system ({host})" in page() and "sent once every cell is finished" in page()
    receiver.answers.append(503)
    callbacks.deliver(batch_id=batch.pk)
    assert "attempt 1 failed (the receiver answered HTTP 503); trying again" in page()
    make_due(batch)
    callbacks.deliver(batch_id=batch.pk)
    assert f"sent {timezone.localtime(refreshed(batch).callback_delivered_at):%Y-%m-%d %H:%M}" in page()
    Batch.objects.filter(pk=batch.pk).update(callback_url=receiver.url.replace("//", "//lis:s3cret@"))
    assert f"Results for the lab system ({host})" in page() and "s3cret" not in page()
    plain = services.create_batch(owner=user, uploads=[upload()])
    assert "Results for the lab system" not in client.get(f"/batches/{plain.pk}/").content.decode()


def test_nothing_is_sent_while_a_cell_is_unfinished(user, receiver):
    batch = finished_batch(user, receiver.url)
    batch.analyses.filter(original_filename="b.png").update(status=Analysis.Status.RUNNING)
    assert not callbacks.deliver(batch_id=batch.pk)
    assert receiver.received == [] and refreshed(batch).callback_attempts == 0


def test_redirects_are_not_followed_and_it_gives_up_after_the_last_attempt(settings, client, user, receiver):
    settings.CALLBACK_MAX_ATTEMPTS = 2
    batch = finished_batch(user, receiver.url)
    receiver.answers.extend([302, 302])
    assert not callbacks.deliver(batch_id=batch.pk)
    make_due(batch)
    assert not callbacks.deliver(batch_id=batch.pk)
    given_up = refreshed(batch)
    assert given_up.callback_state == State.FAILED and given_up.callback_due_at is None
    assert "HTTP 302" in given_up.callback_error and len(receiver.received) == 2
    make_due(batch)
    assert not callbacks.deliver(batch_id=batch.pk) and len(receiver.received) == 2
    client.force_login(user)
    assert "<strong>not delivered</strong> after 2 attempts" in client.get(f"/batches/{batch.pk}/").content.decode()


def test_an_unreachable_receiver_is_a_failed_attempt_with_the_reason(user):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    batch = finished_batch(user, f"http://127.0.0.1:{port}/results")
    assert not callbacks.deliver(batch_id=batch.pk)
    assert "ConnectionRefusedError" in refreshed(batch).callback_error
    assert not AccessEvent.objects.exists()  # the results never left: no disclosure to record


def attempted_on_a_service_that_answers(user, answer: bytes) -> Batch:
    """A batch whose one attempt went to a port of the allowed host where something other than an
    HTTP receiver listens: it reads the request and sends ``answer`` (b"": hangs up)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once():
        connection, _ = listener.accept()
        with connection:
            # The whole request first: closing with some of it unread resets the connection, which
            # the client reads as another failure (ConnectionResetError) than the one under test.
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += connection.recv(65536)
            connection.sendall(answer)

    threading.Thread(target=serve_once, daemon=True).start()
    batch = finished_batch(user, f"http://127.0.0.1:{listener.getsockname()[1]}/results")
    try:
        assert not callbacks.deliver(batch_id=batch.pk)
    finally:
        listener.close()
    return refreshed(batch)


def test_a_receiver_that_does_not_speak_http_is_a_failed_attempt_not_a_stuck_one(user):
    failed = attempted_on_a_service_that_answers(user, b"SSH-2.0-OpenSSH_9.6\r\n")
    assert (failed.callback_state, failed.callback_attempts) == (State.PENDING, 1)
    assert "BadStatusLine" in failed.callback_error and failed.callback_due_at > timezone.now()


def test_an_attempt_stopped_by_the_tasks_time_limit_is_a_failed_attempt_not_a_stuck_one(user, receiver, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    def trickling_receiver(*args, **kwargs):  # one byte every few seconds beats each read's timeout
        raise SoftTimeLimitExceeded()

    batch = finished_batch(user, receiver.url)
    monkeypatch.setattr(callbacks, "_post", trickling_receiver)
    assert not callbacks.deliver(batch_id=batch.pk)
    failed = refreshed(batch)
    assert (failed.callback_state, failed.callback_attempts) == (State.PENDING, 1)
    assert "SoftTimeLimitExceeded" in failed.callback_error and failed.callback_due_at > timezone.now()


def test_a_stored_url_http_cannot_send_fails_at_once_saying_why(user, receiver):
    batch = finished_batch(user, receiver.url)
    Batch.objects.filter(pk=batch.pk).update(callback_url=receiver.url + "/prüfung")  # stored before the check
    assert not callbacks.deliver(batch_id=batch.pk)
    failed = refreshed(batch)
    assert failed.callback_state == State.FAILED and "percent-encode" in failed.callback_error
    assert not receiver.received


def test_a_stored_url_with_a_space_fails_at_once_without_its_path_in_the_error(user, receiver):
    batch = finished_batch(user, receiver.url)
    stored = receiver.url + "/token=4f1c 9a"  # stored before the check: http.client would echo the path
    Batch.objects.filter(pk=batch.pk).update(callback_url=stored)
    assert not callbacks.deliver(batch_id=batch.pk)
    failed = refreshed(batch)
    assert failed.callback_state == State.FAILED and "spaces or control characters" in failed.callback_error
    assert "4f1c" not in failed.callback_error and not receiver.received


def test_a_reviewers_correction_is_sent_to_the_lab_system_again(
    user, receiver, monkeypatch, django_capture_on_commit_callbacks
):
    from django.contrib.auth import get_user_model

    batch = finished_batch(user, receiver.url)
    assert callbacks.deliver(batch_id=batch.pk)
    first = json.loads(receiver.received[0].body)["batch"]
    cell = batch.analyses.get(original_filename="a.png")
    reviewer = get_user_model().objects.create_superuser("microscopist", password="pw-for-tests-123")

    enqueued = []
    monkeypatch.setattr(callbacks, "_enqueue", enqueued.append)  # the worker's part is the delivery below
    with django_capture_on_commit_callbacks(execute=True):
        services.review_analysis(
            analysis=cell, reviewer=reviewer, verdict="disagree", corrected_label="Parasitized", replacing=None
        )
    assert enqueued == [batch.pk]
    assert refreshed(batch).callback_state == State.PENDING
    assert callbacks.deliver(batch_id=batch.pk)
    second = json.loads(receiver.received[1].body)["batch"]
    corrected = next(a for a in second["analyses"] if a["id"] == cell.pk)
    assert (corrected["final_label"], corrected["label"], corrected["review_verdict"]) == (
        "Parasitized",
        "Uninfected",
        "disagree",
    )
    assert second["results_as_of"] > first["results_as_of"]
    # As the API says it: a lab system that polls too reads one diagnosis under one name.
    api = APIClient()
    api.force_authenticate(user)
    polled = api.get(f"/api/batches/{batch.pk}/").json()
    assert (polled["results_as_of"], polled["created_at"]) == (second["results_as_of"], second["created_at"])
    assert polled["counts"] == second["counts"] and polled["counts"]["parasitized_percent"] == 50
    polled_cell = next(a for a in polled["analyses"] if a["id"] == cell.pk)
    assert {name: polled_cell[name] for name in corrected} == corrected


def test_the_sweeper_sends_a_callback_whose_enqueue_was_lost(user, receiver, monkeypatch):
    monkeypatch.setitem(celery_app.conf, "task_always_eager", True)  # the task runs here, on this database
    batch = finished_batch(user, receiver.url)
    assert callbacks.requeue_due_callbacks() == 1
    assert refreshed(batch).callback_state == State.DELIVERED and len(receiver.received) == 1
    assert callbacks.requeue_due_callbacks() == 0
    (disclosure,) = AccessEvent.objects.all()  # the access trail names where the results went
    assert (disclosure.action, disclosure.batch_id, disclosure.owner_id) == ("exported", batch.pk, user.pk)
    assert disclosure.detail == f"results POSTed to {receiver.url.split('/')[2]}" and disclosure.user is None


def test_a_failed_callback_can_be_retried_through_the_api_and_admin_and_nothing_else_can(
    user, receiver, monkeypatch, admin_client
):
    monkeypatch.setitem(celery_app.conf, "task_always_eager", True)  # the retried attempt runs here
    api = APIClient()
    api.force_authenticate(user)
    batch = finished_batch(user, receiver.url)
    refused = api.post(f"/api/batches/{batch.pk}/callback/retry/")
    assert refused.status_code == 409 and "this batch's is pending" in refused.json()["detail"]

    Batch.objects.filter(pk=batch.pk).update(callback_state=State.FAILED, callback_attempts=6, callback_error="x")
    retried = api.post(f"/api/batches/{batch.pk}/callback/retry/")
    assert retried.status_code == 202 and retried.json()["callback_state"] == "delivered"
    assert retried.json()["callback_attempts"] == 1 and len(receiver.received) == 1
    assert api.post(f"/api/batches/{batch.pk}/callback/retry/").status_code == 409  # delivered: nothing to do
    Batch.objects.filter(pk=batch.pk).update(callback_state=State.NONE)
    without = api.post(f"/api/batches/{batch.pk}/callback/retry/").json()["detail"]
    assert without == "Only a failed callback can be retried; this batch has no callback."
    Batch.objects.filter(pk=batch.pk).update(callback_state=State.DELIVERED)

    Batch.objects.filter(pk=batch.pk).update(callback_state=State.FAILED)
    response = admin_client.post(
        "/admin/diagnosis/batch/", {"action": "retry_callbacks", "_selected_action": [str(batch.pk)]}, follow=True
    )
    assert "1 failed callback(s) will be tried again." in response.content.decode()
    assert refreshed(batch).callback_state == State.DELIVERED and len(receiver.received) == 2


def test_callbacks_stay_off_without_a_signing_key_of_their_own(settings, api_client):
    settings.CALLBACK_SECRET = ""
    response = api_client.post("/api/batches/", {"images": [upload()], "callback_url": "http://127.0.0.1/x"})
    assert response.status_code == 400 and "CALLBACK_SECRET is not set" in response.json()["detail"]
    assert not Batch.objects.exists()


def test_a_refusal_of_the_longest_host_name_is_stored_and_ends_the_callback(settings, user):
    """The refusal names the host; one of 253 characters must still fit the error column (PostgreSQL
    refuses a longer value, which left the callback pending and retried for ever)."""
    host = ".".join(["a" * 63] * 3 + ["b" * 61])
    settings.CALLBACK_ALLOWED_HOSTS = [host]
    batch = finished_batch(user, f"https://{host}/results")
    settings.CALLBACK_ALLOWED_HOSTS = ["lis.example-hospital.org"]
    assert not callbacks.deliver(batch_id=batch.pk)
    refused = refreshed(batch)
    assert refused.callback_state == State.FAILED and refused.callback_error.startswith(
        f"This server may not call {host}"
    )
    assert "lis.example-hospital.org" not in refused.callback_error, "the allowed hosts are the server's business"


def test_a_host_removed_from_the_allowed_list_is_no_longer_called(settings, user, receiver):
    batch = finished_batch(user, receiver.url)
    settings.CALLBACK_ALLOWED_HOSTS = ["lis.example-hospital.org"]
    assert not callbacks.deliver(batch_id=batch.pk)
    refused = refreshed(batch)
    assert receiver.received == [] and refused.callback_state == State.FAILED
    assert "may not call 127.0.0.1" in refused.callback_error
    make_due(batch)
    assert not callbacks.deliver(batch_id=batch.pk) and receiver.received == []


def test_cells_analysed_again_while_an_attempt_is_under_way_are_sent_once_finished(user, receiver, monkeypatch):
    """The owner retries a failed cell while the lab system is still answering the first POST: that
    attempt must not mark the batch delivered, or the new result would never be sent."""
    batch = finished_batch(user, receiver.url)
    failed = batch.analyses.get(original_filename="a.png")
    Analysis.objects.filter(pk=failed.pk).update(status=Analysis.Status.FAILED, label="", error="Cannot read")
    post = callbacks._post

    def retried_during_the_post(url, body, *, batch_id):
        services.retry_failed_analyses(analyses=Analysis.objects.filter(pk=failed.pk))
        return post(url, body, batch_id=batch_id)

    monkeypatch.setattr(callbacks, "_post", retried_during_the_post)
    assert callbacks.deliver(batch_id=batch.pk)  # the receiver did get the first results
    monkeypatch.setattr(callbacks, "_post", post)
    restarted = refreshed(batch)
    assert (restarted.callback_state, restarted.callback_attempts) == (State.PENDING, 0)
    assert json.loads(receiver.received[0].body)["batch"]["counts"]["failed"] == 1

    assert not callbacks.deliver(batch_id=batch.pk)  # the cell is queued again: nothing to send yet
    Analysis.objects.filter(pk=failed.pk).update(status=Analysis.Status.DONE, label="Parasitized", error="")
    assert callbacks.deliver(batch_id=batch.pk)
    second = json.loads(receiver.received[1].body)["batch"]
    assert second["counts"]["failed"] == 0 and second["counts"]["parasitized"] == 1
    assert refreshed(batch).callback_state == State.DELIVERED


def test_a_cell_deleted_after_delivery_is_withdrawn_from_the_lab_system(
    user, receiver, monkeypatch, django_capture_on_commit_callbacks
):
    batch = finished_batch(user, receiver.url)
    assert callbacks.deliver(batch_id=batch.pk)
    first = json.loads(receiver.received[0].body)["batch"]
    enqueued = []
    monkeypatch.setattr(callbacks, "_enqueue", enqueued.append)  # the worker's part is the delivery below
    api = APIClient()
    api.force_authenticate(user)
    wrong_patient = batch.analyses.get(original_filename="a.png")
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/analyses/{wrong_patient.pk}/").status_code == 204
    assert enqueued == [batch.pk] and refreshed(batch).callback_state == State.PENDING
    assert callbacks.deliver(batch_id=batch.pk)
    second = json.loads(receiver.received[1].body)
    assert second["event"] == "batch.finished"
    assert [a["original_filename"] for a in second["batch"]["analyses"]] == ["b.png"]
    assert second["batch"]["results_as_of"] > first["results_as_of"]  # a receiver keeping the latest takes it


def test_a_batch_deleted_after_delivery_is_withdrawn_then_gone(
    client, user, receiver, monkeypatch, django_capture_on_commit_callbacks
):
    batch = finished_batch(user, receiver.url)
    Batch.objects.filter(pk=batch.pk).update(note="bed 4, Mrs A.")
    assert callbacks.deliver(batch_id=batch.pk)
    enqueued = []
    monkeypatch.setattr(callbacks, "_enqueue", enqueued.append)
    files = [f.name for a in batch.analyses.all() for f in (a.image, a.thumbnail)]
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/batches/{batch.pk}/delete/").status_code == 302
    # Gone for its owner, its cells and files at once; kept only to tell the lab system.
    assert client.get(f"/batches/{batch.pk}/").status_code == 404
    api = APIClient()
    api.force_authenticate(user)
    assert api.get(f"/api/batches/{batch.pk}/").status_code == 404 and api.get("/api/batches/").json()["count"] == 0
    assert not Analysis.objects.exists() and not any(private_storage.exists(name) for name in files)
    assert enqueued == [batch.pk] and Batch.with_withdrawn.get(pk=batch.pk).note == ""

    assert callbacks.deliver(batch_id=batch.pk)
    withdrawn = receiver.received[1]
    assert withdrawn.headers["X-Malaria-Signature"] == callbacks.signature(withdrawn.body)
    body = json.loads(withdrawn.body)
    assert body["event"] == "batch.withdrawn"
    assert (body["batch"]["id"], body["batch"]["sample_reference"], body["batch"]["analyses"]) == (batch.pk, "", [])
    assert not Batch.with_withdrawn.filter(pk=batch.pk).exists()


def test_a_batch_deleted_before_any_delivery_tells_the_lab_system_nothing(user, receiver):
    batch = services.create_batch(owner=user, uploads=[upload("a.png")], callback_url=receiver.url)
    services.delete_batch(batch=batch)
    assert not Batch.with_withdrawn.exists() and callbacks.requeue_due_callbacks() == 0
    assert receiver.received == []


def test_an_admins_deletion_is_withdrawn_from_the_lab_system_too(admin_client, user, receiver, monkeypatch):
    batch, other = finished_batch(user, receiver.url), finished_batch(user, receiver.url)
    assert callbacks.deliver(batch_id=batch.pk) and callbacks.deliver(batch_id=other.pk)
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    assert admin_client.post(f"/admin/diagnosis/batch/{batch.pk}/delete/", {"post": "yes"}).status_code == 302
    cell = other.analyses.first()
    selected = {"action": "delete_selected", "_selected_action": [cell.pk], "post": "yes"}
    assert admin_client.post("/admin/diagnosis/analysis/", selected).status_code == 302
    assert refreshed(other).callback_state == State.PENDING and other.analyses.count() == 1
    assert Batch.with_withdrawn.get(pk=batch.pk).withdrawn_at is not None
    assert admin_client.get("/admin/diagnosis/batch/?withdrawn=no").content.decode().count("/change/") == 1


def test_removing_a_user_withdraws_the_results_their_lab_system_was_sent(
    admin_client, user, receiver, monkeypatch, django_capture_on_commit_callbacks
):
    sent, never_sent = finished_batch(user, receiver.url), finished_batch(user, receiver.url)
    assert callbacks.deliver(batch_id=sent.pk)
    enqueued = []
    monkeypatch.setattr(callbacks, "_enqueue", enqueued.append)
    with django_capture_on_commit_callbacks(execute=True):
        assert admin_client.post(f"/admin/auth/user/{user.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Analysis.objects.exists()
    tombstone = Batch.with_withdrawn.get()  # the batch never sent goes with its owner, untold
    assert (tombstone.pk, tombstone.owner, enqueued) == (sent.pk, None, [sent.pk])
    assert (
        f"/admin/diagnosis/batch/{sent.pk}/change/"
        in admin_client.get("/admin/diagnosis/batch/?withdrawn=yes").content.decode()
    )
    assert admin_client.get(f"/admin/diagnosis/batch/{sent.pk}/change/").status_code == 200
    assert callbacks.deliver(batch_id=sent.pk)
    body = json.loads(receiver.received[1].body)
    assert (body["event"], body["batch"]["id"], body["batch"]["analyses"]) == ("batch.withdrawn", sent.pk, [])
    assert not Batch.with_withdrawn.exists() and never_sent.pk not in [
        json.loads(r.body)["batch"]["id"] for r in receiver.received
    ]


def test_a_cell_sent_again_just_after_the_claim_is_not_announced_as_finished(user, receiver, monkeypatch):
    batch = finished_batch(user, receiver.url)
    failed = batch.analyses.get(original_filename="a.png")
    Analysis.objects.filter(pk=failed.pk).update(status=Analysis.Status.FAILED, label="", error="Cannot read")
    check = callbacks.check_callback_url

    def retried_after_the_claim(url):
        services.retry_failed_analyses(analyses=Analysis.objects.filter(pk=failed.pk))
        return check(url)

    monkeypatch.setattr(callbacks, "check_callback_url", retried_after_the_claim)
    assert not callbacks.deliver(batch_id=batch.pk)
    assert receiver.received == []  # no "batch.finished" with a queued cell in it
    # Nothing went out, so nothing is owed a withdrawal: deleting it now would tell the lab nothing.
    assert not Batch.objects.get(pk=batch.pk).results_may_have_reached
    monkeypatch.setattr(callbacks, "check_callback_url", check)
    Analysis.objects.filter(pk=failed.pk).update(status=Analysis.Status.DONE, label="Parasitized", error="")
    assert callbacks.deliver(batch_id=batch.pk)
    assert {a["status"] for a in json.loads(receiver.received[0].body)["batch"]["analyses"]} == {"done"}


def test_a_batch_whose_results_may_have_arrived_unconfirmed_is_withdrawn_too(user, receiver, monkeypatch):
    """Delivery is at least once: an attempt that timed out or got a 5xx may have been stored."""
    batch = finished_batch(user, receiver.url)
    receiver.answers.append(503)
    assert not callbacks.deliver(batch_id=batch.pk) and len(receiver.received) == 1
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    services.delete_batch(batch=refreshed(batch))
    tombstone = Batch.with_withdrawn.get(pk=batch.pk)
    assert tombstone.withdrawn_at and tombstone.callback_state == State.PENDING and tombstone.callback_attempts == 0
    assert callbacks.deliver(batch_id=batch.pk)
    assert json.loads(receiver.received[1].body)["event"] == "batch.withdrawn"


@pytest.mark.parametrize("deletion", ["the batch", "its owner"])
def test_results_sent_unconfirmed_are_withdrawn_even_after_a_retry_restarted_the_count(
    user, receiver, monkeypatch, django_capture_on_commit_callbacks, deletion
):
    """A retry (an admin's, or a cell analysed again) starts the count of attempts afresh; the
    failed attempts before it may still have been stored by the lab system."""
    batch = finished_batch(user, receiver.url)
    receiver.answers.append(503)
    assert not callbacks.deliver(batch_id=batch.pk) and len(receiver.received) == 1
    Batch.objects.filter(pk=batch.pk).update(callback_state=State.FAILED)  # given up on
    enqueued = []
    monkeypatch.setattr(callbacks, "_enqueue", enqueued.append)
    assert callbacks.retry(batch=refreshed(batch)) and refreshed(batch).callback_attempts == 0
    with django_capture_on_commit_callbacks(execute=True):
        if deletion == "the batch":
            services.delete_batch(batch=refreshed(batch))
        else:
            user.delete()
    assert Batch.with_withdrawn.get(pk=batch.pk).withdrawn_at is not None
    assert callbacks.deliver(batch_id=batch.pk)
    assert json.loads(receiver.received[-1].body)["event"] == "batch.withdrawn"


def test_a_batch_deleted_while_its_attempt_builds_the_body_is_withdrawn_after_it(user, receiver, monkeypatch):
    """Between the claim and the POST a deletion may reset the count of attempts (a cell deleted)
    and then remove the batch: the attempt still goes out, so a withdrawal must follow it."""
    batch = finished_batch(user, receiver.url)
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    payload = callbacks._payload

    def deleted_meanwhile(claimed):
        body = payload(claimed)
        services.delete_analysis(analysis=Analysis.objects.get(batch=batch, original_filename="a.png"))
        services.delete_batch(batch=Batch.objects.get(pk=batch.pk))
        return body

    monkeypatch.setattr(callbacks, "_payload", deleted_meanwhile)
    callbacks.deliver(batch_id=batch.pk)
    assert json.loads(receiver.received[0].body)["event"] == "batch.finished"
    assert Batch.with_withdrawn.get(pk=batch.pk).withdrawn_at is not None
    monkeypatch.setattr(callbacks, "_payload", payload)
    assert callbacks.deliver(batch_id=batch.pk)
    assert json.loads(receiver.received[-1].body)["event"] == "batch.withdrawn"


def test_the_migration_marks_batches_sent_before_it_as_sent(user, receiver):
    import importlib

    from django.apps import apps

    tried, delivered, untried = (finished_batch(user, receiver.url) for _ in range(3))
    Batch.objects.filter(pk=tried.pk).update(callback_attempts=2)
    Batch.objects.filter(pk=delivered.pk).update(callback_delivered_at=timezone.now())
    Batch.objects.update(callback_first_sent_at=None)
    importlib.import_module("diagnosis.migrations.0010_callback_first_sent_at").date_earlier_attempts(apps, None)
    assert [refreshed(b).results_may_have_reached for b in (tried, delivered, untried)] == [True, True, False]
    assert refreshed(tried).callback_first_sent_at and refreshed(delivered).callback_first_sent_at
    assert refreshed(untried).callback_first_sent_at is None


def test_a_cell_deleted_while_an_attempt_is_under_way_is_sent_again_later(user, receiver, monkeypatch):
    batch = finished_batch(user, receiver.url)
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    post = callbacks._post

    def deleted_during_the_post(url, body, *, batch_id):
        services.delete_analysis(analysis=Analysis.objects.get(batch=batch, original_filename="a.png"))
        return post(url, body, batch_id=batch_id)

    monkeypatch.setattr(callbacks, "_post", deleted_during_the_post)
    assert callbacks.deliver(batch_id=batch.pk)  # the receiver got the batch with a.png in it
    monkeypatch.setattr(callbacks, "_post", post)
    assert refreshed(batch).callback_state == State.PENDING  # that attempt lost its lease: not "delivered"
    assert callbacks.deliver(batch_id=batch.pk)
    first, second = (json.loads(r.body)["batch"] for r in receiver.received)
    assert [a["original_filename"] for a in second["analyses"]] == ["b.png"]
    assert second["results_as_of"] > first["results_as_of"]


def test_a_failed_withdrawal_is_listed_in_the_admin_retried_there_and_kept_from_retention(
    admin_client, user, receiver, settings, monkeypatch
):
    batch = finished_batch(user, receiver.url)
    assert callbacks.deliver(batch_id=batch.pk)
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    services.delete_batch(batch=refreshed(batch))
    Batch.with_withdrawn.filter(pk=batch.pk).update(created_at=timezone.now() - timedelta(days=30))
    assert services.delete_expired_analyses(older_than=timedelta(days=7)) == 0
    assert Batch.with_withdrawn.filter(pk=batch.pk).exists(), "a withdrawal still being tried is kept"

    Batch.with_withdrawn.filter(pk=batch.pk).update(callback_state=State.FAILED, callback_error="HTTP 503")
    listed = admin_client.get("/admin/diagnosis/batch/?withdrawn=yes").content.decode()
    assert f"/admin/diagnosis/batch/{batch.pk}/change/" in listed
    chosen = {"action": "retry_callbacks", "_selected_action": [batch.pk]}
    assert admin_client.post("/admin/diagnosis/batch/", chosen).status_code == 302
    assert Batch.with_withdrawn.get(pk=batch.pk).callback_state == State.PENDING
    assert callbacks.deliver(batch_id=batch.pk) and not Batch.with_withdrawn.filter(pk=batch.pk).exists()


@pytest.mark.parametrize("cause", ["host refused since", "no connection"])
def test_a_batch_whose_only_attempt_posted_nothing_is_deleted_outright(user, settings, monkeypatch, cause):
    """An attempt that could not connect, or whose host was taken off the list, posted nothing: the
    batch's deletion left a row with its sample reference, to send a withdrawal of results the lab
    system never had (never, for a refused host), and its Idempotency-Key stayed refused."""
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/results"
    batch, _ = services.create_batch_once(owner=user, idempotency_key="lis-42", uploads=[upload()], callback_url=url)
    batch.analyses.update(status=Analysis.Status.DONE, label="Uninfected", probability_parasitized=0.02)
    allowed = settings.CALLBACK_ALLOWED_HOSTS
    if cause == "host refused since":
        settings.CALLBACK_ALLOWED_HOSTS = ["lis.example-hospital.org"]
    assert not callbacks.deliver(batch_id=batch.pk)
    settings.CALLBACK_ALLOWED_HOSTS = allowed
    tried = refreshed(batch)
    assert tried.callback_attempts == 1 and not tried.results_may_have_reached  # counted towards giving up
    services.delete_batch(batch=tried)
    assert not Batch.with_withdrawn.filter(pk=batch.pk).exists()
    _, created = services.create_batch_once(owner=user, idempotency_key="lis-42", uploads=[upload()], callback_url=url)
    assert created, "the key of a batch deleted outright is free again"


def test_each_callback_names_the_account_whose_batch_it_is(user, other_user, receiver, monkeypatch):
    """Any account may name an allowed URL and one secret signs for every receiver: another
    account's batch, under one of the lab system's sample references, arrived signed exactly as
    its own, with nothing in it by which the lab system could refuse it."""
    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: None)
    own, pointed_at_it = finished_batch(user, receiver.url), finished_batch(other_user, receiver.url)
    assert callbacks.deliver(batch_id=own.pk) and callbacks.deliver(batch_id=pointed_at_it.pk)
    accounts = [json.loads(call.body)["account"] for call in receiver.received]
    assert accounts == [user.username, other_user.username]

    other_user.delete()  # its batch was sent: it is withdrawn, named by no account now
    services.withdraw_batches_of_removed_users()
    make_due(pointed_at_it)
    assert callbacks.deliver(batch_id=pointed_at_it.pk)
    withdrawal = json.loads(receiver.received[-1].body)
    assert (withdrawal["event"], withdrawal["account"]) == ("batch.withdrawn", "")


def test_what_a_service_other_than_http_answers_is_not_shown_as_the_callback_error(user, api_client):
    """An allowed host's other ports can be named: the first line a mail server there answered
    ("220 mail.internal ESMTP Postfix ...") was copied into callback_error, shown to the owner."""
    batch = attempted_on_a_service_that_answers(user, b"220 mail.internal.example ESMTP Postfix 3.4.13 (Debian)\r\n")
    shown = api_client.get(f"/api/batches/{batch.pk}/").json()["callback_error"]
    assert shown == "the receiver did not answer in HTTP (BadStatusLine)"
    assert refreshed(batch).callback_state == State.PENDING  # a failed attempt, tried again later


def test_a_receiver_that_hangs_up_without_answering_is_said_to_have_done_so(user):
    batch = attempted_on_a_service_that_answers(user, b"")
    assert batch.callback_error == "the receiver closed the connection without answering"


def test_results_as_of_sorts_as_text_across_the_night_the_clocks_go_back(settings, user, api_client, receiver):
    """Written in TIME_ZONE, a review 40 minutes after a result read 02:10+01:00, before the
    result's 02:30+02:00: a lab system keeping the latest as text kept the stale result."""
    settings.TIME_ZONE = "Europe/Berlin"
    batch = finished_batch(user, receiver.url)
    finished = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 summer time
    batch.analyses.update(finished_at=finished)
    assert callbacks.deliver(batch_id=batch.pk)
    Analysis.objects.filter(pk=batch.analyses.first().pk).update(
        review_verdict="agree",
        reviewed_at=finished + timedelta(minutes=40),  # 02:10 winter time
    )
    callbacks.send_again(batch_ids=[batch.pk])
    assert callbacks.deliver(batch_id=batch.pk)
    first, second = (json.loads(call.body)["batch"]["results_as_of"] for call in receiver.received)
    assert (first, second) == ("2026-10-25T00:30:00Z", "2026-10-25T01:10:00Z") and second > first
    assert api_client.get(f"/api/batches/{batch.pk}/").json()["results_as_of"] == second


def test_reviews_while_the_lab_system_is_down_wait_out_its_pause_and_count_its_attempts(
    settings, user, receiver, monkeypatch, django_capture_on_commit_callbacks
):
    """Each review reset the count of attempts to 0 and ended the pause: a receiver answering 503
    was called at once on every review, and the callback never reached `failed`."""
    from django.contrib.auth import get_user_model

    monkeypatch.setattr(callbacks, "_enqueue", lambda batch_id: callbacks.deliver(batch_id=batch_id))
    batch = services.create_batch(
        owner=user, uploads=[upload(f"c{n}.png") for n in range(4)], callback_url=receiver.url
    )
    batch.analyses.update(status=Analysis.Status.DONE, label="Uninfected", probability_parasitized=0.02)
    reviewer = get_user_model().objects.create_superuser("microscopist", password="pw-for-tests-123")
    receiver.answers.extend([503] * 10)
    assert not callbacks.deliver(batch_id=batch.pk)
    for cell in batch.analyses.order_by("pk"):
        with django_capture_on_commit_callbacks(execute=True):
            services.review_analysis(analysis=cell, reviewer=reviewer, verdict="agree", replacing=None)
    state = refreshed(batch)
    assert len(receiver.received) == 1, "the receiver, answering 503, was called again at once"
    assert (state.callback_state, state.callback_attempts) == (State.PENDING, 1)
    assert state.callback_due_at > timezone.now() + timedelta(seconds=30)  # its pause of a minute, kept

    make_due(batch)  # the pause over: the reviewed results go out, as the second attempt
    receiver.answers.clear()
    assert callbacks.deliver(batch_id=batch.pk)
    sent = json.loads(receiver.received[-1].body)["batch"]["analyses"]
    assert {cell["review_verdict"] for cell in sent} == {"agree"} and refreshed(batch).callback_attempts == 2


def _failing_for_hours(user, *, attempts: int, due_in: timedelta) -> Batch:
    """A batch whose receiver has failed ``attempts`` times, its pause ending after ``due_in``."""
    batch = finished_batch(user, "http://127.0.0.1:9/results")
    Batch.objects.filter(pk=batch.pk).update(
        callback_state=State.PENDING,
        callback_attempts=attempts,
        callback_error="the receiver answered HTTP 503",
        callback_due_at=timezone.now() + due_in,
        callback_first_sent_at=timezone.now() - timedelta(hours=3),
    )
    return batch


def test_new_results_for_a_failing_receiver_do_not_push_back_a_pause_already_over(user):
    """Each review began the pause anew: a receiver on its hour's pause was put off another hour
    by every review, and one reviewing through the batch put it off for as long as they worked."""
    batch = _failing_for_hours(user, attempts=7, due_in=-timedelta(seconds=5))
    callbacks.send_again(batch_ids=[batch.pk])  # a review
    assert callbacks._due().filter(pk=batch.pk).exists()  # the sweeper's next round sends it
    assert refreshed(batch).callback_attempts == 7


def test_new_results_for_a_failing_receiver_keep_its_count_when_an_attempt_claims_it_meanwhile(user, monkeypatch):
    """The count was read, then the pause written only if it was unchanged: an attempt claimed in
    between made it fall through to a restart, count 0 and no pause, the reset it was to end."""
    batch = _failing_for_hours(user, attempts=5, due_in=-timedelta(seconds=5))
    pause = callbacks.retry_pause

    def claimed_meanwhile(attempts):  # deliver()'s claim, between the look and the update
        Batch.objects.filter(pk=batch.pk).update(
            callback_due_at=timezone.now() + callbacks.LEASE, callback_attempts=F("callback_attempts") + 1
        )
        monkeypatch.setattr(callbacks, "retry_pause", pause)
        return pause(attempts)

    monkeypatch.setattr(callbacks, "retry_pause", claimed_meanwhile)
    callbacks.send_again(batch_ids=[batch.pk])
    state = refreshed(batch)
    assert state.callback_attempts == 6 and state.callback_error
