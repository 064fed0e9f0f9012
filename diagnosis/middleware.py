from django.conf import settings
from django.http import JsonResponse


class RequestSizeLimitMiddleware:
    """Refuse bodies over REQUEST_MAX_BYTES from Content-Length, before anything reads them."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.REQUEST_MAX_BYTES
        if length > limit:
            message = f"The request is too large ({length} bytes); the limit is {limit} bytes."
            return JsonResponse({"detail": message}, status=413)
        return self.get_response(request)
