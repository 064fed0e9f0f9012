from django import template

register = template.Library()


@register.filter
def middle_truncate(name: str, length: int) -> str:
    """``name`` in at most ``length`` characters, cut in the middle: the cells of one slide share a
    long prefix (``C100P61ThinF_IMG_20150918_…``) and differ at the end (``…_cell_162.png``)."""
    if len(name) <= length:
        return name
    tail = (length - 1) * 3 // 4
    return f"{name[: length - 1 - tail]}…{name[-tail:]}"
