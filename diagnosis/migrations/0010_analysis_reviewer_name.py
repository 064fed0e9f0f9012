from django.conf import settings
from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def sign_existing_reviews(apps, schema_editor):
    Analysis = apps.get_model("diagnosis", "Analysis")
    User = apps.get_model(settings.AUTH_USER_MODEL)
    reviewer = User.objects.filter(pk=OuterRef("reviewed_by_id")).values("username")[:1]
    Analysis.objects.filter(reviewed_by__isnull=False).update(reviewer_name=Subquery(reviewer))


class Migration(migrations.Migration):
    dependencies = [
        ("diagnosis", "0009_batch_kept_when_its_owner_is_removed"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="analysis",
            name="reviewer_name",
            field=models.CharField(blank=True, max_length=150),
        ),
        migrations.RunPython(sign_existing_reviews, migrations.RunPython.noop),
    ]
