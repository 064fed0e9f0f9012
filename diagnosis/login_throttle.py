"""Sign-in with a limit on failed attempts per client address and username (brute-force guard)."""

from django.conf import settings
from django.contrib.auth.views import LoginView
from django.core.cache import cache


def _key(request, username: str) -> str:
    address = request.META.get(settings.CLIENT_IP_HEADER) or request.META.get("REMOTE_ADDR", "unknown")
    return f"login-failures:{address}:{username.strip().lower()[:150]}"


class ThrottledLoginView(LoginView):
    def post(self, request, *args, **kwargs):
        key = _key(request, request.POST.get("username", ""))
        if cache.get(key, 0) >= settings.LOGIN_MAX_FAILURES:
            form = self.get_form()
            minutes = settings.LOGIN_LOCKOUT_SECONDS // 60
            form.add_error(None, f"Too many failed sign-in attempts. Try again in {minutes} minutes.")
            return self.render_to_response(self.get_context_data(form=form), status=429)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        key = _key(self.request, self.request.POST.get("username", ""))
        cache.add(key, 0, timeout=settings.LOGIN_LOCKOUT_SECONDS)
        cache.incr(key)
        return super().form_invalid(form)

    def form_valid(self, form):
        cache.delete(_key(self.request, self.request.POST.get("username", "")))
        return super().form_valid(form)
