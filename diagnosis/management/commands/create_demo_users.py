import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create a demo clinician and an admin reviewer once, and print how to sign in as them."

    def handle(self, *args, **options):
        credentials = settings.VAR_DIR / "demo-credentials.txt"
        User = get_user_model()
        # A new database (var/db.sqlite3 removed to start afresh) gets new accounts: the file of an
        # earlier one would name accounts that no longer exist.
        if not User.objects.exists():
            lines = []
            for username, is_admin in (("demo", False), ("admin", True)):
                password = secrets.token_urlsafe(9)
                user = User.objects.create_user(
                    username=username, password=password, is_staff=is_admin, is_superuser=is_admin
                )
                if is_admin:
                    user.groups.add(Group.objects.get(name="reviewers"))
                lines.append(f"{username} / {password}" + ("  (admin and reviewer)" if is_admin else "  (clinician)"))
            credentials.write_text("\n".join(lines) + "\n")
            credentials.chmod(0o600)
        elif not credentials.exists():
            self.stdout.write("Users already exist; create more with 'python manage.py createsuperuser'.")
            return
        self.stdout.write(f"Sign in with one of these accounts, with the passwords first set (also in {credentials}):")
        self.stdout.write(credentials.read_text())
