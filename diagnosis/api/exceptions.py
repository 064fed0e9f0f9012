from rest_framework.views import exception_handler


def api_exception_handler(exc, context):
    """DRF's handler, plus a one-line ``detail`` on field errors so every 4xx carries a message."""
    response = exception_handler(exc, context)
    if response is not None and isinstance(response.data, dict) and "detail" not in response.data:
        parts = []
        for field, errors in response.data.items():
            messages = errors if isinstance(errors, list) else [errors]
            parts.append(f"{field}: " + " ".join(str(m) for m in messages))
        response.data["detail"] = "; ".join(parts)
    return response
