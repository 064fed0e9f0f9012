import unicodedata
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.fields import empty

from diagnosis import selectors
from diagnosis.callbacks import check_callback_url, results_timestamp
from diagnosis.models import NOTE_MAX_LENGTH, Analysis, Batch
from diagnosis.text import composed, plain_line


class SignInSerializer(AuthTokenSerializer):
    """The token POST's user name read as the web sign-in reads it (Django's UsernameField, NFKC):
    a lab system that sends "Müller" decomposed, as a Mac keeps it, signs in as Müller, instead of
    being refused with the right password and counted towards locking Müller out."""

    def validate_username(self, value: str) -> str:
        return unicodedata.normalize("NFKC", value)


class AnalysisSerializer(serializers.ModelSerializer):
    image_url = serializers.SerializerMethodField()
    overlay_url = serializers.SerializerMethodField()
    batch = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True, help_text="null for a single upload")
    final_label = serializers.ChoiceField(
        choices=Analysis.Label.choices,
        read_only=True,
        allow_blank=True,
        help_text="The reviewer's corrected label where a reviewer disagreed, else the model's `label`.",
    )
    # Blank until the model has given one; a reviewer's correction is `corrected_label`, not this.
    label = serializers.ChoiceField(
        choices=Analysis.Label.choices, read_only=True, allow_blank=True, help_text="The model's label."
    )
    borderline = serializers.BooleanField(
        source="is_borderline",
        read_only=True,
        help_text=(
            "Whether the model's call is close to its threshold, where most of its errors are: confirm these "
            "first. Within BORDERLINE_CONFIDENCE (by default 0.5) of the room between `decision_threshold` and "
            "either end of the scale: by default 0.055 to 0.555 at a threshold of 0.11. False until the cell is done."
        ),
    )
    review_verdict = serializers.ChoiceField(choices=Analysis.Verdict.choices, read_only=True, allow_blank=True)
    corrected_label = serializers.ChoiceField(choices=Analysis.Label.choices, read_only=True, allow_blank=True)

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
            "borderline",
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
            "review_note",  # what the microscopist wrote ("gametocytes seen, repeat smear"), as the report prints it
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


class QueryBooleanField(serializers.BooleanField):
    """Left out of a query, no value: DRF reads a boolean left out of a form as false (an unticked
    checkbox), which would filter every list by it."""

    default_empty_html = empty


class AnalysisListQuerySerializer(serializers.Serializer):
    """The list's filters: an unknown value is refused, never ignored into an unfiltered list."""

    status = serializers.ChoiceField(choices=Analysis.Status.values, required=False, allow_blank=True)
    label = serializers.ChoiceField(choices=Analysis.Label.values, required=False, allow_blank=True)
    # At most the largest id a batch can have: a longer number overflowed SQLite's integers (a 500).
    batch = serializers.IntegerField(required=False, min_value=1, max_value=2**63 - 1)
    borderline = QueryBooleanField(
        required=False, help_text="true: only borderline calls; false: every other cell (as the field reads)"
    )


class AnalysisUploadSerializer(serializers.Serializer):
    image = serializers.FileField(help_text="One cell image: PNG, JPEG, TIFF or BMP.")


@extend_schema_field(
    {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "maxItems": settings.BATCH_MAX_FILES,  # refused by the upload service, saying so
        "description": f"Repeat the field per image: 1 to {settings.BATCH_MAX_FILES} (BATCH_MAX_FILES).",
    }
)
class ImageList(serializers.ListField):
    pass


class PlainLineField(serializers.CharField):
    """The API's diagnosis.forms.PlainLineField: cleaned by plain_line before its length is checked."""

    def to_internal_value(self, data) -> str:
        return plain_line(super().to_internal_value(data))


class ComposedTextField(serializers.CharField):
    def to_internal_value(self, data) -> str:
        return composed(super().to_internal_value(data))


class BatchUploadSerializer(serializers.Serializer):
    # Empty files pass here so that the upload service refuses them by name.
    images = ImageList(child=serializers.FileField(allow_empty_file=True), allow_empty=False)
    sample_reference = PlainLineField(max_length=100, required=False, allow_blank=True)
    note = ComposedTextField(required=False, allow_blank=True, max_length=NOTE_MAX_LENGTH)
    # Checked by the callbacks' own rules, not URLField's, which refuses the single-label host names
    # (https://lis01/results) that hospital networks use.
    callback_url = serializers.CharField(
        max_length=500,
        required=False,
        allow_blank=True,
        help_text="POSTed the results, signed, once every cell is finished (hosts in CALLBACK_ALLOWED_HOSTS only).",
    )

    def validate_callback_url(self, url: str) -> str:
        try:
            return check_callback_url(url) if url else url
        except ValidationError as refusal:
            raise serializers.ValidationError(refusal.messages) from None


class BatchCountsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    done = serializers.IntegerField()
    failed = serializers.IntegerField()
    finished = serializers.IntegerField(help_text="done + failed")
    parasitized = serializers.IntegerField(help_text="by final label")
    uninfected = serializers.IntegerField(help_text="by final label")
    borderline = serializers.IntegerField(help_text="done cells whose call is `borderline`, reviewed or not")
    parasitized_percent = serializers.IntegerField(allow_null=True, help_text="of the done cells; null if none")


class BatchSerializer(serializers.ModelSerializer):
    # Not the model's URLField, which the schema would call a URI: most batches have none, "".
    callback_url = serializers.CharField(read_only=True, help_text='where results are POSTed; "" for none')
    counts = serializers.SerializerMethodField()
    results_as_of = serializers.SerializerMethodField(
        help_text=(
            "When its results last changed (a cell finished, was reviewed, deleted or sent for analysis again), "
            "as its callbacks say; in UTC, so the later of two also sorts later as text."
        )
    )
    analyses = AnalysisSerializer(
        many=True, read_only=True, source="cells_as_sent", help_text="In the order the images were sent."
    )

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
            "results_as_of",
            "counts",
            "analyses",
        ]
        read_only_fields = fields

    @extend_schema_field(BatchCountsSerializer)
    def get_counts(self, batch: Batch) -> dict[str, int | None]:
        # Annotated by selectors.batches_with_counts: one query for a whole page of batches.
        return selectors.with_percent(counts={name: getattr(batch, name) for name in selectors.BATCH_COUNT_NAMES})

    @extend_schema_field(OpenApiTypes.DATETIME)
    def get_results_as_of(self, batch: Batch) -> datetime:
        return results_timestamp(selectors.results_as_of(batch=batch, analyses=batch.analyses.all()))


class OperationsStatusSerializer(serializers.Serializer):
    """selectors.operations_status, for a monitoring system's generated client (docs/deploy.md)."""

    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    oldest_queued_seconds = serializers.FloatField(allow_null=True, help_text="since the oldest queued cell was sent")
    oldest_running_seconds = serializers.FloatField(allow_null=True)
    done_last_24h = serializers.IntegerField()
    failed_last_24h = serializers.IntegerField()
    mean_inference_ms_last_24h = serializers.FloatField(allow_null=True)
    mean_turnaround_seconds_last_24h = serializers.FloatField(allow_null=True, help_text="upload to result")
    model_versions_last_24h = serializers.ListField(child=serializers.CharField())
    callbacks_pending = serializers.IntegerField()
    callbacks_failed = serializers.IntegerField()
