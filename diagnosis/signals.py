"""An analysis's stored files go with it, however it is deleted: page, API, admin, or its owner's
removal; a removed user's results are withdrawn from the lab systems that were sent them; a
user's API key goes with their password or their account's deactivation (their sign-ins with
the latter), and a new password lifts their sign-in lockout; and a sign-in's clock starts at
sign-in."""

import logging
import time

from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX
from django.contrib.auth.signals import user_logged_in
from django.contrib.sessions.models import Session
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver
from django.utils import timezone

from diagnosis import login_throttle, services
from diagnosis.middleware import SignOutMiddleware
from diagnosis.models import Analysis, ApiToken, overlay_path, private_storage

logger = logging.getLogger("diagnosis.deletion")


@receiver(post_delete, sender=Analysis, dispatch_uid="diagnosis.remove_analysis_files")
def remove_analysis_files(sender, instance: Analysis, **kwargs) -> None:
    names = [field.name for field in (instance.image, instance.thumbnail, instance.overlay) if field]
    # Also by its id: an overlay recorded after this instance was loaded is not in instance.overlay.
    names.append(overlay_path(instance.pk))
    # Only once the deletion commits: a rolled-back delete keeps its row, so it must keep its files.
    # Robust: a failure here must not drop the hooks of the other cells deleted in the same commit.
    transaction.on_commit(lambda: _delete_files(names), robust=True)


def _delete_files(names: list[str]) -> None:
    for name in names:
        try:
            private_storage.delete(name)
        except OSError:  # the row is gone already: log the file left behind, and remove the others
            logger.exception("event=file_not_deleted name=%s", name)


@receiver(post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="diagnosis.withdraw_removed_users_batches")
def withdraw_removed_users_batches(sender, instance, **kwargs) -> None:
    services.withdraw_batches_of_removed_users()


@receiver(pre_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="diagnosis.revoke_token_when_access_ends")
def revoke_token_when_access_ends(sender, instance, update_fields=None, **kwargs) -> None:
    """A new password (changed by its owner, or set by an admin after a suspected leak), one an
    admin disables, or the account deactivated also ends the user's API key: whoever may have taken
    the password may have taken a key with it, and reactivating the account must not revive it."""
    if instance.pk is None:
        return
    # set_password() leaves the new password here until the save; Django's own re-hashing of an
    # unchanged password on sign-in clears it, so that does not count as a change.
    if getattr(instance, "_password", None) is not None:
        ApiToken.objects.filter(user_id=instance.pk).delete()
        return
    if update_fields is not None and not {"password", "is_active"} & set(update_fields):
        return  # e.g. last_login at sign-in
    stored = sender.objects.filter(pk=instance.pk).values_list("password", "is_active").first()
    if stored is None:
        return
    password, was_active = stored
    disabled = not instance.has_usable_password() and not password.startswith(UNUSABLE_PASSWORD_PREFIX)
    # Either way round: an account deactivated by an update() (a leavers' script) sends no signal
    # then, so its key is ended when it is reactivated.
    if disabled or was_active != instance.is_active:
        ApiToken.objects.filter(user_id=instance.pk).delete()
    if was_active != instance.is_active:
        _end_sign_ins(user_id=instance.pk)


def _end_sign_ins(*, user_id: int) -> None:
    """Django only ignores an inactive account's sessions: reactivated (after a suspected leak), the
    browser that may have been the leak's would be signed in again. Sessions name their user only
    inside their data, so the live ones are read; deactivations are rare."""
    live = Session.objects.filter(expire_date__gt=timezone.now())
    ended = [session.pk for session in live.iterator() if session.get_decoded().get(SESSION_KEY) == str(user_id)]
    Session.objects.filter(pk__in=ended).delete()


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="diagnosis.lift_lockout_on_new_password")
def lift_lockout_on_new_password(sender, instance, **kwargs) -> None:
    """The user locked out by a forgotten password is the one an administrator sets a new one for
    (in the admin or with ``manage.py changepassword``), and must be able to use it at once."""
    if getattr(instance, "_password", None) is not None:  # set_password() before this save
        username = instance.get_username()
        # Not if the form's save rolls back; robust: the cache being down must not cancel later hooks.
        transaction.on_commit(lambda: login_throttle.forgive(username), robust=True)


@receiver(user_logged_in, dispatch_uid="diagnosis.start_sign_in_clock")
def start_sign_in_clock(sender, request, user, **kwargs) -> None:
    if request is not None and hasattr(request, "session"):  # the API's token endpoint has no session
        now = int(time.time())
        request.session[SignOutMiddleware.SIGNED_IN_AT] = now
        request.session[SignOutMiddleware.LAST_ACTIVITY] = now
