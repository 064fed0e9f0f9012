from django.db import migrations


def create_reviewers_group(apps, schema_editor):
    # Permissions are normally created after all migrations; create ours now so it can be granted.
    ContentType = apps.get_model("contenttypes", "ContentType")
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    content_type, _ = ContentType.objects.get_or_create(app_label="diagnosis", model="analysis")
    permission, _ = Permission.objects.get_or_create(
        codename="review_analysis", content_type=content_type, defaults={"name": "Can review any user's analyses"}
    )
    group, _ = Group.objects.get_or_create(name="reviewers")
    group.permissions.add(permission)


class Migration(migrations.Migration):
    dependencies = [
        ("diagnosis", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_reviewers_group, migrations.RunPython.noop)]
