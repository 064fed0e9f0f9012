import importlib
import io

import factory
from django.apps import apps
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image, ImageDraw

PASSWORD = "correct-horse-battery-staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password(PASSWORD)


def reviewers_group() -> Group:
    """The `reviewers` group. A data migration makes it, and a transactional test's flush takes it
    away: the migration's own function makes it again where it is gone (it changes nothing else)."""
    importlib.import_module("diagnosis.migrations.0002_reviewers_group").create_reviewers_group(apps, None)
    return Group.objects.get(name="reviewers")


def add_to_reviewers(user):
    user.groups.add(reviewers_group())
    return user


def make_reviewer(**fields):
    """A user (of UserFactory, with ``fields``) in the `reviewers` group."""
    return add_to_reviewers(UserFactory(**fields))


def image_bytes(size=(120, 110), color=(180, 90, 120), fmt="PNG", mode="RGB") -> bytes:
    """A cell as the NIH crops show one: a disc of ``color`` on black (a blank picture is refused)."""
    image = Image.new(mode, size, 0)
    width, height = size
    ImageDraw.Draw(image).ellipse(
        [width // 8, height // 8, width - 1 - width // 8, height - 1 - height // 8],
        fill=color if mode == "RGB" else 128,
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def upload(name="cell.png", content: bytes | None = None, content_type="image/png") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, image_bytes() if content is None else content, content_type=content_type)


def api_key(user) -> str:
    """A working API key for user (issuing it replaces any key the user had)."""
    from diagnosis.tokens import new_token

    return new_token(user=user)[1]


def classified(analysis, **fields):
    """The analysis as the worker leaves it: done, Parasitized at 0.91 under threshold 0.37 (or ``fields``)."""
    from diagnosis.models import Analysis

    result = {
        "status": "done",
        "label": "Parasitized",
        "probability_parasitized": 0.91,
        "decision_threshold": 0.37,
        "model_version": "test-model",
    }
    Analysis.objects.filter(pk=analysis.pk).update(**result | fields)
    return Analysis.objects.get(pk=analysis.pk)
