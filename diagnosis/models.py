import contextlib
import os
import uuid
from urllib.parse import urlsplit

from django.conf import settings
from django.core.files.storage import FileSystemStorage
from django.db import models
from django.db.models import Case, F, Value, When
from django.db.models.functions import Coalesce, NullIf
from django.utils import timezone

from ml.metrics import borderline_band


class PrivateStorage(FileSystemStorage):
    """MEDIA_ROOT without public URLs: files leave only through views that check ownership."""

    def url(self, name):
        raise NotImplementedError("private files have no public URL; serve them with diagnosis.files")

    def _save(self, name, content):
        began = not os.path.lexists(self.path(name))  # save() chose a free name: the file is this call's
        try:
            return super()._save(name, content)
        except OSError:
            # Half a patient's image, written before the disk filled: not left for the nightly sweep.
            if began:
                with contextlib.suppress(OSError):
                    os.remove(self.path(name))
            raise


private_storage = PrivateStorage()


def overlay_path(analysis_id: int) -> str:
    """Where an analysis's heatmap overlay is stored: one per analysis, found again from its id alone."""
    return f"overlays/{analysis_id}.png"


def upload_path(instance, filename: str) -> str:
    # The client's file name is kept only as data; paths are random so names can't traverse or clash.
    return f"uploads/{uuid.uuid4().hex}.{filename.rsplit('.', 1)[-1]}"


# Free-text notes are for a sentence or two; the cap keeps a runaway client from storing megabytes.
NOTE_MAX_LENGTH = 2000


class KeptBatches(models.Manager):
    """Batches as users, the API and the admin see them: not those deleted after their lab system
    was sent results, which stay only until it is told they are withdrawn (diagnosis.callbacks)."""

    def get_queryset(self):
        return super().get_queryset().filter(withdrawn_at__isnull=True)


class Batch(models.Model):
    class CallbackState(models.TextChoices):
        NONE = "", "no callback"
        PENDING = "pending", "pending"
        DELIVERED = "delivered", "delivered"
        FAILED = "failed", "failed"

    # Kept, without an owner, when its owner's account is removed (their cells go with it): a batch
    # whose results may have reached its lab system stays until the lab system is told they are
    # withdrawn (services.withdraw_batches_of_removed_users); no one can see it but an admin.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="batches")
    sample_reference = models.CharField(max_length=100, blank=True, help_text="Patient or sample reference")
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    # A lab system's URL to POST the results to once every cell is finished (diagnosis.callbacks).
    callback_url = models.URLField(max_length=500, blank=True)
    callback_state = models.CharField(max_length=10, choices=CallbackState.choices, blank=True, default="")
    callback_attempts = models.PositiveSmallIntegerField(default=0)
    # No attempt starts before this: the pause after a failure, or the lease of an attempt under way.
    callback_due_at = models.DateTimeField(null=True, blank=True)
    callback_error = models.CharField(max_length=300, blank=True)
    callback_delivered_at = models.DateTimeField(null=True, blank=True)
    # When an attempt first POSTed the results, answered or not. Never reset (the count of attempts
    # is, on a retry): delivery is at least once, so from then on the lab system may hold them.
    callback_first_sent_at = models.DateTimeField(null=True, blank=True)
    # When a cell was last deleted from the batch or sent for analysis again (its result withdrawn),
    # and when the batch itself was deleted: no cell's own times say so, and each makes the results
    # a lab system holds out of date (results_as_of moves on; a callback is sent again).
    results_changed_at = models.DateTimeField(null=True, blank=True)
    withdrawn_at = models.DateTimeField(null=True, blank=True)
    # A lab system's Idempotency-Key for the request that made the batch, and a digest of that
    # request, so that sending it again (its response was lost) makes no second batch.
    idempotency_key = models.CharField(max_length=100, blank=True, default="")
    request_digest = models.CharField(max_length=64, blank=True, default="")

    objects = KeptBatches()
    with_withdrawn = models.Manager()  # noqa: DJ012 - ruff takes the manager above for a field

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="one_batch_per_idempotency_key",
            )
        ]
        # The sweeper looks for due callbacks every minute: among the few pending, not every batch ever made.
        indexes = [
            models.Index(
                fields=["callback_due_at"], condition=models.Q(callback_state="pending"), name="callbacks_pending"
            )
        ]

    def __str__(self) -> str:
        # No patient data: the admin's history (django_admin_log) keeps this text for every record
        # changed or deleted there, past the record's deletion and any retention period.
        return f"Batch {self.pk}"

    @property
    def results_may_have_reached(self) -> bool:
        """Whether its lab system may hold its results: an attempt is claimed, was made, or arrived.
        Not the count of attempts: one that posted nothing (no connection, its host since refused)
        counts towards giving up, and takes back its mark (callbacks._not_sent)."""
        return (self.callback_delivered_at or self.callback_first_sent_at) is not None

    @property
    def cells_as_sent(self) -> list["Analysis"]:
        """The batch's cells in the order its images came, as a lab system pairs them with what it
        sent (names may repeat); sorted here so that a prefetched page of batches needs no query."""
        return sorted(self.analyses.all(), key=lambda analysis: analysis.pk)

    @property
    def callback_host(self) -> str:
        """Host and port only: a URL may carry credentials, which pages and the trail must not show."""
        parts = urlsplit(self.callback_url)
        try:
            port = parts.port
        except ValueError:  # stored before URLs were checked for it; the attempt fails saying why
            port = None
        return f"{parts.hostname}:{port}" if port else parts.hostname or ""


# Batch.results_may_have_reached as a query: the batches whose lab system was never sent anything.
RESULTS_NEVER_SENT = models.Q(callback_delivered_at__isnull=True, callback_first_sent_at__isnull=True)


# How sure the model was of a cell: its score's distance from the model's own decision threshold
# (0.5 where none was recorded), as a share of the room on that side of it. The review queue shows
# the least sure first. A plain distance ranked a certain 0.000 (0.11 below a threshold of 0.11)
# before an even 0.565 (0.455 above it, out of 0.89).
_THRESHOLD = Coalesce(F("decision_threshold"), Value(0.5))
REVIEW_CONFIDENCE = Case(
    When(
        probability_parasitized__gte=_THRESHOLD,
        # A score on a threshold of 1.0 (or 0.0) has no room beside it: the least sure, 0, not NULL.
        then=Coalesce((F("probability_parasitized") - _THRESHOLD) / NullIf(Value(1.0) - _THRESHOLD, Value(0.0)), 0.0),
    ),
    default=Coalesce((_THRESHOLD - F("probability_parasitized")) / NullIf(_THRESHOLD, Value(0.0)), 0.0),
    output_field=models.FloatField(),
)
# "Most suspicious first" on one scale for every model: REVIEW_CONFIDENCE, negative below the
# threshold (-1 a certain negative, 1 a certain positive; NULL unscored). For one model it orders as
# the scores do; across two (a batch analysed again under a new one) a raw 0.25 is a sure negative
# at a threshold of 0.6 and a positive at 0.11. Analysis.suspicion and live.js work it out alike.
SUSPICION = Case(
    When(
        probability_parasitized__gte=_THRESHOLD,
        then=Coalesce((F("probability_parasitized") - _THRESHOLD) / NullIf(Value(1.0) - _THRESHOLD, Value(0.0)), 0.0),
    ),
    default=(F("probability_parasitized") - _THRESHOLD) / NullIf(_THRESHOLD, Value(0.0)),
    output_field=models.FloatField(),
)


# A call is borderline when its score lies within BORDERLINE_CONFIDENCE of the room between the
# threshold and the end of the scale on its side (ml.metrics.borderline_band; 0.055 to 0.555 for
# the shipped model's 0.11): on its validation patients, 4 % of the cells, holding half of its
# errors (ml/MODEL_CARD.md).
def is_borderline(path: str = "") -> models.Q:
    """Analysis.is_borderline as a query, through ``path`` ("analyses__" from batches)."""
    threshold = Coalesce(F(f"{path}decision_threshold"), Value(0.5))
    confidence = settings.BORDERLINE_CONFIDENCE
    return models.Q(
        **{
            f"{path}status": "done",
            f"{path}probability_parasitized__gte": threshold * Value(1 - confidence),
            f"{path}probability_parasitized__lt": threshold + (Value(1.0) - threshold) * Value(confidence),
        }
    )


class Analysis(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    class Label(models.TextChoices):
        PARASITIZED = "Parasitized", "Parasitized"
        UNINFECTED = "Uninfected", "Uninfected"

    class Verdict(models.TextChoices):
        AGREE = "agree", "Agree"
        DISAGREE = "disagree", "Disagree"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="analyses")
    batch = models.ForeignKey(Batch, null=True, blank=True, on_delete=models.CASCADE, related_name="analyses")
    image = models.ImageField(storage=private_storage, upload_to=upload_path)
    thumbnail = models.ImageField(storage=private_storage, upload_to="thumbnails/", blank=True)
    overlay = models.ImageField(storage=private_storage, upload_to="overlays/", blank=True)
    original_filename = models.CharField(max_length=255)
    width = models.PositiveIntegerField(null=True)
    height = models.PositiveIntegerField(null=True)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    label = models.CharField(max_length=12, choices=Label.choices, blank=True, db_index=True)
    probability_parasitized = models.FloatField(null=True, blank=True)
    # The model's operating point: at or above it the cell is labelled Parasitized.
    decision_threshold = models.FloatField(null=True, blank=True)
    model_version = models.CharField(max_length=100, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Celery task id that claimed the analysis; lets that task (and only it) resume after a retry.
    claimed_by_task = models.CharField(max_length=64, blank=True)
    # That task's retry count when it claimed: the same task claiming again with a higher count is
    # retrying after an error; with the same count, its message was redelivered because its worker died.
    claimed_at_retry = models.PositiveSmallIntegerField(default=0)
    inference_ms = models.FloatField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True, db_index=True)  # the last day's work (operations)

    review_verdict = models.CharField(max_length=10, choices=Verdict.choices, blank=True)
    corrected_label = models.CharField(max_length=12, choices=Label.choices, blank=True)
    review_note = models.TextField(blank=True)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="reviews"
    )
    # Who signed the review, as they were named then: kept when their account is removed.
    reviewer_name = models.CharField(max_length=150, blank=True)
    reviewed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "analyses"
        permissions = [("review_analysis", "Can review any user's analyses")]
        indexes = [
            models.Index(fields=["owner", "-created_at"]),
            # The review queue's order and its list of disagreements, each a small part of the table.
            models.Index(
                REVIEW_CONFIDENCE,
                "created_at",
                condition=models.Q(status="done", review_verdict=""),
                name="review_queue",
            ),
            models.Index(F("reviewed_at").desc(), condition=models.Q(review_verdict="disagree"), name="disagreements"),
            # A reviewer's latest reviews, beside the queue: 20 of them, not all they ever gave, sorted.
            models.Index(F("reviewed_by"), F("reviewed_at").desc(), name="reviews_by_reviewer"),
            # The nightly sweep for files no cell names looks each name up: without these, a full
            # scan per 1,000 files, on the worker that classifies cells.
            models.Index(fields=["image"], name="analysis_by_image"),
            models.Index(fields=["thumbnail"], name="analysis_by_thumbnail"),
            models.Index(fields=["overlay"], name="analysis_by_overlay"),
        ]

    def __str__(self) -> str:
        return f"Analysis {self.pk}"  # no file name, as Batch.__str__

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.DONE, self.Status.FAILED)

    @property
    def final_label(self) -> str:
        """The reviewer's corrected label where there is one, else the model's."""
        return self.corrected_label or self.label

    @property
    def is_borderline(self) -> bool:
        """A finished call whose score is close to its threshold, where half or more of the model's
        errors are: to be confirmed by microscopy before anything else."""
        if self.status != self.Status.DONE or self.probability_parasitized is None:
            return False
        threshold = 0.5 if self.decision_threshold is None else self.decision_threshold
        low, high = borderline_band(threshold=threshold, confidence=settings.BORDERLINE_CONFIDENCE)
        return low <= self.probability_parasitized < high

    @property
    def suspicion(self) -> float | None:
        """SUSPICION, for the pages' data-score (live.js keeps their order with it)."""
        if self.probability_parasitized is None:
            return None
        threshold = 0.5 if self.decision_threshold is None else self.decision_threshold
        score = self.probability_parasitized
        if score >= threshold:
            return (score - threshold) / (1 - threshold) if threshold < 1 else 0.0
        return (score - threshold) / threshold

    @property
    def reviewer(self) -> str:
        """Who reviewed it ("" if no one): the name they signed with, even once their account is gone."""
        return self.reviewer_name or (self.reviewed_by.get_username() if self.reviewed_by else "")

    @property
    def duration_ms(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds() * 1000
        return None


class AccessEvent(models.Model):
    """One opening, download, export, upload, review or deletion of patient data: who, what, when, from where.

    Subjects are plain ids, not foreign keys, so the trail outlives the records it is about; the
    user name is copied for the same reason. Rows are only ever added (see diagnosis.audit).
    """

    class Action(models.TextChoices):
        UPLOADED = "uploaded", "uploaded"
        VIEWED = "viewed", "viewed"
        DOWNLOADED = "downloaded", "downloaded"
        EXPORTED = "exported", "exported"
        REVIEWED = "reviewed", "reviewed"
        DELETED = "deleted", "deleted"

    class Channel(models.TextChoices):
        WEB = "web", "web"
        API = "api", "API"
        ADMIN = "admin", "admin"
        COMMAND = "cli", "server command"

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    # No constraint and nothing done on the user's removal: the entries keep their user's id as
    # written (an update of every entry of theirs would rewrite the trail, and take minutes).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=10, choices=Action.choices)
    channel = models.CharField(max_length=5, choices=Channel.choices)
    analysis_id = models.PositiveIntegerField(null=True, blank=True, db_index=True)
    batch_id = models.PositiveIntegerField(null=True, blank=True, db_index=True)
    owner_id = models.PositiveIntegerField(null=True, blank=True, help_text="owner of the record at the time")
    detail = models.CharField(max_length=200, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        # What the admin's search looks entries up by (AccessEventAdmin.get_search_results).
        indexes = [
            models.Index(fields=["username", "-at"], name="access_by_username"),
            models.Index(fields=["client_ip", "-at"], name="access_by_client_ip"),
            models.Index(fields=["owner_id", "-at"], name="access_by_owner"),
        ]

    def __str__(self) -> str:
        # The entry's admin page shows no other time: in the site's zone, as the list beside it.
        return f"{self.username} {self.action} at {timezone.localtime(self.at):%Y-%m-%d %H:%M:%S}"


class ApiToken(models.Model):
    """A user's API key, kept only as its SHA-256 digest: a copy of the database holds no working key.

    The key itself is shown once, when it is issued (diagnosis.tokens). A plain hash is enough
    because keys are 160 random bits, not passwords a dictionary could guess.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_token")
    digest = models.CharField(max_length=64, unique=True)
    hint = models.CharField(max_length=4, help_text="the key's last four characters, to tell keys apart")
    created = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"key …{self.hint} of {self.user}"
