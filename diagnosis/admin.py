import ipaddress
from collections.abc import Iterable

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import actions as admin_actions
from django.contrib.admin import helpers
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.db.models.constants import LOOKUP_SEP
from django.http import Http404, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from diagnosis import callbacks, login_throttle, selectors, services, tokens
from diagnosis.audit import counted, deletion_recorder, record_access, record_account_deletion, record_list_read
from diagnosis.exports import csv_download, csv_safe
from diagnosis.forms import NoteField, ReviewTimeField, show_review_time
from diagnosis.models import AccessEvent, Analysis, ApiToken, Batch, is_borderline
from diagnosis.templatetags.scores import score
from diagnosis.text import plain_line

admin.site.login_form = login_throttle.LockoutAdminAuthenticationForm


class ReviewAdminForm(forms.ModelForm):
    # The case's review time as the form was opened: a review saved elsewhere meanwhile is not
    # replaced unseen.
    replacing = ReviewTimeField(required=False)
    review_note = NoteField(label="Review note")  # the site's limit and line breaks: each form takes the other's notes

    class Meta:
        model = Analysis
        fields = ["review_verdict", "corrected_label", "review_note"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial["replacing"] = self.instance.reviewed_at

    def clean(self):
        data = super().clean()
        if "review_verdict" not in self.fields:
            return data  # read-only for this user: nothing of the review can change
        if data.get("review_verdict"):
            services.check_review(
                analysis=self.instance,
                verdict=data["review_verdict"],
                corrected_label=data.get("corrected_label") or "",
            )
            # Locked until the admin's save commits (its change view is one transaction): a colleague's
            # review saved meanwhile waits, then finds this one, instead of slipping in between this
            # check and the save, which could then only fail with a server error.
            current = services.lock_for_review(analysis=self.instance)
            if current is None:  # deleted by its owner since the page was opened
                raise forms.ValidationError("This case was deleted while you had it open: there is nothing to review.")
            if "replacing" in data and data["replacing"] != current.reviewed_at:
                show_review_time(self, current.reviewed_at)
                services.check_not_reviewed_since(analysis_id=self.instance.pk, replacing=data["replacing"])
        elif data.get("corrected_label") or data.get("review_note") or self.instance.review_verdict:
            # Without a verdict nothing would record who changed the final label, or when.
            raise forms.ValidationError("A review needs a verdict: agree or disagree. Reviews are not cleared here.")
        return data


def _image_tag(analysis: Analysis, field: str, size: int, *, kind: str = "") -> str:
    """An <img> of one of the analysis's files (``kind``: the file view's name for it, if not the field's)."""
    if not getattr(analysis, field):
        return "—"
    url = reverse("diagnosis:analysis-file", kwargs={"pk": analysis.pk, "kind": kind or field})
    return format_html(
        '<img src="{}" alt="{} of {}" style="max-width:{}px;max-height:{}px">',
        url,
        field,
        analysis.original_filename,
        size,
        size,
    )


class RecordsDeletions:
    """Deletions here go into the access trail like the owners' own, one entry per record."""

    def delete_recorded(self, request, obj) -> None:
        """Delete ``obj`` and enter its deletion in the access trail."""
        raise NotImplementedError

    # In one transaction with the deletions: one that fails is not recorded as done (Django's delete
    # page has its own, its "Delete selected" action none).
    def delete_model(self, request, obj):
        with transaction.atomic():
            self.delete_recorded(request, obj)

    def batch_ids_of(self, records: list) -> Iterable[int]:
        """The batches deleting these records writes (see services.lock_batches)."""
        raise NotImplementedError

    def delete_queryset(self, request, queryset):
        records = list(queryset)
        with transaction.atomic():
            # All of them first, in id order, as every other writer of several batches takes them:
            # the list's order (newest first) would deadlock against a retry across the same ones.
            services.lock_batches(batch_ids=self.batch_ids_of(records))
            for obj in records:
                try:
                    with transaction.atomic():
                        self.delete_recorded(request, obj)
                except Http404:  # deleted meanwhile, by its owner or another admin: not this action's
                    continue


# The lists' id filters, by the noun their refusal names.
ID_FILTERS = {"batch": "batch", "batch_id": "batch", "analysis_id": "cell", "owner": "user", "owner_id": "user",
              "reviewed_by": "user", "reviewed_by_id": "user", "user": "user", "user_id": "user", "groups": "group",
              "id": "record", "pk": "record"}  # fmt: skip


def _beyond_any_id(value: str) -> bool:
    try:
        return abs(int(value)) > 2**63 - 1  # int() takes "+9...", " 9..." too
    except ValueError:  # not a number: Django's own lookup check answers it
        return False


class HidesFields:
    """Fields no page shows, kept from the list's query string too: Django takes a lookup on any of
    the model's own fields there, and which records a guess like ?callback_url__contains=key=s3
    lists would read the field back, a character at a time."""

    hidden_fields: tuple[str, ...] = ()

    def lookup_allowed(self, lookup, value, request=None):
        field = lookup.split(LOOKUP_SEP)[0]
        return field not in self.hidden_fields and super().lookup_allowed(lookup, value, request)


class ChecksIdFilters:
    """A list's id filter (?batch=, ?owner=, ?user=, ?groups=, ...) edited past a 64-bit integer is
    answered that there is no such record: SQLite cannot compare it (a 500), and no record has it."""

    def changelist_view(self, request, extra_context=None):
        for key, value in request.GET.items():
            noun = ID_FILTERS.get(key.split("__")[0])
            if noun and any(_beyond_any_id(one) for one in value.split(",")):  # __in lists too
                self.message_user(request, f"There is no {noun} #{value.strip()[:30]}.", level=messages.ERROR)
                return HttpResponseRedirect(request.path)
        return super().changelist_view(request, extra_context)


def _is_id(value: str) -> bool:
    return value.isascii() and value.isdigit() and int(value) <= 2**63 - 1


class ChecksSelections:
    """An action's ticked rows come as ids, filtered by unchecked: one that is no id (a stale or
    scripted form's "abc", "1.5", a number past 64 bits) was a 500 (ValueError, or OverflowError on
    SQLite). The action is refused instead, as Django refuses one with nothing selected."""

    def response_action(self, request, queryset):
        if all(map(_is_id, request.POST.getlist(helpers.ACTION_CHECKBOX_NAME))):
            return super().response_action(request, queryset)
        self.message_user(request, "Nothing was done: the selection held something that is no id.", messages.ERROR)
        return None


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip())
    except ValueError:
        return False
    return True


class PatientRecordAdmin(ChecksIdFilters, ChecksSelections, RecordsDeletions, admin.ModelAdmin):
    """Cells and batches: made by uploads, never here; each opening of one enters the access trail.

    Seen only by the `reviewers` group (staff in it), as on the site: the permission that shows every
    user's cells there shows them here, and their images with them. Staff outside it see none, whatever
    model permissions they hold; deleting still needs Django's delete permission as well.
    """

    class Media:
        js = ["js/admin_search.js"]

    # "Show counts" counts each filter's records over the whole table (13 more queries a page, about
    # a second at 30,000 cells), as the lists are kept from doing.
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request):
        return False

    def has_view_permission(self, request, obj=None):
        return selectors.can_review(user=request.user)

    def has_change_permission(self, request, obj=None):
        return selectors.can_review(user=request.user) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return selectors.can_review(user=request.user) and super().has_delete_permission(request, obj)

    def delete_recorded(self, request, obj) -> None:
        # As the owners' deletions: a lab system that was sent the results is told they are withdrawn.
        record = deletion_recorder(request=request)
        if isinstance(obj, Batch):
            services.delete_batch(batch=obj, record=record)
        else:
            services.delete_analysis(analysis=obj, record=record)

    def get_search_results(self, request, queryset, search_term):
        # Django's autocomplete endpoint runs this search for any reviewer (no page here uses it),
        # across every user's records, and would leave no trace of it: the lists' searches do.
        if request.resolver_match and request.resolver_match.url_name == "autocomplete":
            return queryset.none(), False
        # As the site stores references and file names (composed, no invisible characters): a
        # "Müller" pasted from a Mac's file name, "u" and a combining mark, found nothing.
        return super().get_search_results(request, queryset, plain_line(search_term))

    def get_deleted_objects(self, objs, request):
        """What deleting these takes with it, counted: Django's page would link every cell."""
        deleted, counts, needed, protected = super().get_deleted_objects(objs, request)
        if self.model is Batch:
            batches = list(objs)
            cells = Analysis.objects.filter(batch__in=batches).count()
            deleted = [format_html("{} and {} (their images, thumbnails and heatmaps)", counted(len(batches), "batch"),
                                   counted(cells, "cell"))]  # fmt: skip
        return deleted, counts, needed, protected

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", None) and response.context_data.get("cl")
        if changelist is not None:  # a page was shown, not a refusal or the redirect after an action
            # A search by sample reference lists a patient's batches across every user: a trace, as
            # an API list leaves one.
            noun = "batch" if self.model is Batch else "cell"
            records = list(changelist.result_list)
            record_list_read(request=request, records=records, noun=noun, page=changelist.page_num, own=False)
        return response

    def change_view(self, request, object_id, form_url="", extra_context=None):
        record = self.get_object(request, object_id) if request.method == "GET" else None
        # get_object checks no permission: a refused opening (403) opened nothing, so records nothing.
        if record is not None and self.has_view_or_change_permission(request, record):
            self.record_viewing(request, record)
        return super().change_view(request, object_id, form_url, extra_context)

    def record_viewing(self, request, record) -> None:
        subject = {"batch": record} if isinstance(record, Batch) else {"analysis": record}
        record_access(request=request, action=AccessEvent.Action.VIEWED, **subject)


class OwnersWithRecords(admin.RelatedFieldListFilter):
    """The owners of records of the list's kind only: a reviewer may not list the accounts
    (superusers and service accounts included), and an owner filter of every user would name them
    all. Asked user by user (EXISTS on the owner index), not as Django's RelatedOnlyFieldListFilter
    does, with a DISTINCT over every cell ever uploaded on each page (55 ms at 300,000 cells)."""

    def field_choices(self, field, request, model_admin):
        records = field.model._base_manager.filter(**{field.name: OuterRef("pk")})  # a withdrawn batch's too
        owners = field.remote_field.model._default_manager.filter(Exists(records)).values("pk")
        ordering = self.field_admin_ordering(field, request, model_admin)
        return field.get_choices(include_blank=False, limit_choices_to={"pk__in": owners}, ordering=ordering)


OWNERS_WITH_RECORDS = ("owner", OwnersWithRecords)


class FinalLabelFilter(admin.SimpleListFilter):
    title = "label (a reviewer's correction, else the model's)"
    parameter_name = "final_label"

    def lookups(self, request, model_admin):
        return Analysis.Label.choices

    def queryset(self, request, queryset):
        if self.value() in Analysis.Label.values:
            return queryset.filter(selectors.final_label_is(self.value()))
        return queryset


class ModelLabelFilter(admin.ChoicesFieldListFilter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.title = "label the model gave"  # beside the label shown, which may be a reviewer's


class _YesNoFilter(admin.SimpleListFilter):
    """The records that meet ``condition`` (yes), or those that do not (no)."""

    answers: tuple[str, str]

    def condition(self) -> Q:
        raise NotImplementedError

    def lookups(self, request, model_admin):
        return [("yes", self.answers[0]), ("no", self.answers[1])]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(self.condition())
        if self.value() == "no":
            return queryset.exclude(self.condition())
        return queryset


class ReviewedFilter(_YesNoFilter):
    title = "reviewed"
    parameter_name = "reviewed"
    answers = ("Reviewed", "Not reviewed")

    def condition(self):
        return ~Q(review_verdict="")


class BorderlineFilter(_YesNoFilter):
    title = "borderline (confirm first)"
    parameter_name = "borderline"
    answers = ("Borderline", "Not borderline")

    def condition(self):
        return is_borderline()


def _batch_cells_link(batch: Batch) -> str:
    url = reverse("admin:diagnosis_analysis_changelist") + f"?batch={batch.pk}"
    reference = f"{batch.sample_reference}, " if batch.sample_reference else ""
    return format_html('<a href="{}">{} ({}{})</a>', url, batch, reference, counted(batch.analyses.count(), "cell"))


@admin.register(Analysis)
class AnalysisAdmin(PatientRecordAdmin):
    def batch_ids_of(self, records):
        return [cell.batch_id for cell in records]

    form = ReviewAdminForm
    actions = ["retry_failed"]
    list_display = [
        "id",
        "thumb",
        "original_filename",
        "sample",
        "owner",
        "status",
        "final_label",
        "probability",
        "borderline",
        "model_version",
        "reviewed",
        "created_at",
    ]
    list_filter = [
        "status",
        FinalLabelFilter,
        ("label", ModelLabelFilter),
        BorderlineFilter,
        ReviewedFilter,
        "review_verdict",
        OWNERS_WITH_RECORDS,
        "created_at",
    ]
    search_fields = ["original_filename", "owner__username", "batch__sample_reference", "model_version"]
    # No date_hierarchy (the created_at filter dates the list) and no count of every cell beside the
    # filtered count: each ran the search's unindexed scans again, 0.6-1 s a page at 115,000 cells.
    show_full_result_count = False
    list_select_related = ["owner", "batch"]
    fieldsets = [
        ("Images", {"fields": [("original_image", "overlay_image")]}),
        (
            "Prediction",
            {
                "fields": [
                    "owner",
                    "batch_cells",
                    "original_filename",
                    ("width", "height"),
                    "status",
                    "label",
                    "probability",
                    "decision_threshold",
                    "borderline",
                    "model_version",
                    "error",
                    "attempts",
                    "model_time",
                    ("created_at", "started_at", "finished_at"),
                ]
            },
        ),
        (
            "Review",
            {
                "fields": [
                    "review_verdict",
                    "corrected_label",
                    "review_note",
                    ("reviewed_by", "reviewer_name"),
                    "reviewed_at",
                    "replacing",
                ]
            },
        ),
    ]
    # Everything but the reviewer's own fields is the model's record and stays as the worker wrote it.
    readonly_fields = [
        name for name in flatten_fieldsets(fieldsets) if name not in [*ReviewAdminForm.Meta.fields, "replacing"]
    ]

    def has_change_permission(self, request, obj=None):
        return selectors.can_review(user=request.user)  # reviewing is the one change made here

    @admin.display(description="Image")
    def thumb(self, obj):
        return _image_tag(obj, "thumbnail", 48)

    @admin.display(description="Original")
    def original_image(self, obj):
        return _image_tag(obj, "image", 320, kind="picture")  # a TIFF drawn as a PNG

    @admin.display(description="Grad-CAM overlay")
    def overlay_image(self, obj):
        return _image_tag(obj, "overlay", 320)

    @admin.display(description="P(parasitized)", ordering="probability_parasitized")
    def probability(self, obj):
        return score(obj.probability_parasitized)

    @admin.display(description="Borderline", boolean=True)
    def borderline(self, obj):
        # As the pages mark it: a score close to its threshold, where most of the model's errors are.
        return obj.is_borderline

    @admin.display(description="Sample", ordering="batch__sample_reference")
    def sample(self, obj):
        if not obj.batch_id:
            return "single upload"
        return f"#{obj.batch_id} {obj.batch.sample_reference}".strip()

    @admin.display(description="Model time per image")
    def model_time(self, obj):
        return f"{obj.inference_ms:.1f} ms" if obj.inference_ms is not None else "—"

    @admin.display(description="Label")
    def final_label(self, obj):
        # The label the cell shows everywhere else: a reviewer's correction marked as one.
        return f"{obj.final_label} (corrected)" if obj.corrected_label else obj.label

    @admin.display(description="Batch")
    def batch_cells(self, obj):
        return _batch_cells_link(obj.batch) if obj.batch_id else "—"

    @admin.display(description="Reviewed", boolean=True, ordering="reviewed_at")
    def reviewed(self, obj):
        return bool(obj.review_verdict)

    def get_readonly_fields(self, request, obj=None):
        if selectors.can_review(user=request.user):
            return self.readonly_fields
        # Only the `reviewers` group records verdicts ("replacing" is the form's, and hidden).
        return [name for name in flatten_fieldsets(self.fieldsets) if name != "replacing"]

    def has_retry_permission(self, request) -> bool:
        # Reviewing is the change a reviewer makes; analysing someone's cells again (their results
        # reset, their lab system sent them again) takes Django's change permission as well.
        return selectors.can_review(user=request.user) and request.user.has_perm("diagnosis.change_analysis")

    @admin.action(description="Analyse the selected failed analyses again", permissions=["retry"])
    def retry_failed(self, request, queryset):
        retried = services.retry_failed_analyses(analyses=queryset)
        self.message_user(request, f"{len(retried)} failed analyses queued again; the others were left alone.")

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        if not data.get("review_verdict") or not form.has_changed():
            return  # saved as it was (the review fields are the only editable ones): nobody reviewed anything
        saved = Analysis.objects.get(pk=obj.pk)
        services.review_analysis(
            analysis=saved,
            reviewer=request.user,
            verdict=data["review_verdict"],
            corrected_label=data.get("corrected_label") or "",
            note=data.get("review_note") or "",
            replacing=data["replacing"],
        )
        record_access(request=request, action=AccessEvent.Action.REVIEWED, analysis=obj, detail=data["review_verdict"])


class WithdrawnFilter(_YesNoFilter):
    title = "deleted, lab system to be told"
    parameter_name = "withdrawn"
    answers = ("yes", "no")

    def condition(self):
        return Q(withdrawn_at__isnull=False)


@admin.register(Batch)
class BatchAdmin(HidesFields, PatientRecordAdmin):
    actions = ["delete_selected", "retry_callbacks"]  # Django's delete_selected, replaced
    # The callback URL may carry credentials (only its host is shown); the lab system's
    # Idempotency-Key and its request's digest are shown nowhere either.
    hidden_fields = ("callback_url", "idempotency_key", "request_digest")

    def batch_ids_of(self, records):
        return [batch.pk for batch in records]

    def has_delete_permission(self, request, obj=None):
        # Deleted by its owner, the lab system not yet told: without this row it never would be, and
        # would keep the results. One given up on (failed) may go.
        if obj is not None and obj.withdrawn_at and obj.callback_state == Batch.CallbackState.PENDING:
            return False
        return super().has_delete_permission(request, obj)

    @admin.action(description=admin_actions.delete_selected.short_description, permissions=["delete"])
    def delete_selected(self, request, queryset):
        """Django's, leaving out the withdrawals still to be delivered (which it would refuse the whole
        selection for, saying the account may not delete batches)."""
        pending = Q(withdrawn_at__isnull=False, callback_state=Batch.CallbackState.PENDING)
        if left_out := queryset.filter(pending).count():
            self.message_user(
                request,
                f"Left out: {counted(left_out, 'batch')} deleted by the owner whose lab system is still to be "
                "told; each goes once that is delivered.",
                messages.WARNING,
            )
        deletable = queryset.exclude(pending)
        return admin_actions.delete_selected(self, request, deletable) if deletable.exists() else None

    @admin.action(description="Retry failed callbacks of the selected batches", permissions=["change"])
    def retry_callbacks(self, request, queryset):
        retried = sum(callbacks.retry(batch=batch) for batch in queryset)
        self.message_user(request, f"{retried} failed callback(s) will be tried again.")

    list_display = ["id", "owner", "sample_reference", "created_at", "callback_state", "withdrawn_at"]
    list_select_related = ["owner"]  # a nullable key, which Django's own select_related leaves out
    list_filter = ["callback_state", WithdrawnFilter, OWNERS_WITH_RECORDS, "created_at"]

    def get_queryset(self, request):
        # Deleted batches waiting to tell their lab system too: a failed withdrawal is retried here.
        return Batch.with_withdrawn.all()

    search_fields = ["sample_reference", "owner__username"]
    # All read-only: a sample reference ties results to a patient and is the owner's record; the
    # callback URL may carry credentials, so only its host is shown.
    fields = readonly_fields = [
        "owner",
        "cells",
        "sample_reference",
        "note",
        "created_at",
        "callback_host",
        "callback_state",
        "callback_attempts",
        "callback_due_at",
        "callback_error",
        "callback_first_sent_at",
        "callback_delivered_at",
        "withdrawn_at",
    ]

    @admin.display(description="Cells")
    def cells(self, obj):
        return _batch_cells_link(obj)


ACCESS_TRAIL_COLUMNS = [
    "at",
    "username",
    "action",
    "channel",
    "analysis_id",
    "batch_id",
    "owner_id",
    "detail",
    "client_ip",
]


@admin.register(AccessEvent)
class AccessEventAdmin(ChecksIdFilters, ChecksSelections, admin.ModelAdmin):
    """The access trail, read-only for everyone: no one adds, edits or removes entries here."""

    class Media:
        js = ["js/admin_search.js"]

    list_display = ACCESS_TRAIL_COLUMNS
    list_filter = ["action", "channel", "at"]
    search_fields = ["username"]  # shows the search box; get_search_results does the searching
    search_help_text = "An id (of a cell, a batch or an owner), a client address, or an exact user name."
    # The trail grows by millions of entries a year: no year-by-year navigation and no second
    # count of the whole table on every page, each of which reads all of it.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ["export_csv"]

    def changelist_view(self, request, extra_context=None):
        # ?client_ip= edited by hand: PostgreSQL refuses to compare text that is no address (a 500).
        for key, value in request.GET.items():
            field, _, lookup = key.partition("__")
            addresses = value.split(",") if lookup == "in" else [value]  # a plain ?client_ip=a,b is one text
            if field == "client_ip" and lookup != "isnull" and not all(map(_is_address, addresses)):
                self.message_user(request, f"{value.strip()[:50]!r} is no client address.", level=messages.ERROR)
                return HttpResponseRedirect(request.path)
        return super().changelist_view(request, extra_context)

    def get_search_results(self, request, queryset, search_term):
        """One term, looked up exactly by an index. Django's own search would compare every entry's
        ids as text and usernames as substrings: 47 s over ten million entries."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.isascii() and term.isdigit():
            if int(term) >= 2**31:  # no id is that large, and PostgreSQL would refuse the comparison
                return queryset.none(), False
            number = int(term)
            return queryset.filter(Q(analysis_id=number) | Q(batch_id=number) | Q(owner_id=number)), False
        try:
            address = str(ipaddress.ip_address(term))
        except ValueError:
            return queryset.filter(username=term), False
        return queryset.filter(client_ip=address), False

    @admin.action(description="Export selected entries as CSV")
    def export_csv(self, request, queryset):
        rows = (
            [
                timezone.localtime(event.at).isoformat(),
                *(csv_safe(getattr(event, name)) for name in ACCESS_TRAIL_COLUMNS[1:]),
            ]
            for event in queryset.order_by("at", "id").iterator(chunk_size=2000)
        )
        return csv_download(header=ACCESS_TRAIL_COLUMNS, rows=rows, filename="access-trail.csv")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(HidesFields, ChecksIdFilters, ChecksSelections, admin.ModelAdmin):
    """Who holds an API key and when it was last used; an admin can revoke one (delete) but never read it."""

    hidden_fields = ("digest",)  # the key's hash, kept back as the key is

    list_display = ["user", "hint", "created", "expires", "last_used_at"]
    search_fields = ["user__username"]
    fields = ["user", "hint", "created", "expires", "last_used_at"]
    readonly_fields = fields

    @admin.display(description="Expires")
    def expires(self, token):
        end = tokens.expires_at(token)
        if end is None:
            return "never"
        day = f"{timezone.localtime(end):%Y-%m-%d}"  # the site's day, as on the user's own API-token page
        return f"expired {day}" if tokens.token_expired(token) else day

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


admin.site.unregister(get_user_model())
admin.site.unregister(Group)


@admin.register(Group)
class CheckedGroupAdmin(ChecksIdFilters, ChecksSelections, GroupAdmin):
    """Django's, its id filters and Delete selected checked as the other lists'."""


def _privileged(user) -> bool:
    """An account with more access than a clinician's: to the admin, or to every user's cells. A
    deactivated reviewer is one too (has_perm says no while inactive): set a password and ticked
    Active, it is a reviewer again."""
    return user.is_superuser or user.is_staff or selectors.holds_review_permission(user=user)


@admin.register(get_user_model())
class RecordedUserAdmin(ChecksIdFilters, ChecksSelections, RecordsDeletions, UserAdmin):
    """Django's user admin; deleting an account records the patient data that goes with it."""

    actions = ["clear_sign_in_lockout"]

    def delete_recorded(self, request, obj) -> None:
        record_account_deletion(request=request, user=obj)
        obj.delete()

    def batch_ids_of(self, records):
        return Batch.with_withdrawn.filter(owner__in=records).values_list("pk", flat=True)

    # change_user is what lifting a lockout needs: with it, a help desk's account could otherwise make
    # itself a superuser or a reviewer, or set a reviewer's password and sign in as them.
    PRIVILEGES = ("is_superuser", "is_staff", "groups", "user_permissions")

    def get_readonly_fields(self, request, obj=None):
        fields = super().get_readonly_fields(request, obj)
        return fields if request.user.is_superuser else (*fields, *self.PRIVILEGES)

    def has_change_permission(self, request, obj=None):
        if obj is not None and not request.user.is_superuser and _privileged(obj):
            return False  # its password, its name, its access: a superuser's to change
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and not request.user.is_superuser and _privileged(obj):
            return False
        return super().has_delete_permission(request, obj)

    @admin.action(description="Clear the selected users' sign-in lockouts", permissions=["change"])
    def clear_sign_in_lockout(self, request, queryset):
        users = list(queryset)
        # Else a help desk could keep lifting a superuser's lockout, and turn it off for that account.
        passed_over = [] if request.user.is_superuser else [user for user in users if _privileged(user)]
        if passed_over:
            users = [user for user in users if user not in passed_over]
            self.message_user(
                request,
                f"Not cleared for {', '.join(user.get_username() for user in passed_over)}: a staff, reviewer "
                "or superuser account's lockout is a superuser's to clear.",
                messages.WARNING,
            )
        for user in users:
            login_throttle.forgive(user.get_username())
            self.log_change(request, user, "Cleared the sign-in lockout.")
        self.message_user(
            request,
            f"Sign-in lockouts cleared for {counted(len(users), 'user')}. An address locked out for "
            "guessing at many names stays locked until its count expires (LOGIN_LOCKOUT_SECONDS), or until "
            "manage.py clear_address_lockout ADDRESS clears it.",
        )

    def get_deleted_objects(self, objs, request):
        """What deleting these accounts takes with it, counted rather than listed: Django's page would
        name every cell, which for a lab system's account is a page of hundreds of megabytes. Counted
        in one query for the whole selection, however many accounts it holds."""
        users = selectors.accounts_with_their_records(users=objs)
        batches = sum(user.batch_count for user in users)
        cells = sum(user.cell_count for user in users)
        summary = [
            format_html(
                "{}: {} and {} (their images, thumbnails and heatmaps), and the API key; the reviews they "
                "signed keep their name, and batches whose results a lab system was sent are withdrawn there",
                user.get_username(),
                counted(user.batch_count, "batch"),
                counted(user.cell_count, "cell"),
            )
            for user in users
        ]
        counts = {self.model._meta.verbose_name_plural: len(users), "batches": batches, "cells": cells}
        # As for deleting the cells themselves: other users' records are a reviewer's to delete.
        reviewer = selectors.can_review(user=request.user)
        needed = {
            model._meta.verbose_name
            for model, count in ((Batch, batches), (Analysis, cells))
            if count and not (reviewer and request.user.has_perm(f"diagnosis.delete_{model._meta.model_name}"))
        }
        privileged = (user.is_superuser or user.is_staff or user.holds_review for user in users)  # as _privileged
        if not request.user.is_superuser and any(privileged):  # the list's action too
            needed.add("staff, reviewer or superuser account")
        # Django deletes an account's admin history with it: the only record of who granted a role,
        # set a password or cleared a lockout. Such an account is deactivated instead.
        keeps_history = [
            format_html(
                "{}: the admin history of their {} (who granted which rights, set which password, cleared "
                "which lockout) would go with it; deactivate the account instead (untick Active)",
                user.get_username(),
                counted(user.admin_changes, "change"),
            )
            for user in users
            if user.admin_changes
        ]
        return summary, counts, needed, keeps_history
