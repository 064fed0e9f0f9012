from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler

from diagnosis.errors import unreadable_request_message
from diagnosis.services import StorageFailed


def api_exception_handler(exc, context):
    """DRF's handler, plus a one-line ``detail`` on field errors so every 4xx carries a message."""
    if (message := unreadable_request_message(exc)) is not None:  # DRF would leave these to Django's bare 400
        return Response({"detail": message}, status=400)
    if isinstance(exc, StorageFailed):  # the server's fault, not the request's: 507 Insufficient Storage
        return Response({"detail": f"{exc} Nothing was stored."}, status=507)
    response = exception_handler(exc, context)
    if response is not None and isinstance(response.data, dict) and "detail" not in response.data:
        response.data["detail"] = "; ".join(_field_messages(response.data))
    return response


def _field_messages(errors, prefix: str = "") -> list[str]:
    """One line per field, nested ones named by path: ``{"images": {1: ["Not a file."]}}`` gives
    ``["images[1]: Not a file."]``."""
    if isinstance(errors, dict):
        return [
            message
            for key, value in errors.items()
            for message in _field_messages(value, f"{prefix}[{key}]" if prefix else str(key))
        ]
    if isinstance(errors, list) and any(isinstance(item, dict | list) for item in errors):
        return [message for index, item in enumerate(errors) for message in _field_messages(item, f"{prefix}[{index}]")]
    messages = errors if isinstance(errors, list) else [errors]
    text = " ".join(str(message) for message in messages)
    # A refusal of the whole request (a wrong password) is about no field: DRF's key is no word for it.
    return [text if prefix == api_settings.NON_FIELD_ERRORS_KEY else f"{prefix}: {text}"]
