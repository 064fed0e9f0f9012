"""How the API picks what to answer in."""

from django.conf import settings
from django.http import Http404
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BrowsableAPIRenderer


class JsonUnlessSignedInBrowser(DefaultContentNegotiation):
    """JSON for every client but a browser signed in to the site, which may browse the API: a lab
    system whose HTTP library asks for text/html first (java.net.HttpURLConnection does) got the
    browsable API's HTML page, its batch stored and the answer unreadable to it."""

    def select_renderer(self, request, renderers, format_suffix=None):
        if "HTTP_AUTHORIZATION" in request.META or settings.SESSION_COOKIE_NAME not in request.COOKIES:
            renderers = [renderer for renderer in renderers if not isinstance(renderer, BrowsableAPIRenderer)]
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except Http404:  # DRF's answer to ?format=xml: read as "no such record" of one that exists
            asked = request.query_params.get("format", format_suffix)
            raise NotAcceptable(f"There is no answer in the format {asked!r}: leave ?format out.") from None
