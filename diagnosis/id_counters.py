"""On SQLite, an id once given out is never given out again, across migrations too.

The access trail and the lab systems' callbacks name batches, cells and users by plain ids, so as
to outlive them. SQLite's AUTOINCREMENT keeps that promise until a migration rebuilds a table
(Django's SQLite schema editor copies it into a new one for most changes): the new table's counter
starts from the largest id left in it, and a deleted newest batch's id, with its trail, went to
the next user's batch. Each migrate run puts the counters back where they were, and no lower than
the largest id the trail names (for databases upgraded before this).
"""

from django.db import connections
from django.db.models import Max
from django.db.models.signals import post_migrate, pre_migrate
from django.dispatch import receiver

_counters_before: dict[str, dict[str, int]] = {}


def _counters(connection) -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'")
        if cursor.fetchone() is None:  # a new database: no AUTOINCREMENT table made yet
            return {}
        cursor.execute("SELECT name, seq FROM sqlite_sequence")
        return dict(cursor.fetchall())


def _named_by_the_trail(connection_alias: str) -> dict[str, int]:
    from diagnosis.models import AccessEvent, Analysis, Batch

    named = AccessEvent.objects.using(connection_alias).aggregate(
        batch=Max("batch_id"), analysis=Max("analysis_id"), user=Max("user_id")
    )
    tables = {"batch": Batch._meta.db_table, "analysis": Analysis._meta.db_table, "user": "auth_user"}
    return {tables[key]: value for key, value in named.items() if value is not None}


@receiver(pre_migrate, dispatch_uid="diagnosis.remember_id_counters")
def remember_id_counters(sender, using: str, **kwargs) -> None:
    connection = connections[using]
    if connection.vendor == "sqlite" and using not in _counters_before:  # sent once for each app
        _counters_before[using] = _counters(connection)


@receiver(post_migrate, dispatch_uid="diagnosis.restore_id_counters")
def restore_id_counters(sender, using: str, **kwargs) -> None:
    connection = connections[using]
    if connection.vendor != "sqlite" or using not in _counters_before:
        return
    floors = _counters_before.pop(using)
    tables = set(connection.introspection.table_names())
    if "diagnosis_accessevent" in tables:
        for table, largest in _named_by_the_trail(using).items():
            floors[table] = max(floors.get(table, 0), largest)
    now = _counters(connection)
    with connection.cursor() as cursor:
        for table, floor in floors.items():
            if table not in tables:  # dropped by a migration
                continue
            if table not in now:  # no row ever made since the rebuild: SQLite has no entry yet
                cursor.execute("INSERT INTO sqlite_sequence (name, seq) SELECT %s, %s", [table, floor])
            elif now[table] < floor:
                cursor.execute("UPDATE sqlite_sequence SET seq = %s WHERE name = %s", [floor, table])
