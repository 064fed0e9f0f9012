from collections.abc import Collection, Mapping

from django.core.exceptions import ValidationError
from django.db.models import prefetch_related_objects
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, Throttled
from rest_framework.exceptions import ValidationError as ApiValidationError
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from diagnosis import callbacks, login_throttle, selectors, services, tokens
from diagnosis.api.parsers import UploadParser
from diagnosis.api.serializers import (
    AnalysisListQuerySerializer,
    AnalysisSerializer,
    AnalysisUploadSerializer,
    BatchSerializer,
    BatchUploadSerializer,
    OperationsStatusSerializer,
    SignInSerializer,
)
from diagnosis.api.throttling import ScopedRateThrottle
from diagnosis.audit import counted, deletion_recorder, record_access, record_list_read
from diagnosis.files import FILE_TYPES, protected_file_response
from diagnosis.models import AccessEvent, Analysis, Batch
from diagnosis.text import plain_line


def errors(*codes: int, answers_json: bool = True) -> dict:
    """Error responses for extend_schema: each is ``{"detail": "..."}`` (400s may add per-field lists).
    Every operation may answer 400 (a NUL character in any query is refused) and 429 (every request
    counts against API_USER_RATE); one that answers JSON also 406, to an Accept or ?format without it."""
    listed = sorted({*codes, 400, 429, *([406] if answers_json else [])})
    return {code: OpenApiResponse(ErrorSerializer, description=ERROR_MEANINGS[code]) for code in listed}


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="what is wrong, in a sentence")


ERROR_MEANINGS = {
    400: "the request or one of its files is refused, saying why (field errors are listed by field too)",
    401: "no valid token or session",
    403: "the account may not use this endpoint (staff only)",
    404: "no such record among the requesting user's (on a list: no such page)",
    406: "the Accept header or ?format asks for another type than JSON, the only one this operation answers",
    409: "not in a state that allows it",
    413: "the request is larger than the server takes",
    415: "the body is not of a type this operation reads (uploads: multipart/form-data)",
    422: "the Idempotency-Key was used for a different request",
    429: "rate limited or locked out; Retry-After says for how many seconds",
    507: "the server's storage is full or cannot be written: nothing was stored",
}


class TokenView(APIView):
    """Exchange username and password for an API token (send as `Authorization: Token <key>`).

    A user has one token at a time. POST issues a new key, which replaces the previous one: only a
    digest of each key is stored, so a key is shown once, in this response, and never again. It works
    until `expires_at` (API_TOKEN_DAYS after it was issued). DELETE revokes the token the request is
    signed with, for a lab system being retired or a key that leaked.
    """

    parser_classes = [FormParser, MultiPartParser, JSONParser]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "login"

    def get_permissions(self):
        return [IsAuthenticated()] if self.request.method == "DELETE" else []

    def get_authenticators(self):
        # A POST signs in with a password: an expired key the client still sends must not block it.
        posting = getattr(self.request, "method", None) == "POST"  # no request yet while the schema is built
        return [] if posting else super().get_authenticators()

    @extend_schema(
        request=SignInSerializer,
        responses={
            200: inline_serializer(
                "IssuedToken",
                {"token": serializers.CharField(), "expires_at": serializers.DateTimeField(allow_null=True)},
            ),
            **errors(400, 415),
        },
    )
    def post(self, request, *args, **kwargs):
        username = str(request.data.get("username", "")) if isinstance(request.data, Mapping) else ""
        if not login_throttle.admit(request, username):
            wait = login_throttle.seconds_locked(request, username)
            raise Throttled(wait=wait, detail=login_throttle.lockout_message(wait))
        serializer = SignInSerializer(data=request.data, context={"request": request})
        if not serializer.is_valid():
            if not _wrong_credentials(serializer):  # missing ones, or no form at all; wrong ones stay counted
                login_throttle.not_a_guess(request, username)
            raise ApiValidationError(serializer.errors)
        login_throttle.signed_in(request, username)
        token, key = tokens.new_token(user=serializer.validated_data["user"])
        # The key itself, shown this once: no cache on the way may keep a copy.
        expires_at = tokens.expires_at(token)
        return Response(
            # In the time zone every other time of the API is written in (DRF's field; JSON's would be UTC).
            {"token": key, "expires_at": expires_at and serializers.DateTimeField().to_representation(expires_at)},
            headers={"Cache-Control": "no-store"},
        )

    @extend_schema(
        request=None,
        responses={204: None, **errors(401)},
        summary="Revoke the token this request is signed with",
        description="For a lab system being retired, or a key that leaked: the key stops working at once.",
    )
    def delete(self, request):
        tokens.revoke_token(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class Unprocessable(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "unprocessable"


def _idempotency_key(request) -> str:
    """The request's key, "" for none; a header sent empty is refused, not taken for no key (a retry
    of the request would then make a second batch)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ""
    if not (0 < len(key) <= 100 and key.isascii() and key.isprintable() and " " not in key):
        raise ApiValidationError({"detail": "An Idempotency-Key is 1 to 100 printable ASCII characters, no spaces."})
    return key


def _refuse_unknown_parameters(request, known: set[str]) -> None:
    """A misspelt filter (``?batch_id=4``) must not be ignored into a list of every cell of the account,
    nor a filter given twice be read as its last value, nor an empty one (a lab system's unset
    variable: ``?batch=``) as no filter at all."""
    if unknown := sorted(set(request.query_params) - known - {"page", "format"}):  # DRF's own ?format=json
        takes = ", ".join(sorted(known | {"page"}))
        raise ApiValidationError({"detail": f"Unknown query parameter: {', '.join(unknown)}. This list takes {takes}."})
    _refuse_repeated(request.query_params, "query parameter")
    query = request.query_params
    # Empty as the lookups read it: a zero-width space alone listed every record, unfiltered.
    if empty := sorted(name for name in known if name in query and not plain_line(query[name])):
        raise ApiValidationError(
            {"detail": f"{', '.join(empty)} is empty: give a value, or leave the parameter out to list every one."}
        )


def _refuse_unexpected_fields(request, *, takes: list[str], files: str, repeatable: str = "") -> None:
    """An upload's misspelt field (``sample_ref``), a field sent in the query string or twice, or a
    file under a name it does not take would otherwise be dropped unseen: the batch stored without
    its patient's reference or its callback, or without that file."""
    # A part with an empty file name (a form's file field left empty) or none arrives among the
    # fields (request.POST: request.data has the files too, or is a plain dict for an empty body),
    # which come before the files: its position among them cannot be told.
    if request.POST.getlist(files):
        raise ApiValidationError(
            {
                "detail": f"A part named {files} is not a file (its file name is empty or missing): "
                "choose one or leave it out."
            }
        )
    if query := set(request.query_params) - {"format"}:  # DRF's own ?format=json
        raise ApiValidationError(
            {
                "detail": f"This POST takes no query parameters (got {', '.join(sorted(query))}): "
                "send its fields in the multipart body."
            }
        )
    if unknown := sorted(set(request.data) - set(takes) - {"csrfmiddlewaretoken"}):  # a browser's session form
        raise ApiValidationError(
            {"detail": f"Unknown field: {', '.join(unknown)}. This POST takes {', '.join(takes)}."}
        )
    _refuse_repeated(request.data, "field", but={repeatable, "csrfmiddlewaretoken"})


def _refuse_repeated(values, noun: str, *, but: Collection[str] = ()) -> None:
    if repeated := sorted(key for key in values if key not in but and len(values.getlist(key)) > 1):
        raise ApiValidationError({"detail": f"The {noun} {', '.join(repeated)} was sent more than once; send it once."})


class FileNegotiation(BaseContentNegotiation):
    """A file goes out whatever type the client asks for (``Accept: image/png``, ``image/*``): DRF
    would refuse any but JSON with a 406. An error about it is still rendered as JSON."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def _service_errors(error: ValidationError) -> ApiValidationError:
    return ApiValidationError({"detail": " ".join(error.messages), "errors": error.messages})


def _record_page(view: viewsets.GenericViewSet, noun: str) -> None:
    """The page a list answered, in the access trail."""
    page = view.paginator.page
    record_list_read(request=view.request, records=list(page.object_list), noun=noun, page=page.number)


def _wrong_credentials(serializer: SignInSerializer) -> bool:
    """A password was checked, and refused (not a field left out, nor a body that is no form)."""
    refusals = serializer.errors.get("non_field_errors", [])
    return serializer.errors.keys() == {"non_field_errors"} and any(r.code == "authorization" for r in refusals)


class _OptionsDescribeTheUpload:
    # OPTIONS describes what a POST takes, not what it answers: the upload's fields on a list, none
    # on a record's retry actions. (A comment: drf-spectacular would publish a docstring here as the
    # description of every operation of the viewsets.)

    upload_serializer_class: type

    def get_serializer_class(self):
        if self.action == "metadata" and self.request.method == "POST":
            return serializers.Serializer if self.detail else self.upload_serializer_class
        return super().get_serializer_class()


class AnalysisViewSet(
    _OptionsDescribeTheUpload,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = AnalysisSerializer
    upload_serializer_class = AnalysisUploadSerializer
    parser_classes = [UploadParser]
    lookup_value_regex = "[0-9]+"

    def get_queryset(self):
        filters = selectors.AnalysisFilters()
        if self.action == "list":  # the list's filters only: a cell's own URL finds it whatever they say
            query = AnalysisListQuerySerializer(data=self.request.query_params)
            query.is_valid(raise_exception=True)
            filters = selectors.AnalysisFilters(**query.validated_data)
            # Another user's batch answers as one that does not exist: an empty list would say it has no cells.
            yours = selectors.batches_for(user=self.request.user)
            if filters.batch is not None and not yours.filter(pk=filters.batch).exists():
                raise NotFound(f"No batch #{filters.batch} among yours: GET /api/batches/ lists them.")
        return selectors.analyses_for(user=self.request.user, filters=filters)

    @extend_schema(
        parameters=[
            OpenApiParameter("status", enum=Analysis.Status.values),
            OpenApiParameter(
                "label",
                enum=Analysis.Label.values,
                description="The final label: the reviewer's where a reviewer corrected the model.",
            ),
            OpenApiParameter(
                "batch", int, description="only the cells of this batch, one of yours (another's, or none: 404)"
            ),
            OpenApiParameter(
                "borderline",
                bool,
                description="true: only the calls to confirm first; false: every other cell (as `borderline` reads)",
            ),
        ],
        responses={200: AnalysisSerializer(many=True), **errors(400, 401, 404)},
    )
    def list(self, request, *args, **kwargs):
        """Your cells, newest first, a page at a time; filter by status, final label, batch or borderline."""
        _refuse_unknown_parameters(request, {"status", "label", "batch", "borderline"})
        response = super().list(request, *args, **kwargs)
        _record_page(self, "cell")
        return response

    @extend_schema(
        request=AnalysisUploadSerializer, responses={202: AnalysisSerializer, **errors(400, 401, 413, 415, 507)}
    )
    def create(self, request):
        """Upload one cell image: 202 with the queued analysis, which the worker classifies (poll it)."""
        if "Idempotency-Key" in request.headers:  # ignored, it would make a second analysis unseen
            raise ApiValidationError(
                {"detail": "An Idempotency-Key is taken by POST /api/batches/ only: send the image as a batch of one."}
            )
        # One image per POST: a second `image` part would be dropped (POST /api/batches/ takes several).
        _refuse_unexpected_fields(request, takes=["image"], files="image")
        upload = AnalysisUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        try:
            analysis = services.create_analysis(
                owner=request.user,
                upload=upload.validated_data["image"],
                record=lambda analysis: record_access(
                    request=request, action=AccessEvent.Action.UPLOADED, analysis=analysis, detail="1 image"
                ),
            )
        except ValidationError as error:
            raise _service_errors(error) from None
        return Response(self.get_serializer(analysis).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={200: AnalysisSerializer, **errors(401, 404)})
    def retrieve(self, request, *args, **kwargs):
        """One of your cells: its status, label, probability, threshold, model version and review."""
        analysis = self.get_object()
        record_access(request=request, action=AccessEvent.Action.VIEWED, analysis=analysis)
        return Response(self.get_serializer(analysis).data)

    def perform_destroy(self, instance):
        """204: the analysis, its image and its heatmap are gone for good."""
        services.delete_analysis(analysis=instance, record=deletion_recorder(request=self.request))

    @extend_schema(responses={204: None, **errors(401, 404)})
    def destroy(self, request, *args, **kwargs):
        """Delete one of your cells, its image and heatmap, for good (its lab system is sent the batch again)."""
        return super().destroy(request, *args, **kwargs)

    @extend_schema(request=None, responses={202: AnalysisSerializer, **errors(401, 404, 409)})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        """Send a failed analysis to the worker again (409 unless it failed)."""
        analysis = self.get_object()
        if not services.retry_failed_analyses(analyses=Analysis.objects.filter(pk=analysis.pk)):
            raise Conflict(f"Only a failed analysis can be tried again; this one is {analysis.get_status_display()}.")
        # The answer is the whole record, as a GET's: recorded as one, or a key could read through it unseen.
        record_access(request=request, action=AccessEvent.Action.VIEWED, analysis=analysis, detail="retry answer")
        return Response(self.get_serializer(self.get_object()).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        operation_id="analyses_file_retrieve",
        description="The uploaded image as kept: a PNG of its picture as the model read it (EXIF orientation "
        "applied, colours in sRGB, without the file's metadata; images stored before 2026-12-02 are as sent, "
        "PNG, JPEG, TIFF or BMP), or the heatmap overlay (PNG).",
        responses={
            **{(200, media_type): OpenApiTypes.BINARY for media_type in FILE_TYPES},
            **errors(401, 404, answers_json=False),  # a file goes out whatever the Accept header says
        },
    )
    @action(
        detail=True,
        methods=["get"],
        url_path=r"(?P<kind>(?:image|overlay))",  # grouped: the schema's pattern is ^...$ around it
        url_name="file",
        content_negotiation_class=FileNegotiation,
    )
    def file(self, request, pk=None, kind="image"):
        analysis = selectors.get_analysis(user=request.user, pk=pk)
        response = protected_file_response(getattr(analysis, kind), download_stem=f"{kind}-{analysis.pk}")
        record_access(request=request, action=AccessEvent.Action.DOWNLOADED, analysis=analysis, detail=kind)
        return response  # recorded once there is a file to send: a 404 disclosed nothing


class BatchViewSet(
    _OptionsDescribeTheUpload,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = BatchSerializer
    upload_serializer_class = BatchUploadSerializer
    parser_classes = [UploadParser]
    lookup_value_regex = "[0-9]+"

    def get_queryset(self):
        if self.action == "list":  # counted a page at a time, in list()
            reference = self.request.query_params.get("sample_reference", "")
            return selectors.batches_matching(user=self.request.user, sample_reference=reference)
        return selectors.batches_with_counts(user=self.request.user).prefetch_related("analyses")

    @extend_schema(
        parameters=[OpenApiParameter("sample_reference", description="only batches with this reference (any case)")],
        responses={200: BatchSerializer(many=True), **errors(400, 401, 404)},
    )
    def list(self, request, *args, **kwargs):
        """Your batches, newest first, with their counts and cells; ?sample_reference= finds a sample's."""
        _refuse_unknown_parameters(request, {"sample_reference"})
        batches = selectors.with_counts(batches=self.paginate_queryset(self.get_queryset()))
        prefetch_related_objects(batches, "analyses")
        response = self.get_paginated_response(self.get_serializer(batches, many=True).data)
        _record_page(self, "batch")
        return response

    @extend_schema(
        request=BatchUploadSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                location=OpenApiParameter.HEADER,
                description="any unique string (1 to 100 printable ASCII characters, no spaces, e.g. a UUID): "
                "the same request sent again under it, after a lost response, gets the first one's batch back "
                "(200); an empty one is refused (400)",
            ),
            OpenApiParameter(
                "Idempotent-Replayed",
                location=OpenApiParameter.HEADER,
                enum=["true"],
                response=[200],
                description="set on the answer to a request sent again",
            ),
        ],
        responses={
            202: BatchSerializer,
            200: OpenApiResponse(
                BatchSerializer, description="a request sent again under its Idempotency-Key: the first one's batch"
            ),
            **errors(400, 401, 413, 415, 422, 507),
        },
    )
    def create(self, request):
        """Upload a sample's cell images as one batch (repeat `images`): 202 with its cells in the order sent."""
        _refuse_unexpected_fields(
            request, takes=["images", "sample_reference", "note", "callback_url"], files="images", repeatable="images"
        )
        upload = BatchUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        detail = counted(len(data["images"]), "image")
        request_fields = {
            "owner": request.user,
            "uploads": data["images"],
            "sample_reference": data.get("sample_reference", ""),
            "note": data.get("note", ""),
            "callback_url": data.get("callback_url", ""),
            "record": lambda batch: record_access(
                request=request, action=AccessEvent.Action.UPLOADED, batch=batch, detail=detail
            ),
        }
        key = _idempotency_key(request)
        try:
            if key:
                batch, created = services.create_batch_once(idempotency_key=key, **request_fields)
            else:
                batch, created = services.create_batch(**request_fields), True
        except services.KeyReused as refusal:
            raise Unprocessable(" ".join(refusal.messages)) from None
        except ValidationError as error:
            raise _service_errors(error) from None
        batch = selectors.batches_with_counts(user=request.user).prefetch_related("analyses").get(pk=batch.pk)
        if created:
            return Response(self.get_serializer(batch).data, status=status.HTTP_202_ACCEPTED)
        record_access(request=request, action=AccessEvent.Action.VIEWED, batch=batch, detail="replayed request")
        return Response(self.get_serializer(batch).data, headers={"Idempotent-Replayed": "true"})

    @extend_schema(request=None, responses={202: BatchSerializer, **errors(401, 404, 409)})
    @action(detail=True, methods=["post"], url_path="retry-failed", url_name="retry-failed")
    def retry_failed(self, request, pk=None):
        """Send the batch's failed analyses to the worker again (409 unless one failed)."""
        batch = self.get_object()
        if not services.retry_failed_analyses(analyses=batch.analyses.all()):
            raise Conflict("Only failed analyses can be tried again; this batch has none.")
        return self._retry_answer(request)

    @extend_schema(request=None, responses={202: BatchSerializer, **errors(401, 404, 409)})
    @action(detail=True, methods=["post"], url_path="callback/retry", url_name="callback-retry")
    def retry_callback(self, request, pk=None):
        """Try a failed callback again from its first attempt (409 unless it failed)."""
        batch = self.get_object()
        if not callbacks.retry(batch=batch):
            if batch.callback_state == Batch.CallbackState.NONE:
                raise Conflict("Only a failed callback can be retried; this batch has no callback.")
            state = batch.get_callback_state_display()
            raise Conflict(f"Only a failed callback can be retried; this batch's is {state}.")
        return self._retry_answer(request)

    def _retry_answer(self, request) -> Response:
        """The batch as it is now, every result in it, as a GET's answer: recorded as one, or a key
        could read every batch through the retries unseen."""
        batch = self.get_object()
        record_access(request=request, action=AccessEvent.Action.VIEWED, batch=batch, detail="retry answer")
        return Response(self.get_serializer(batch).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={200: BatchSerializer, **errors(401, 404)})
    def retrieve(self, request, *args, **kwargs):
        """One of your batches: its counts, its cells in the order sent, and its callback's state."""
        batch = self.get_object()
        record_access(request=request, action=AccessEvent.Action.VIEWED, batch=batch)
        return Response(self.get_serializer(batch).data)

    @extend_schema(responses={204: None, **errors(401, 404)})
    def destroy(self, request, *args, **kwargs):
        """Delete one of your batches with its cells and files (a lab system sent its results is told)."""
        return super().destroy(request, *args, **kwargs)

    def perform_destroy(self, instance):
        """204: the batch and every analysis in it, files included, are gone for good."""
        services.delete_batch(batch=instance, record=deletion_recorder(request=self.request))


class OperationsStatusView(APIView):
    """Staff only: queue depth and age, the last day's throughput, failures and turnaround, and
    callbacks waiting or failed; counts, no patient data. For a monitoring system's service account."""

    permission_classes = [IsAdminUser]

    @extend_schema(responses={200: OperationsStatusSerializer, **errors(401, 403)})
    def get(self, request):
        return Response(selectors.operations_status())
