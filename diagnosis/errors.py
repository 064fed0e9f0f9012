"""Requests Django refuses to read (too many files or fields, form fields too large) get a message
that says which limit they broke, on the site and in the API alike, instead of a bare 400; and the
API's errors that never reach DRF (no such path, a crash) are JSON like its others, not HTML pages."""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import JsonResponse
from django.shortcuts import render
from django.views import defaults


def unreadable_request_message(exception: Exception) -> str | None:
    if isinstance(exception, TooManyFilesSent):
        return f"A batch holds at most {settings.BATCH_MAX_FILES} images; this request sent more."
    if isinstance(exception, TooManyFieldsSent):
        return f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} form fields."
    if isinstance(exception, RequestDataTooBig):
        return (
            f"The request's form fields (everything but the image files) exceed "
            f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
        )
    return None


def _for_api(request) -> bool:
    return request.path.startswith("/api/")


def bad_request(request, exception):
    message = unreadable_request_message(exception) or "The request could not be read."
    if _for_api(request):
        return JsonResponse({"detail": message}, status=400)
    return render(request, "400.html", {"message": message}, status=400)


def not_found(request, exception):
    if _for_api(request):
        return api_not_found()
    return defaults.page_not_found(request, exception)


def api_not_found() -> JsonResponse:
    return JsonResponse({"detail": "There is no such resource: see /api/docs/ for the API's paths."}, status=404)


def server_error(request):
    if _for_api(request):
        return JsonResponse({"detail": "The server failed on this request; it has been logged."}, status=500)
    return defaults.server_error(request)
