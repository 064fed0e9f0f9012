from django.conf import settings
from django.http import JsonResponse
from django.utils.cache import patch_cache_control


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


class NoStoreWhenSignedInMiddleware:
    """Pages for a signed-in user hold patient data, and workstations are shared: after sign-out,
    the browser's Back button must not bring the last user's pages back from its cache."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and not response.has_header("Cache-Control"):
            patch_cache_control(response, private=True, no_store=True)
        return response
