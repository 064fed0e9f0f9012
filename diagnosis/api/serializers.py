from django.urls import reverse
from rest_framework import serializers

from diagnosis.models import NOTE_MAX_LENGTH, Analysis, Batch
from diagnosis.selectors import BATCH_COUNT_NAMES


class AnalysisSerializer(serializers.ModelSerializer):
    image_url = serializers.SerializerMethodField()
    overlay_url = serializers.SerializerMethodField()
    batch = serializers.PrimaryKeyRelatedField(read_only=True)
    final_label = serializers.ChoiceField(
        choices=Analysis.Label.choices,
        read_only=True,
        allow_blank=True,
        help_text="The reviewer's corrected label where a reviewer disagreed, else the model's `label`.",
    )

    class Meta:
        model = Analysis
        fields = [
            "id",
            "batch",
            "status",
            "final_label",
            "label",
            "probability_parasitized",
            "decision_threshold",
            "model_version",
            "original_filename",
            "width",
            "height",
            "created_at",
            "started_at",
            "finished_at",
            "inference_ms",
            "error",
            "image_url",
            "overlay_url",
            "review_verdict",
            "corrected_label",
            "reviewed_at",
        ]
        read_only_fields = fields

    def _url(self, analysis: Analysis, kind: str) -> str | None:
        if not getattr(analysis, kind):
            return None
        path = reverse("api:analysis-file", kwargs={"pk": analysis.pk, "kind": kind})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path

    def get_image_url(self, analysis: Analysis) -> str | None:
        return self._url(analysis, "image")

    def get_overlay_url(self, analysis: Analysis) -> str | None:
        return self._url(analysis, "overlay")


class AnalysisListQuerySerializer(serializers.Serializer):
    """The list's filters: an unknown value is refused, never ignored into an unfiltered list."""

    status = serializers.ChoiceField(choices=Analysis.Status.values, required=False, allow_blank=True)
    label = serializers.ChoiceField(choices=Analysis.Label.values, required=False, allow_blank=True)


class AnalysisUploadSerializer(serializers.Serializer):
    image = serializers.FileField(help_text="One cell image: PNG, JPEG, TIFF or BMP.")


class BatchUploadSerializer(serializers.Serializer):
    # Empty files pass here so that the upload service refuses them by name.
    images = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True), allow_empty=False, help_text="Repeat the field per image."
    )
    sample_reference = serializers.CharField(max_length=100, required=False, allow_blank=True)
    note = serializers.CharField(required=False, allow_blank=True, max_length=NOTE_MAX_LENGTH)
    callback_url = serializers.URLField(
        max_length=500,
        required=False,
        allow_blank=True,
        help_text="POSTed the results, signed, once every cell is finished (hosts in CALLBACK_ALLOWED_HOSTS only).",
    )


class BatchSerializer(serializers.ModelSerializer):
    counts = serializers.SerializerMethodField()
    analyses = AnalysisSerializer(many=True, read_only=True)

    class Meta:
        model = Batch
        fields = [
            "id",
            "sample_reference",
            "note",
            "created_at",
            "callback_url",
            "callback_state",
            "callback_attempts",
            "callback_error",
            "callback_delivered_at",
            "counts",
            "analyses",
        ]
        read_only_fields = fields

    def get_counts(self, batch: Batch) -> dict[str, int]:
        """Annotated by ``selectors.batches_with_counts``: one query for a whole page of batches."""
        return {name: getattr(batch, name) for name in BATCH_COUNT_NAMES}
