from django.apps import AppConfig


class DiagnosisConfig(AppConfig):
    name = "diagnosis"
    verbose_name = "Malaria diagnosis"

    def ready(self) -> None:
        from diagnosis import signals  # noqa: F401 - connects the receivers
