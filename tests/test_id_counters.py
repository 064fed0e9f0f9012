"""No id is given out twice on SQLite, migrations included: the access trail and the lab systems'
callbacks name batches, cells and users by their ids after they are deleted (diagnosis.id_counters)."""

import pytest
from django.core.management import call_command
from django.db import connection

from diagnosis import services
from diagnosis.models import AccessEvent
from tests.factories import PASSWORD, UserFactory, upload

pytestmark = pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's table rebuilds (dev default)")


def _the_newest_batch_opened_then_deleted(client, owner):
    services.create_batch(owner=owner, uploads=[upload("kept.png")], sample_reference="KEPT-1")
    gone = services.create_batch(owner=owner, uploads=[upload("smith.png")], sample_reference="SMITH-J")
    gone.cell_ids = [cell.pk for cell in gone.cells_as_sent]
    client.login(username=owner.username, password=PASSWORD)
    client.get(f"/batches/{gone.pk}/")
    assert client.post(f"/batches/{gone.pk}/delete/").status_code == 302
    client.logout()
    return gone


def test_an_upgrade_that_rebuilds_tables_gives_no_deleted_batchs_id_and_trail_to_a_new_one(
    transactional_db, client, monkeypatch
):
    monkeypatch.setattr("diagnosis.services.enqueue_analyses", lambda **kwargs: None)
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    gone = _the_newest_batch_opened_then_deleted(client, alice)
    assert AccessEvent.objects.filter(batch_id=gone.pk, username="alice").count() == 2  # opened, deleted

    call_command("migrate", "diagnosis", "0008", verbosity=0)  # 0009 rebuilt diagnosis_batch, as upgrades do
    call_command("migrate", verbosity=0)

    new = services.create_batch(owner=bob, uploads=[upload("doe.png")], sample_reference="DOE-J")
    assert new.pk > gone.pk, f"batch #{gone.pk} (deleted) gave its id to another patient's batch"
    assert new.cells_as_sent[0].pk > gone.cell_ids[0]
    client.login(username="bob", password=PASSWORD)
    assert "alice" not in client.get(f"/batches/{new.pk}/").content.decode(), "another user's trail shown"


def test_a_database_upgraded_before_the_fix_skips_the_ids_its_trail_names(transactional_db, client, monkeypatch):
    monkeypatch.setattr("diagnosis.services.enqueue_analyses", lambda **kwargs: None)
    gone = _the_newest_batch_opened_then_deleted(client, UserFactory(username="alice"))
    with connection.cursor() as cursor:  # as an earlier rebuild left it: back at the largest id left
        cursor.execute("UPDATE sqlite_sequence SET seq = %s WHERE name = 'diagnosis_batch'", [gone.pk - 1])

    call_command("migrate", verbosity=0)  # scripts/start runs it at every start, with nothing to do

    new = services.create_batch(owner=UserFactory(username="bob"), uploads=[upload("doe.png")])
    assert new.pk > gone.pk
