"""No id is given out twice on SQLite, migrations included: the access trail and the lab systems'
callbacks name batches, cells and users by their ids after they are deleted (diagnosis.id_counters).

Each scenario runs in a process of its own on a SQLite database of its own (the embedded default),
whichever database the suite itself runs on."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCENARIO = """
import json, sys
import django
django.setup()
from django.core.management import call_command
from django.db import connection
from diagnosis import services
from diagnosis.models import AccessEvent, Batch
from tests.factories import UserFactory, upload

services.enqueue_analyses = lambda **kwargs: None  # no broker here
call_command("migrate", verbosity=0)
alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
services.create_batch(owner=alice, uploads=[upload("kept.png")])
gone = services.create_batch(owner=alice, uploads=[upload("smith.png")], sample_reference="SMITH-J")
gone_cell = gone.cells_as_sent[0].pk
AccessEvent.objects.create(user=alice, username="alice", action="deleted", channel="web", batch_id=gone.pk)
services.delete_batch(batch=Batch.objects.get(pk=gone.pk))
if sys.argv[1] == "rebuilt":  # an upgrade whose migration rebuilds diagnosis_batch, as 0009's did
    call_command("migrate", "diagnosis", "0008", verbosity=0)
else:  # a database an earlier rebuild left with its counter back at the largest id left
    with connection.cursor() as cursor:
        cursor.execute("UPDATE sqlite_sequence SET seq = %s WHERE name = 'diagnosis_batch'", [gone.pk - 1])
call_command("migrate", verbosity=0)  # scripts/start runs it at every start
new = services.create_batch(owner=bob, uploads=[upload("doe.png")])
print(json.dumps({"gone": gone.pk, "gone_cell": gone_cell, "new": new.pk, "new_cell": new.cells_as_sent[0].pk}))
"""


def run_scenario(kind: str, tmp_path) -> dict:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "MEDIA_ROOT": str(tmp_path / "media"),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, kind], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_upgrade_that_rebuilds_tables_gives_no_deleted_batchs_id_to_a_new_one(tmp_path):
    ids = run_scenario("rebuilt", tmp_path)
    assert ids["new"] > ids["gone"], f"batch #{ids['gone']} (deleted, in the trail) went to another patient"
    assert ids["new_cell"] > ids["gone_cell"]


def test_a_database_upgraded_before_the_fix_skips_the_ids_its_trail_names(tmp_path):
    ids = run_scenario("lowered", tmp_path)
    assert ids["new"] > ids["gone"]
