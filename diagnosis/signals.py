"""An analysis's stored files go with it, however it is deleted: page, API, admin, or its owner's removal."""

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from diagnosis.models import Analysis, overlay_path, private_storage


@receiver(post_delete, sender=Analysis, dispatch_uid="diagnosis.remove_analysis_files")
def remove_analysis_files(sender, instance: Analysis, **kwargs) -> None:
    names = [field.name for field in (instance.image, instance.thumbnail, instance.overlay) if field]
    # Also by its id: an overlay recorded after this instance was loaded is not in instance.overlay.
    names.append(overlay_path(instance.pk))
    # Only once the deletion commits: a rolled-back delete keeps its row, so it must keep its files.
    transaction.on_commit(lambda: _delete_files(names))


def _delete_files(names: list[str]) -> None:
    for name in names:
        private_storage.delete(name)
