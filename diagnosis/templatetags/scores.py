import math

from django import template

register = template.Library()


@register.filter
def score(probability: float | None) -> str:
    """A model score to three decimals, rounded down: rounded to nearest, a 0.1096 that a threshold
    of 0.11 labelled Uninfected would read 0.110 beside "threshold 0.11". (static/js/live.js agrees.)"""
    if probability is None:
        return "—"
    return f"{math.floor(probability * 1000 + 1e-9) / 1000:.3f}"
