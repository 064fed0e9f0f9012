"""A lab system that sends a batch again after losing the response (a timeout, a proxy's 502) gets
the batch its first request made, not a second one, under the Idempotency-Key it chose."""

import pytest
from django.utils import timezone

from diagnosis import services
from diagnosis.models import AccessEvent, Batch
from tests.conftest import stored_files
from tests.factories import UserFactory, image_bytes, upload


def send(client, key: str | None, *, reference="WARD-9", names=("a.png", "b.png"), seed=1):
    images = [upload(name, image_bytes(color=(180, 90, 100 + seed + k))) for k, name in enumerate(names)]
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post("/api/batches/", {"images": images, "sample_reference": reference}, **headers)


def test_the_same_request_again_gets_the_first_batch_back(api_client, user, media_root):
    first = send(api_client, "lis-order-4711")
    assert first.status_code == 202
    files = stored_files(media_root)
    again = send(api_client, "lis-order-4711")
    assert again.status_code == 200 and again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and Batch.objects.count() == 1
    assert stored_files(media_root) == files  # nothing stored twice
    assert AccessEvent.objects.filter(action="uploaded").count() == 1
    replayed = AccessEvent.objects.get(action="viewed")  # the results went out again: the trail says so
    assert (replayed.batch_id, replayed.detail) == (first.json()["id"], "replayed request")
    # Another lab system (another account) may use the same key for its own batch.
    other = send(api_client_for(UserFactory()), "lis-order-4711")
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def api_client_for(user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.mark.parametrize(
    "changed",
    [{"reference": "WARD-10"}, {"names": ("a.png", "c.png")}, {"seed": 7}],
    ids=["reference", "name", "bytes"],
)
def test_the_key_sent_with_another_request_is_refused_and_stores_nothing(api_client, media_root, changed):
    assert send(api_client, "order-1").status_code == 202
    files = stored_files(media_root)
    refused = send(api_client, "order-1", **changed)
    assert refused.status_code == 422 and "sent before with another request" in refused.json()["detail"]
    assert Batch.objects.count() == 1 and stored_files(media_root) == files


def test_the_key_of_a_batch_withdrawn_from_its_lab_system_is_refused(api_client):
    """Deleted after its results were sent, a batch waits, hidden, to tell the lab system: its key
    must not bring it back. (A batch deleted before that is gone with its key.)"""
    batch = send(api_client, "order-2").json()
    Batch.objects.filter(pk=batch["id"]).update(withdrawn_at=timezone.now())
    refused = send(api_client, "order-2")
    assert refused.status_code == 422 and "has been deleted" in refused.json()["detail"]


@pytest.mark.parametrize("key", ["x" * 101, "two words", "clé", ""])  # empty: taken for none, a retry made two
def test_a_key_that_is_no_key_is_refused(api_client, key):
    refused = send(api_client, key.encode().decode("latin-1"))
    assert refused.status_code == 400 and "Idempotency-Key" in refused.json()["detail"]
    assert not Batch.objects.exists()


def test_two_requests_under_one_key_at_once_make_one_batch(api_client, user, media_root, monkeypatch):
    """The second arrives before the first has committed, so it finds no batch under the key; the
    database's constraint stops its insert, and it answers with the first one's batch."""
    first = send(api_client, "order-3")
    files = stored_files(media_root)
    lookups = []
    real = services._batch_made_under

    def not_committed_the_first_time(**kwargs):
        lookups.append(kwargs)
        return None if len(lookups) == 1 else real(**kwargs)

    monkeypatch.setattr(services, "_batch_made_under", not_committed_the_first_time)
    again = send(api_client, "order-3")
    assert len(lookups) == 2, "the insert was tried, refused, and the batch looked up again"
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert Batch.objects.count() == 1 and stored_files(media_root) == files


def test_without_a_key_each_request_is_a_batch(api_client):
    assert send(api_client, None).status_code == send(api_client, None).status_code == 202
    assert Batch.objects.count() == 2
