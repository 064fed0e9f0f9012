from django.apps import AppConfig


class DiagnosisConfig(AppConfig):
    name = "diagnosis"
    verbose_name = "Malaria diagnosis"

    def ready(self) -> None:
        from diagnosis import checks, id_counters, signals  # noqa: F401 - registers the checks, connects the receivers
