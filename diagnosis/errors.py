"""Requests Django refuses to read (too many files or fields, form fields too large) get a message
that says which limit they broke, on the site and in the API alike, instead of a bare 400."""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.shortcuts import render


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


def bad_request(request, exception):
    message = unreadable_request_message(exception) or "The request could not be read."
    return render(request, "400.html", {"message": message}, status=400)
