from django.db import migrations


class Migration(migrations.Migration):
    """A batch's results also change when a cell is sent for analysis again, and for a batch without
    a callback: the time is the batch's, not the deletion's."""

    dependencies = [("diagnosis", "0011_review_queue_confidence_by_side")]

    operations = [migrations.RenameField(model_name="batch", old_name="cell_deleted_at", new_name="results_changed_at")]
