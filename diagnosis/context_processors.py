from diagnosis.selectors import can_review


def roles(request):
    return {"is_reviewer": can_review(request.user) if hasattr(request, "user") else False}
