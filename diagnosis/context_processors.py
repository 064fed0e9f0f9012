from django.conf import settings

from diagnosis.selectors import can_review


def roles(request):
    return {"is_reviewer": can_review(user=request.user) if hasattr(request, "user") else False}


def idle_sign_out(request):
    """How long without activity a sign-in lasts (0: for ever), for idle.js."""
    return {"idle_sign_out_seconds": settings.SESSION_IDLE_MINUTES * 60}
