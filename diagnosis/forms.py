import secrets
from datetime import UTC, datetime

from django import forms

from diagnosis.models import NOTE_MAX_LENGTH, Analysis
from diagnosis.selectors import AnalysisFilters
from diagnosis.text import composed, plain_line


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleImageField(forms.FileField):
    """Accepts many files; each is validated by the upload service, not here."""

    widget = MultipleFileInput

    def __init__(self, **kwargs):
        # An empty file too: the service names it among every other refused file, where this field
        # stopped at the first, and a file input cannot be refilled for the next bad one.
        super().__init__(allow_empty_file=True, **kwargs)

    def clean(self, data, initial=None):
        files = data if isinstance(data, list | tuple) else [data] if data else []
        if not files:
            raise forms.ValidationError("Choose at least one image.")
        cleaned = []
        for file in files:
            try:
                cleaned.append(super().clean(file, initial))
            except forms.ValidationError as error:  # e.g. an empty file: say which one of the selection
                raise forms.ValidationError(f"{file.name}: {' '.join(error.messages)}") from error
        return cleaned


# A workstation is shared: its browser must not offer the next user the patient references typed
# before (autofill keeps what a field was given, past sign-out).
NOT_REMEMBERED = {"autocomplete": "off"}


class NoteField(forms.CharField):
    """Free text whose line breaks count as one character each, as the textarea's maxlength counts
    them: the browser sends each as CR LF, which would count as two and refuse a note it allowed."""

    def __init__(self, **kwargs):
        widget = forms.Textarea(attrs={"rows": 2, **NOT_REMEMBERED})
        super().__init__(widget=widget, required=False, max_length=NOTE_MAX_LENGTH, **kwargs)

    def to_python(self, value):
        return composed(super().to_python(value).replace("\r\n", "\n").replace("\r", "\n"))


class PlainLineField(forms.CharField):
    """One line, composed and without invisible characters (diagnosis.text) before its length is
    checked: composing lengthens some letters, and the column's limit would fail with a 500."""

    def to_python(self, value):
        return plain_line(super().to_python(value))


class UploadForm(forms.Form):
    images = MultipleImageField(
        label="Cell images",
        help_text="Colour PNG, JPEG, TIFF or BMP; one segmented cell per image.",
        widget=MultipleFileInput(attrs={"accept": "image/png,image/jpeg,image/tiff,image/bmp", "multiple": True}),
    )
    sample_reference = PlainLineField(
        max_length=100,
        required=False,
        label="Patient / sample reference",
        widget=forms.TextInput(attrs=NOT_REMEMBERED),
    )
    note = NoteField()
    # A new one each time the page is drawn: the same form sent twice (a double click without
    # JavaScript, or sent again after its answer was lost) makes one batch (services.create_batch_once).
    upload_id = forms.CharField(
        required=False, max_length=43, widget=forms.HiddenInput, initial=lambda: secrets.token_urlsafe(24)
    )


class FilterForm(forms.Form):
    search = forms.CharField(required=False, label="Search", widget=forms.TextInput(attrs=NOT_REMEMBERED))
    status = forms.ChoiceField(choices=[("", "Any status"), *Analysis.Status.choices], required=False)
    label = forms.ChoiceField(choices=[("", "Any label"), *Analysis.Label.choices], required=False)
    reviewed = forms.ChoiceField(
        choices=[("", "Reviewed or not"), ("yes", "Reviewed"), ("no", "Not reviewed")], required=False
    )
    call = forms.ChoiceField(choices=[("", "Every call"), ("borderline", "Borderline only")], required=False)
    date_from = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}), label="From")
    date_to = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}), label="To")
    sort = forms.ChoiceField(choices=AnalysisFilters.SORTS.items(), required=False)

    @property
    def reversed_dates(self) -> bool:
        """Both dates valid and To before From: applied as given, so nothing matches, and said so."""
        self.is_valid()  # cleans once; cleaned_data then holds the fields that validated
        data = getattr(self, "cleaned_data", {})
        return bool(data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"])

    def to_filters(self) -> AnalysisFilters:
        """The query's filters; invalid values (a bad date, an unknown choice) are ignored, the rest apply."""
        self.is_valid()
        data = self.cleaned_data  # holds only the fields that validated
        return AnalysisFilters(
            status=data.get("status") or "",
            label=data.get("label") or "",
            search=(data.get("search") or "").strip(),
            reviewed=data.get("reviewed") or "",
            borderline=True if data.get("call") == "borderline" else None,
            date_from=str(data.get("date_from") or ""),
            date_to=str(data.get("date_to") or ""),
            sort=data.get("sort") or "-created_at",
        )


class ReviewTimeField(forms.DateTimeField):
    """When the case was last reviewed as the reviewer opened it (empty: no review yet), so a review
    saved elsewhere meanwhile is not replaced unseen. It round-trips exactly: ISO 8601 keeps the
    microseconds and the UTC offset (Django's own rendering drops the offset, which makes an hour a
    year ambiguous)."""

    widget = forms.HiddenInput

    def to_python(self, value):
        moment = super().to_python(value)
        try:
            moment and moment.astimezone(UTC)  # as the database compares it
        except OverflowError:  # an offset at the end of the calendar: not a time this form gave
            raise forms.ValidationError("This is not the review time the page gave: open the case again.") from None
        return moment

    def prepare_value(self, value):
        return value.isoformat() if isinstance(value, datetime) else value


def show_review_time(form: forms.BaseForm, reviewed_at: datetime | None) -> None:
    """After a conflict the form carries the review that got there first: saving again replaces it."""
    form.data = form.data.copy()
    form.data[form.add_prefix("replacing")] = form.fields["replacing"].prepare_value(reviewed_at)


class ReviewForm(forms.Form):
    verdict = forms.ChoiceField(choices=Analysis.Verdict.choices, widget=forms.RadioSelect)
    replacing = ReviewTimeField(required=False)
    corrected_label = forms.ChoiceField(choices=[("", "—"), *Analysis.Label.choices], required=False)
    note = NoteField()
